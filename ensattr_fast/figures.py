"""The report's pictures: each sample beside its counterfactuals and the training data they
removed. Drawn on a matplotlib ``Figure`` of its own, never through pyplot, so that a notebook's
backend and open figures are left as they are."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["counterfactual_figure"]


def _show(ax, image: np.ndarray, title: str = "") -> None:
    """An image [C, H, W] in [-1, 1] on an axis without ticks."""
    picture = np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1)
    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def counterfactual_figure(
    path: os.PathLike,
    samples: np.ndarray,
    counterfactuals: np.ndarray,
    units: np.ndarray,
    distances: np.ndarray,
    unit_images: Optional[np.ndarray] = None,
    unit_names: Optional[Sequence[str]] = None,
    scores: Optional[np.ndarray] = None,
    score_name: str = "score",
    score_distribution: Optional[np.ndarray] = None,
    rows: int = 8,
    title: str = "",
) -> None:
    """Write a PNG: per sample, a row of [sample, counterfactual per ablated unit] and, below,
    the ablated units' training images; an optional histogram of all scores at the bottom.

    Args:
        samples [S, C, H, W]; counterfactuals [S, K, C, H, W]; units, distances [S, K];
        unit_images [S, K, C, H, W] (a representative image of each ablated unit);
        scores [S, K] (a predicted score per counterfactual); score_distribution: any 1-D array.
    """
    S, K = units.shape
    rows = min(rows, S)
    per_sample = 2 if unit_images is not None else 1
    extra = 1 if score_distribution is not None else 0
    fig = Figure(figsize=(1.4 * (K + 1), 1.25 * (rows * per_sample + 2 * extra) + 0.4))
    grid = fig.add_gridspec(rows * per_sample + 2 * extra, K + 1)
    for i in range(rows):
        r = i * per_sample
        _show(fig.add_subplot(grid[r, 0]), samples[i], f"sample {i}")
        for k in range(K):
            if units[i, k] < 0:
                continue
            name = unit_names[units[i, k]] if unit_names is not None else str(units[i, k])
            label = f"-{name}\nd={distances[i, k]:.3g}"
            if scores is not None:
                label += f" {score_name}={scores[i, k]:.3g}"
            _show(fig.add_subplot(grid[r, k + 1]), counterfactuals[i, k], label)
            if unit_images is not None:
                _show(fig.add_subplot(grid[r + 1, k + 1]), unit_images[i, k], f"unit {name}")
    if extra:
        ax = fig.add_subplot(grid[rows * per_sample :, :])
        ax.hist(score_distribution[np.isfinite(score_distribution)], bins=80, color="0.3")
        ax.set_yscale("log")
        ax.set_xlabel(f"{score_name} of every (sample, unit)")
        ax.set_ylabel("count")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
