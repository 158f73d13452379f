"""TRAK's kernel scores with the training features read block by block: memory bounded by a
block, whatever the number of training examples.

Member m's score of query q against training example i is phi_m(q)^T (K_m + lambda I)^-1 phi_m(i)
with K_m = Phi_m^T Phi_m, the d x d Gram of the member's training features (the primal form of
:func:`~.gradients.member_scores`; lambda a fraction of K_m's mean diagonal). K_m is a sum over
examples, so it is accumulated one block of features at a time; W_m = (K_m + lambda I)^-1
phi_m(q)^T [d, Q] is solved once, and each block then scores as Phi_block W_m. A unit's score
sums its examples', and the members combine as :func:`~.gradients.combine` does, by keeping two
sums per (query, unit): over the members that trained on the unit and over those that did not.
Nothing here holds more than one block of features, the Grams [M, d, d] and those two sums.

Where features come from is the caller's (:class:`TrainFeatures`): in memory for small data,
or the features file beside a checkpoint (:mod:`ensattr_fast.store.features`) for large.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..errors import MethodError
from .gradients import member_scores

__all__ = ["TrainFeatures", "add_gram", "kernel_weights", "kernel_sums", "unit_sums", "combined", "feature_blocks"]

#: a block of training features: the first example's index and features [M, b, d]
Block = Tuple[int, Tensor]


@dataclasses.dataclass
class TrainFeatures:
    """The training examples' features, ``n`` of them under ``M`` members: the Grams
    ``gram`` float64 [M, d, d] (Phi_m^T Phi_m; None where d > n, whose kernel is solved in the
    n x n dual form from the features themselves) and ``blocks()``, every block in order."""

    n: int
    gram: Optional[Tensor]
    blocks: Callable[[], Iterator[Block]]

    @classmethod
    def in_memory(cls, features: Tensor, rows: int = 4096) -> "TrainFeatures":
        """From features [M, n, d] held whole (small data, tests)."""
        gram = None
        if features.shape[2] <= features.shape[1]:
            gram = torch.zeros(features.shape[0], features.shape[2], features.shape[2], dtype=torch.float64)
            add_gram(gram, features)
        return cls(features.shape[1], gram,
                   lambda: ((s, features[:, s:s + rows]) for s in range(0, features.shape[1], rows)))

    def whole(self) -> Tensor:
        """Every feature [M, n, d] (small data only: the dual form's n x n systems)."""
        return torch.cat([block for _, block in self.blocks()], 1)


def feature_blocks(compute: Callable[[Tensor], Tensor], images: Iterator[Tensor]) -> Iterator[Block]:
    """``compute`` (images [b, ...] -> features [M, b, d]) over blocks of images, with the
    index of each block's first image."""
    start = 0
    for block in images:
        yield start, compute(block)
        start += len(block)


def add_gram(gram: Tensor, block: Tensor) -> None:
    """``gram`` [M, d, d] += Phi^T Phi of a block of features [M, b, d], in float64."""
    phi = block.double()
    gram += phi.transpose(1, 2) @ phi


def kernel_weights(gram: Tensor, queries: Tensor, damping: float = 0.01) -> Tensor:
    """W_m = (K_m + lambda_m I)^-1 phi_m(q)^T, float64 [M, d, Q], from the Grams [M, d, d] and
    the queries' features [M, Q, d]; lambda_m is ``damping`` times K_m's mean diagonal."""
    kernel = gram.clone()
    mean = kernel.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    kernel.diagonal(dim1=1, dim2=2).add_(damping * mean[:, None])
    return torch.linalg.solve(kernel, queries.double().transpose(1, 2))


def kernel_sums(blocks: Iterator[Block], weights: Tensor, unit_of: Tensor, code: Tensor) -> Tuple[Tensor, Tensor]:
    """The members' scores of every unit, summed over the members that trained on it and over
    those that did not: (includers, excluders), float32 [Q, N] each, from the training feature
    blocks and the kernel weights [M, d, Q]; ``code`` uint8 [N, M], ``unit_of`` int64 [n]."""
    M, _, Q = weights.shape
    seen = code.bool()
    includers = torch.zeros(Q, len(code))
    excluders = torch.zeros(Q, len(code))
    for start, block in blocks:
        units = unit_of[start:start + block.shape[1]]
        trained = seen[units]  # [b, M]
        for m in range(M):
            scores = (block[m].double() @ weights[m]).float().T  # [Q, b]
            includers.index_add_(1, units, scores * trained[:, m])
            excluders.index_add_(1, units, scores * ~trained[:, m])
    return includers, excluders


def unit_sums(train: TrainFeatures, queries: Tensor, unit_of: Tensor, code: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`kernel_sums`' two sums for the queries' features [M, Q, d]: block by block through
    the Grams, or, where ``train`` has none (a projection wider than the examples are many),
    from each member's scores through the n x n dual (:func:`~.gradients.member_scores`; its
    features are few), summed over includers and excluders the same way."""
    if train.gram is not None:
        return kernel_sums(train.blocks(), kernel_weights(train.gram, queries), unit_of, code)
    scores = member_scores(train.whole(), queries, unit_of, len(code))  # [M, Q, N]
    seen = code.T.float()[:, None, :]
    return (scores * seen).sum(0), (scores * (1 - seen)).sum(0)


def combined(includers: Tensor, excluders: Tensor, code: Tensor, how: str) -> Tensor:
    """[Q, N] by :func:`~.gradients.combine`'s rule, from :func:`kernel_sums`' two sums."""
    seen = code.bool().sum(1).float()
    unseen = code.shape[1] - seen
    if how == "mean":
        return (includers + excluders) / code.shape[1]
    if how == "includers":
        return includers / seen.clamp_min(1)
    if how == "contrast":
        return includers / seen.clamp_min(1) - excluders / unseen.clamp_min(1)
    raise MethodError(f"combination must be mean, includers or contrast, got {how!r}")
