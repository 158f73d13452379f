"""The built-in small UNet for images of 8x8 to 32x32: one member as a plain module
(:class:`UNetMember`) and M of them as one batched ensemble (:class:`StackedUNet`).

How the members are batched: written folded into grouped convolutions (see :mod:`.grouped`).
Against the other two ways, on CPU (Xeon, 2 cores, 8 members of width 32 at 3x32x32, 16
examples each, fastest of 7 interleaved runs, ``benchmarks/timing/benchmark_members.py``): a sampling
step took 237 ms against 349 ms for stacked parameters under ``torch.func.vmap`` (1.47x) and
291 ms for the generic fold of :class:`FoldedEnsemble` (1.23x); a training step 438 ms
against 539 ms (1.23x) and 549 ms (1.25x). vmap moves the member dimension in and out of the
channels around every convolution and group norm, the generic fold around every convolution;
this one folds it once. The same 8 members called one by one took 193 ms and 566 ms on that
quiet machine: oneDNN runs grouped convolutions at a lower rate than plain ones, and a CPU has
no launch overhead for batching to save (on 2 cores shared with other work the batched step
was the faster, 1.3x to 2.9x, because its fewer, larger operations wait less on each other).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArchitectureError
from .base import label_rows, timestep_embedding
from .grouped import (GroupedConv2d, GroupedConvTranspose2d, GroupedGroupNorm, StackedLinear, add_per_channel,
                      cat_channels, fold, unfold)
from .vmap import VmapEnsemble


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(min(groups, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNetMember(nn.Module):
    """A small UNet denoiser for images of 8x8 to 32x32: two resolutions, residual blocks
    with a time embedding, skip connections. ``forward(x [B, C, H, W], t [B])``; with
    ``classes``, ``forward(x, t, labels [B])``: a label embedding (built last, so unconditional
    members draw their weights as before it) added to the time embedding, -1 the empty label."""

    def __init__(self, channels: int = 1, width: int = 32, time_dim: int = 64, classes: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = _ResBlock(width, width, time_dim)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * width, 2 * width, time_dim)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = _ResBlock(2 * width, width, time_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        self.classes = classes
        self.label = nn.Linear(classes + 1, time_dim) if classes else None

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        e = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.label is not None:
            e = e + self.label(label_rows(labels, t.shape, self.classes, x))
        elif labels is not None:
            raise ArchitectureError("these members are unconditional: they take no labels")
        h0 = self.down(self.inp(x), e)
        h = self.up(self.mid(self.pool(h0), e))
        return self.out(self.dec(torch.cat([h, h0], 1), e))


class _GroupedResBlock(nn.Module):
    """M of :class:`_ResBlock` on member-folded activations; the same parameter names."""

    def __init__(self, members: int, cin: int, cout: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = GroupedGroupNorm(members, min(groups, cin), cin)
        self.conv1 = GroupedConv2d(members, cin, cout, 3, padding=1)
        self.temb = StackedLinear(members, time_dim, cout)
        self.norm2 = GroupedGroupNorm(members, min(groups, cout), cout)
        self.conv2 = GroupedConv2d(members, cout, cout, 3, padding=1)
        self.skip = GroupedConv2d(members, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        a = add_per_channel(self.conv1(F.silu(self.norm1(h))), self.temb(e))
        return self.skip(h) + self.conv2(F.silu(self.norm2(a)))


class _FoldedUNet(nn.Module):
    """M :class:`UNetMember` on member-folded activations, under ``UNetMember``'s names."""

    def __init__(self, members: int, channels: int, width: int, time_dim: int, classes: int = 0):
        super().__init__()
        self.time_dim, self.classes = time_dim, classes
        self.time = nn.Sequential(StackedLinear(members, time_dim, time_dim), nn.SiLU())
        self.inp = GroupedConv2d(members, channels, width, 3, padding=1)
        self.down = _GroupedResBlock(members, width, width, time_dim)
        self.pool = GroupedConv2d(members, width, 2 * width, 3, stride=2, padding=1)
        self.mid = _GroupedResBlock(members, 2 * width, 2 * width, time_dim)
        self.up = GroupedConvTranspose2d(members, 2 * width, width, 2, stride=2)
        self.dec = _GroupedResBlock(members, 2 * width, width, time_dim)
        self.out = nn.Sequential(GroupedGroupNorm(members, 8, width), nn.SiLU(),
                                 GroupedConv2d(members, width, channels, 3, padding=1))
        self.label = StackedLinear(members, classes + 1, time_dim) if classes else None

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        M, B = x.shape[:2]
        e = timestep_embedding(t, self.time_dim).to(x.dtype)
        e = self.time(e.expand(M, B, self.time_dim) if e.dim() == 2 else e)
        if self.label is not None:
            e = e + self.label(label_rows(labels, (M, B), self.classes, x))
        elif labels is not None:
            raise ArchitectureError("these members are unconditional: they take no labels")
        h0 = self.down(self.inp(fold(x)), e)
        h = self.up(self.mid(self.pool(h0), e))
        return unfold(self.out(self.dec(cat_channels(h, h0, M), e)), M)


class StackedUNet(VmapEnsemble):
    """M :class:`UNetMember` denoisers in one call, in grouped convolutions.

    The members are built and stored as a :class:`VmapEnsemble` of ``UNetMember`` stores them
    (the same state, so the same checkpoints, spec, :meth:`member` and :meth:`select`): only
    the forward differs.
    """

    def __init__(self, n_members: int, data_shape: Sequence[int], width: int = 32, time_dim: int = 64,
                 shared_init: bool = False, seed: int = 0, classes: int = 0):
        channels = data_shape[0]
        spec = dict(kind="unet", n_members=n_members, data_shape=list(data_shape), width=width, time_dim=time_dim,
                    shared_init=shared_init, seed=seed, **({"classes": classes} if classes else {}))
        super().__init__(lambda: UNetMember(channels, width, time_dim, classes), n_members, data_shape, shared_init,
                         seed, spec)
        self.width, self.time_dim, self.classes = width, time_dim, classes
        with torch.device("meta"):  # the weights: the stacked state
            self._folded = [_FoldedUNet(n_members, channels, width, time_dim, classes)]

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self._on_stacked(self._folded[0], x, t, *(() if labels is None else (labels,)))
