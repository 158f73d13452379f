"""``demo``: the whole method on the embedded digits, end to end.

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

import torch

from ..data import load_data
from ..runtime.files import check_output
from ..store import read_plan
from ._demo_parts import attribute_first, judge_and_report, step
from .ablate import ablate
from .finetune_demo import finetune_demo
from .options import AblateOptions, DemoOptions, PlanOptions, SampleOptions, TrainOptions
from .plan import plan
from .sample import sample
from .session import Session
from .train import train

__all__ = ["demo"]


def demo(out: Path, options: DemoOptions = DemoOptions()) -> dict:
    """Every step on the digits under ``out``; returns the sample-quality figures (and, for
    class units, how often each ablated ensemble still draws its removed class). Files of an
    earlier demo in ``out`` are replaced only with ``overwrite``. ``finetune``: the fine-tune demo
    (:func:`~ensattr_fast.steps.finetune_demo.finetune_demo`)."""
    if options.finetune:
        return finetune_demo(out, options)
    start = time.perf_counter()
    out = Path(out)
    by_class = options.units == "class"
    n_members = options.members or (20 if by_class else 16)
    config, device = options.train, options.device
    session = Session(out / "plan.h5", out / "ensemble.pt", out / "results.h5")
    for path in (session.plan_path, session.checkpoint_path, session.results_path, out / "report.png",
                 out / "report.html"):
        check_output(path, "--out", options.overwrite)

    planned = plan(session.plan_path, PlanOptions(data="digits", units=options.units, members=n_members,
                                                  design="sparse" if by_class else "balanced", excluders=2,
                                                  seed=config.seed, overwrite=True))
    step(f"plan: {planned.stats}; duplicates: {planned.duplicates_line()}", start)
    train(session.plan_path, session.checkpoint_path,
          TrainOptions(train=config, architecture=options.architecture, checkpoint_every=0, overwrite=True,
                       device=device))
    step(f"trained {n_members} members for {config.steps} steps -> {session.checkpoint_path}", start)
    drawn = sample(session, session.results_path, SampleOptions(seeds=range(options.samples), sampler=options.sampler,
                                                                overwrite=True, device=device)).images
    samples = options.samples
    step(f"{samples} samples -> {session.results_path}", start)

    data = load_data("digits")
    _, _, units = read_plan(session.plan_path)
    if by_class:
        ablated = torch.arange(units.n_units).expand(samples, -1).clone()
        found = ablate(session, AblateOptions(device=device), ablated)
        step(f"{ablated.numel()} exact counterfactuals ({found.member_evaluations:,} member evaluations), "
             f"mean distance {found.distances.mean():.3f}", start)
    else:
        attribute_first(session, options, f"all {units.n_units} units (dtrak, first_order, direct, loss)", start)

    def removed_classes(judge, quality):  # share of the class-c ablation's samples confidently labelled c
        quality["ablated_confident_as_removed_class"] = [
            judge.judge(found.images[:, c])["confident_of_class"][c] for c in range(units.n_units)]

    quality = judge_and_report(session, out, data, drawn, start, removed_classes if by_class else
                               (lambda judge, quality: None))
    print(f"sample quality: {quality['relative_confident']:.2f} of the held-out real digits' share "
          f"of confident labels; class shares {[round(s, 3) for s in quality['class_shares']]}")
    if by_class:
        print("ablated ensembles drawing their removed class (confidently): "
              f"{[round(s, 3) for s in quality['ablated_confident_as_removed_class']]}; the full "
              f"ensemble: {[round(s, 3) for s in quality['confident_of_class']]}")
    return quality
