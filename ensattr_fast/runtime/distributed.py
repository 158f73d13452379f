"""The collectives the steps use across processes and machines (``torch.distributed``); one
process is the same code with a world of size 1. Joining the process group that ``torchrun``
describes is the command line's job (:func:`ensattr_fast.cli.main.launch`).

The work splits so that the heavy loops exchange nothing:

- **training**: members are sharded (each rank trains its members, batched). Members never
  share gradients, so a training step sends no bytes; a checkpoint gathers the shards to rank
  0, which writes one file that any world size loads (each rank slices its members from it).
  Every rank draws the random numbers of all members and keeps its own, so a sharded run
  takes exactly the draws of a one-process run.
- **sampling and ablation**: every rank holds all members and runs its share of the
  trajectories; the images are gathered once at the end. We chose this over sharding members
  and all-reducing the weighted eps sums every step (S*D floats per step, docs/method.md)
  because an ensemble fits on one device at every scale of the papers (20 CIFAR-10 UNets of
  35.7M parameters: 2.9 GB in float32), and then trajectories split with no traffic at all.
- **attribution**: rows (samples) are sharded in whole row blocks; each rank streams its part
  file and rank 0 stitches the parts into the results file with HDF5 virtual datasets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World", "world", "shard", "gather_rows", "select_members",
           "gather_members", "all_reduce_sum", "barrier", "broadcast_object"]


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard(n: int, align: int = 1, at: Optional[World] = None) -> range:
    """This rank's contiguous share of ``range(n)``, cut at multiples of ``align``."""
    w = at or world()
    pieces = -(-n // align) if n else 0
    lo, hi = pieces * w.rank // w.size, pieces * (w.rank + 1) // w.size
    return range(min(n, lo * align), min(n, hi * align))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(local: Tensor, to_all: bool = True) -> Tensor:
    """Every rank's rows concatenated along dim 0 in rank order (the shares may differ in
    length; the trailing shapes and dtype must agree): on every rank, or with ``to_all=False``
    on rank 0 only (the other ranks get their own rows back)."""
    if not world().distributed:
        return local
    device, size = _comm_device(), dist.get_world_size()
    count = torch.tensor([len(local)], device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[: len(local)] = local
    if to_all:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in counts] if world().main else None
        dist.gather(padded, parts, dst=0)
        if not world().main:
            return local
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)


def select_members(state: Any, members: range) -> Any:
    """The members ``members`` of a state (a tensor, or dicts and lists of them) in which
    every tensor of one or more dimensions is stacked over members along dim 0 and 0-dim
    tensors (step counts) are shared: ensemble, EMA and Adam states alike."""
    if isinstance(state, Tensor):
        return state[members.start : members.stop] if state.dim() else state
    if isinstance(state, dict):
        return {k: select_members(v, members) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(select_members(v, members) for v in state)
    return state


def gather_members(state: Any) -> Any:
    """The inverse of :func:`select_members` over the ranks, on rank 0: shards concatenated
    in rank order (the members of rank r follow those of rank r - 1). Other ranks get their
    own state back."""
    if isinstance(state, Tensor):
        return gather_rows(state.contiguous(), to_all=False) if state.dim() else state
    if isinstance(state, dict):
        return {k: gather_members(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_members(v) for v in state)
    return state


def all_reduce_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` over every rank, on every rank (in place; itself when not
    distributed)."""
    if world().distributed:
        moved = value.to(_comm_device())
        dist.all_reduce(moved)
        value.copy_(moved)
    return value


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (small JSON-like values: flags, errors, paths)."""
    if not world().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
