"""Phantom rows: code rows of the design's own kind that belong to no unit.

The exact counterfactual of unit u is the sample of its excluders E_u, so it depends on u only
through its code row; the same is true of its first-order score. A phantom row is a row the
design could have given a unit but gave none: ablating it removes "nothing in particular" (its
members still differ by the other units each saw and by their training noise). The effects of
phantom ablations, from the same noise as a sample, are the noise floor a unit's effect must
beat (docs/method.md, "Noise floor").

Rows of the same kind: each phantom takes the row weight (number of includers) of a unit drawn
at random, so a constant-weight code gets rows of weight M/2 and a sparse exclusion design gets
sub-ensembles of its r excluders; the members are then a uniform random subset of that size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import CodeError

__all__ = ["phantom_rows", "free_phantom_rows", "ablation_weights_of_rows"]

_TRIES = 100


def phantom_rows(code: Tensor, count: int, seed: int = 0) -> Tensor:
    """``count`` distinct rows uint8 [count, M] of the code's kind that no unit has.

    Args:
        code: uint8 [N, M], ``code[u, m] = 1`` iff member m trains on unit u.
        count: phantoms to draw (P).
        seed: the draws depend on nothing else (and the code).
    Raises:
        CodeError when the code leaves fewer than ``count`` free rows of its kind.
    """
    if count < 0:
        raise CodeError(f"phantom count must be >= 0, got {count}")
    rows, weights = _kinds(code)
    n_members = rows.shape[1]
    if count and not len(weights):
        raise CodeError("phantom rows need a code with at least one unit that some member excludes")
    taken = {r.tobytes() for r in rows}
    free = free_phantom_rows(code)
    if count > free:
        raise CodeError(f"the code leaves {max(free, 0)} rows of its kind free for phantoms, {count} asked: "
                        "use fewer phantoms or more members")
    rng = np.random.default_rng([int(seed), 0x9A47])
    out: list = []
    for _ in range(_TRIES * max(count, 1)):
        if len(out) == count:
            break
        weight = int(rng.choice(weights))
        row = np.zeros(n_members, dtype=bool)
        row[rng.permutation(n_members)[:weight]] = True
        if row.tobytes() not in taken:
            taken.add(row.tobytes())
            out.append(row)
    if len(out) < count:  # pragma: no cover - only for codes that fill nearly every row
        raise CodeError(f"found only {len(out)} of {count} phantom rows; use fewer phantoms")
    return torch.from_numpy(np.stack(out).astype(np.uint8) if out else np.zeros((0, n_members), np.uint8))


def _kinds(code: Tensor):
    """The code's rows (bool [N, M]) and the row weights a phantom may take."""
    rows = code.numpy().astype(bool)
    weights = rows.sum(1)
    return rows, weights[(weights > 0) & (weights < rows.shape[1])]  # a phantom needs excluders and includers


def free_phantom_rows(code: Tensor) -> int:
    """How many distinct phantom rows the code leaves: rows of its weights that no unit has."""
    rows, weights = _kinds(code)
    kinds = {int(w) for w in weights}
    taken = len({r.tobytes() for r, w in zip(rows, rows.sum(1)) if int(w) in kinds})
    return sum(math.comb(rows.shape[1], w) for w in kinds) - taken


def ablation_weights_of_rows(rows: Tensor) -> Tensor:
    """Member weights float64 [P, M] of ablating each row: 1/|E| on its excluders E (its zeros)."""
    keep = rows == 0
    if (keep.sum(1) == 0).any():
        raise CodeError("a row with no excluder cannot be ablated")
    return keep.double() / keep.sum(1, keepdim=True)
