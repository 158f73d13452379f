"""The TRAK kernel without a projection: each member's regularised kernel of the full
per-example gradients, through the n x n Gram of the n training examples (the dual form)

    phi(q)^T (Phi^T Phi + lambda I)^-1 Phi^T = phi(q)^T Phi^T (Phi Phi^T + lambda I)^-1,

lambda by the projected path's rule: ``damping`` times the mean diagonal of Phi^T Phi, which
is trace(Phi Phi^T) / P for P parameters. The gradients are those the projected features
project (for the built-in MLP members the linear layers', layer-norm gains left out), so the
projected scores tend to these as the dimension grows. The Grams take (n + Q) n M float64
numbers, so only small training sets are allowed (:data:`EXACT_BUDGET`).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..diffusion.schedules import NoiseSchedule
from ..errors import MethodError
from ..members import Ensemble
from .gradients import FeatureSpec, _noised, is_linear, layer_rows, layer_shapes, per_example_gradients

__all__ = ["EXACT_BUDGET", "check_exact_budget", "exact_example_scores", "exact_member_scores"]

#: bytes the exact kernel's Grams may take: (n + Q) * n * M * 8
EXACT_BUDGET = 2**30
#: bytes one block of full per-example gradients may take
_BLOCK_BYTES = 2**28


def check_exact_budget(n: int, queries: int, members: int, budget: int = EXACT_BUDGET) -> None:
    """Refuse, in one line, Grams of more than ``budget`` bytes."""
    need = (n + queries) * n * members * 8
    if need > budget:
        raise MethodError(f"exact kernel needs (n + Q) * n * M * 8 = {need:,} bytes for n={n} training examples, "
                          f"Q={queries} queries, M={members} members, above the limit of {budget:,} bytes: "
                          f"use a projection (--projection-dim) instead")


def gradient_size(ensemble: Ensemble) -> int:
    """P: the numbers in one member's gradient that the features hold."""
    if is_linear(ensemble):
        return sum((fan_in + bias) * fan_out for fan_in, fan_out, bias in layer_shapes(ensemble))
    return sum(p[0].numel() for p in ensemble.parameters())


def full_gradients(ensemble: Ensemble, schedule: NoiseSchedule, images: Tensor, spec: FeatureSpec,
                   labels: Optional[Tensor] = None) -> Tensor:
    """Each member's full per-example gradient, flattened: [M, n, P] float64 for ``images`` [n, *shape]
    (under their ``labels`` [n], class-conditional members)."""
    M, n, K = ensemble.n_members, len(images), spec.timesteps
    if is_linear(ensemble):
        parts = []
        rows = layer_rows(ensemble, schedule, images, spec, labels)
        for (x, dy), (_, _, bias) in zip(rows, layer_shapes(ensemble)):
            x = (torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1) if bias else x).double().view(M, n, K, -1)
            parts.append(torch.einsum("mnka,mnkb->mnab", x, dy.double().view(M, n, K, -1)).reshape(M, n, -1))
        return torch.cat(parts, -1)
    parameter = next(ensemble.parameters())
    per_example, names, params = per_example_gradients(ensemble, spec, labelled=labels is not None)
    x_t, t, eps = _noised(images, spec, schedule, parameter.device, parameter.dtype)
    grads = per_example(params, x_t, t, eps, *(() if labels is None else (labels.to(x_t.device),)))
    return torch.cat([grads[k].reshape(n, M, -1).double() for k in names], -1).transpose(0, 1)


def _blocks(n: int, size: int) -> Iterable[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def exact_grams(ensemble: Ensemble, schedule: NoiseSchedule, train: Tensor, queries: Tensor,
                spec: FeatureSpec, labels: Optional[Tuple[Tensor, Tensor]] = None) -> tuple:
    """(Phi Phi^T [M, n, n], phi(q) Phi^T [M, Q, n], P), float64, from the full gradients of
    ``train`` [n, *shape] and ``queries`` [Q, *shape] (under ``labels``, (train's [n],
    queries' [Q]), class-conditional members), block by block (blocks recomputed rather than
    kept: memory is one pair of blocks and the Grams)."""
    M, n = ensemble.n_members, len(train)
    P = gradient_size(ensemble)
    images = torch.cat([train, queries.to(train.dtype)])
    every = None if labels is None else torch.cat([labels[0], labels[1]]).long()

    def full_gradients_of(block: slice) -> Tensor:
        return full_gradients(ensemble, schedule, images[block], spec, None if every is None else every[block])

    size = max(1, _BLOCK_BYTES // (M * P * 8))
    gram = torch.zeros(M, len(images), n, dtype=torch.float64)
    train_blocks = _blocks(n, size)
    query_blocks = [slice(n + b.start, n + b.stop) for b in _blocks(len(queries), size)]
    for rows in train_blocks + query_blocks:
        gi = full_gradients_of(rows)
        for cols in train_blocks:
            if rows.start < n and cols.start < rows.start:
                continue  # train x train: each pair of blocks once, mirrored below
            gj = gi if cols == rows else full_gradients_of(cols)
            gram[:, rows, cols] = (gi @ gj.transpose(1, 2)).cpu()
            if rows.start < n and cols != rows:
                gram[:, cols, rows] = gram[:, rows, cols].transpose(1, 2)
    return gram[:, :n], gram[:, n:], P


def exact_example_scores(gram: Tensor, cross: Tensor, P: int, damping: float = 0.01) -> Tensor:
    """Each member's scores of the queries against each training example, [M, Q, n] float64,
    from the Grams of :func:`exact_grams`: phi(q) Phi^T (Phi Phi^T + lambda I)^-1."""
    out = torch.empty(cross.shape, dtype=torch.float64)
    for m in range(len(gram)):
        kernel = gram[m].clone()
        kernel.diagonal().add_(damping * (kernel.diagonal().sum() / P).clamp_min(1e-30))
        out[m] = torch.linalg.solve(kernel, cross[m].T).T  # the kernel is symmetric
    return out


def exact_member_scores(ensemble: Ensemble, schedule: NoiseSchedule, train: Union[Tensor, object], queries: Tensor,
                        spec: FeatureSpec, unit_of: Tensor, n_units: int, damping: float = 0.01,
                        budget: int = EXACT_BUDGET, labels: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Each member's exact-kernel scores of ``queries`` against the units, [M, Q, N] float32, as
    :func:`~.gradients.member_scores` gives for projected features. ``train``: the training
    images [n, *shape] or a :class:`~ensattr_fast.data.Dataset`; ``labels``: (the training
    examples', the queries') for class-conditional members."""
    if not isinstance(train, Tensor):
        blocks = list(train.blocks())
        train = torch.cat(blocks) if blocks else torch.zeros(0, *ensemble.data_shape)
    check_exact_budget(len(train), len(queries), ensemble.n_members, budget)
    gram, cross, P = exact_grams(ensemble, schedule, train, queries, spec, labels)
    per_example = exact_example_scores(gram, cross, P, damping).float()
    out = torch.zeros(ensemble.n_members, len(queries), n_units)
    for m in range(ensemble.n_members):
        out[m].index_add_(1, unit_of, per_example[m])
    return out
