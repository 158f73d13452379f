"""Copies inside a fine-tune, measured and proven (issue 21).

The setting of ``demo --finetune``: a class-conditional base model trained on the digits 0-4,
then 16 LoRA adapter members (rank 8) on that frozen base, trained on the digits 5-9. Three
canaries (fine-tuning digits mirrored left-right, 60 copies each: 17% of the fine-tuning images)
are planted in the fine-tuning set; each canary's copies form one unit, every other image its own
unit, on a balanced constant-weight code. One adapter of the same rank on the same base is
trained on all the fine-tuning data: the model a fine-tuner would ship.

Generators, each drawing the same seeds, asked for the new classes in turn (5, 6, 7, 8, 9, ...)
with guidance 2 (DDIM 50, eta 0): the full adapter ensemble, each adapter that saw canary 0, the
adapters that saw canary 0 (includers), those that never saw it (excluders), and the one adapter
on everything. ``ensattr memorization`` finds each generator's near-copies (pixel L2 < 1.0) and
proves each by exact ablation, the adapters that never saw the copied unit, against phantom
sub-ensembles. The figures are those of the plain study (:mod:`.benchmark_trust_copies`), whose
helpers this one shares: copy rates, the share of canary copies proven (target >= 90%), the
share of other samples flagged (target <= 5%), and the ensemble's canary copy rate against the
one adapter's (target: at most a tenth). Checkpoints are kept under ``$ENSATTR_TRUST_DIR``
(default ``out/trust``) for reruns.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import torch

from ensattr_fast import Audit
from ensattr_fast.data import Dataset, load_data, load_digits, plant_canaries
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.diffusion.schedules import Sampler
from ensattr_fast.evaluation.lds import train_full_model
from ensattr_fast.members import MemberOptions
from ensattr_fast.steps import MemorizationOptions, PlanOptions, TrainOptions
from ensattr_fast.steps.finetune_demo import GUIDANCE, NEW_CLASSES
from ensattr_fast.training import TrainConfig

from .._common import Record, Suite
from .benchmark_trust_copies import THRESHOLD, _figures, _generators, _pooled, _record, _work

RANK = 8


def _halves() -> tuple:
    """The digits the base learns (0-4) and the fine-tuning digits (5-9)."""
    digits = load_digits()
    new = torch.isin(digits.labels, torch.tensor(NEW_CLASSES))
    return (Dataset(digits.images[~new], digits.labels[~new], "digits 0-4"),
            Dataset(digits.images[new], digits.labels[new], "digits 5-9"))


def _prepare(work, config: TrainConfig, device: str):
    """The base, the planted fine-tuning data, its plan, the adapter members and the one adapter
    on everything (reused when already there). Returns (audit, one-adapter path, canary units)."""
    work.mkdir(parents=True, exist_ok=True)
    old, new = _halves()
    members = MemberOptions(conditional=True)
    base = work / "base" / Audit.CHECKPOINT
    if not base.exists():
        np.savez(work / "old.npz", images=old.images.numpy(), labels=old.labels.numpy())
        base_audit = Audit.open(work / "base", progress=False)
        base_audit.plan(PlanOptions(data=str(work / "old.npz"), seed=0, overwrite=True))
        base_audit.train(TrainOptions(train=config, architecture=members, all_units=True, checkpoint_every=0,
                                      device=device))
    planted = plant_canaries(new, canaries=3, copies=60, seed=0)
    npz, csv = work / "new-canaries.npz", work / "new-canaries.csv"
    if not npz.exists() or not csv.exists():
        save_canaries(npz, csv, planted, overwrite=True)
    audit = Audit.open(work, progress=False)  # plan.h5, ensemble.pt
    if not (work / Audit.PLAN).exists():
        audit.plan(PlanOptions(data=str(npz), metadata=csv, units="group", members=16, design="balanced", seed=0))
    adapters = dataclasses.replace(members, base=str(base), rank=RANK)
    audit.train(TrainOptions(train=config, architecture=adapters, checkpoint_every=500, resume=True, device=device))
    checkpoint = audit.checkpoint
    one = work / "one-adapter.pt"
    train_full_model(one, load_data(checkpoint.data_source), checkpoint.unit_of, len(checkpoint.code), config,
                     checkpoint.spec, device, progress=False)
    return audit, one, planted.units


def run(quick: bool, device: str, seeds: Optional[int] = None) -> Suite:
    suite = Suite("trust: copies of canaries planted in a fine-tune", quick)
    config = TrainConfig(steps=600 if quick else 3500, batch_size=128, lr=3e-3, seed=0)
    work = _work(quick).with_name(_work(quick).name.replace("copies", "finetune-copies"))
    audit, one, canaries = _prepare(work, config, device)
    checkpoint = audit.checkpoint
    data = load_data(checkpoint.data_source)
    canary_images = torch.stack([data.images[checkpoint.unit_of == u][0] for u in canaries])
    S = seeds or (60 if quick else 500)
    labels = tuple(NEW_CLASSES[i % len(NEW_CLASSES)] for i in range(S))
    sampler = Sampler("ddim", 50, 0.0, guidance=GUIDANCE)
    label0 = f"fine-tune, {S} samples of 5-9 (guidance {GUIDANCE:g}), {config.steps} steps"
    members: List[Dict[str, float]] = []
    rates: Dict[str, float] = {}
    for label, generator, other in _generators(checkpoint.code, canaries[0], one):
        label = label.replace("member", "adapter").replace("full-data model", "one adapter on everything")
        out = work / f"copies-{generator.replace(':', '-')}-{'model' if other else 'ens'}.h5"
        options = MemorizationOptions(generator=generator, generator_checkpoint=other, seeds=tuple(range(S)),
                                      labels=labels, threshold=THRESHOLD, sampler=sampler, overwrite=True,
                                      device=device)
        figures = _figures(audit.memorization(out, options).arrays, list(canaries), canary_images)
        rates[label] = figures["canary_rate"]
        print(f"{label}: {figures}", flush=True)
        if generator.startswith("member:"):
            members.append(figures)
            continue
        _record(suite, f"{label0}, {label}", figures, copying=other is not None or "includers" in label)
    _record(suite, f"{label0}, each adapter that saw canary 0 (pooled, {len(members)})", _pooled(members), True)
    one_rate, ens_rate = rates["one adapter on everything"], rates["full ensemble"]
    suite.record(Record(name=f"{label0}: adapter ensemble's canary copy rate / one adapter on everything's",
                        value=ens_rate, unit="share", baseline=one_rate,
                        ratio=ens_rate / one_rate if one_rate else np.nan, target="<= 0.1" if one_rate else None,
                        met=ens_rate <= 0.1 * one_rate if one_rate else None))
    return suite
