"""The designs: which member trains on which unit, for many small units (constant weight) or
a few large groups (sparse exclusion), and :func:`plan`, which picks one."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from ..errors import CodeError
from .checks import _distances, validate
from .units import Units


def members_needed(n_units: int) -> int:
    """The fewest (even) members whose constant-weight rows can tell ``n_units`` units apart:
    the least M with C(M, M/2) >= N (M = 20 holds 184,756 units, M = 24 2.7 million)."""
    M = 2
    while math.comb(M, M // 2) < n_units:
        M += 2
    return M


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
            f"{n_members} members (at most {capacity}): use at least {members_needed(n_units)} members, "
            f"or pass allow_duplicates=True to accept units that no score can tell apart"
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


#: what the plan reports for each design
DESIGN_NAMES = {"balanced": "balanced constant weight", "random": "random constant weight",
                "sparse": "sparse exclusion"}


def plan(
    units: Units, n_members: int, seed: int = 0, design: str = "auto", excluders_per_group: int = 2
) -> Tuple[torch.Tensor, str]:
    """The code for these units, and the name of the design used.

    ``design``: ``balanced`` / ``random`` (constant weight), ``sparse`` (exclusion), or
    ``auto``: sparse exclusion when units are few and large (fewer units than 4 M, or the
    largest unit above 5% of the data), constant weight (balanced) otherwise.
    :func:`design_reason` says why, in a sentence.
    """
    if design == "auto":
        few, large = _few_and_large(units, n_members)
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


def _few_and_large(units: Units, n_members: int) -> Tuple[bool, bool]:
    """The auto rule's two tests: fewer units than 4 M; the largest unit above 5% of the data."""
    few = units.n_units < 4 * n_members
    large = bool(units.n_units) and units.sizes.max().item() > 0.05 * len(units.unit_of)
    return few, large


def design_reason(units: Units, code: torch.Tensor, design: str, asked: str = "auto") -> str:
    """One sentence: the design ``design`` that :func:`plan` used for ``units`` (code uint8
    [N, M]), why (the auto rule's test that decided, or ``asked``, the design requested), and
    the smallest share of the data a member sees (for sparse exclusion the reason it fits few
    large units: members that see almost everything model nearly the same distribution)."""
    n_examples, n_members = len(units.unit_of), code.shape[1]
    mean = n_examples / max(1, units.n_units)
    what = f"{units.n_units} units of {mean:.3g} example{'' if f'{mean:.3g}' == '1' else 's'} on average"
    few, large = _few_and_large(units, n_members)
    if asked != "auto":
        why = f"as asked (--design {asked})"
    elif few:
        why = f"few units (fewer than 4 x {n_members} members)"
    elif large:
        share = units.sizes.max().item() / n_examples
        why = f"large units (the largest holds {share:.0%} of the data, above 5%)"
    else:
        why = f"many small units (at least 4 x {n_members} members, none above 5% of the data)"
    seen = (units.sizes.double() @ code.double()).min().item() / max(1, n_examples)  # [N] @ [N, M]
    return f"{DESIGN_NAMES[design]}: {what}, {why}; each member sees at least {seen:.0%} of the data"
