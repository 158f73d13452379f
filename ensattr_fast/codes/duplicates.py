"""Exact and near duplicates among training images, found before a plan scatters them.

Two images are duplicates when their distance (pixel L2 on the data scale [-1, 1], the scale of
``memorization --threshold``; or L2 between user-given embeddings) is at most ``radius``; a
duplicate set is a connected component of that relation (A near B and B near C puts all three in
one set). A plan that leaves a set over several units lets every member see some copy, so no
ensemble has forgotten the image; grouping each set into one unit restores exact ablation.

Search. Every pair within the radius is found exactly, by a range search in two stages:

1. **Filter** on the points projected onto their top principal directions (at most
   ``_FILTER_DIMS``). The projection is orthonormal, so it never lengthens a distance: every
   pair within ``radius`` in full dimension is within it projected. The range search there is a
   flat (brute-force) index: faiss's ``IndexFlatL2`` when faiss-cpu is installed (the
   ``ensattr_fast[index]`` extra), otherwise the same blocked matrix product in torch, so that
   ``plan`` works without the extra.
2. **Confirm** each candidate pair by its distance in full dimension, in float64.

Duplicates are sparse in any data worth training on, so the candidates are few and the cost is
the filter's n^2 x k products: seconds at 10^5 images. The result does not depend on the
projection or the thread count (the filter only admits, with slack; the confirmation decides),
so a plan's units replay bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from ..errors import DataError
from ..runtime import memory

__all__ = ["Duplicates", "find_duplicates", "DUPLICATE_MODES"]

DUPLICATE_MODES = ("group", "keep", "refuse", "off")
_FILTER_DIMS = 64  # principal directions of the filter: the flat search's cost is n^2 x this
_PAIRS_SHARE = 1 / 32  # of the memory budget: the float32 distances of the rows x points compared at once
_SLACK = 1e-4  # relative slack of the float32 filter, far above its rounding error


@dataclasses.dataclass(frozen=True)
class Duplicates:
    """Duplicate sets of n images: ``set_of[i]`` is the set of image i (sets numbered from 0 in
    order of their first image), -1 for an image with no duplicate."""

    set_of: Tensor  # int64 [n]
    radius: float
    space: str = "pixels"  # or "embeddings"; "none": no search was made (``--duplicates off``)

    @property
    def n_sets(self) -> int:
        return int(self.set_of.max().item()) + 1 if len(self.set_of) else 0

    @property
    def sizes(self) -> Tensor:
        """Images per set [n_sets]."""
        return torch.bincount(self.set_of[self.set_of >= 0], minlength=self.n_sets)

    @property
    def n_images(self) -> int:
        """Images that have a duplicate."""
        return int((self.set_of >= 0).sum().item())

    @property
    def largest(self) -> int:
        return int(self.sizes.max().item()) if self.n_sets else 0

    def members(self, index: int) -> Tensor:
        """The images of set ``index``, ascending."""
        return torch.nonzero(self.set_of == index).flatten()

    def __str__(self) -> str:
        where = "pixel L2" if self.space == "pixels" else "embedding L2"
        if self.space == "none":
            return "not searched (--duplicates off): copies of an image scattered over units go unnoticed"
        if not self.n_sets:
            return f"no duplicate images (none within {where} {self.radius:g})"
        sets = f"{self.n_sets} duplicate set{'s' if self.n_sets > 1 else ''}"
        return f"{self.n_images} images in {sets} within {where} {self.radius:g} (largest {self.largest})"


def find_duplicates(points: Tensor, radius: float, space: str = "pixels") -> Duplicates:
    """Duplicate sets of the images ``points`` [n, D] (flattened images or embeddings): every pair
    within L2 ``radius`` found exactly (module doc), sets as connected components."""
    if points.ndim != 2:
        raise DataError(f"duplicate search needs points [n, D], got shape {tuple(points.shape)}")
    if not radius >= 0:
        raise DataError(f"--duplicate-radius must be >= 0, got {radius}")
    n = len(points)
    if not torch.isfinite(points).all():
        raise DataError("the images (or embeddings) hold NaN or infinite values: no distance between them is defined")
    parent = np.arange(n)  # each image's set, as the smallest image it is linked to so far
    for rows, cols in _candidates(points, radius):
        keep = _confirm(points, rows, cols, radius)
        if keep.any():
            parent = _merge(parent, rows[keep], cols[keep])
    return Duplicates(_number_sets(parent), float(radius), space)


def _filter_points(points: Tensor) -> Tensor:
    """``points`` centred and projected onto their top principal directions, float32 [n, k]
    (the points themselves when D <= k). The directions come from an SVD of up to 1,024 evenly
    spaced points (under a second at D = 3,072): any orthonormal basis keeps the filter exact, the
    principal one keeps it tight."""
    mean = points.sum(0, dtype=torch.float64) / max(1, len(points))
    if points.shape[1] <= _FILTER_DIMS:
        return (points.double() - mean).float()
    sample = points[:: max(1, len(points) // 1024)][:1024].double() - mean
    _, _, vh = torch.linalg.svd(sample, full_matrices=False)
    basis = vh[:_FILTER_DIMS].T.float().contiguous()
    shift = (mean.float() @ basis)
    return torch.cat([block.float() @ basis - shift for block in points.split(8192)])


def _candidates(points: Tensor, radius: float) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Pairs (i < j) whose filtered distance is within ``radius`` (plus slack), block by block."""
    y = _filter_points(points)
    norms = (y.double() ** 2).sum(1)
    scale = float(norms.max()) if len(norms) else 0.0
    limit = radius**2 + _SLACK * (2 * scale + radius**2) + 1e-12
    index = _faiss_index(y)
    step = max(1, memory.share(_PAIRS_SHARE, 4) // max(1, len(y)))
    for start in range(0, len(y), step):
        block = y[start:start + step]
        if index is not None:
            lims, _, found = index.range_search(block.numpy(), limit)
            rows = np.repeat(np.arange(start, start + len(block)), np.diff(lims.astype(np.int64)))
            cols = found.astype(np.int64)
        else:
            d2 = norms[start:start + step, None].float() + norms[None].float() - 2 * block @ y.T
            rows, cols = (t.numpy() for t in torch.nonzero(d2 <= limit, as_tuple=True))
            rows = rows + start
        above = cols > rows
        yield rows[above], cols[above]


def _faiss_index(y: Tensor):
    """A faiss flat L2 index over ``y``, or None when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatL2(y.shape[1])
    index.add(np.ascontiguousarray(y.numpy()))
    return index


def _confirm(points: Tensor, rows: np.ndarray, cols: np.ndarray, radius: float) -> np.ndarray:
    """Which candidate pairs are within ``radius`` in full dimension (float64, row by row)."""
    keep = np.zeros(len(rows), dtype=bool)
    step = max(1, memory.share(_PAIRS_SHARE, 4) // max(1, points.shape[1]))
    for start in range(0, len(rows), step):
        i = torch.from_numpy(rows[start:start + step])
        j = torch.from_numpy(cols[start:start + step])
        d2 = ((points[i].double() - points[j].double()) ** 2).sum(1)
        keep[start:start + step] = (d2 <= radius**2).numpy()
    return keep


def _merge(parent: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Components of the links so far (``parent``) joined with new links, as each image's
    smallest linked image. Only n links are carried between blocks, however many pairs a block
    holds (a set of 10^4 exact copies has 5 x 10^7 pairs)."""
    n = len(parent)
    linked = parent != np.arange(n)
    i = np.concatenate([rows, np.nonzero(linked)[0]])
    j = np.concatenate([cols, parent[linked]])
    label = components(i, j, n)
    smallest = np.full(label.max() + 1, n)
    np.minimum.at(smallest, label, np.arange(n))
    return smallest[label]


def components(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Component of each of n nodes linked by the pairs (i[k], j[k]), numbered in order of their
    smallest node (scipy labels components as it meets them, from node 0 up)."""
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _number_sets(parent: np.ndarray) -> Tensor:
    """Set index per image from the smallest-linked-image labels: -1 alone, sets numbered in
    order of their first image."""
    n = len(parent)
    sizes = np.bincount(parent, minlength=n)
    in_set = sizes[parent] > 1
    firsts = np.unique(parent[in_set])
    number = np.full(n, -1, dtype=np.int64)
    number[firsts] = np.arange(len(firsts))
    out = np.where(in_set, number[parent], -1)
    return torch.from_numpy(out.astype(np.int64))


def check_embeddings(embeddings: Optional[np.ndarray], n: int) -> Optional[Tensor]:
    """User-given embeddings as float64 [n, k], or a DataError naming what is wrong."""
    if embeddings is None:
        return None
    e = np.asarray(embeddings)
    if e.ndim != 2 or len(e) != n:
        raise DataError(f"embeddings must be one row per training image, [{n}, k]; got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.number):
        raise DataError(f"embeddings must be numbers, got dtype {e.dtype}")
    return torch.from_numpy(e.astype(np.float64))
