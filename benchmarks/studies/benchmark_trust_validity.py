"""Calibration of the noise floor and the ABC false attribution rate (issue 12, items 4c, 4d).

Calibration, on the plain demo (nothing planted: 16 members, 1,797 single-digit units): the
share of (sample, unit) pairs flagged at FDR 5%, for the exact check (each sample's top-8 units
by first order, against 32 phantom ablations, BH over all 1,797 units) and for first order
(every unit against 1,024 phantom rows). And the null itself: half of each sample's phantom
ablations judged against the other half, where every flag is false by construction. The demo
is read from ``$ENSATTR_DEMO_DIR`` (a finished ``ensattr demo --out DIR``), else run in
``out/trust/demo``.

False attribution (Attribution-Based Counterfactuals protocol) at 256 units: the first 256
digits, one unit each, 16 members, constant weight. A method attributes each sample to its top
unit; that unit is ablated exactly (the sub-ensemble that never saw it, same noise), and the
counterfactual is attributed again by the same method: still the same unit means the method
attributed the sample to data whose removal did not remove the resemblance. Ablating a random
unit instead gives the base rate. Methods: pixel nearest, D-TRAK over the members, and the
loss contrast.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ensattr_fast import codes
from ensattr_fast.attribution import member_losses
from ensattr_fast.attribution.gradients import FeatureSpec, dataset_features, gradient_features, member_scores
from ensattr_fast.cli.main import main as ensattr
from ensattr_fast.data import Dataset, load_digits
from ensattr_fast.diffusion.sampling import ablate, sample
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.evaluation.significance import significance
from ensattr_fast.ops import code_scores
from ensattr_fast.store import open_results
from ensattr_fast.training import TrainConfig

from .._common import Record, Suite
from .benchmark_trust_groups import _train, _work


def _demo_dir(quick: bool) -> Path:
    given = os.environ.get("ENSATTR_DEMO_DIR")
    if given:
        return Path(given)
    out = _work() / ("demo-quick" if quick else "demo")
    if not (out / "results.h5").exists():  # the demo's settings: lr 3e-3, DDIM 50, eta 0
        command = ["demo", "--out", str(out), "--steps", "300" if quick else "3500", "--lr", "3e-3",
                   "--samples", "32" if quick else "256", "--attribute", "8" if quick else "32", "--per-sample", "8"]
        if ensattr(command) != 0:
            raise RuntimeError(f"ensattr {' '.join(command)} failed")
    return out


def _calibration(suite: Suite, quick: bool) -> None:
    with open_results(_demo_dir(quick) / "results.h5") as r:
        cf = r.counterfactual_arrays(images=False)
        n_units = r.code.shape[0]
        first_order = r.significance("first_order")
    valid = cf["units"] >= 0
    label = f"calibration on the plain demo ({n_units} units, nothing planted)"
    share = float(cf["significant"][valid].mean())
    suite.record(Record(name=f"{label}: exact check pairs flagged at FDR 5% ({int(valid.sum())} pairs)",
                        value=share, unit="share", target="<= 5%", met=bool(share <= 0.05)))
    flagged = first_order["n_significant"].sum() / (len(first_order["n_significant"]) * n_units)
    suite.record(Record(name=f"{label}: first-order (sample, unit) pairs flagged at FDR 5%", value=float(flagged),
                        unit="share", target="<= 5%", met=bool(flagged <= 0.05)))
    floor = cf["floor_distance"]
    half = floor.shape[1] // 2
    for tests, what in ((n_units, f"BH over {n_units} units"), (half, f"BH over the {half} tested")):
        null = significance(floor[:, :half], floor[:, half:], tests=tests)["significant"].mean()
        suite.record(Record(name=f"{label}: phantoms judged against other phantoms, flagged ({what})",
                            value=float(null), unit="share", target="<= 5%", met=bool(null <= 0.05)))
    p = significance(floor[:, :half], floor[:, half:], tests=half)["pvalue"]
    suite.record(Record(name=f"{label}: phantoms against phantoms, share with p <= 0.05 (uniform: 0.05)",
                        value=float((p <= 0.05).mean()), unit="share"))


def _dtrak(ensemble, schedule, data, images, train) -> torch.Tensor:
    spec = FeatureSpec(kind="dtrak")
    return member_scores(train, gradient_features(ensemble, schedule, images, spec), torch.arange(len(data)),
                         len(data)).mean(0)


def _false_attribution(suite: Suite, quick: bool, device: str) -> None:
    digits = load_digits()
    n = 256
    data = Dataset(digits.images[:n], digits.labels[:n], name="digits[:256]")
    code = codes.balanced_constant_weight(n, 16, seed=0)
    steps = 300 if quick else 1500
    config = TrainConfig(steps=steps, batch_size=128, lr=3e-3, mode="shared_noise", seed=0)
    checkpoint = _train(_work() / f"abc-{n}-{steps}" / "ensemble.pt", data, code, torch.arange(n), config, True,
                        device)
    ensemble, schedule = checkpoint.build().to(device), NoiseSchedule.linear()
    sampler, S = Sampler("ddim", 50, 0.0), 16 if quick else 64
    samples = sample(ensemble, schedule, sampler, range(S)).cpu()
    train = dataset_features(ensemble, schedule, data, FeatureSpec(kind="dtrak"), False)

    def pixel(images):
        return -data.pixel_distances(images)

    def dtrak(images):
        return _dtrak(ensemble, schedule, data, images, train)

    def loss(images):
        return code_scores(code, losses=member_losses(ensemble, schedule, images, draws=256).double()).scores

    rng = torch.Generator().manual_seed(7)
    random_units = torch.randint(n, (S,), generator=rng)
    for name, method in (("pixel nearest", pixel), ("D-TRAK over the members", dtrak), ("loss contrast", loss)):
        top = method(samples).argmax(1)
        sets = [[[int(a)], [int(b)]] for a, b in zip(top, random_units)]
        after = ablate(ensemble, schedule, sampler, code, range(S), sets, per_sample=True).images.cpu()
        still = [(method(after[:, j]).argmax(1) == top).float().mean().item() for j in range(2)]
        label = f"ABC false attribution at {n} units ({steps} steps, {S} samples), {name}"
        suite.record(Record(name=f"{label}: top unit ablated, still top", value=still[0], unit="share",
                            baseline=still[1], ratio=still[0] / still[1] if still[1] else None))


def run(quick: bool, device: str) -> Suite:
    suite = Suite("trust: calibration and false attribution", quick)
    _calibration(suite, quick)
    _false_attribution(suite, quick, device)
    return suite
