"""What is attributable, by training-set size: the counterfactual-radius curve on nested subsets
of the digits, with the noise floor beside it.

The follow-up to the seed paper found that single samples become unattributable as training
sets grow: removing any one image moves a sample less and less. This study measures that
curve with the package's own exact counterfactuals. For each size n (nested: the first n of one
fixed permutation of the 1,797 digits) an encoded ensemble of the demo's architecture and
training budget (16 MLP members, 3,500 steps) is trained on the n images, one unit per image;
S samples are drawn, every unit is scored by D-TRAK over the members, and each sample's top k
units are ablated exactly, each judged against phantom ablations from the same noise (the noise
floor: removing a random half of no unit's members' views). Per size:

- radius: the largest exact distance among a sample's top-k units (its counterfactual radius),
  mean over samples with its 95% interval;
- floor: the median of each sample's phantom distances, mean over samples;
- radius / floor, the z-score of the largest effect against the sample's phantoms, the share
  of samples whose largest effect passes 95% of its phantoms (unadjusted), and the share the
  package calls significant (q <= 5% over all n units, among which the top units were chosen).

Run: ``python -m benchmarks.studies.benchmark_attributable --out out/attributable``
(``--sizes 256,512,1024,1797 --samples 32``; about 10 minutes per size on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ensattr_fast import Audit
from ensattr_fast.data import load_digits
from ensattr_fast.evaluation.metrics import mean_interval


def run_size(n: int, args, order: torch.Tensor) -> dict:
    """Train (or reuse), sample, attribute and check the ensemble of the first ``n`` images."""
    folder = args.out / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "digits.npy"
    np.save(data, load_digits().images[order[:n]].numpy())
    start = time.perf_counter()
    if (folder / "ensemble.pt").exists():
        audit = Audit.open(folder, progress=False)
    else:
        audit = Audit.create(str(data), members=args.members, workdir=folder, progress=False)
        audit.train(steps=args.steps)
    audit.sample(seeds=args.samples, overwrite=True)
    audit.attribute(methods=["dtrak"], samples=args.samples, check=args.top, overwrite=True)
    return dict(summary(folder / "results.h5", n), seconds=round(time.perf_counter() - start, 1))


def summary(results: Path, n: int) -> dict:
    """The curve's figures from the exact check kept in ``results`` (``/counterfactuals``)."""
    with h5py.File(results, "r") as f:
        cf = {k: f["counterfactuals"][k][()] for k in ("distance", "floor_distance", "pvalue", "zscore",
                                                          "significant")}
    radius = np.nanmax(cf["distance"], axis=1)  # [S]: the largest effect among the top units
    floor = np.nanmedian(cf["floor_distance"], axis=1)  # [S]: the median phantom effect
    return dict(n=n, radius=mean_interval(radius), floor=mean_interval(floor), ratio=mean_interval(radius / floor),
                top_zscore=mean_interval(np.nanmax(cf["zscore"], axis=1)),
                # unadjusted: the sample's largest effect beyond 95% of its own phantoms
                share_p05=float((np.nanmin(cf["pvalue"], axis=1) <= 0.05).mean()),
                # the package's call: q <= 5% over all n units (the top units were chosen among them)
                share_significant=float(cf["significant"].any(axis=1).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/attributable"))
    parser.add_argument("--sizes", default="256,512,1024,1797")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--summary-only", action="store_true", help="only read the curve from earlier runs' files")
    args = parser.parse_args()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    report = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        report[n] = summary(args.out / f"n{n}" / "results.h5", n) if args.summary_only else run_size(n, args, order)
        print(json.dumps(report[n]), flush=True)
        (args.out / "attributable.json").write_text(json.dumps(report, indent=2))
    print(f"{'images':>7} {'radius':>22} {'floor':>22} {'radius/floor':>13} {'top z':>6} {'p<=.05':>7} {'q<=.05':>7}")
    for n, row in report.items():
        r, f = row["radius"], row["floor"]
        print(f"{n:>7} {r['mean']:7.3f} [{r['low']:.3f}, {r['high']:.3f}] {f['mean']:7.3f} [{f['low']:.3f}, "
              f"{f['high']:.3f}] {row['ratio']['mean']:13.2f} {row['top_zscore']['mean']:6.2f} "
              f"{row['share_p05']:7.0%} {row['share_significant']:7.0%}")


if __name__ == "__main__":
    main()
