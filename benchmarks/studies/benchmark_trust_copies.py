"""Copies, measured and certified (issue 12, item 3c).

Three canaries (training digits mirrored left-right, 60 copies each: 9% of the training
images) are planted in the 1,797 digits; each canary's copies form one unit, every other image
its own unit. 16 MLP members are planned on a balanced constant-weight code and trained with
the demo's settings (3500 steps, lr 3e-3); one model of the same architecture is trained on
all the data. Generators, each drawing the same seeds (DDIM 50, eta 0): the full ensemble, each
member that saw canary 0, the sub-ensemble of the 8 members that saw canary 0 (includers), the
8 that never saw it (excluders), and the full-data model. ``ensattr memorization`` finds each
generator's near-copies (pixel L2 < 1.0) and proves each by exact ablation against 64 phantom
sub-ensembles of the same size, drawn per sample (false discovery rate 5% over the copies).

Figures per generator: the share of samples copying a canary and copying any training unit,
the nearest distance to a canary, and for the copying generators the share of canary copies
found and proven (target >= 90%) and the share of samples not copying a canary that are
flagged as proven copies of a clean unit (target <= 5%); and the full ensemble's canary copy
rate against the full-data model's (target: at most a tenth). Checkpoints are kept under
``$ENSATTR_TRUST_DIR`` (default ``out/trust``) for reruns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ensattr_fast import Audit
from ensattr_fast.data import load_data, load_digits, plant_canaries
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.diffusion.schedules import Sampler
from ensattr_fast.evaluation.lds import train_full_model
from ensattr_fast.steps import MemorizationOptions, PlanOptions, TrainOptions
from ensattr_fast.training import TrainConfig

from .._common import Record, Suite

THRESHOLD = 1.0


def _work(quick: bool) -> Path:
    return Path(os.environ.get("ENSATTR_TRUST_DIR", "out/trust")) / ("copies-quick" if quick else "copies")


def _prepare(work: Path, config: TrainConfig, device: str):
    """The planted data, the plan, the trained ensemble and the full-data model (reused when
    already there). Returns (the audit of ``work``, full-data model path, canary unit ids)."""
    work.mkdir(parents=True, exist_ok=True)
    planted = plant_canaries(load_digits(), canaries=3, copies=60, seed=0)
    npz, csv = work / "digits-canaries.npz", work / "digits-canaries.csv"
    if not npz.exists() or not csv.exists():
        save_canaries(npz, csv, planted, overwrite=True)
    audit = Audit.open(work, progress=False)  # plan.h5, ensemble.pt
    if not (work / Audit.PLAN).exists():
        audit.plan(PlanOptions(data=str(npz), metadata=csv, units="group", members=16, design="balanced", seed=0))
    audit.train(TrainOptions(train=config, checkpoint_every=500, resume=True, device=device))
    checkpoint = audit.checkpoint
    data = load_data(checkpoint.data_source)
    full = work / "full.pt"
    train_full_model(full, data, checkpoint.unit_of, len(checkpoint.code), config, checkpoint.spec, device,
                     progress=False)
    return audit, full, planted.units


def _generators(code: torch.Tensor, canary: int, full: Path) -> List[tuple]:
    """(label, --generator, --generator-checkpoint) of every generator measured."""
    includers = torch.nonzero(code[canary]).flatten().tolist()
    excluders = torch.nonzero(code[canary] == 0).flatten().tolist()
    listed = ",".join(map(str, includers))
    out = [("full ensemble", "full", None)]
    out += [(f"member {m} (saw canary 0)", f"member:{m}", None) for m in includers]
    out += [(f"includers of canary 0 ({len(includers)})", f"members:{listed}", None),
            (f"excluders of canary 0 ({len(excluders)})", "members:" + ",".join(map(str, excluders)), None),
            ("full-data model", "full", full)]
    return out


def _figures(arrays: Dict[str, np.ndarray], canaries: List[int], canary_images: torch.Tensor) -> Dict[str, float]:
    """Copy rates, nearest distance to a canary, detection and false positives of one run."""
    copy, proven = arrays["is_copy"] == 1, arrays["proven"] == 1
    of_canary = copy & np.isin(arrays["nearest_unit"], canaries)
    clean = ~of_canary
    images = torch.from_numpy(arrays["images"]).flatten(1)
    nearest_canary = torch.cdist(images, canary_images.flatten(1)).min().item()
    return dict(samples=len(copy), canary_copies=int(of_canary.sum()), canary_rate=float(of_canary.mean()),
                canary0_rate=float((copy & (arrays["nearest_unit"] == canaries[0])).mean()),
                any_rate=float(copy.mean()), nearest_canary=nearest_canary,
                nearest_any=float(arrays["nearest_distance"].min()),
                detected=float((of_canary & proven).sum() / max(of_canary.sum(), 1)) if of_canary.any() else np.nan,
                flagged_clean=float((clean & proven).sum() / max(clean.sum(), 1)))


def _record(suite: Suite, label: str, f: Dict[str, float], copying: bool) -> None:
    """``copying``: the generator is one the issue sets a detection target for."""
    suite.record(Record(name=f"{label}: samples copying a canary (< {THRESHOLD:g})", value=f["canary_rate"],
                        unit="share"))
    suite.record(Record(name=f"{label}: samples copying canary 0", value=f["canary0_rate"], unit="share"))
    suite.record(Record(name=f"{label}: samples copying any training unit", value=f["any_rate"], unit="share"))
    suite.record(Record(name=f"{label}: nearest distance to a canary", value=f["nearest_canary"], unit="L2"))
    if copying or f["canary_copies"]:
        judged = copying and not np.isnan(f["detected"])  # no copies (a short quick run): nothing to judge
        suite.record(Record(name=f"{label}: canary copies found and proven (FDR 5%)", value=f["detected"],
                            unit="share", target=">= 0.9" if judged else None,
                            met=f["detected"] >= 0.9 if judged else None))
    suite.record(Record(name=f"{label}: other samples flagged as proven copies of a clean unit",
                        value=f["flagged_clean"], unit="share", target="<= 0.05", met=f["flagged_clean"] <= 0.05))


def _pooled(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """The figures of several runs pooled over their samples."""
    n = sum(r["samples"] for r in rows)
    copies = sum(r["canary_copies"] for r in rows)
    detected = sum(r["detected"] * r["canary_copies"] for r in rows if r["canary_copies"])
    clean = sum(r["flagged_clean"] * (r["samples"] - r["canary_copies"]) for r in rows)
    return dict(samples=n, canary_copies=copies, canary_rate=copies / n,
                canary0_rate=sum(r["canary0_rate"] * r["samples"] for r in rows) / n,
                any_rate=sum(r["any_rate"] * r["samples"] for r in rows) / n,
                nearest_canary=min(r["nearest_canary"] for r in rows), nearest_any=min(r["nearest_any"] for r in rows),
                detected=detected / copies if copies else np.nan, flagged_clean=clean / max(n - copies, 1))


def run(quick: bool, device: str, seeds: Optional[int] = None) -> Suite:
    suite = Suite("trust: copies of planted canaries", quick)
    config = TrainConfig(steps=600 if quick else 3500, batch_size=128, lr=3e-3, seed=0)
    work = _work(quick)
    audit, full, canaries = _prepare(work, config, device)
    checkpoint = audit.checkpoint
    data = load_data(checkpoint.data_source)
    canary_images = torch.stack([data.images[checkpoint.unit_of == u][0] for u in canaries])
    S = seeds or (64 if quick else 512)
    label0 = f"{S} samples, {config.steps} steps"
    members: List[Dict[str, float]] = []
    rates: Dict[str, float] = {}
    for label, generator, other in _generators(checkpoint.code, canaries[0], full):
        out = work / f"copies-{generator.replace(':', '-')}-{'model' if other else 'ens'}.h5"
        options = MemorizationOptions(generator=generator, generator_checkpoint=other, seeds=tuple(range(S)),
                                      threshold=THRESHOLD, sampler=Sampler("ddim", 50, 0.0), overwrite=True,
                                      device=device)
        arrays = audit.memorization(out, options).arrays
        figures = _figures(arrays, list(canaries), canary_images)
        rates[label] = figures["canary_rate"]
        print(f"{label}: {figures}", flush=True)
        if generator.startswith("member:"):
            members.append(figures)
            continue
        _record(suite, f"{label0}, {label}", figures, copying=label in ("full-data model",) or "includers" in label)
    _record(suite, f"{label0}, each member that saw canary 0 (pooled, {len(members)})", _pooled(members), True)
    full_rate, ens_rate = rates["full-data model"], rates["full ensemble"]
    suite.record(Record(name=f"{label0}: full ensemble's canary copy rate / full-data model's", value=ens_rate,
                        unit="share", baseline=full_rate, ratio=ens_rate / full_rate if full_rate else np.nan,
                        target="<= 0.1" if full_rate else None, met=ens_rate <= 0.1 * full_rate if full_rate else None))
    return suite
