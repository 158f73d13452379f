"""Planted canaries: training images copied many times, to test that copies are found and proven.

A canary is a training image mirrored left-right (an image the data does not otherwise hold),
appended ``copies`` times. Every original example is its own unit and all copies of one canary
form one unit ("canary 0", ...), so a plan over group units gives each canary one code row: the
members that saw it saw every copy, and its excluders saw none. A model that memorises a canary
draws near-copies of it; the excluders cannot.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ..errors import DataError
from ..runtime.files import atomic_output, check_output
from .dataset import Dataset

__all__ = ["plant_canaries", "save_canaries", "Canaries"]


@dataclasses.dataclass(frozen=True)
class Canaries:
    """A data set with canaries planted: ``data`` (originals first, then the copies, with one
    group per unit), ``units`` (the canary unit ids under group units, [K]) and ``sources``
    (the index of the original each canary mirrors, [K])."""

    data: Dataset
    units: Tuple[int, ...]
    sources: Tuple[int, ...]


def plant_canaries(data: Dataset, canaries: int = 3, copies: int = 60, seed: int = 0,
                   min_distance: float = 3.0) -> Canaries:
    """``data`` with ``canaries`` mirrored training images appended ``copies`` times each.

    The canaries are drawn (by ``seed``) among the images whose mirror lies at least
    ``min_distance`` (pixel L2) from every original image, so that a copy of a canary is told
    apart from the data it came from. Groups: original example i is unit ``str(i)``, the copies
    of canary k the unit ``"canary k"``; under group units (``Units.from_labels``) the originals
    keep their ids 0..n-1 and canary k is unit n + k.
    """
    if not data.in_memory:
        raise DataError(f"{data.name}: canaries are planted in data held in memory")
    if canaries < 1 or copies < 1:
        raise DataError(f"plant at least one canary of at least one copy, got {canaries} x {copies}")
    images = data.images.to(torch.float32)
    mirrored = images.flip(-1)
    nearest = torch.cat([torch.cdist(block.flatten(1), images.flatten(1)).min(1).values
                         for block in mirrored.split(1024)])
    eligible = torch.nonzero(nearest >= min_distance).flatten().numpy()
    if len(eligible) < canaries:
        raise DataError(f"{data.name}: only {len(eligible)} images have a mirror at least {min_distance:g} "
                        f"from every image; {canaries} canaries asked")
    sources = np.sort(np.random.default_rng([int(seed), 0xCA7]).choice(eligible, canaries, replace=False))
    n = len(data)
    planted = mirrored[torch.from_numpy(sources)].repeat_interleave(copies, 0)
    groups = [str(i) for i in range(n)] + [f"canary {k}" for k in range(canaries) for _ in range(copies)]
    labels = None
    if data.labels is not None:
        labels = torch.cat([data.labels, data.labels[torch.from_numpy(sources)].repeat_interleave(copies)])
    names = [str(i) for i in range(n + canaries * copies)]
    planted_data = Dataset(torch.cat([images, planted]), labels, f"{data.name} with {canaries} canaries",
                           tuple(groups), tuple(names))
    return Canaries(planted_data, tuple(range(n, n + canaries)), tuple(int(s) for s in sources))


def save_canaries(path_npz: os.PathLike, path_metadata: os.PathLike, canaries: Canaries,
                  overwrite: bool = False) -> None:
    """Write the planted data as an ``.npz`` (``images`` float32 [n, C, H, W] in [-1, 1], and
    ``labels`` where known) and a metadata CSV (columns ``example``, ``group``) that
    ``ensattr plan --data X.npz --units group --metadata Y.csv`` loads. Existing files are
    replaced only with ``overwrite``; each appears whole or not at all."""
    if Path(path_npz).suffix != ".npz":
        raise DataError(f"{path_npz}: the images go to an .npz file")
    check_output(path_npz, "path_npz", overwrite)
    check_output(path_metadata, "path_metadata", overwrite, inputs={"path_npz": path_npz})
    data = canaries.data
    arrays = dict(images=data.images.numpy().astype(np.float32))
    if data.labels is not None:
        arrays["labels"] = data.labels.numpy()
    with atomic_output(path_npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    rows: List[Tuple[str, str]] = [(str(i), group) for i, group in enumerate(data.groups)]
    with atomic_output(path_metadata) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["example", "group"])
        writer.writerows(rows)
