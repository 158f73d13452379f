"""Time to the quality bar: adapter members on a frozen base against full members from scratch
(issue 21).

The fine-tune of ``demo --finetune`` (its files under ``$ENSATTR_FINETUNE_DIR``, default
``out/finetune``, made by the demo when missing): 16 conditional members on the planned halves of
the digits 5-9, trained twice with the same code, draws and schedule (3,500 steps, lr 3e-3,
batch 128): as LoRA adapters (rank 8) on the base trained on the digits 0-4, and as full MLP
members from scratch. Every ``CHECK`` steps the members' EMA weights draw 100 guided samples
(w = 2) asked for 5, 6, 7, 8, 9 in turn, judged by the demo's digit classifier. The bar is the
issue's: the judge's confident share at least 0.8 of real digits', and each new class drawn
(confidently) in at least 80% of the samples asked for it. Recorded per kind: the first step
that meets the bar, the training wall time to it (evaluations not counted), and both kinds' time
per step in this run, side by side.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from ensattr_fast.data import load_data
from ensattr_fast.diffusion import NoiseSchedule
from ensattr_fast.diffusion.sampling import sample
from ensattr_fast.diffusion.schedules import Sampler
from ensattr_fast.evaluation.judge import DigitJudge, train_judge
from ensattr_fast.members import MemberOptions, build_members
from ensattr_fast.steps import DemoOptions, demo
from ensattr_fast.steps.finetune_demo import GUIDANCE, NEW_CLASSES
from ensattr_fast.store import read_plan
from ensattr_fast.training import TrainConfig, Trainer
from ensattr_fast.training.checkpoint import load_base

from .._common import Record, Suite

CHECK = 250
SAMPLES = 100
RANK = 8


def _bar(judge: DigitJudge, images: torch.Tensor, asked: torch.Tensor) -> Dict[str, float]:
    quality = judge.judge(images)
    drawn = min(judge.judge(images[asked == c])["confident_of_class"][c] for c in NEW_CLASSES)
    return dict(quality=quality["relative_confident"], worst_class=drawn,
                met=quality["relative_confident"] >= 0.8 and drawn >= 0.8)


def _until_bar(kind: str, ensemble, plan, data, config: TrainConfig, judge: DigitJudge, device: str) -> dict:
    """Train ``ensemble`` on the plan, judging it every CHECK steps; stop at the bar (or at the end)."""
    _, code, units = plan
    trainer = Trainer(ensemble, data, code, units.unit_of, units.names, NoiseSchedule.linear(), config, device)
    labels = torch.tensor([NEW_CLASSES[i % len(NEW_CLASSES)] for i in range(SAMPLES)])
    sampler = Sampler("ddim", 50, 0.0, guidance=GUIDANCE)
    trained, history = 0.0, []
    while trainer.step < config.steps:
        start = time.perf_counter()
        for _ in range(CHECK):
            trainer.train_step()
        trained += time.perf_counter() - start
        with torch.no_grad():
            images = sample(trainer.ema.module, NoiseSchedule.linear(), sampler, range(SAMPLES), labels=labels)
        found = dict(step=trainer.step, seconds=trained, **_bar(judge, images.cpu(), labels))
        history.append(found)
        print(f"{kind}: {found}", flush=True)
        if found["met"]:
            break
    return dict(history=history, per_step=trained / trainer.step, at=history[-1] if history[-1]["met"] else None)


def run(quick: bool, device: str, seeds: Optional[int] = None) -> Suite:
    suite = Suite("trust: time to the quality bar, adapters against full members", quick)
    work = Path(os.environ.get("ENSATTR_FINETUNE_DIR", "out/finetune" + ("-quick" if quick else "")))
    steps = 500 if quick else 3500
    if not (work / "plan.h5").exists():
        demo(work, DemoOptions(finetune=True, train=TrainConfig(steps=steps, lr=3e-3), samples=20, attribute=2,
                               per_sample=2, overwrite=True, device=device))
    plan = read_plan(work / "plan.h5")
    data = load_data(plan[0])  # the data the plan was made for
    judge = train_judge(load_data("digits"))
    config = TrainConfig(steps=steps, batch_size=128, lr=3e-3, seed=0)
    M = plan[1].shape[1]
    members, classes = MemberOptions(conditional=True), int(data.labels.max()) + 1
    shared = config.mode != "independent"  # as `train` builds them
    kinds = {"adapters": build_members(dataclasses.replace(members, rank=RANK, base=str(work / "base.pt")), M,
                                       data.data_shape, shared, config.seed, classes, *load_base(work / "base.pt")),
             "full members": build_members(members, M, data.data_shape, shared, config.seed, classes)}
    found = {kind: _until_bar(kind, ensemble, plan, data, config, judge, device) for kind, ensemble in kinds.items()}
    label = f"fine-tune of the digits 5-9, {M} members, batch 128, judged every {CHECK} steps on {SAMPLES} samples"
    for kind, f in found.items():
        at = f["at"]
        suite.record(Record(name=f"{label}: {kind}, first step at the bar", value=at["step"] if at else float("nan"),
                            unit="steps"))
        suite.record(Record(name=f"{label}: {kind}, training time to the bar", value=at["seconds"] if at else
                            float("nan"), unit="s"))
        suite.record(Record(name=f"{label}: {kind}, time per step", value=f["per_step"] * 1e3, unit="ms"))
    ours, theirs = found["adapters"]["at"], found["full members"]["at"]
    if ours and theirs:
        suite.record(Record(name=f"{label}: time to the bar, full members / adapters", value=ours["seconds"],
                            unit="s", baseline=theirs["seconds"], ratio=theirs["seconds"] / ours["seconds"]))
    return suite
