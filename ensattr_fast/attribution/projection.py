"""The random projections of per-example gradients, drawn from seeds, never a matrix over all
parameters (see :mod:`.gradients`).

- :class:`RankOneProjection`: for the stacked linear layers of the built-in MLP members, a
  rank-one Gaussian direction u_j v_j^T per layer and output coordinate j;
- :class:`CountSketch`: for any other members, coordinate i to bucket h(i) with sign s(i).

Either is shared by all members (drawn from ``seed + 1``, as before issue 12) or drawn per
member: member m's projection comes from the seed :func:`member_seed` (seed, m), so that the
members' projection errors are independent and average out over the ensemble.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["member_seed", "CountSketch", "RankOneProjection"]

#: at most this many float32 numbers in one [M, rows, columns] product (larger dims go in column chunks)
_CHUNK_NUMBERS = 2**26
#: per-member rank-one directions are kept between batches when all members' fit in this many bytes
_CACHE_BYTES = 2**29


def member_seed(seed: int, member: int) -> int:
    """The seed of member ``member``'s own projection: numpy's ``SeedSequence([seed, member])``
    as one 63-bit integer (deterministic, and unrelated for different seeds or members)."""
    return int(np.random.SeedSequence([seed, member]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class CountSketch:
    """A random projection R^P -> R^dim from a seed, applied without a matrix: for each
    parameter tensor, coordinate i goes to bucket ``index[i]`` with sign ``sign[i]``."""

    def __init__(self, sizes: List[int], dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.index = [torch.randint(dim, (n,), generator=g) for n in sizes]
        self.sign = [torch.randint(2, (n,), generator=g).float() * 2 - 1 for n in sizes]

    def __call__(self, parts: List[Tensor]) -> Tensor:
        """``parts[j]`` [R, sizes[j]] -> [R, dim]."""
        out = parts[0].new_zeros(len(parts[0]), self.dim)
        for part, index, sign in zip(parts, self.index, self.sign):
            out.index_add_(1, index.to(part.device), part * sign.to(part.device, part.dtype))
        return out


def _draw(shapes: Sequence[tuple], dim: int, seed: int, device) -> List[Tuple[Tensor, Tensor]]:
    """Per layer (fan_in, fan_out[, has a bias]): u [fan_in + 1 (the bias), dim], v [fan_out,
    dim], drawn layer by layer, u before v, from one generator (the bias row of u is drawn
    for every layer, and left unused by a layer without bias)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape[0] + 1, dim, generator=g).to(device), torch.randn(shape[1], dim, generator=g).to(device))
            for shape in shapes]


def _project(x: Tensor, dy: Tensor, u: Tensor, v: Tensor, n: int, K: int, bias: bool = True) -> Tensor:
    """sum_k (x~_k . u_j)(dy_k . v_j) per example: x [M, n K, fan_in], dy [M, n K, fan_out],
    u [fan_in + 1, dim], v [fan_out, dim] -> [M, n, dim], in column chunks for large dims
    (x~ = [x, 1], or x for a layer without bias)."""
    M, dim = len(x), u.shape[1]
    step = max(1, _CHUNK_NUMBERS // max(1, M * n * K))
    out = []
    for c in range(0, dim, step):
        uc, vc = u[:, c : c + step], v[:, c : c + step]
        weight = uc[:-1].expand(M, *uc[:-1].shape)
        xu = torch.baddbmm(uc[-1].expand(M, 1, -1), x, weight) if bias else torch.bmm(x, weight)
        out.append((xu * (dy @ vc)).view(M, n, K, uc.shape[1]).sum(2))
    return out[0] if len(out) == 1 else torch.cat(out, -1)


class RankOneProjection:
    """Rank-one Gaussian projections of stacked linear layers' per-example gradients
    sum_k x~_k dy_k^T (x~ = [x, 1]): coordinate j of a layer is <u_j v_j^T, gradient>, summed
    over the layers; shared by the members or one per member."""

    def __init__(self, shapes: Sequence[tuple], members: int, dim: int, seed: int, per_member: bool, device):
        """``shapes``: per layer (fan_in, fan_out) or (fan_in, fan_out, has a bias)."""
        self.shapes, self.members, self.dim, self.seed, self.device = list(shapes), members, dim, seed, device
        self.biases = [len(shape) < 3 or bool(shape[2]) for shape in self.shapes]
        self.per_member = per_member
        size = members * dim * sum(shape[0] + 1 + shape[1] for shape in self.shapes) * 4
        if not per_member:
            self._drawn = [_draw(self.shapes, dim, seed + 1, device)]
        elif size <= _CACHE_BYTES:
            self._drawn = [_draw(self.shapes, dim, member_seed(seed, m), device) for m in range(members)]
        else:  # drawn again for every batch: never more than one member's directions in memory
            self._drawn = None

    def member(self, m: int) -> List[Tuple[Tensor, Tensor]]:
        """Member ``m``'s directions (the shared ones when not per member)."""
        if not self.per_member:
            return self._drawn[0]
        return self._drawn[m] if self._drawn is not None else _draw(self.shapes, self.dim,
                                                                    member_seed(self.seed, m), self.device)

    def __call__(self, rows: List[Tuple[Tensor, Tensor]], n: int, K: int) -> Tensor:
        """Features [M, n, dim] from each layer's (x [M, n K, fan_in], dy [M, n K, fan_out])."""
        if not self.per_member:
            block = torch.zeros(self.members, n, self.dim, device=self.device)
            for (x, dy), (u, v), bias in zip(rows, self._drawn[0], self.biases):
                block += _project(x, dy, u, v, n, K, bias)
            return block
        block = torch.zeros(self.members, n, self.dim, device=self.device)
        for m in range(self.members):
            for (x, dy), (u, v), bias in zip(rows, self.member(m), self.biases):
                block[m : m + 1] += _project(x[m : m + 1], dy[m : m + 1], u, v, n, K, bias)
        return block
