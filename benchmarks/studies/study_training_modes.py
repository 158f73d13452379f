"""Which training mode attributes best? The full demo once per mode, then on each: sample
quality, first-order agreement with exact ablation, loss-based self-influence, and the LDS of
every method against one shared set of reference models (R random halves x seeds).

    python -m benchmarks.studies.study_training_modes --out study [--modes ...] [--halves 32 --seeds 2]

Takes about an hour on 2 CPU cores (the reference models dominate); writes study/modes.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ensattr_fast import Audit
from ensattr_fast.attribution import member_losses
from ensattr_fast.cli.main import main as ensattr
from ensattr_fast.data import load_data
from ensattr_fast.ops import code_scores
from ensattr_fast.steps import LdsOptions
from ensattr_fast.store import open_results
from ensattr_fast.training import MODES
from ensattr_fast.training.checkpoint import Checkpoint


def self_influence(checkpoint_path: Path, n: int = 100, draws: int = 64) -> float:
    """Share of n training images whose own unit is in the top 10 of their loss scores."""
    checkpoint = Checkpoint.load(checkpoint_path)
    data = load_data("digits")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:n]
    losses = member_losses(checkpoint.build(), checkpoint.schedule, data.images[idx], draws)
    top = code_scores(checkpoint.code, losses=losses, k=10).top_indices
    return (top == checkpoint.unit_of[idx][:, None]).any(1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_training_modes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("study"))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--halves", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for mode in args.modes:
        run = args.out / mode
        start = time.perf_counter()
        if not (run / "results.h5").exists():
            assert ensattr(["demo", "--out", str(run), "--mode", mode]) == 0
        with open_results(run / "results.h5") as r:
            attrs = r.attrs
        report[mode] = dict(
            demo_seconds=time.perf_counter() - start,
            relative_confident=attrs["quality"]["relative_confident"],
            class_shares=attrs["quality"]["class_shares"],
            agreement=attrs["agreement"],
            self_influence_top10=self_influence(run / "ensemble.pt"),
        )
        print(mode, json.dumps(report[mode]), flush=True)
    for mode in args.modes:
        run = args.out / mode
        table = Audit.open(run).lds(LdsOptions(references=args.out / "references.pt", halves=args.halves,
                                               models_per_half=args.seeds))
        report[mode]["lds"] = {m: {k: v for k, v in row.items() if k != "per_query"} for m, row in table.items()}
        print(mode, "LDS", json.dumps(report[mode]["lds"]), flush=True)
        (args.out / "modes.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
