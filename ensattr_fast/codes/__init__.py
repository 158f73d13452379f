"""Codes: which member trains on which unit.

A code is a binary matrix C [N units, M members], ``C[u, m] = 1`` iff member m trains on unit u.
The members with ``C[u, m] = 0`` (the excluders E_u) form the ensemble that has exactly
forgotten u; both E_u and the includers I_u must be non-empty.

Two families, for two kinds of units (docs/method.md, "Why members must each see a broad slice"):

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

from ..errors import CodeError
from .checks import check_unit_ids, group_code, statistics, validate
from .clusters import kmeans
from .designs import balanced_constant_weight, design_reason, plan, random_constant_weight, sparse_exclusion
from .phantoms import ablation_weights_of_rows, free_phantom_rows, phantom_rows
from .units import CodeStats, Units, member_pools

__all__ = ["CodeError", "CodeStats", "Units", "random_constant_weight", "balanced_constant_weight",
           "sparse_exclusion", "plan", "design_reason", "kmeans", "validate", "check_unit_ids", "statistics",
           "group_code", "member_pools",
           "phantom_rows", "free_phantom_rows", "ablation_weights_of_rows"]
