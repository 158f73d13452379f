"""Validity metrics: how far ablations move samples, and how well cheap scores agree with them.

- counterfactual radius CR(s) = max_u ||x^(-u) - x|| (ABC paper), here over the units whose
  exact counterfactuals were computed;
- agreement of a predicted score with the exact counterfactual distances: Spearman correlation
  over all (sample, unit) pairs, and the share of samples whose unit of largest exact effect
  is among the predicted top 3;
- false attribution rate (ABC protocol): attribute each sample to its pixel-nearest training
  unit, ablate that unit, and count how often the counterfactual's nearest unit is still the
  same one, although the ablated ensemble never saw it; the same for a random unit;
- linear datamodeling score (LDS): for models trained on random halves of the units, the
  Spearman correlation, per query, between their actual losses and the losses an influence
  matrix predicts for their halves, averaged over queries.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
from scipy import stats

__all__ = ["counterfactual_radius", "agreement", "lds", "mean_interval"]


def counterfactual_radius(distances: np.ndarray) -> np.ndarray:
    """Largest exact counterfactual distance of each sample [S] (over checked units)."""
    return np.nanmax(np.where(np.isfinite(distances), distances, np.nan), axis=1)


def agreement(predicted: np.ndarray, exact: np.ndarray, top: int = 3) -> Dict[str, float]:
    """Spearman correlation of predicted and exact distances over all (sample, unit) pairs,
    and the share of samples whose largest exact effect is among the ``top`` predicted."""
    valid = np.isfinite(predicted) & np.isfinite(exact)
    rho = stats.spearmanr(predicted[valid], exact[valid]).statistic if valid.sum() > 2 else math.nan
    hits = []
    for p, e, ok in zip(predicted, exact, valid):
        if ok.sum() == 0:
            continue
        p, e = np.where(ok, p, -np.inf), np.where(ok, e, -np.inf)
        hits.append(int(np.argmax(e)) in np.argsort(-p, kind="stable")[:top].tolist())
    return {"spearman": float(rho), f"top{top}": float(np.mean(hits)) if hits else math.nan,
            "pairs": int(valid.sum())}


def mean_interval(values: np.ndarray) -> Dict[str, float]:
    """Mean and its normal-approximation 95% interval over finite values."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "n": int(len(v))}


def lds(influence: np.ndarray, subsets: np.ndarray, losses: np.ndarray,
        sign: Optional[float] = -1.0) -> Dict[str, float]:
    """Linear datamodeling score of one influence matrix.

    Args:
        influence: [Q, N] scores (positive: the unit supports the query).
        subsets: [R, N] bool, unit u in the training half of reference model r.
        losses: [Q, R] actual diffusion loss of query q under reference model r.
        sign: predicted loss of a subset = sign * (sum of its units' scores); -1 for scores
            where a supporting unit lowers the loss, None for unsigned scores (uses -1).
    Returns:
        mean LDS over queries with its 95% interval, and the per-query values' count.
    """
    predicted = (sign if sign is not None else -1.0) * (np.nan_to_num(influence) @ subsets.T.astype(np.float64))
    per_query = np.array([
        stats.spearmanr(predicted[q], losses[q]).statistic if np.ptp(predicted[q]) > 0 else np.nan
        for q in range(len(losses))
    ])
    return mean_interval(per_query) | {"per_query": per_query.tolist()}
