"""LDS of ways to combine the members' gradient scores, from the features a results file keeps.

    python -m benchmarks.studies.study_gradient_combinations --checkpoint demo/ensemble.pt \\
        --results demo/results.h5 --references refs.pt [--rows 128]

The results file must hold ``/statistics/features_{dtrak,trak}[_train]`` (``ensattr attribute
--method dtrak,trak``) and ``--references`` the reference models of ``ensattr lds`` (same
halves and seeds). Prints one LDS (with its 95% interval) per combination and feature kind.
"""

from __future__ import annotations

import argparse

import h5py
import torch

from ensattr_fast.attribution import member_losses
from ensattr_fast.attribution.gradients import combine, member_scores
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.evaluation.lds import reference_subsets
from ensattr_fast.evaluation.metrics import lds
from ensattr_fast.training.checkpoint import Checkpoint


def _standardised(m: torch.Tensor) -> torch.Tensor:
    return (m - m.mean(-1, keepdim=True)) / m.std(-1, keepdim=True)


def combinations(scores: torch.Tensor, code: torch.Tensor) -> dict:
    mean, contrast = combine(scores, code, "mean"), combine(scores, code, "contrast")
    return {
        "mean over members": mean,
        "mean of per-member standardised scores": _standardised(scores).mean(0),
        "includers' mean": combine(scores, code, "includers"),
        "excluders' mean": combine(scores, code, "includers") - contrast,
        "includers minus excluders (contrast)": contrast,
        **{f"mean {lam:+} x contrast": mean + lam * contrast for lam in (0.25, -0.25, 1.0, -1.0)},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_gradient_combinations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--references", required=True)
    p.add_argument("--halves", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--draws", type=int, default=256)
    args = p.parse_args(argv)

    checkpoint = Checkpoint.load(args.checkpoint)
    code, unit_of, n_units = checkpoint.code, checkpoint.unit_of, len(checkpoint.code)
    with h5py.File(args.results, "r") as f:
        queries = torch.from_numpy(f["samples/images"][: args.rows])
        scores = {kind: member_scores(torch.from_numpy(f[f"statistics/features_{kind}_train"][()]),
                                      torch.from_numpy(f[f"statistics/features_{kind}"][: args.rows]),
                                      unit_of, n_units)
                  for kind in ("dtrak", "trak") if f"statistics/features_{kind}" in f}
    subsets = reference_subsets(n_units, args.halves, seed=checkpoint.config["train"]["seed"] + 1).numpy()
    references = Checkpoint.load(args.references)
    losses = member_losses(references.build(), NoiseSchedule(tuple(references.config["schedule"]["betas"])),
                           queries, draws=args.draws, seed=12345)
    losses = losses.view(len(queries), args.halves, args.seeds).mean(-1).numpy()
    for kind, member in scores.items():
        for name, matrix in combinations(member, code).items():
            row = lds(matrix.numpy(), subsets, losses)
            print(f"{kind:<6} {name:<42} {row['mean']:6.3f}  [{row['low']:.3f}, {row['high']:.3f}]", flush=True)
    if len(scores) == 2:
        both = sum(_standardised(combine(m, code, "mean")) for m in scores.values())
        row = lds(both.numpy(), subsets, losses)
        print(f"{'both':<6} {'standardised D-TRAK mean + TRAK mean':<42} "
              f"{row['mean']:6.3f}  [{row['low']:.3f}, {row['high']:.3f}]")


if __name__ == "__main__":
    main()
