"""The memory budget every step plans its blocks from: one number of bytes for the process.

Set by ``--memory GIB`` on every command, ``Audit(memory=GIB)`` or :func:`set_budget`; else
``ENSATTR_MEMORY`` (GiB); else an eighth of this machine's physical memory (3 GiB on a 24 GiB
machine), at least 1 GiB. Each blocked computation takes a fixed share of it, so that halving
the budget halves its blocks and leaves its results as they were:

============================================  ======  ====================================
block                                         share   at a 2 GiB budget
============================================  ======  ====================================
training features held at once ([M, b, d])     1/8    256 MiB
distances of the duplicate search (float32)    1/32   64 MiB (2^24 pairs)
distances to the k-means centres (float64)     1/32   64 MiB
p-values, z-scores, ranks of score floors      1/512  4 MiB values (32 MiB per float64 array)
============================================  ======  ====================================

The budget bounds the blocks, not the whole step: what every step holds whatever the blocks
(the members, the code, one row per unit of the scores) comes on top; ``ensattr`` prints each
command's peak at its end. The figures of BENCHMARKS.md's scale table were taken with the
blocks of a 2 GiB budget.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

__all__ = ["budget", "set_budget", "budget_of", "share", "GIB"]

GIB = 1 << 30
_set: Optional[int] = None  # bytes, from set_budget


def _machine() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a small machine
        return 8 * GIB


def _bytes(gib: float, where: str) -> int:
    if not gib > 0 or gib != gib or gib == float("inf"):
        raise ValueError(f"{where}: a memory budget is a positive number of GiB, not {gib}")
    return max(1 << 20, int(gib * GIB))


def budget() -> int:
    """The budget in bytes: :func:`set_budget`'s, else ``ENSATTR_MEMORY``'s, else an eighth of
    the machine (at least 1 GiB)."""
    if _set is not None:
        return _set
    given = os.environ.get("ENSATTR_MEMORY")
    if given:
        try:
            return _bytes(float(given), "ENSATTR_MEMORY")
        except ValueError:
            raise ValueError(f"ENSATTR_MEMORY={given!r}: a memory budget is a positive number of GiB") from None
    return max(GIB, _machine() // 8)


def set_budget(gib: Optional[float]) -> None:
    """The process's budget, in GiB (None: back to ``ENSATTR_MEMORY`` or the machine's share)."""
    global _set
    _set = None if gib is None else _bytes(gib, "memory budget")


@contextlib.contextmanager
def budget_of(gib: Optional[float]) -> Iterator[None]:
    """``with budget_of(2):`` the steps inside plan their blocks from 2 GiB (None: unchanged)."""
    global _set
    before = _set
    if gib is not None:
        set_budget(gib)
    try:
        yield
    finally:
        _set = before


def share(fraction: float, item_bytes: int = 1) -> int:
    """How many items of ``item_bytes`` a ``fraction`` of the budget holds (at least one)."""
    return max(1, int(budget() * fraction) // max(1, item_bytes))
