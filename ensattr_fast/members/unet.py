"""A small built-in UNet member for images of 8x8 to 32x32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import timestep_embedding


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
