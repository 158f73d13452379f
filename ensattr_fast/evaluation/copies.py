"""The copy test: which training units a sample copies (pixel L2, or L2 between embeddings),
and the planted near-copies that memorization's null check proves non-copies against."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import Dataset
from ..errors import DataError

__all__ = ["CopyTest", "plant_null"]


class CopyTest:
    """How samples are compared with the training images: pixel L2 on the data scale, or, with
    ``embed`` (a function of images float32 [B, C, H, W] in [-1, 1] to embeddings [B, k]), L2
    between embeddings, the training images embedded once. A sample copies every training image
    within ``threshold``."""

    def __init__(self, data: Dataset, unit_of: Tensor, threshold: float,
                 embed: Optional[Callable[[Tensor], Tensor]] = None):
        self.data, self.unit_of, self.threshold, self.embed = data, unit_of, float(threshold), embed
        self._train = None if embed is None else torch.cat([self._embedded(b) for b in data.blocks()])

    def _embedded(self, images: Tensor) -> Tensor:
        out = torch.as_tensor(self.embed(images.float())).detach().float().cpu()
        if out.ndim != 2 or len(out) != len(images) or not torch.isfinite(out).all():
            raise DataError(f"the copy test's embedding must map {len(images)} images to finite rows [{len(images)}, "
                            f"k], got {tuple(out.shape)}")
        return out

    def distances(self, images: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """Distances [Q, n] (or [Q, len(rows)]) of images [Q, C, H, W] to the training images."""
        if self._train is None:
            if rows is None:
                return self.data.pixel_distances(images)
            return torch.cdist(images.flatten(1).float(), self.data.read(rows).flatten(1))
        train = self._train if rows is None else self._train[rows]
        return torch.cdist(self._embedded(images), train)

    def copied(self, images: Tensor) -> Tuple[Tensor, Tensor, List[List[int]]]:
        """Each image's nearest training unit int64 [S] and distance [S], and the units it
        copies (every unit with an image within the threshold; empty for no copy)."""
        distances = self.distances(images)
        nearest = distances.min(1)
        within = distances < self.threshold
        sets = [self.unit_of[row].unique().tolist() for row in within]
        return self.unit_of[nearest.indices], nearest.values, sets

    def distance_to_units(self, images: Tensor, sets: Sequence[Sequence[int]]) -> Tensor:
        """Distance [S, K] of images [S, K, C, H, W] to the nearest training image of ``sets[s]``."""
        out = torch.empty(images.shape[:2])
        for s, units in enumerate(sets):
            rows = torch.nonzero(torch.isin(self.unit_of, torch.tensor(list(units)))).flatten()
            out[s] = self.distances(images[s], rows).min(1).values
        return out


def plant_null(test: CopyTest, targets: List[List[int]], copied: List[List[int]], distance: Tensor,
           seed: int) -> None:
    """The planted null: each non-copy's target becomes the units within the threshold of a
    near-copy of a training image drawn at random (its own unit when, e.g. under an embedding,
    the noise carries it past the threshold), and its distance the near-copy's to them."""
    rng = np.random.default_rng([int(seed), 0x9A7])
    clean = [s for s, c in enumerate(copied) if not c]
    if not clean:
        return
    rows = torch.as_tensor(rng.choice(len(test.unit_of), len(clean)), dtype=torch.long)
    images = test.data.read(rows).float()
    noise = torch.as_tensor(rng.standard_normal(tuple(images.shape)), dtype=images.dtype)
    noise *= test.threshold / 4 / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (noise.ndim - 1))
    _, _, sets = test.copied(images + noise)
    for i, s in enumerate(clean):
        targets[s] = sets[i] or [int(test.unit_of[rows[i]])]
    distance[clean] = test.distance_to_units((images + noise)[:, None], [targets[s] for s in clean])[:, 0]
