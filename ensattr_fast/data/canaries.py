"""Planted canaries: training images copied many times, to test that copies are found and proven.

A canary is a training image transformed (mirrored left-right by default, or turned upside
down, rotated, negated, transposed or shifted: :data:`CANARY_KINDS`), an image the data does not
otherwise hold, appended ``copies`` times. Every original example is its own unit and all copies
of one canary form one unit ("canary 0", ...), so a plan over group units gives each canary one
code row: the members that saw it saw every copy, and its excluders saw none. A model that
memorises a canary draws near-copies of it; the excluders cannot.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataError
from ..runtime.files import atomic_output, check_output
from .dataset import Dataset

__all__ = ["plant_canaries", "save_canaries", "Canaries", "CANARY_KINDS"]

#: how a canary is made from a training image [n, C, H, W]
CANARY_KINDS = {
    "mirror": lambda x: x.flip(-1),
    "upside_down": lambda x: x.flip(-2),
    "rotate": lambda x: x.rot90(1, (-2, -1)),
    "negative": lambda x: -x,
    "transpose": lambda x: x.transpose(-1, -2),
    "shift": lambda x: x.roll(2, -1),
}


@dataclasses.dataclass(frozen=True)
class Canaries:
    """A data set with canaries planted: ``data`` (originals first, then the copies, with one
    group per unit), ``units`` (the canary unit ids under group units, [K]) and ``sources``
    (the index of the original each canary mirrors, [K])."""

    data: Dataset
    units: Tuple[int, ...]
    sources: Tuple[int, ...]


def plant_canaries(data: Dataset, canaries: int = 3, copies: int = 60, seed: int = 0,
                   min_distance: float = 3.0, kinds: Sequence[str] = ("mirror",)) -> Canaries:
    """``data`` with ``canaries`` transformed training images appended ``copies`` times each;
    canary k is of kind ``kinds[k % len(kinds)]`` (:data:`CANARY_KINDS`).

    The canaries are drawn (by ``seed``) among the images whose transform lies at least
    ``min_distance`` (pixel L2) from every original image, so that a copy of a canary is told
    apart from the data it came from. Groups: original example i is unit ``str(i)``, the copies
    of canary k the unit ``"canary k"``; under group units (``Units.from_labels``) the originals
    keep their ids 0..n-1 and canary k is unit n + k.
    """
    if not data.in_memory:
        raise DataError(f"{data.name}: canaries are planted in data held in memory")
    if canaries < 1 or copies < 1:
        raise DataError(f"plant at least one canary of at least one copy, got {canaries} x {copies}")
    unknown = [k for k in kinds if k not in CANARY_KINDS]
    if unknown or not kinds:
        raise DataError(f"canary kinds must be among {sorted(CANARY_KINDS)}, got {list(kinds)}")
    images = data.images.to(torch.float32)
    if images.shape[-1] != images.shape[-2] and {"rotate", "transpose"} & set(kinds):
        raise DataError(f"{data.name}: rotated and transposed canaries need square images")
    rng = np.random.default_rng([int(seed), 0xCA7])
    sources = np.zeros(canaries, dtype=np.int64)
    made, taken = [None] * canaries, []
    for kind in dict.fromkeys(kinds):  # each kind's canaries drawn at once, sorted; sources distinct
        mine = [k for k in range(canaries) if kinds[k % len(kinds)] == kind]
        if not mine:
            continue
        transformed = CANARY_KINDS[kind](images)
        nearest = torch.cat([torch.cdist(block.flatten(1), images.flatten(1)).min(1).values
                             for block in transformed.split(1024)])
        eligible = np.setdiff1d(torch.nonzero(nearest >= min_distance).flatten().numpy(), taken)
        if len(eligible) < len(mine):
            raise DataError(f"{data.name}: only {len(eligible)} images have a {kind} at least {min_distance:g} "
                            f"from every image; {len(mine)} canaries of that kind asked")
        picks = np.sort(rng.choice(eligible, len(mine), replace=False))
        taken += picks.tolist()
        for k, pick in zip(mine, picks):
            sources[k], made[k] = pick, transformed[int(pick):int(pick) + 1]
    n = len(data)
    planted = torch.cat(made).repeat_interleave(copies, 0)
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
