"""What every ensemble is: M denoisers evaluated in one call, each on its own batch, and the
packed layout that ablated sampling feeds them."""

from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [..., dim] of integer timesteps t [...]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


def label_rows(labels: Optional[Tensor], shape, classes: int, like: Tensor) -> Tensor:
    """One-hot rows [*shape, classes + 1] of ``labels`` (broadcast to ``shape``; -1 or None: the
    empty label, the last), in ``like``'s dtype and device. By comparison, not ``F.one_hot``,
    whose range check cannot run under vmap (per-example gradients)."""
    index = torch.full(shape, classes, device=like.device) if labels is None else labels.to(like.device).expand(shape)
    index = torch.where(index < 0, classes, index)
    return (index[..., None] == torch.arange(classes + 1, device=like.device)).to(like.dtype)


class PackedLayout:
    """Where each packed row [P] sits in a padded member batch [M, n_max].

    Packed rows are grouped by member: ``counts[m]`` consecutive rows for member m. Padding to
    a multiple of 8 rows keeps matrix products off the small-batch kernels whose rounding
    differs, so a trajectory's member output does not depend on what else is in the batch.
    """

    def __init__(self, counts: Tensor):
        self.counts = counts.cpu()
        self.n_members = len(self.counts)
        self.n_packed = int(self.counts.sum())
        largest = int(self.counts.max()) if self.n_members else 0
        self.n_max = max(8, 8 * math.ceil(largest / 8))
        self.member = torch.repeat_interleave(torch.arange(self.n_members), self.counts)
        starts = torch.cumsum(self.counts, 0) - self.counts
        self.position = torch.arange(self.n_packed) - starts[self.member]
        self._on_device: dict = {}

    def _index(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """(member, position) on ``device``, copied there once per sampling run."""
        if device not in self._on_device:
            self._on_device[device] = (self.member.to(device), self.position.to(device))
        return self._on_device[device]

    def pad(self, packed: Tensor) -> Tensor:
        out = packed.new_zeros((self.n_members, self.n_max, *packed.shape[1:]))
        out[self._index(packed.device)] = packed
        return out

    def unpad(self, padded: Tensor) -> Tensor:
        return padded[self._index(padded.device)]


class Ensemble(nn.Module):
    """Base class: ``n_members`` denoisers over data of shape ``data_shape``; class-conditional
    where ``classes`` > 0, whose ``forward(x, t, labels)`` takes a label per row (-1: none);
    text-conditioned where ``condition_shape`` is set, whose ``labels`` are condition indices."""

    n_members: int
    data_shape: Tuple[int, ...]
    classes: int = 0
    #: (L, D) of the embedding each row is conditioned on (text-conditioned members, :mod:`.text`)
    condition_shape: Optional[Tuple[int, int]] = None

    def spec(self) -> dict:
        """JSON-able description from which :func:`build_ensemble` rebuilds the architecture."""
        raise NotImplementedError

    def forward_packed(self, x_packed: Tensor, t: int, layout: PackedLayout,
                       labels: Optional[Tensor] = None) -> Tensor:
        """Member outputs for packed rows x_packed [P, *data_shape], all at timestep t, with
        the label of each row ``labels`` [P] (class-conditional members)."""
        padded = layout.pad(x_packed)
        steps = torch.full(padded.shape[:2], t, dtype=torch.long, device=x_packed.device)
        if labels is None:
            return layout.unpad(self(padded, steps))
        return layout.unpad(self(padded, steps, layout.pad(labels)))

    def example_conditions(self, data) -> Optional[Tensor]:
        """What each training example of ``data`` is conditioned on, as ``forward`` takes it: its
        label (class-conditional members), its condition index (text-conditioned members), or
        None (unconditional members)."""
        return data.class_labels(self.classes) if self.classes else None

    def parameters_per_member(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.n_members

    def select(self, members: range) -> "Ensemble":
        """A new ensemble of the members ``members`` (a shard for one rank of a distributed
        run): every parameter and buffer is stacked over members along dim 0."""
        part = _select_module(self, members)
        part.n_members = len(members)
        return part


def shared_buffers(module: nn.Module) -> set:
    """The names of ``module``'s buffers that every member shares (a frozen base's weights under
    adapter members): those not saved in its state. Every other parameter and buffer of an
    ensemble is stacked over its members along dim 0."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, part in module.named_modules() for name in part._non_persistent_buffers_set}


def _select_module(module: nn.Module, members: range) -> nn.Module:
    """A copy of ``module`` whose member-stacked parameters and buffers keep ``members`` (the
    shared buffers stay as they are, shared)."""
    part = copy.copy(module)
    part._modules = {k: _select_module(v, members) for k, v in module._modules.items()}
    part._parameters = {k: None if v is None else
                        nn.Parameter(v.detach()[members.start : members.stop].clone(), v.requires_grad)
                        for k, v in module._parameters.items()}
    part._buffers = {k: v if k in module._non_persistent_buffers_set else v[members.start : members.stop].clone()
                     for k, v in module._buffers.items()}
    return part
