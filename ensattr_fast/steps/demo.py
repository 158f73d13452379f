"""``ensattr demo``: the whole method on the embedded digits, end to end.

Example units (default): 16 members on a balanced constant-weight code, one unit per image;
samples; first-order, direct and loss-based influence of every unit on the first samples,
streamed to the results file; then the exact counterfactuals of each of those samples without
each of its top units by first-order score.
Class units (``--units class``): 20 members on a leave-one-class-out design (each class
excluded by 2 members); every sample re-drawn without each class.
Every exact counterfactual is judged against phantom ablations from the same noise (its
significance is printed, stored and drawn). Writes plan.h5, ensemble.pt, results.h5, report.png
and report.html under ``out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..data import load_data
from ..evaluation.judge import train_judge
from ..files import check_output
from ..members import MemberOptions
from ..schedules import Sampler
from ..store import ResultsWriter, open_results, read_plan
from ..training import TrainConfig
from ._floors import summary
from .ablate import ablate_step
from .attribute import attribute_step
from .plan import make_plan
from .report import report_step
from .sample import sample_step
from .train import train

__all__ = ["run_demo"]


def _step(name: str, start: float) -> float:
    now = time.perf_counter()
    print(f"[{now - start:6.1f} s] {name}", flush=True)
    return now


def run_demo(out: Path, config: TrainConfig, sampler: Sampler, members: MemberOptions = MemberOptions(),
             units: str = "example", n_members: Optional[int] = None, samples: int = 256, attribute: int = 32,
             per_sample: int = 8, device: str = "cpu", overwrite: bool = False) -> dict:
    """Every step on the digits under ``out``; returns the sample-quality figures (and, for
    class units, how often each ablated ensemble still draws its removed class). Files of an
    earlier demo in ``out`` are replaced only with ``overwrite``."""
    start = time.perf_counter()
    out = Path(out)
    by_class = units == "class"
    n_members = n_members or (20 if by_class else 16)
    plan, checkpoint, results = out / "plan.h5", out / "ensemble.pt", out / "results.h5"
    for path in (plan, checkpoint, results, out / "report.png", out / "report.html"):
        check_output(path, "--out", overwrite)

    stats = make_plan(plan, "digits", units, n_members, design="sparse" if by_class else "balanced",
                      excluders=2, seed=config.seed, overwrite=True)
    _step(f"plan: {stats}", start)
    train(plan, checkpoint, config, members, device, overwrite=True)
    _step(f"trained {n_members} members for {config.steps} steps -> {checkpoint}", start)
    sample_step(checkpoint, results, range(samples), sampler, device, overwrite=True)
    with open_results(results) as r:
        drawn = torch.from_numpy(r.samples[()])
    _step(f"{samples} samples -> {results}", start)

    data = load_data("digits")
    _, _, planned = read_plan(plan)
    if by_class:
        ablated = torch.arange(planned.n_units).expand(samples, -1).clone()
        images, distances, evaluations = ablate_step(checkpoint, results, ablated, device)
        _step(f"{ablated.numel()} exact counterfactuals ({evaluations:,} member evaluations), "
              f"mean distance {distances.mean():.3f}", start)
    else:
        n = min(attribute, samples)
        agreement = attribute_step(checkpoint, results, n, k=max(10, per_sample), check=per_sample, device=device)
        _step(f"influence of all {planned.n_units} units on {n} samples (dtrak, first_order, direct, loss); "
              f"exact check of each sample's top {per_sample}: {agreement}", start)

    print(summary(results), flush=True)

    judge = train_judge(data)
    quality = judge.judge(drawn)
    quality["held_out_confident"] = judge.held_out_confident
    if by_class:
        # share of the class-c ablation's samples confidently labelled c, for every class c
        quality["ablated_confident_as_removed_class"] = [
            judge.judge(images[:, c])["confident_of_class"][c] for c in range(planned.n_units)
        ]
    with ResultsWriter(results, "a") as writer:
        writer.set_attrs(quality=quality)
    report_step(results, out / "report.png", overwrite=True)
    _step(f"report -> {out / 'report.png'}, {out / 'report.html'}", start)
    print(f"sample quality: {quality['relative_confident']:.2f} of the held-out real digits' share "
          f"of confident labels; class shares {[round(s, 3) for s in quality['class_shares']]}")
    if by_class:
        print("ablated ensembles drawing their removed class (confidently): "
              f"{[round(s, 3) for s in quality['ablated_confident_as_removed_class']]}; the full "
              f"ensemble: {[round(s, 3) for s in quality['confident_of_class']]}")
    return quality
