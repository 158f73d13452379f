"""How often does the estimated copy certificate miss? ``python -m benchmarks.studies.study_certificates``

Runs a short demo (one unit per digit image, 1,797 units, 16 members), whose certificates are
estimates (the code has 1,797 distinct rows, past ``--certify auto``'s 256): exact for each
sample's top units by first order, first order scaled by the largest exact/predicted ratio seen
for the rest. Then every unit is ablated exactly for the first ``--samples`` samples (the
exhaustive certificate), and for each sample: the true maximum, whether the estimate held, and
the share of unchecked units whose exact/first-order ratio exceeds the estimate's scale (the
units the extrapolation would have missed, had one of them been the largest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main as ensattr
from ensattr_fast.steps.attribute import _every_row


def measure(work: Path, samples: int, steps: int) -> dict:
    demo = ["demo", "--out", str(work), "--steps", str(steps), "--samples", "16", "--attribute", str(samples),
            "--per-sample", "8", "--overwrite"]
    assert ensattr(demo) == 0
    audit = ef.Audit.open(work, progress=False)
    with audit.results() as r:
        estimate = r.certificate()
        scores = r.influence("first_order")[:samples, :].astype(np.float64)
        cf = r.counterfactual_arrays(samples, images=False)
    assert not estimate["meta"]["exhaustive"], "the demo's certificate should be an estimate"
    options = ef.AttributeOptions(samples=samples, certify="exhaustive")
    every, first = _every_row(audit.session, options, samples)  # [S, D], a unit of each distinct row
    code = audit.checkpoint.code
    _, inverse = torch.unique(code, dim=0, return_inverse=True)
    exact = every[:, inverse.numpy()]  # [S, N]: every unit's exact distance (one replay per distinct row)
    out = []
    for s in range(samples):
        valid = cf["units"][s] >= 0
        checked, distance = cf["units"][s][valid], cf["distance"][s][valid]
        predicted = scores[s, checked]
        scale = max(1.0, float(np.nanmax(np.where(predicted > 0, distance / predicted, -np.inf))))
        unchecked = np.setdiff1d(np.arange(len(code)), checked)
        ratio = exact[s, unchecked] / np.where(scores[s, unchecked] > 0, scores[s, unchecked], np.nan)
        truth = float(exact[s].max())
        out.append(dict(sample=s, truth=truth, unit=int(exact[s].argmax()), estimate=float(estimate["bound"][s]),
                        held=bool(estimate["bound"][s] >= truth - 1e-6), scale=scale,
                        above_scale=int(np.nansum(ratio > scale)), unchecked=len(unchecked),
                        max_ratio=float(np.nanmax(ratio)), truth_among_checked=bool(exact[s].argmax() in checked)))
    return dict(units=len(code), distinct_rows=int(every.shape[1]), samples=out,
                held=sum(o["held"] for o in out), miss_share=float(np.mean([o["above_scale"] / o["unchecked"]
                                                                             for o in out])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_certificates", description=__doc__)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="training steps of the demo")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="certificates-"))
    try:
        found = measure(work / "demo", args.samples, args.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for o in found["samples"]:
        print(f"sample {o['sample']}: true max {o['truth']:.3f} (unit {o['unit']}), estimate {o['estimate']:.3f} "
              f"({'held' if o['held'] else 'MISSED'}); {o['above_scale']} of {o['unchecked']} unchecked units above "
              f"the scale {o['scale']:.3f} (largest ratio {o['max_ratio']:.2f}); the maximum "
              f"{'was' if o['truth_among_checked'] else 'was not'} among the checked units")
    print(f"{found['held']} of {len(found['samples'])} estimates held; mean share of unchecked units above the scale "
          f"{found['miss_share']:.3f} ({found['distinct_rows']} distinct rows of {found['units']} units)")
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
