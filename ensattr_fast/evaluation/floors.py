"""The noise floor every answer is judged against: phantom ablations beside each exact
counterfactual (:class:`NoiseFloor`, :func:`floor_arrays`), phantom rows beside every code-based
score, and each sample's copy certificate.

- Exact counterfactuals. Each sample is re-drawn, from its own noise, without each of P phantom
  rows (code rows of the design's kind that belong to no unit); every counterfactual's distance
  gets an empirical p-value, z-score and Benjamini-Hochberg q-value against its sample's P.

- Scores. A unit's first-order or loss score depends on it only through its code row, so the
  floor of a row (sample) is the scores of P phantom rows (rows of the design's kind that
  belong to no unit) from the same statistic, one ``code_scores`` call. Every unit's score gets
  an empirical p-value against that floor, Benjamini-Hochberg runs over all N units of the
  row, and the top units' p, z and q are stored beside ``/topk/<method>``.
- Certificate. The exact check ablates each sample's top units by first order, which predicts
  the distance a unit's removal moves the sample. The largest exact distance among them is the
  counterfactual radius; the first-order scores of every unchecked unit, scaled by the largest
  exact / predicted ratio seen among the checked ones, bound the rest. ``bound`` is the r in
  "no one training unit moves this sample by more than r": exact when every unit was checked
  (``exhaustive``), first order's word for the unchecked units otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import codes
from ..attribution.methods import Method
from ..ops import code_scores
from ..runtime import memory
from ..runtime.fields import Float, Int, check_fields, option
from ..store import ResultsWriter, open_results, parse_json
from .significance import benjamini_hochberg, empirical_pvalues, significance

__all__ = ["NoiseFloor", "floor_arrays", "score_floors", "certify", "summary", "SCORE_PHANTOMS"]

#: phantom rows scored per row: cheap (one code_scores call), and p-values resolve to 1e-3
SCORE_PHANTOMS = 1024
#: the memory budget's share, in values, of a block of an influence matrix judged at once (rows
#: x units): each float64 array of the p-values, z-scores and BH ranks of a block is 32 MiB at
#: a 2 GiB budget, whatever N
_BLOCK_SHARE = 1 / 512


@dataclasses.dataclass(frozen=True)
class NoiseFloor:
    """The noise floor of exact counterfactuals: ``phantoms`` ablations of phantom rows per
    sample (fewer when the code leaves fewer free), from the same noise as the sample; effects
    judged at false discovery rate ``alpha`` over ``tests`` hypotheses per sample (None: the
    units ablated)."""

    phantoms: int = option(32, Int(0, 2**16), "phantom ablations per sample: the noise floor every exact effect "
                                               "is judged against (fewer when the code leaves fewer rows free; "
                                               "0: none)")
    alpha: float = option(0.05, Float(0, 1, low_open=True, high_open=True),
                          "false discovery rate at which effects are called significant")
    tests: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "noise floor: ")


def floor_arrays(distances: torch.Tensor, floor_distance: torch.Tensor, phantoms: torch.Tensor,
                 floor: NoiseFloor) -> dict:
    """What ``/counterfactuals`` stores of the floor: the phantom rows and distances [S, P], and
    the significance of each counterfactual distance [S, K] against its sample's floor."""
    judged = significance(distances.numpy(), floor_distance.numpy(), floor.alpha, floor.tests)
    return dict(judged, floor_distance=floor_distance.float().numpy(), floor_code=phantoms.numpy(),
                attrs=dict(phantoms=len(phantoms), kind="code rows of the design's weights that no unit has",
                           alpha=floor.alpha, tests=floor.tests or distances.shape[1], seed=floor.seed))


def score_floors(results: os.PathLike, code: torch.Tensor, methods: Sequence[Method], alpha: float = 0.05,
                 phantoms: int = SCORE_PHANTOMS, seed: int = 0) -> None:
    """``/significance/<method>`` for every code-based method (first order, direct, loss) of
    ``methods`` in ``results``."""
    rows = codes.phantom_rows(code, min(phantoms, codes.free_phantom_rows(code)), seed)
    found = {}
    with open_results(results) as r:
        for method in methods:
            if not method.scorer.by_code or method.name not in r.methods or not len(rows):
                continue
            statistic = torch.from_numpy(r.statistic(method.statistic))
            floor = code_scores(rows, **{method.scorer.argument: statistic.double()}).scores.float().numpy()  # [R, P]
            index = r.topk(method.name)[0][()]
            found[method.name] = _judge(r.influence(method.name), floor, index, alpha)
    meta = dict(phantoms=len(rows), alpha=alpha, seed=seed, tests=len(code),
                kind="code rows of the design's weights that no unit has")
    with ResultsWriter(results, "a") as writer:
        for name, arrays in found.items():
            writer.write_group(f"significance/{name}", arrays, {"floor": meta})


def _judge(view, floor: np.ndarray, index: np.ndarray, alpha: float) -> dict:
    """p, z, q of the top units ``index`` [R, k] of a lazy influence matrix [R, N], BH over N."""
    out = {name: np.full(index.shape, np.nan, np.float32) for name in ("pvalue", "zscore", "qvalue")}
    n_significant = np.zeros(len(index), np.int64)
    rows = max(1, min(64, memory.share(_BLOCK_SHARE) // max(1, view.shape[1])))
    for start in range(0, len(index), rows):
        block = slice(start, start + rows)
        p, z = empirical_pvalues(view[block, :], floor[block])
        q = benjamini_hochberg(p)
        n_significant[block] = (np.nan_to_num(q, nan=1.0) <= alpha).sum(1)
        top = np.clip(index[block], 0, None)
        for name, value in (("pvalue", p), ("zscore", z), ("qvalue", q)):
            out[name][block] = np.where(index[block] >= 0, np.take_along_axis(value, top, 1), np.nan)
    significant = (np.nan_to_num(out["qvalue"], nan=1.0) <= alpha).astype(np.uint8)
    return dict(out, significant=significant, n_significant=n_significant, floor=floor)


def certify(results: os.PathLike, check_method: Method, rows: int,
            exhaustive: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> dict:
    """``/certificate`` of the first ``rows`` samples from the exact check in ``results``;
    returns the mean radius and bound.

    With ``exhaustive`` = (distances [rows, D], units [D]): the exact distance of each sample
    without each of the code's D distinct rows (``units``: a unit of each row), so the bound is
    the true maximum over every unit, with the unit that reaches it (``/certificate/unit``).
    Without, the bound is an estimate: exact for the checked units, and for the rest their first
    order scores scaled by the largest exact/predicted ratio seen, which a unit may exceed."""
    with open_results(results) as r:
        cf = r.counterfactual_arrays(rows, images=False)
        units, exact = cf["units"], cf["distance"].astype(np.float64)
        view = r.influence(check_method.name)
        scores = view[:rows, :].astype(np.float64)
    n_units = scores.shape[1]
    radius = np.nanmax(np.where(units >= 0, exact, np.nan), 1, initial=0.0)
    unchecked = scores.copy()
    np.put_along_axis(unchecked, np.clip(units, 0, None), np.nan, 1)
    if check_method.predicts_distance:
        predicted = np.take_along_axis(scores, np.clip(units, 0, None), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((units >= 0) & (predicted > 0), exact / predicted, np.nan)
        scale = np.fmax(np.nanmax(np.where(np.isfinite(ratio), ratio, -np.inf), 1, initial=1.0), 1.0)
        rest = np.nanmax(np.where(np.isfinite(unchecked), unchecked, -np.inf), 1, initial=0.0)
        bound = np.maximum(radius, scale * rest)
    else:
        bound = np.full(len(radius), np.nan)
    floor = cf.get("floor_distance")
    p95 = np.percentile(floor, 95, axis=1) if floor is not None and floor.shape[1] else np.full(len(radius), np.nan)
    checked = (units >= 0).sum(1)
    arrays = {}
    if exhaustive is not None:  # every distinct code row ablated exactly: the true maximum
        every, representative = exhaustive
        top = np.nanargmax(np.where(np.isfinite(every), every, -np.inf), 1)
        bound = np.maximum(radius, np.take_along_axis(every, top[:, None], 1)[:, 0])
        radius, checked = bound.copy(), np.full(len(radius), n_units)
        arrays["unit"] = np.asarray(representative, np.int64)[top]
    exhausted = bool((checked >= n_units).all())
    meta = dict(method=check_method.name, units=n_units, exhaustive=exhausted, estimate=not exhausted,
                bound="exact: every distinct code row ablated" if exhaustive is not None else
                "exact" if exhausted else "an estimate, not a bound: exact for the checked units, their first "
                                          "order scores scaled by the largest exact/predicted ratio for the rest")
    if exhaustive is not None:
        meta["distinct_rows"] = int(exhaustive[0].shape[1])
    with ResultsWriter(results, "a") as writer:
        writer.write_group("certificate", dict(radius=radius.astype(np.float32), bound=bound.astype(np.float32),
                                               floor_p95=p95.astype(np.float32), checked=checked.astype(np.int64),
                                               **arrays),
                           {"certificate": meta})
    return dict(radius=float(np.mean(radius)), bound=float(np.nanmean(bound)) if np.isfinite(bound).any() else None,
                exhaustive=exhaustive)


def summary(results: os.PathLike) -> str:
    """One plain sentence on how many exact counterfactuals in ``results`` stand above their
    samples' noise floor, and what that means."""
    with open_results(results) as r:
        if not r.has_counterfactuals or "floor_distance" not in r.counterfactuals:
            return "no noise floor in this file: effects are not judged"
        cf = r.counterfactual_arrays(images=False)
        meta = parse_json(r.counterfactuals.attrs["floor"])
        certificate = r.certificate()
    valid = cf["units"] >= 0
    flagged = int(cf["significant"][valid].sum())
    text = (f"{flagged} of {int(valid.sum())} exact counterfactuals stand above the noise floor at FDR "
            f"{meta['alpha']:g} ({meta['phantoms']} phantom ablations per sample; median effect "
            f"{np.nanmedian(cf['distance'][valid]):.3f}, median phantom {np.median(cf['floor_distance']):.3f})")
    if flagged == 0:
        text += ": removing any one of these units moves a sample no more than removing nothing in particular"
    if certificate is not None and np.isfinite(certificate["bound"]).any():
        exact = certificate["meta"].get("exhaustive")
        text += (f"; copy certificates{'' if exact else ' (estimates)'}: no one training unit moves a sample by "
                 f"more than r, r from {np.nanmin(certificate['bound']):.3f} to {np.nanmax(certificate['bound']):.3f}")
    return text
