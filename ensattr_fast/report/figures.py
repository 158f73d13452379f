"""The report's pictures: each sample beside its counterfactuals and the training data they
removed. Drawn on a matplotlib ``Figure`` of its own, never through pyplot, so that a notebook's
backend and open figures are left as they are."""

from __future__ import annotations

import os
import textwrap
from typing import Dict, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["counterfactual_figure", "SIGNIFICANT_COLOUR", "NOISE_COLOUR"]

SIGNIFICANT_COLOUR = "#c0392b"  # an effect above the noise floor
NOISE_COLOUR = "#8c8c8c"  # an effect within it


def _show(ax, image: np.ndarray, title: str = "", **style) -> None:
    """An image [C, H, W] in [-1, 1] on an axis without ticks; ``style``: of the title."""
    picture = np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1)
    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=6.5, **style)


def _frame(ax, colour: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _label(ax, text: str) -> None:
    """A text-only cell of the grid."""
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=6.5, transform=ax.transAxes)


def _number(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2g}"


def _verdict(sig: Dict, i: int, k: int, distance: float):
    """(two title lines, title style, frame colour, frame width) of counterfactual (i, k)
    against the sample's noise floor."""
    p, q = (sig[key][i, k] if sig.get(key) is not None else None for key in ("pvalue", "qvalue"))
    if sig["significant"][i, k]:
        z = sig["zscore"][i, k] if sig.get("zscore") is not None else None
        return (f"d {distance:.3g} · q {_number(q)}\np {_number(p)} · z {_number(z)}",
                dict(color=SIGNIFICANT_COLOUR, fontweight="bold"), SIGNIFICANT_COLOUR, 2.0)
    return (f"d {distance:.3g} · within noise\np {_number(p)} · q {_number(q)}",
            dict(color=NOISE_COLOUR), NOISE_COLOUR, 0.6)


def _floor_text(sig: Optional[Dict], certificate: Optional[Dict], i: int) -> str:
    """The sample's noise floor and certified radius, one fact a line."""
    lines = []
    if sig is not None and sig.get("floor_median") is not None:
        lines.append(f"floor med {sig['floor_median'][i]:.3g}\nfloor p95 {sig['floor_p95'][i]:.3g}")
    if certificate is not None and "bound" in certificate and i < len(certificate["bound"]):
        exact = certificate.get("meta", {}).get("exhaustive")
        lines.append(f"certified r ≤ {certificate['bound'][i]:.3g}" if exact else
                     f"r ≈ {certificate['bound'][i]:.3g} (estimate)")
    return "\n".join(lines)


def _counterfactual_row(fig, grid, r, i, K, samples, counterfactuals, units, distances, unit_names,
                        scores, score_name, sig, certificate) -> None:
    ax = fig.add_subplot(grid[r, 0])
    _show(ax, samples[i], f"sample {i}")
    ax.set_xlabel(_floor_text(sig, certificate, i), fontsize=6)
    for k in range(K):
        if units[i, k] < 0:
            continue
        name = unit_names[units[i, k]] if unit_names is not None else str(units[i, k])
        head = f"-{name}" + (f"  {score_name} {scores[i, k]:.3g}" if scores is not None else "")
        ax = fig.add_subplot(grid[r, k + 1])
        if sig is None:
            _show(ax, counterfactuals[i, k], f"{head}\nd={distances[i, k]:.3g}")
            continue
        text, style, colour, width = _verdict(sig, i, k, distances[i, k])
        _show(ax, counterfactuals[i, k], f"{head}\n{text}", **style)
        _frame(ax, colour, width)


def _top_row(fig, grid, r, i, top: Dict, unit_names) -> None:
    _label(fig.add_subplot(grid[r, 0]), f"top by\n{top['method']}")
    for j, unit in enumerate(top["units"][i]):
        if unit < 0:
            continue
        name = unit_names[unit] if unit_names is not None else str(unit)
        _show(fig.add_subplot(grid[r, j + 1]), top["images"][i, j], f"{name}\n{top['scores'][i, j]:.3g}")


def _distributions(fig, grid, row, columns, score_distribution, score_name, sig, distances, units) -> None:
    """The histogram of all scores and, with a floor, the exact distances against it."""
    panels = [p for p in ("scores", "floor") if (p == "scores" and score_distribution is not None)
              or (p == "floor" and sig is not None and sig.get("floor") is not None)]
    width = columns // max(len(panels), 1)
    for n, panel in enumerate(panels):
        ax = fig.add_subplot(grid[row:, n * width: columns if n == len(panels) - 1 else (n + 1) * width])
        if panel == "scores":
            ax.hist(score_distribution[np.isfinite(score_distribution)], bins=80, color="0.3")
            ax.set_yscale("log")
            ax.set_xlabel(f"{score_name} of every (sample, unit)", fontsize=7)
            ax.set_ylabel("count", fontsize=7)
            continue
        floor = sig["floor"][np.isfinite(sig["floor"])]
        exact = distances[(units >= 0) & np.isfinite(distances)]
        bins = np.linspace(0, max(floor.max(initial=0), exact.max(initial=0)) * 1.02 + 1e-12, 40)
        ax.hist(floor, bins=bins, color=NOISE_COLOUR, alpha=0.7, density=True, label="phantom units (floor)")
        ax.hist(exact, bins=bins, color="#2c3e50", alpha=0.6, density=True, label="checked real units")
        ax.set_xlabel("exact counterfactual distance d", fontsize=7)
        ax.set_ylabel("density", fontsize=7)
        ax.legend(fontsize=6)


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
    significance: Optional[Dict] = None,
    certificate: Optional[Dict] = None,
    top: Optional[Dict] = None,
) -> None:
    """Write a PNG: per sample, a row of [sample, counterfactual per ablated unit] and, below,
    the ablated units' training images and the sample's top training images by a method;
    histograms of all scores and of the noise floor at the bottom.

    Args:
        samples [S, C, H, W]; counterfactuals [S, K, C, H, W]; units, distances [S, K];
        unit_images [S, K, C, H, W] (a representative image of each ablated unit);
        scores [S, K] (a predicted score per counterfactual); score_distribution: any 1-D array.
        significance: ``significant`` [S, K] bool; optional ``pvalue``, ``qvalue``, ``zscore``
            [S, K], ``floor_median``, ``floor_p95`` [S], ``floor`` (phantom distances, any shape).
            Without it the counterfactuals carry no mark (files from before the noise floor).
        certificate: ``bound`` [S], the certified radius of each sample.
        top: ``method``, ``units``, ``scores`` [S, k], ``images`` [S, k, C, H, W].
    """
    S, K = units.shape
    rows = min(rows, S)
    per_sample = 1 + (unit_images is not None) + (top is not None)
    columns = 1 + max(K, top["units"].shape[1] if top is not None else 0)
    extra = 2 if score_distribution is not None or (significance or {}).get("floor") is not None else 0
    fig = Figure(figsize=(1.45 * columns, 1.45 * (rows * per_sample + extra) + 0.6))
    grid = fig.add_gridspec(rows * per_sample + extra, columns)
    for i in range(rows):
        r = i * per_sample
        _counterfactual_row(fig, grid, r, i, K, samples, counterfactuals, units, distances, unit_names,
                            scores, score_name, significance, certificate)
        if unit_images is not None:
            r += 1
            _label(fig.add_subplot(grid[r, 0]), "removed\nunits")
            for k in np.flatnonzero(units[i] >= 0):
                name = unit_names[units[i, k]] if unit_names is not None else str(units[i, k])
                _show(fig.add_subplot(grid[r, k + 1]), unit_images[i, k], f"unit {name}")
        if top is not None:
            _top_row(fig, grid, r + 1, i, top, unit_names)
    if extra:
        _distributions(fig, grid, rows * per_sample, columns, score_distribution, score_name,
                       significance, distances[:rows], units[:rows])
    if title:  # wrapped to the figure's width: a report of few columns is narrow
        width = max(40, int(fig.get_figwidth() * 15))
        fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
