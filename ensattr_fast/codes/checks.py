"""Checks of a code (can it give exact ablations?), its statistics, and the code rows of unit
sets."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import CodeError
from .units import CodeStats


def check_unit_ids(units, n_units: int, what: str = "unit ids", allow_none: bool = False) -> None:
    """Raise :class:`CodeError` unless every id lies in [0, n_units) (or is -1, "no unit",
    with ``allow_none``)."""
    ids = torch.as_tensor(units, dtype=torch.long).flatten()
    bad = (ids < (-1 if allow_none else 0)) | (ids >= n_units)
    if bad.any():
        raise CodeError(f"{what}: unit {ids[bad][0].item()} is out of range, the code has {n_units} "
                        f"units (ids 0..{n_units - 1}{', or -1 for none' if allow_none else ''})")


def validate(code: torch.Tensor, constant_weight: Optional[bool] = None,
             unit_of: Optional[torch.Tensor] = None) -> None:
    """Raise :class:`CodeError` naming the first problem: shape, values, a unit no member
    excludes or no member sees, or (``constant_weight=True``) a row of weight other than M/2;
    with ``unit_of`` (the unit of each example), an id outside the code's units."""
    if code.dim() != 2:
        raise CodeError(f"a code must be a matrix [units, members], got shape {tuple(code.shape)}")
    if code.numel() and not ((code == 0) | (code == 1)).all():
        raise CodeError("a code must hold only 0 and 1")
    n_units, n_members = code.shape
    if unit_of is not None:
        check_unit_ids(unit_of, n_units, "the unit of an example (units/of_example)")
    weight = code.long().sum(1)
    for problem, bad in (
        ("has no excluder: every member trains on it, so no ablation can remove it", weight == n_members),
        ("is seen by no member", weight == 0),
    ):
        where = bad.nonzero()
        if len(where):
            raise CodeError(f"unit {where[0].item()} {problem} ({len(where)} such units)")
    if constant_weight:
        if n_members % 2:
            raise CodeError(f"constant-weight codes need an even number of members, got M = {n_members}")
        off = (weight != n_members // 2).nonzero()
        if len(off):
            u = off[0].item()
            raise CodeError(f"unit {u} is seen by {weight[u].item()} members, not M/2 = {n_members // 2}")


def statistics(code: torch.Tensor, max_pairs_units: int = 20_000) -> CodeStats:
    """Row weights, column loads, pairwise distances (over the first ``max_pairs_units``
    units when N is larger) and duplicate rows."""
    c = code.numpy().astype(bool)
    n_units, n_members = c.shape
    weight, load = c.sum(1), c.sum(0)
    duplicates = n_units - len({r.tobytes() for r in c})
    packed = np.packbits(c[:max_pairs_units], axis=1)
    if len(packed) > 1:
        d_min, eff_min, close, total, pairs = n_members, n_members, 0, 0, 0
        for start in range(0, len(packed), 512):
            d = _distances(packed[start : start + 512], packed)
            i = np.arange(start, min(start + 512, len(packed)))
            upper = np.arange(len(packed))[None, :] > i[:, None]
            d_pairs = d[upper]
            if d_pairs.size:
                d_min = min(d_min, int(d_pairs.min()))
                effective = np.minimum(d_pairs, n_members - d_pairs)
                if effective.min() < eff_min:
                    eff_min, close = int(effective.min()), 0
                close += int((effective == eff_min).sum())
                total, pairs = total + int(d_pairs.sum()), pairs + d_pairs.size
        mean = total / pairs
    else:
        d_min = eff_min = n_members
        close, mean = 0, float(n_members)
    return CodeStats(
        n_units=n_units,
        n_members=n_members,
        row_weight_min=int(weight.min()) if n_units else 0,
        row_weight_max=int(weight.max()) if n_units else 0,
        column_load_min=int(load.min()) if n_members else 0,
        column_load_max=int(load.max()) if n_members else 0,
        min_distance=d_min,
        mean_distance=mean,
        min_effective_distance=eff_min,
        close_pairs=close,
        duplicate_rows=duplicates,
    )


def _distances(rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Hamming distances [len(rows), len(chosen)] between packed bit rows."""
    return np.bitwise_count(rows[:, None, :] ^ chosen[None, :, :]).sum(-1, dtype=np.int64)


def group_code(code: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Code rows of unit sets [G, M]: a member trained on a set if it trained on any unit of
    it, so the set's excluders are the intersection of its units' excluders."""
    for name, units in enumerate(groups):
        check_unit_ids(list(units), len(code), f"group {name}")
    rows = [code[list(g)].amax(0) if len(g) else torch.zeros(code.shape[1], dtype=code.dtype)
            for g in groups]
    return torch.stack(rows) if rows else code.new_zeros(0, code.shape[1])
