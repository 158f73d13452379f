"""Member-sharded sampling: an ensemble too large for one device, its members split over ranks.

Each rank holds the members of its shard and evaluates them on their packed rows; every
step, the member outputs of all ranks are gathered so that every rank forms the same
weighted sums with the same fused step. We gather the member outputs [P, D] rather than
all-reduce each rank's partial weighted sums [T, D] (about M/2 times fewer bytes): partial
sums add the members in another order than one process does, and the audit's promise is
that a counterfactual replays bit for bit whatever the world size. At the papers' scale
(CIFAR-10, a few hundred trajectories of 3,072 floats, 20 members) that is tens of MB per step,
a fraction of a millisecond over NVLink.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from torch import Tensor

from ..runtime import distributed
from .base import Ensemble, PackedLayout
from .passes import MemberPasses, Passes

__all__ = ["ShardedEnsemble", "shard_members", "place_members"]


class ShardedEnsemble(Ensemble):
    """The members ``members`` of an ensemble of ``n_members``, held by this rank (the others
    by the other ranks, in rank order). Only :meth:`forward_packed` (sampling and ablation)
    is defined: every rank must call it at every step, with the same packed layout."""

    def __init__(self, shard: Ensemble, members: range, n_members: int, passes: Passes = Passes()):
        super().__init__()
        if len(members) != shard.n_members or members.stop > n_members:
            raise ValueError(f"a shard of {shard.n_members} members cannot hold members {members} of {n_members}")
        self.shard, self.members, self.n_members = shard, members, n_members
        self.data_shape, self.classes = shard.data_shape, shard.classes
        self.condition_shape = shard.condition_shape
        if shard.condition_shape is not None:  # text conditions: the shard's tables answer for the ensemble
            self.check_indices = shard.check_indices
        self._passes = MemberPasses(shard, passes)
        self._layout: Optional[Tuple[PackedLayout, PackedLayout]] = None  # (whole, own) of this run

    def spec(self) -> dict:
        return dict(self.shard.spec(), n_members=self.n_members)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError("a member-sharded ensemble only samples (forward_packed)")

    def _own(self, layout: PackedLayout) -> PackedLayout:
        """This shard's part of ``layout``, padded to the whole layout's width so that each
        member evaluates exactly the batch it would in one process."""
        if self._layout is None or self._layout[0] is not layout:
            own = PackedLayout(layout.counts[self.members.start : self.members.stop])
            own.n_max = layout.n_max
            self._layout = (layout, own)
        return self._layout[1]

    def forward_packed(self, x_packed: Tensor, t: int, layout: PackedLayout,
                       labels: Optional[Tensor] = None) -> Tensor:
        counts = layout.counts
        start, stop = int(counts[: self.members.start].sum()), int(counts[: self.members.stop].sum())
        own = self._passes.forward_packed(x_packed[start:stop], t, self._own(layout),
                                          None if labels is None else labels[start:stop])
        return distributed.gather_rows(own)


def shard_members(ensemble: Ensemble, passes: Passes = Passes()) -> ShardedEnsemble:
    """This rank's share of ``ensemble``'s members (contiguous, in rank order) as a
    :class:`ShardedEnsemble`; the other members' weights are dropped."""
    members = distributed.shard(ensemble.n_members)
    if not len(members):
        raise ValueError(f"{ensemble.n_members} members cannot be sharded over {distributed.world().size} ranks: "
                         "each rank needs at least one")
    return ShardedEnsemble(ensemble.select(members), members, ensemble.n_members, passes)


def place_members(ensemble: Ensemble, passes: Passes, device) -> Tuple[Ensemble, Passes]:
    """``ensemble`` on ``device`` as sampling and ablation run it: this rank's share of the
    members with ``passes.shard_members`` (the passes then apply inside the shard), else all
    of them. Returns the ensemble and the passes the sampler is left to apply."""
    if passes.shard_members:
        return shard_members(ensemble, dataclasses.replace(passes, shard_members=False)).to(device), Passes()
    return ensemble.to(device), passes
