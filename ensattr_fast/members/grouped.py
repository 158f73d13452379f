"""Layers of M members in one call, on activations whose channels hold the members side by side.

A member-folded activation is h [B, M*C, H, W]: channels m*C .. (m+1)*C - 1 belong to member m.
A convolution of groups=M is then M independent convolutions, a group norm of M*G groups is M
group norms of G groups, and member m's weights are row m of every parameter, stacked [M, ...]
(so :meth:`Ensemble.select` slices members like any stacked ensemble). The number of members
is read from the weights at every call, so a slice of them runs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fold(x: Tensor) -> Tensor:
    """x [M, B, C, H, W] -> [B, M*C, H, W]."""
    return x.transpose(0, 1).flatten(1, 2)


def unfold(h: Tensor, members: int) -> Tensor:
    """h [B, M*C, H, W] -> [M, B, C, H, W] (contiguous)."""
    return h.unflatten(1, (members, -1)).transpose(0, 1).contiguous()


def cat_channels(a: Tensor, b: Tensor, members: int) -> Tensor:
    """Each member's channels of a, then its channels of b: torch.cat(dim=1) member by member."""
    return torch.cat([a.unflatten(1, (members, -1)), b.unflatten(1, (members, -1))], 2).flatten(1, 2)


def add_per_channel(h: Tensor, v: Tensor) -> Tensor:
    """h [B, M*C, H, W] + v [M, B, C] broadcast over H, W."""
    return h + v.transpose(0, 1).flatten(1)[:, :, None, None]


class GroupedConv2d(nn.Module):
    """M ``nn.Conv2d(cin, cout, kernel)``: weight [M, cout, cin, k, k], bias [M, cout]."""

    def __init__(self, members: int, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(members, cout))
        self.stride, self.padding = stride, padding

    def forward(self, h: Tensor) -> Tensor:
        return F.conv2d(h, self.weight.flatten(0, 1), self.bias.flatten(), self.stride, self.padding,
                        groups=self.weight.shape[0])


class GroupedConvTranspose2d(nn.Module):
    """M ``nn.ConvTranspose2d(cin, cout, kernel, stride)``: weight [M, cin, cout, k, k]."""

    def __init__(self, members: int, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, cin, cout, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(members, cout))
        self.stride = stride

    def forward(self, h: Tensor) -> Tensor:
        return F.conv_transpose2d(h, self.weight.flatten(0, 1), self.bias.flatten(), self.stride,
                                  groups=self.weight.shape[0])


class GroupedGroupNorm(nn.Module):
    """M ``nn.GroupNorm(groups, channels)``: weight and bias [M, channels]."""

    def __init__(self, members: int, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, channels))
        self.bias = nn.Parameter(torch.zeros(members, channels))
        self.groups, self.eps = groups, eps

    def forward(self, h: Tensor) -> Tensor:
        # contiguous: group_norm asks a non-contiguous input for its memory format, which vmap
        # (per-example gradients, Jacobians) cannot answer
        return F.group_norm(h.contiguous(), self.weight.shape[0] * self.groups, self.weight.flatten(),
                            self.bias.flatten(), self.eps)


class StackedLinear(nn.Module):
    """M ``nn.Linear(fan_in, fan_out)`` on x [M, B, fan_in]: weight [M, fan_out, fan_in]."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, fan_out, fan_in))
        self.bias = nn.Parameter(torch.empty(members, fan_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias[:, None], x, self.weight.transpose(1, 2))
