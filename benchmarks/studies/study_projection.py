"""The gradient methods at their best (issue 12, item 6): D-TRAK (or TRAK) scores of an ensemble
at several projection dimensions, one projection shared by the members against one per
member, compared with the exact kernel of the full gradients.

    python -m benchmarks.studies.study_projection --checkpoint demo/ensemble.pt --results demo/results.h5 \\
        [--units 128] [--rows 16] [--dims 256,1024,4096,16384] [--references refs.pt]

The training set is cut to the first ``--units`` units (the exact kernel needs its n x n
Grams; the projected methods see the same units), the queries are the first ``--rows``
samples of ``--results``. Each row prints the mean over queries of the Spearman correlation,
over those units, of the members' mean score (the ``dtrak`` method) with the exact kernel's
(or, when the exact kernel is over its budget, with the largest dimension's per-member
scores), and the seconds it took. ``--references`` (the reference models of ``ensattr lds``:
same halves and seeds) adds each variant's LDS over the units kept.
"""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np
import torch

from ensattr_fast.attribution import full_kernel as exact_module
from ensattr_fast.attribution import member_losses
from ensattr_fast.attribution.gradients import FeatureSpec, combine, gradient_features, member_scores
from ensattr_fast.data import load_data
from ensattr_fast.errors import MethodError
from ensattr_fast.evaluation.lds import reference_subsets
from ensattr_fast.evaluation.metrics import lds
from ensattr_fast.training.checkpoint import Checkpoint


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of ``a`` [Q, N] and ``b`` [Q, N]."""
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def projected(ensemble, schedule, train, queries, spec, unit_of, n_units, code) -> torch.Tensor:
    """The members' mean score [Q, N] under the projection of ``spec``."""
    phi = gradient_features(ensemble, schedule, train, spec)
    return combine(member_scores(phi, gradient_features(ensemble, schedule, queries, spec), unit_of, n_units),
                   code, "mean")


def lds_of(references, subsets, queries, matrix, draws, halves, seeds, cache={}) -> str:  # noqa: B006
    """LDS of ``matrix`` [Q, N] over the kept units against the reference models' losses."""
    if "losses" not in cache:
        refs = Checkpoint.load(references)
        losses = member_losses(refs.build(), refs.schedule, queries, draws=draws, seed=12345)
        cache["losses"] = losses.view(len(queries), halves, seeds).mean(-1).numpy()
    row = lds(matrix.numpy(), subsets, cache["losses"])
    return f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--kind", choices=["dtrak", "trak"], default="dtrak")
    p.add_argument("--units", type=int, default=128, help="the first U units are the training set")
    p.add_argument("--rows", type=int, default=16, help="the first Q samples are the queries")
    p.add_argument("--dims", default="256,1024,4096,16384")
    p.add_argument("--exact-budget", type=int, default=exact_module.EXACT_BUDGET, help="bytes for the Grams")
    p.add_argument("--references", default=None, help="reference models of `ensattr lds`: adds the LDS")
    p.add_argument("--halves", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--draws", type=int, default=256)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    checkpoint = Checkpoint.load(args.checkpoint)
    ensemble, schedule = checkpoint.build(), checkpoint.schedule
    keep = checkpoint.unit_of < args.units
    unit_of, code = checkpoint.unit_of[keep], checkpoint.code[: args.units]
    train = load_data(checkpoint.data_source).images[keep]
    with h5py.File(args.results, "r") as f:
        queries = torch.from_numpy(f["samples/images"][: args.rows])
    print(f"{ensemble.n_members} members, P = {exact_module.gradient_size(ensemble):,} parameters each; "
          f"{len(train)} training examples in {args.units} units; {len(queries)} queries", flush=True)

    scores, seconds = {}, {}
    start = time.perf_counter()
    try:
        scores["exact"] = combine(exact_module.exact_member_scores(
            ensemble, schedule, train, queries, FeatureSpec(args.kind, exact=True), unit_of, args.units,
            budget=args.exact_budget), code, "mean")
        seconds["exact"] = time.perf_counter() - start
    except MethodError as error:
        print(f"no exact kernel: {error}")
    for dim in [int(d) for d in args.dims.split(",")]:
        for per_member in (False, True):
            name = (dim, "per member" if per_member else "shared")
            start = time.perf_counter()
            spec = FeatureSpec(args.kind, dim=dim, per_member_projection=per_member)
            scores[name] = projected(ensemble, schedule, train, queries, spec, unit_of, args.units, code)
            seconds[name] = time.perf_counter() - start
            print(f"  {name}: {seconds[name]:.1f} s", flush=True)
    reference = "exact" if "exact" in scores else max(k for k in scores if k[1] == "per member")
    subsets = None
    if args.references:
        seed = checkpoint.config["train"]["seed"] + 1
        subsets = reference_subsets(len(checkpoint.code), args.halves, seed=seed).numpy()[:, : args.units]
    print(f"\n| projection | dim | Spearman vs {reference} | seconds |"
          + (" LDS (kept units) |" if args.references else ""))
    for name, matrix in scores.items():
        label, dim = ("exact kernel", "all") if name == "exact" else (name[1], f"{name[0]:,}")
        row = f"| {label} | {dim} | {spearman(matrix, scores[reference]):.3f} | {seconds[name]:.1f} |"
        if subsets is not None:
            row += f" {lds_of(args.references, subsets, queries, matrix, args.draws, args.halves, args.seeds)} |"
        print(row, flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
