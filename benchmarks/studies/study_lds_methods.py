"""Which ranking predicts retraining best: LDS of D-TRAK, TRAK, EK-FAC and K-FAC over the
encoded ensemble's members, on one model trained on every unit, and on the equal-compute
ensemble of M such models, with the same queries and the same reference models.

It reads what ``ensattr demo`` and ``ensattr lds`` leave: the ensemble and its samples (``--run``),
the reference models of ``lds`` (``--references``, R halves x seeds) and, beside them, its one
and M full-data models (``<stem>.full.pt``, ``<stem>.full.x<M>.pt``). Every method is scored on
the first ``--queries`` samples and compared (Spearman per query, mean with its 95% interval)
with the references' losses over 256 fixed draws, as ``ensattr lds`` does:

- D-TRAK / TRAK: 10 timesteps, 1,024 dimensions, lambda 1% of the mean diagonal, per model;
- EK-FAC / K-FAC: kronfluence per model (:mod:`ensattr_fast.attribution.curvature`), the
  curvature fitted on the model's own training data, the same 10 draws;
- over several models, the mean of their scores (the ``mean`` combination); over the encoded
  members also the ``includers`` combination.

Run: ``python -m benchmarks.studies.study_lds_methods --run demo --references refs.pt``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ensattr_fast.attribution.baselines import pixel_similarity
from ensattr_fast.attribution.curvature import CurvatureSpec, member_influence
from ensattr_fast.attribution.gradients import FeatureSpec, combine, dataset_features, gradient_features, member_scores
from ensattr_fast.data import load_data
from ensattr_fast.evaluation.lds import Queries, reference_losses, reference_subsets
from ensattr_fast.evaluation.metrics import lds
from ensattr_fast.store import open_results
from ensattr_fast.training import Checkpoint


def per_model_scores(model: Checkpoint, code: torch.Tensor, data, queries, unit_of, kind: str,
                     function: str = "loss") -> torch.Tensor:
    """Each model's scores [M, Q, N] by ``kind`` (dtrak, trak, ekfac, kfac; the curvature methods
    scoring the gradients of ``function``)."""
    ensemble, schedule = model.build(), model.schedule
    if kind in ("dtrak", "trak"):
        spec = FeatureSpec(kind=kind)
        train = dataset_features(ensemble, schedule, data, spec)
        return member_scores(train, gradient_features(ensemble, schedule, queries, spec), unit_of, len(code))
    spec = CurvatureSpec(strategy=kind, function=function)
    return member_influence(ensemble, schedule, data, queries, spec, unit_of, code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="folder with ensemble.pt and results.h5")
    parser.add_argument("--references", type=Path, required=True)
    parser.add_argument("--halves", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--kinds", default="dtrak,trak,ekfac,kfac")
    parser.add_argument("--function", choices=("loss", "dtrak"), default="loss",
                        help="the function whose gradients ekfac/kfac score (dtrak: D-TRAK's output norm)")
    parser.add_argument("--models", default="members,one,many", help="which of the three to score")
    parser.add_argument("--json", type=Path, default=Path("out/lds_methods.json"))
    args = parser.parse_args()

    checkpoint = Checkpoint.load(args.run / "ensemble.pt")
    data, code, unit_of = load_data(checkpoint.data_source), checkpoint.code, checkpoint.unit_of
    N, M = code.shape
    with open_results(args.run / "results.h5") as r:
        queries = torch.from_numpy(r.samples[: args.queries])
    refs = Checkpoint.load(args.references)
    subsets = reference_subsets(N, args.halves, seed=checkpoint.config["train"]["seed"] + 1).numpy()
    losses = reference_losses(refs, Queries("generated", queries, {}), args.halves, args.seeds)
    stem = args.references.with_name(args.references.stem)
    models = {
        "members": (f"over the {M} members", lambda: checkpoint, code),
        "one": ("one full-data model", lambda: Checkpoint.load(f"{stem}.full.pt"), torch.ones(N, 1, dtype=torch.uint8)),
        "many": (f"{M} full-data models", lambda: Checkpoint.load(f"{stem}.full.x{M}.pt"),
                 torch.ones(N, M, dtype=torch.uint8)),
    }
    table, seconds = {}, {}
    for method in args.kinds.split(","):
        kind = method if method in ("dtrak", "trak") or args.function == "loss" else f"{method}[{args.function}]"
        for which in args.models.split(","):
            where, load, model_code = models[which]
            model = load()
            start = time.perf_counter()
            scores = per_model_scores(model, model_code, data, queries, unit_of, method, args.function)
            seconds[f"{kind} {where}"] = round(time.perf_counter() - start, 1)
            table[f"{kind} {where}"] = lds(scores.mean(0).numpy(), subsets, losses)
            if model is checkpoint:
                table[f"{kind}_includers {where}"] = lds(combine(scores, code, "includers").numpy(), subsets, losses)
            print(f"{kind} {where}: {table[f'{kind} {where}']['mean']:.3f} ({seconds[f'{kind} {where}']} s)",
                  flush=True)
    for name, nearest in (("pixel similarity", None), ("pixel 10 nearest", 10)):
        table[name] = lds(pixel_similarity(queries, data, unit_of, N, nearest).numpy(), subsets, losses)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(queries=len(queries), halves=args.halves, seeds=args.seeds, seconds=seconds,
                                         table={k: {x: v[x] for x in ("mean", "low", "high", "n")}
                                                for k, v in table.items()}), indent=2))
    print(f"{'method':<44} {'LDS':>6}  95% interval")
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:<44} {row['mean']:6.3f}  {row['low']:.3f} .. {row['high']:.3f}")


if __name__ == "__main__":
    main()
