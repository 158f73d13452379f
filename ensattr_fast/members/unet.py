"""The built-in small UNet for images of 8x8 to 32x32: one member as a plain module
(:class:`UNetMember`) and M of them as one batched ensemble (:class:`StackedUNet`).

How the members are batched: folded into grouped convolutions (see :mod:`.grouped`). The other
way, stacked parameters under ``torch.func.vmap`` (:class:`VmapEnsemble` of ``UNetMember``,
still the path for diffusers and user modules), was measured against it on CPU (2 shared cores,
8 members, 3x32x32, width 32, 8 examples per member; min of 8 interleaved runs): grouped
convolutions took 413 ms per forward and 1.67 s per forward+backward, vmap 652 ms and 1.99 s
(1.6x and 1.2x slower): vmap moves the member dimension in and out of the channels around
every convolution and group norm, the grouped path folds it once. ``benchmarks/benchmark_members.py``
measures both again side by side.
"""

from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state

from .base import Ensemble, timestep_embedding
from .grouped import (GroupedConv2d, GroupedConvTranspose2d, GroupedGroupNorm, StackedLinear, add_per_channel,
                      cat_channels, fold, unfold)
from .vmap import build_member_modules


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
    with a time embedding, skip connections. ``forward(x [B, C, H, W], t [B])``."""

    def __init__(self, channels: int = 1, width: int = 32, time_dim: int = 64):
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

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
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


class StackedUNet(Ensemble):
    """M :class:`UNetMember` denoisers in one call, their weights stacked [M, ...] under the
    names of ``UNetMember``'s parameters: member m's weights are ``{k: v[m]}`` of the state.

    The members are initialised as M ``UNetMember`` modules drawn from ``seed`` (one, copied,
    with ``shared_init``). :meth:`member` gives member m back as a ``UNetMember``.
    """

    def __init__(self, n_members: int, data_shape: Sequence[int], width: int = 32, time_dim: int = 64,
                 shared_init: bool = False, seed: int = 0):
        super().__init__()
        self.n_members, self.data_shape = n_members, tuple(data_shape)
        self.width, self.time_dim, self.shared_init, self.seed = width, time_dim, shared_init, seed
        M, C = n_members, self.data_shape[0]
        self.time = nn.Sequential(StackedLinear(M, time_dim, time_dim), nn.SiLU())
        self.inp = GroupedConv2d(M, C, width, 3, padding=1)
        self.down = _GroupedResBlock(M, width, width, time_dim)
        self.pool = GroupedConv2d(M, width, 2 * width, 3, stride=2, padding=1)
        self.mid = _GroupedResBlock(M, 2 * width, 2 * width, time_dim)
        self.up = GroupedConvTranspose2d(M, 2 * width, width, 2, stride=2)
        self.dec = _GroupedResBlock(M, 2 * width, width, time_dim)
        self.out = nn.Sequential(GroupedGroupNorm(M, 8, width), nn.SiLU(), GroupedConv2d(M, width, C, 3, padding=1))
        members = build_member_modules(self._new_member, n_members, shared_init, seed)
        stacked, _ = stack_module_state(members)
        self.load_state_dict(stacked)
        self.register_load_state_dict_pre_hook(_from_vmap_keys)

    def _new_member(self) -> UNetMember:
        return UNetMember(self.data_shape[0], self.width, self.time_dim)

    def spec(self) -> dict:
        return dict(kind="unet", n_members=self.n_members, data_shape=list(self.data_shape), width=self.width,
                    time_dim=self.time_dim, shared_init=self.shared_init, seed=self.seed)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        """In the order of the vmapped ``unet`` members before issue 13 (names sorted), so that
        their checkpoints' optimiser states and gradient features carry over."""
        named = super().named_parameters(prefix, recurse, remove_duplicate)
        return iter(sorted(named, key=lambda item: item[0].replace(".", "__")))

    def stacked_parameters(self) -> Dict[str, Tensor]:
        """{a member's parameter name: the members' parameters stacked [M, ...]}."""
        return dict(self.named_parameters())

    def member(self, m: int) -> UNetMember:
        """Member m as a plain ``UNetMember`` (a copy of its weights)."""
        module = self._new_member().to(next(self.parameters()).device)
        module.load_state_dict({k: v[m] for k, v in self.state_dict().items()})
        return module

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        M, B = x.shape[:2]
        e = timestep_embedding(t, self.time_dim).to(x.dtype)
        e = self.time(e.expand(M, B, self.time_dim) if e.dim() == 2 else e)
        h0 = self.down(self.inp(fold(x)), e)
        h = self.up(self.mid(self.pool(h0), e))
        return unfold(self.out(self.dec(cat_channels(h, h0, M), e)), M)


def _from_vmap_keys(module, state, prefix, *args) -> None:
    """Checkpoints of the ``unet`` members from before :class:`StackedUNet` hold the same
    stacked tensors as a :class:`VmapEnsemble`'s: ``params.down__conv1__weight``."""
    for key in [k for k in state if k.startswith(prefix + "params.")]:
        state[prefix + key[len(prefix + "params."):].replace("__", ".")] = state.pop(key)
