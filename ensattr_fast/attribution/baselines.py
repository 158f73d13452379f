"""Baselines every method is compared with: training images nearest in pixels."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..data import Dataset, check_images
from ..errors import DataError

__all__ = ["nearest_units", "pixel_similarity"]


def nearest_units(images: Tensor, data: Dataset, unit_of: Tensor, k: int) -> Tensor:
    """The k units whose training images lie nearest (pixel L2) to each image [S, k]."""
    check_images(images, f"samples searched among the images of {data.name}", shape=data.data_shape,
                 allow_empty=True)
    if len(unit_of) != len(data):
        raise DataError(f"the units map {len(unit_of)} examples but {data.name} has {len(data)}")
    distances = data.pixel_distances(images)
    order = distances.argsort(1)
    out = torch.full((len(images), k), -1, dtype=torch.long)
    for i, row in enumerate(unit_of[order]):
        seen: List[int] = []
        for u in row.tolist():
            if u not in seen:
                seen.append(u)
            if len(seen) == k:
                break
        out[i, : len(seen)] = torch.tensor(seen)
    return out


def pixel_similarity(queries: Tensor, data: Dataset, unit_of: Tensor, n_units: int,
                     nearest: Optional[int] = None) -> Tensor:
    """[Q, N]: minus the pixel distance from each query to the unit's nearest image; with
    ``nearest``, instead 1 for the query's ``nearest`` closest units and 0 elsewhere."""
    distance = data.pixel_distances(queries)
    closest = torch.full((len(queries), n_units), float("inf"))
    closest.scatter_reduce_(1, unit_of.expand(len(queries), -1), distance, "amin")
    if nearest is None:
        return -closest
    top = closest.topk(nearest, dim=1, largest=False).indices
    return torch.zeros_like(closest).scatter_(1, top, 1.0)
