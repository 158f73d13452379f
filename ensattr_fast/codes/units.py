"""Units and what a design achieved: the two data types every layer passes around."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import CodeError
from .clusters import kmeans
from .duplicates import components


@dataclasses.dataclass(frozen=True)
class Units:
    """The training set's partition into units: ``unit_of[i]`` is example i's unit."""

    unit_of: torch.Tensor  # int64 [n_examples]
    names: Tuple[str, ...]

    @property
    def n_units(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> torch.Tensor:
        """Examples per unit [N]."""
        return torch.bincount(self.unit_of, minlength=self.n_units)

    @classmethod
    def per_example(cls, n_examples: int) -> "Units":
        """One unit per training example (the default)."""
        return cls(torch.arange(n_examples), tuple(str(i) for i in range(n_examples)))

    @classmethod
    def from_labels(cls, labels: Sequence) -> "Units":
        """One unit per distinct label (class, artist, person), named by the label."""
        keys = [str(label.item() if hasattr(label, "item") else label) for label in labels]
        names = sorted(set(keys), key=lambda k: (len(k), k) if k.isdigit() else (math.inf, k))
        index = {name: u for u, name in enumerate(names)}
        return cls(torch.tensor([index[k] for k in keys], dtype=torch.long), tuple(names))

    @classmethod
    def from_clusters(cls, points: Tensor, k: int, seed: int = 0) -> "Units":
        """One unit per content cluster of ``points`` [n, D] (flattened images, float64 is
        used), named "cluster 0" .. "cluster k-1"; cluster 0 holds example 0 (see
        :func:`~ensattr_fast.codes.clusters.kmeans`). For data without metadata."""
        return cls(kmeans(points, k, seed), tuple(f"cluster {j}" for j in range(k)))

    def grouped(self, set_of: Tensor) -> Tuple["Units", int]:
        """These units with every duplicate set in one unit: units that hold images of one set
        (``set_of[i]``, -1 for none; :class:`~ensattr_fast.codes.duplicates.Duplicates`) are
        merged, transitively. A merged unit keeps its first unit's place and name, with how many
        it took in ("7 (+19 duplicates)"). Returns the units and how many were merged away."""
        n_units = self.n_units
        in_set = torch.nonzero(set_of >= 0).flatten()
        first = torch.full((int(set_of.max()) + 1 if len(in_set) else 0,), -1, dtype=torch.long)
        first = first.scatter_reduce(0, set_of[in_set], self.unit_of[in_set], "amin", include_self=False)
        links = np.stack([self.unit_of[in_set].numpy(), first[set_of[in_set]].numpy()])
        label = components(links[0], links[1], n_units)  # numbered by first unit: order is kept
        merged = np.bincount(label)
        names = [""] * len(merged)
        for u in range(n_units - 1, -1, -1):  # the first unit of each component names it
            names[label[u]] = self.names[u]
        names = [n if k == 1 else f"{n} (+{k - 1} duplicate{'s' if k > 2 else ''})" for n, k in zip(names, merged)]
        return Units(torch.from_numpy(label.astype(np.int64))[self.unit_of], tuple(names)), n_units - len(merged)


@dataclasses.dataclass(frozen=True)
class CodeStats:
    """What a design achieved."""

    n_units: int
    n_members: int
    row_weight_min: int
    row_weight_max: int
    column_load_min: int
    column_load_max: int
    min_distance: int  # Hamming distance between the closest two rows (0: duplicates)
    mean_distance: float
    min_effective_distance: int  # min over pairs of min(d, M - d): what first-order sees
    close_pairs: int  # pairs at that minimum effective distance
    duplicate_rows: int  # rows equal to an earlier row

    def __str__(self) -> str:
        return (
            f"{self.n_units} units x {self.n_members} members; row weights "
            f"{self.row_weight_min}..{self.row_weight_max}; column loads "
            f"{self.column_load_min}..{self.column_load_max}; pairwise distance min "
            f"{self.min_distance}, mean {self.mean_distance:.2f}, effective min "
            f"{self.min_effective_distance} ({self.close_pairs} pairs); {self.duplicate_rows} "
            f"duplicate rows"
        )


def member_pools(code: Tensor, unit_of: Tensor) -> tuple[Tensor, Tensor]:
    """Examples each member trains on: padded indices [M, max_pool] and pool sizes [M]."""
    sees = code[unit_of].bool().T  # [M, n_examples]
    sizes = sees.sum(1)
    empty = (sizes == 0).nonzero()
    if len(empty):
        raise CodeError(f"member {empty[0].item()} trains on no example")
    pools = torch.zeros(len(sizes), int(sizes.max()), dtype=torch.long)
    for m, row in enumerate(sees):
        pools[m, : sizes[m]] = row.nonzero().squeeze(1)
    return pools, sizes
