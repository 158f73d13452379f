"""How far an effect stands above the noise floor: empirical p-values, z-scores and the
Benjamini-Hochberg false discovery rate over the units of a sample.

The floor of a sample is the distribution of effects that ablating phantom rows (rows of the
design's kind that belong to no unit, :mod:`ensattr_fast.codes.phantoms`) has on it, from the
same noise. An effect e against P floor values f_1..f_P:

- p = (1 + #{f_j >= e}) / (P + 1), the empirical p-value (never 0: the effect itself counts as
  one draw of the null). Its resolution is 1/(P + 1); an effect beyond every floor value gets
  instead the upper tail of the predictive distribution of one more floor value under a normal
  fitted to the logarithms of the floor (Student t with P - 1 degrees of freedom, scale
  sd sqrt(1 + 1/P): the fit's own uncertainty widens the tail), capped at 1/(P + 1), so that
  copies far above the floor get the small p-values they deserve (Knijnenburg et al. 2009 fit a
  generalised Pareto tail for the same purpose; a log-normal is the simpler choice for
  distances; signed scores with floor values <= 0 get the fit on the values themselves);
- z = (e - mean f) / std f;
- q: Benjamini-Hochberg adjusted p-values over the ``tests`` hypotheses of a row (the units a
  check chose from: units left unchecked count as p = 1), flagged when q <= alpha.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from scipy import stats

__all__ = ["empirical_pvalues", "benjamini_hochberg", "Significance", "significance", "trend_pvalues"]

_TINY = 1e-300


def empirical_pvalues(effects: np.ndarray, floor: np.ndarray, tail: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """p-values and z-scores of ``effects`` [..., K] against ``floor`` [..., P] (same leading
    axes; larger effects are more extreme). NaN effects (and rows whose floor has no finite
    value) give NaN. ``tail``: extrapolate beyond the floor's largest value (module doc)."""
    effects = np.asarray(effects, np.float64)
    floor = np.asarray(floor, np.float64)
    finite = np.isfinite(floor)
    n = finite.sum(-1, keepdims=True)
    sorted_floor = np.sort(np.where(finite, floor, np.inf), axis=-1)  # non-finite last
    at_least = np.empty(effects.shape)
    for index in np.ndindex(effects.shape[:-1]):
        row = sorted_floor[index][: int(n[index][0])]
        at_least[index] = len(row) - np.searchsorted(row, effects[index], side="left")
    p = (1.0 + at_least) / (n + 1.0)
    mean = np.nanmean(np.where(finite, floor, np.nan), -1, keepdims=True) if floor.size else np.full(n.shape, np.nan)
    sd = _std(floor, finite)
    z = (effects - mean) / np.where(sd > 0, sd, np.nan)
    if tail:
        p = np.where((at_least == 0) & (n > 1), np.minimum(p, _log_normal_tail(effects, floor, finite)), p)
    bad = ~np.isfinite(effects) | (n == 0)
    return np.where(bad, np.nan, p), np.where(bad, np.nan, z)


def _std(floor: np.ndarray, finite: np.ndarray) -> np.ndarray:
    n = finite.sum(-1, keepdims=True)
    values = np.where(finite, floor, 0.0)
    mean = values.sum(-1, keepdims=True) / np.maximum(n, 1)
    var = (np.where(finite, (floor - mean) ** 2, 0.0)).sum(-1, keepdims=True) / np.maximum(n - 1, 1)
    return np.where(n > 1, np.sqrt(var), np.nan)


def _log_normal_tail(effects: np.ndarray, floor: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Predictive upper tail of a normal fitted to log(floor) (to the floor itself where a row
    has values <= 0, as signed scores do)."""
    positive = np.where(finite, floor > 0, True).all(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(positive, np.log(np.where(finite & (floor > 0), floor, 1.0)), floor)
        points = np.where(positive, np.log(np.maximum(effects, _TINY)), effects)
    n = finite.sum(-1, keepdims=True)
    sd = _std(values, finite) * np.sqrt(1.0 + 1.0 / np.maximum(n, 1))
    mean = np.where(finite, values, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = stats.t.sf((points - mean) / sd, df=np.maximum(n - 1, 1))
    return np.where(np.isfinite(tail), np.maximum(tail, _TINY), 1.0)


def benjamini_hochberg(p: np.ndarray, tests: Optional[int] = None) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) along the last axis.

    ``tests``: the number of hypotheses m of a row (at least its finite p-values); the ones not
    given count as p = 1, which only raises every q. NaN stays NaN. ``q_(i) = min_{j >= i}
    m p_(j) / j`` for the sorted p-values, capped at 1.
    """
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    for index in np.ndindex(p.shape[:-1]):
        row = p[index]
        finite = np.flatnonzero(np.isfinite(row))
        m = max(len(finite), tests or 0)
        if not len(finite):
            continue
        order = finite[np.argsort(row[finite], kind="stable")]
        ranked = row[order] * m / np.arange(1, len(order) + 1)
        q[index][order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q


class Significance(dict):
    """``pvalue``, ``zscore``, ``qvalue`` [..., K] and ``significant`` uint8 [..., K]."""


def significance(effects: np.ndarray, floor: np.ndarray, alpha: float = 0.05,
                 tests: Optional[int] = None) -> Significance:
    """Everything a results file stores beside effects [..., K] with their floor [..., P]."""
    if not 0 < alpha < 1 or math.isnan(alpha):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p, z = empirical_pvalues(effects, floor)
    q = benjamini_hochberg(p, tests)
    return Significance(pvalue=p.astype(np.float32), zscore=z.astype(np.float32), qvalue=q.astype(np.float32),
                        significant=(np.nan_to_num(q, nan=1.0) <= alpha).astype(np.uint8))


def trend_pvalues(subsets: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """p-value [C] of a row-permutation trend test, for C copies each replayed under K member
    subsets ``subsets`` bool [C, K, M] (subset 0: the members that excluded the copied units; the
    others: phantom subsets of the same size from the same pool; a row of False where there is
    none) with effects ``moved`` [C, K] (how far each replay moved from the copied units).

    Each subset j is read as the excluder set of a row: row 0 the copied units' own, row j a
    phantom row's. A row's statistic is the Spearman correlation, over the replays, between the
    share of each replay's members that the row excludes and the replay's effect: a unit that
    made the copy pulls the replays that keep more of its includers back toward it, whatever the
    rest of each replay holds. Under the null (the copied units do not matter to this sample) the
    copied units' row is one more random row, exchangeable with the phantoms', so
    p = (1 + #{phantom rows j: T_j >= T_0}) / (1 + #phantom rows) is valid; it uses every replay's
    effect, where the floor's p-value (:func:`empirical_pvalues`) compares replay 0's effect alone
    with the others'. NaN where fewer than two phantoms remain.
    """
    subsets = np.asarray(subsets, dtype=bool)
    moved = np.asarray(moved, dtype=np.float64)
    out = np.full(len(moved), np.nan)
    for c in range(len(moved)):
        valid = subsets[c].any(1) & np.isfinite(moved[c])
        if not valid[0] or valid.sum() < 3:
            continue
        sets = subsets[c][valid].astype(np.float64)  # [K', M]; row 0 is the copied units'
        share = sets @ sets.T / sets.sum(1)[None, :]  # [replay k, row r]: share of k's members row r excludes
        effect = _ranks(moved[c][valid])
        statistic = np.array([_pearson(_ranks(share[:, r]), effect) for r in range(len(sets))])
        out[c] = (1 + np.sum(statistic[1:] >= statistic[0] - 1e-12)) / len(sets)
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share theirs), as Spearman's correlation takes them."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else 0.0

