"""Codes: which member trains on which unit.

A code is a binary matrix C [N units, M members], ``C[u, m] = 1`` iff member m trains on unit u.
The members with ``C[u, m] = 0`` (the excluders E_u) form the ensemble that has exactly
forgotten u; both E_u and the includers I_u must be non-empty.

Two families, for two kinds of units (DESIGN.md, "Why members must each see a broad slice"):

- **constant weight** (many small units: examples, people, artists): every row has M/2 ones, so
  every member sees a random half of the data and all members model nearly the same
  distribution. :func:`random_constant_weight` is the seed's design (distinct random rows);
  :func:`balanced_constant_weight` also balances the columns and keeps rows far apart.
- **sparse exclusion** (a few large groups: classes, sources): each group is excluded by r
  members and each member excludes as few groups as possible (leave-one-group-out), so every
  member still sees almost everything. :func:`sparse_exclusion`.

Distances. For a constant-weight row e, ablating its unit moves the member weights by
v = (1 - e)/(M/2) - 1/M, and the complement row gives exactly -v. First-order scores depend on
||J v||, so a unit and its complement are indistinguishable to them. The distance that matters
is therefore min(d, M - d) for Hamming distance d: :func:`statistics` reports both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "CodeError",
    "CodeStats",
    "Units",
    "random_constant_weight",
    "balanced_constant_weight",
    "sparse_exclusion",
    "plan",
    "validate",
    "check_unit_ids",
    "statistics",
]


class CodeError(ValueError):
    """A code or design request that cannot give exact ablations."""


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


def _require_constant_weight(n_units: int, n_members: int, allow_duplicates: bool) -> None:
    if n_members < 2 or n_members % 2:
        raise CodeError(
            f"constant-weight codes need an even number of members >= 2 (each unit is seen by "
            f"M/2 members and excluded by the other M/2), got M = {n_members}"
        )
    capacity = math.comb(n_members, n_members // 2)
    if n_units > capacity and not allow_duplicates:
        raise CodeError(
            f"{n_units} units cannot have distinct rows of weight {n_members // 2} with "
            f"{n_members} members (at most {capacity}): use more members, or pass "
            f"allow_duplicates=True to accept units that no score can tell apart"
        )


def _random_rows(rng: np.random.Generator, count: int, n_members: int) -> np.ndarray:
    """``count`` random rows of weight M/2, as bool [count, M]."""
    order = rng.random((count, n_members)).argsort(axis=1)
    return order < n_members // 2


def random_constant_weight(
    n_units: int, n_members: int, seed: int = 0, allow_duplicates: bool = False
) -> torch.Tensor:
    """The seed's design: independent random rows of weight M/2, redrawn until distinct.

    Columns are not balanced and rows may be close; see :func:`balanced_constant_weight`.
    Returns uint8 [N, M].
    """
    _require_constant_weight(n_units, n_members, allow_duplicates)
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n_units:
        for row in _random_rows(rng, n_units - len(rows), n_members):
            key = row.tobytes()
            if allow_duplicates or key not in seen:
                seen.add(key)
                rows.append(row)
    return torch.from_numpy(np.stack(rows).astype(np.uint8)) if rows else torch.zeros(0, n_members, dtype=torch.uint8)


def _distances(rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Hamming distances [len(rows), len(chosen)] between packed bit rows."""
    return np.bitwise_count(rows[:, None, :] ^ chosen[None, :, :]).sum(-1, dtype=np.int64)


def balanced_constant_weight(
    n_units: int,
    n_members: int,
    seed: int = 0,
    candidates: int = 48,
    search_limit: int = 4_096,
    allow_duplicates: bool = False,
) -> torch.Tensor:
    """A constant-weight design with distinct, far-apart rows and balanced columns.

    The first ``search_limit`` rows are chosen one at a time: of ``candidates`` random rows,
    the one farthest (in effective distance min(d, M - d)) from the rows chosen so far is
    kept, ties going to the one with fewest rows at that distance, then to the one on the
    lightest columns. The search costs O(N^2), so the remaining rows are random, only kept
    distinct and, while the space allows (N <= C(M, M/2) / 2), free of complements. A final
    pass moves ones from heavy to light columns, keeping rows distinct, until column loads
    differ by at most 1. Returns uint8 [N, M].
    """
    _require_constant_weight(n_units, n_members, allow_duplicates)
    rng = np.random.default_rng(seed)
    M = n_members
    avoid_complements = n_units <= math.comb(M, M // 2) // 2
    rows = np.zeros((n_units, M), dtype=bool)
    packed = np.zeros((n_units, (M + 7) // 8), dtype=np.uint8)
    used: set = set()

    def fresh(row: np.ndarray) -> bool:
        return allow_duplicates or (
            row.tobytes() not in used and not (avoid_complements and (~row).tobytes() in used)
        )

    load = np.zeros(M, dtype=np.int64)
    n = 0
    while n < min(n_units, search_limit):
        cand = _random_rows(rng, candidates, M)
        ok = np.array([fresh(r) for r in cand])
        if not ok.any():
            continue
        cand, cand_packed = cand[ok], np.packbits(cand[ok], axis=1)
        balance = -(cand * load).sum(1)
        closest = close_count = np.zeros(len(cand), dtype=np.int64)
        if n:
            d = _distances(cand_packed, packed[:n])
            effective = np.minimum(d, M - d)
            closest = effective.min(1)
            close_count = (effective == closest[:, None]).sum(1)
        best = np.lexsort((balance, -close_count, closest))[-1]  # last key sorts first
        rows[n], packed[n] = cand[best], cand_packed[best]
        used.add(cand[best].tobytes())
        load += cand[best]
        n += 1
    while n < n_units:
        for row in _random_rows(rng, n_units - n, M):
            if n < n_units and fresh(row):
                rows[n] = row
                used.add(row.tobytes())
                n += 1
    _balance_columns(rows, rng, allow_duplicates, avoid_complements)
    return torch.from_numpy(rows.astype(np.uint8))


def _balance_columns(rows: np.ndarray, rng: np.random.Generator, allow_duplicates: bool,
                     avoid_complements: bool) -> None:
    """Move a one from the heaviest to the lightest column in some row, until balanced."""
    used = {r.tobytes() for r in rows}
    load = rows.sum(0)
    while load.max() - load.min() > 1:
        heavy, light = int(load.argmax()), int(load.argmin())
        for u in rng.permutation(np.flatnonzero(rows[:, heavy] & ~rows[:, light])):
            new = rows[u].copy()
            new[heavy], new[light] = False, True
            key = new.tobytes()
            if allow_duplicates or (
                key not in used and not (avoid_complements and (~new).tobytes() in used)
            ):
                used.discard(rows[u].tobytes())
                used.add(key)
                rows[u] = new
                load[heavy] -= 1
                load[light] += 1
                break
        else:
            return  # no move keeps rows distinct: leave the imbalance (statistics report it)


def sparse_exclusion(n_groups: int, n_members: int, excluders_per_group: int = 1) -> torch.Tensor:
    """Each group excluded by ``excluders_per_group`` (r) members, exclusions spread evenly.

    Group g is excluded by members (g r + j) mod M for j < r, so each member excludes
    r G / M groups (rounded). With M = r G this is leave-one-group-out: member m excludes only
    group m // r. Returns uint8 [G, M].
    """
    r = excluders_per_group
    if not 1 <= r < n_members:
        raise CodeError(
            f"each group needs between 1 and M - 1 = {n_members - 1} excluders (so that some "
            f"member sees it), got {r}"
        )
    if n_groups * r < n_members:
        raise CodeError(
            f"{n_members} members with {n_groups} groups x {r} excluders leaves members that "
            f"exclude nothing; use M <= {n_groups * r} members"
        )
    code = torch.ones(n_groups, n_members, dtype=torch.uint8)
    for g in range(n_groups):
        for j in range(r):
            code[g, (g * r + j) % n_members] = 0
    return code


def plan(
    units: Units, n_members: int, seed: int = 0, design: str = "auto", excluders_per_group: int = 2
) -> Tuple[torch.Tensor, str]:
    """The code for these units, and the name of the design used.

    ``design``: ``balanced`` / ``random`` (constant weight), ``sparse`` (exclusion), or
    ``auto``: sparse exclusion when units are few and large (fewer units than 4 M, or the
    largest unit above 5% of the data), constant weight (balanced) otherwise.
    """
    if design == "auto":
        few = units.n_units < 4 * n_members
        large = units.n_units and units.sizes.max().item() > 0.05 * len(units.unit_of)
        design = "sparse" if few or large else "balanced"
    if design == "balanced":
        code = balanced_constant_weight(units.n_units, n_members, seed)
    elif design == "random":
        code = random_constant_weight(units.n_units, n_members, seed)
    elif design == "sparse":
        code = sparse_exclusion(units.n_units, n_members, excluders_per_group)
    else:
        raise CodeError(f"unknown design {design!r}: use auto, balanced, random or sparse")
    validate(code)
    return code, design


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
