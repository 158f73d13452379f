"""``demo --finetune``: auditing a fine-tune on the embedded digits, end to end.

A class-conditional base model is trained on the digits 0-4 (``train --all-units``); the digits
5-9, one unit per image, are the fine-tuning data of 16 adapter members on that frozen base
(``train --base``), each on its planned half. The new classes are sampled with guidance, every
unit's influence on the first samples is scored (D-TRAK over the adapters, loss, first order) and
checked against exact ablation (the adapters that never saw a unit, on the same base), each
against its noise floor. With class units (``--units class``): 10 adapter members on a sparse
design over the five new classes, every sample drawn again without each class. Writes old.npz
and new.npz (the two halves of the digits), base_plan.h5, base.pt, plan.h5, ensemble.pt,
results.h5, report.png and report.html under ``out``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_data
from ..errors import ConfigError
from ..runtime.files import check_output
from ..store import read_plan
from ._demo_parts import attribute_first, judge_and_report, step
from .ablate import ablate
from .options import AblateOptions, DemoOptions, PlanOptions, SampleOptions, TrainOptions
from .plan import plan
from .sample import sample
from .session import Session
from .train import train

__all__ = ["finetune_demo", "NEW_CLASSES", "GUIDANCE"]

#: the classes the base never sees, which the adapters learn
NEW_CLASSES = (5, 6, 7, 8, 9)
#: the guidance the demo samples with unless --guidance says otherwise
GUIDANCE = 2.0


def finetune_demo(out: Path, options: DemoOptions = DemoOptions()) -> dict:
    """The fine-tune demo under ``out``; returns the sample-quality figures, with the share of
    samples of each new class judged (confidently) as the class they were asked for."""
    start, out = time.perf_counter(), Path(out)
    if options.architecture.base:
        raise ConfigError("demo --finetune trains its own base on the digits 0-4: --base does not apply (run the "
                          "steps of the README's fine-tune section to fine-tune yours)")
    names = ("old.npz", "new.npz", "base_plan.h5", "base.pt", "plan.h5", "ensemble.pt", "results.h5",
             "report.png", "report.html")
    for name in names:
        check_output(out / name, "--out", options.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_data("digits")
    new = torch.isin(digits.labels, torch.tensor(NEW_CLASSES))
    for name, keep in (("old.npz", ~new), ("new.npz", new)):
        np.savez(out / name, images=digits.images[keep].numpy(), labels=digits.labels[keep].numpy())
    config, device = options.train, options.device
    members = dataclasses.replace(options.architecture, conditional=True)

    plan(out / "base_plan.h5", PlanOptions(data=str(out / "old.npz"), seed=config.seed, overwrite=True))
    train(out / "base_plan.h5", out / "base.pt", TrainOptions(train=config, architecture=members, all_units=True,
                                                              checkpoint_every=0, overwrite=True, device=device))
    step(f"base: one conditional model on the {int((~new).sum())} digits 0-4, {config.steps} steps -> "
         f"{out / 'base.pt'}", start)

    by_class = options.units == "class"
    n_members = options.members or (2 * len(NEW_CLASSES) if by_class else 16)
    planned = plan(out / "plan.h5", PlanOptions(data=str(out / "new.npz"), units=options.units, members=n_members,
                                                design="sparse" if by_class else "balanced", excluders=2,
                                                seed=config.seed, overwrite=True))
    step(f"plan of the fine-tune: {planned.stats}; duplicates: {planned.duplicates_line()}", start)
    session = Session(out / "plan.h5", out / "ensemble.pt", out / "results.h5")
    train(session.plan_path, session.checkpoint_path,
          TrainOptions(train=config, architecture=dataclasses.replace(members, base=str(out / "base.pt")),
                       checkpoint_every=0, overwrite=True, device=device))
    step(f"{n_members} adapter members of rank {members.rank} on the frozen base, {config.steps} steps "
         f"-> {session.checkpoint_path}", start)

    labels = tuple(NEW_CLASSES[i % len(NEW_CLASSES)] for i in range(options.samples))
    sampler = options.sampler if options.sampler.guidance else dataclasses.replace(options.sampler, guidance=GUIDANCE)
    drawn = sample(session, session.results_path, SampleOptions(seeds=range(options.samples), labels=labels,
                                                                sampler=sampler, overwrite=True, device=device)).images
    step(f"{options.samples} samples of the classes {NEW_CLASSES}, guidance {sampler.guidance} -> "
         f"{session.results_path}", start)

    if by_class:  # every sample drawn again without each new class, by the adapters that never saw it
        unit_of_class = {int(name): u for u, name in enumerate(read_plan(session.plan_path)[2].names)}
        found = ablate(session, AblateOptions(device=device), torch.arange(len(unit_of_class)).expand(
            options.samples, -1).clone())
        step(f"{found.images.shape[0] * found.images.shape[1]} exact counterfactuals, one per sample and class "
             f"({found.member_evaluations:,} member evaluations)", start)
    else:
        attribute_first(session, options, "every fine-tuning unit (dtrak over the adapters, first_order, direct, "
                                          "loss)", start)
    asked = torch.tensor(labels)

    def as_asked(judge, quality):  # asked for class c: drawn as c by the full ensemble, and without c
        quality["drawn_as_asked"] = {c: judge.judge(drawn[asked == c])["confident_of_class"][c] for c in NEW_CLASSES}
        if by_class:
            quality["ablated_drawn_as_asked"] = {c: judge.judge(found.images[asked == c, unit_of_class[c]])[
                "confident_of_class"][c] for c in NEW_CLASSES}

    quality = judge_and_report(session, out, digits, drawn, start, as_asked)
    print(f"sample quality: {quality['relative_confident']:.2f} of the held-out real digits' share of confident "
          f"labels; each new class drawn (confidently) when asked for: "
          f"{ {c: round(s, 3) for c, s in quality['drawn_as_asked'].items()} }")
    if by_class:
        print("asked for class c, the adapters that never saw c draw a confident c: "
              f"{ {c: round(s, 3) for c, s in quality['ablated_drawn_as_asked'].items()} }")
    return quality
