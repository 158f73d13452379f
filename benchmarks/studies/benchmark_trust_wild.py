"""Trust in the wild (issue 19): canaries of several kinds at 10-60 copies, planned as users plan.

For each copy count c (10, 20, 30, 60), four canaries are planted in the 1,797 digits, one of
each kind (mirrored, upside down, rotated, negated; each at least 3.0 from every original), c
copies each, and the data is planned **one unit per image** (``--units example``): ``plan``'s
duplicate search (radius 1.0) groups each canary's copies into one unit, as a user's by-hand
grouping would (the benchmark checks that the canary units are exactly those). With
``$ENSATTR_WILD_BY_HAND=1`` the canaries are grouped by hand instead (``--units group`` from the
metadata, ``--duplicates keep``). 16 MLP members on a balanced constant-weight code train with
the demo's settings (3,500 steps, lr 3e-3). ``$ENSATTR_WILD_COUNTS=20,30`` picks the counts.

Figures per c:
- the full ensemble's copies of a canary (target: none), with the null check on its samples
  (each non-copy proven against its nearest unit as if it copied it, and again against the units
  of a planted near-copy of a training image drawn at random: the share that passes, target
  <= alpha = 0.05);
- every member's copies of a canary (S seeds each) and the share proven, by canary kind, under
  the trend test (the default) and the floor test, from the same replays (target >= 90%).

Checkpoints are kept under ``$ENSATTR_TRUST_DIR`` (default ``out/trust``) for reruns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np

from ensattr_fast import Audit
from ensattr_fast.data import load_digits, plant_canaries
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.diffusion.schedules import Sampler
from ensattr_fast.evaluation.significance import benjamini_hochberg
from ensattr_fast.steps import MemorizationOptions, PlanOptions, TrainOptions
from ensattr_fast.training import TrainConfig

from .._common import Record, Suite

KINDS = ("mirror", "upside_down", "rotate", "negative")
THRESHOLD, ALPHA = 1.0, 0.05


def _prepare(work: Path, copies: int, config: TrainConfig, device: str, by_hand: bool = False):
    """Planted data planned one unit per image (or, ``by_hand``, each canary's copies grouped by
    the user's metadata and the duplicate search told to keep), and the trained ensemble (reused
    when there)."""
    work.mkdir(parents=True, exist_ok=True)
    planted = plant_canaries(load_digits(), canaries=len(KINDS), copies=copies, seed=0, kinds=KINDS)
    npz, csv = work / "data.npz", work / "groups.csv"
    if not npz.exists():
        save_canaries(npz, csv, planted, overwrite=True)
    audit = Audit.open(work, progress=False)
    if not (work / Audit.PLAN).exists():
        units = dict(units="group", metadata=csv, duplicates="keep") if by_hand else dict(units="example")
        audit.plan(PlanOptions(data=str(npz), members=16, design="balanced", seed=0, **units))
    audit.train(TrainOptions(train=config, checkpoint_every=500, resume=True, device=device))
    unit_of = audit.checkpoint.unit_of
    n = len(planted.data) - len(KINDS) * copies
    canaries = []
    for k in range(len(KINDS)):  # each canary's copies are one unit holding nothing else: a hand grouping
        units = unit_of[n + k * copies:n + (k + 1) * copies].unique()
        assert len(units) == 1 and int((unit_of == units[0]).sum()) == copies, f"canary {k} not grouped by plan"
        canaries.append(int(units[0]))
    return audit, canaries


def _proven(arrays: Dict[str, np.ndarray], which: np.ndarray, key: str) -> np.ndarray:
    """Which of the samples ``which`` pass under the p-values ``key`` (BH over them, and the
    counterfactual beyond the threshold)."""
    p = arrays[key].astype(np.float64)
    ok = which & np.isfinite(p)
    out = np.zeros(len(p), dtype=bool)
    if ok.any():
        out[ok] = benjamini_hochberg(p[ok]) <= ALPHA
    return out & (arrays["proof_distance"] >= THRESHOLD)


def run(quick: bool, device: str, counts=None, by_hand: bool = None) -> Suite:
    """``counts`` (default 10, 20, 30, 60) and ``by_hand`` also come from ``$ENSATTR_WILD_COUNTS``
    (e.g. ``20``) and ``$ENSATTR_WILD_BY_HAND=1``."""
    by_hand = bool(os.environ.get("ENSATTR_WILD_BY_HAND")) if by_hand is None else by_hand
    planned = "grouped by hand" if by_hand else "planned one unit per image"
    suite = Suite(f"trust in the wild: canaries of four kinds, {planned}", quick)
    listed = os.environ.get("ENSATTR_WILD_COUNTS")
    counts = counts or (tuple(int(c) for c in listed.split(",")) if listed else None) or \
        ((20,) if quick else (10, 20, 30, 60))
    config = TrainConfig(steps=600 if quick else 3500, batch_size=128, lr=3e-3, seed=0)
    seeds_full, seeds_member = (64, 32) if quick else (256, 256)
    root = Path(os.environ.get("ENSATTR_TRUST_DIR", "out/trust"))
    sampler = Sampler("ddim", 50, 0.0)
    for c in counts:
        work = root / f"wild-{c}{'-hand' if by_hand else ''}{'-quick' if quick else ''}"
        audit, canaries = _prepare(work, c, config, device, by_hand)
        code = audit.checkpoint.code
        label = f"{c} copies x {len(KINDS)} kinds, {'by hand' if by_hand else 'one unit per image'}, " \
                f"{config.steps} steps"
        full = audit.memorization(work / "full.h5", MemorizationOptions(
            seeds=tuple(range(seeds_full)), threshold=THRESHOLD, sampler=sampler, null_check=True, overwrite=True,
            device=device)).arrays
        copies_full = int((full["is_copy"] == 1)[np.isin(full["nearest_unit"], canaries)].sum())
        suite.record(Record(name=f"{label}: full ensemble, samples copying a canary (of {seeds_full})",
                            value=copies_full, unit="samples", target="0", met=copies_full == 0))
        planted = audit.memorization(work / "full-planted.h5", MemorizationOptions(
            seeds=tuple(range(seeds_full)), threshold=THRESHOLD, sampler=sampler, null_check=True,
            null_target="planted", overwrite=True, device=device)).arrays
        for arrays, against in ((full, "their nearest unit"), (planted, "a planted near-copy of a random image")):
            null = (arrays["is_copy"] == 0) & np.isfinite(arrays["pvalue"])
            for key in ("pvalue_trend", "pvalue_floor"):
                flagged = _proven(arrays, null, key)[null].mean() if null.any() else np.nan
                suite.record(Record(name=f"{label}: full ensemble's non-copies proven against {against} "
                                         f"({key.split('_')[1]}; {int(null.sum())} tested)",
                                    value=flagged, unit="share", target=f"<= {ALPHA}", met=bool(flagged <= ALPHA)))
        rows: List[Dict[str, np.ndarray]] = []
        for m in range(code.shape[1]):
            arrays = audit.memorization(work / f"member-{m}.h5", MemorizationOptions(
                generator=f"member:{m}", seeds=tuple(range(seeds_member)), threshold=THRESHOLD, sampler=sampler,
                overwrite=True, device=device)).arrays
            rows.append(arrays)
        for key in ("pvalue_trend", "pvalue_floor"):
            proven, total, by_kind = 0, 0, {kind: [0, 0] for kind in KINDS}
            for arrays in rows:
                copy = (arrays["is_copy"] == 1) & np.isin(arrays["nearest_unit"], canaries)
                ok = _proven(arrays, arrays["is_copy"] == 1, key)
                proven, total = proven + int((ok & copy).sum()), total + int(copy.sum())
                for k, kind in enumerate(KINDS):
                    mine = copy & (arrays["nearest_unit"] == canaries[k])
                    by_kind[kind][0] += int((ok & mine).sum())
                    by_kind[kind][1] += int(mine.sum())
            share = proven / total if total else np.nan
            kinds = ", ".join(f"{kind} {a}/{b}" for kind, (a, b) in by_kind.items())
            suite.record(Record(name=f"{label}: members' canary copies proven ({key.split('_')[1]}; {proven} of "
                                     f"{total}: {kinds})", value=share, unit="share",
                                target=">= 0.9" if total else None, met=bool(share >= 0.9) if total else None))
        reasons = np.concatenate([a["reason"][a["is_copy"] == 1] for a in rows])
        print(f"{label}: reasons of the members' copies (default statistic): {np.bincount(reasons, minlength=7)}",
              flush=True)
    return suite

