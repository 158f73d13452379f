"""The demo's members: residual MLP denoisers whose weights are stacked [M, ...] and applied
with batched matmuls."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArchitectureError
from .base import Ensemble, label_rows, timestep_embedding


class _StackedLinear(nn.Module):
    """M independent linear maps: y[m] = x[m] @ W[m] + b[m] (no b where ``bias`` is False)."""

    def __init__(self, members: int, fan_in: int, fan_out: int, init_scale: float = 1.0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out)) if bias else None
        self.init_scale = init_scale

    def reset(self, generator: torch.Generator, shared: bool) -> None:
        bound = self.init_scale / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            for p in (self.weight, self.bias):
                if p is not None:
                    draw = torch.empty_like(p[:1] if shared else p).uniform_(-bound, bound, generator=generator)
                    p.copy_(draw.expand_as(p))

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class _StackedLayerNorm(nn.Module):
    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class StackedMLP(Ensemble):
    """Residual MLP denoisers on flattened data, weights stacked over members.

    h = W_in x; per block: h += W_2 silu(W_1 silu(LN(h)) + W_t e(t)); eps = W_out silu(LN(h)),
    with e(t) = silu(W_e sinusoidal(t)). Class-conditional members (``classes`` > 0) add
    W_c onehot(c) inside that silu, c in 0..classes-1, or ``classes`` (the empty condition)
    for a label of -1: each member is then its conditional and unconditional model at once.
    """

    def __init__(
        self,
        n_members: int,
        data_shape: Sequence[int],
        hidden: int = 256,
        blocks: int = 3,
        time_dim: int = 128,
        shared_init: bool = False,
        seed: int = 0,
        classes: int = 0,
    ):
        super().__init__()
        self.n_members, self.data_shape, self.classes = n_members, tuple(data_shape), classes
        self.hidden, self.blocks, self.time_dim = hidden, blocks, time_dim
        self.shared_init, self.seed = shared_init, seed
        dim, M = math.prod(self.data_shape), n_members
        self.time = _StackedLinear(M, time_dim, time_dim)
        self.inp = _StackedLinear(M, dim, hidden)
        self.norms = nn.ModuleList([_StackedLayerNorm(M, hidden) for _ in range(blocks)])
        self.lin1 = nn.ModuleList([_StackedLinear(M, hidden, hidden) for _ in range(blocks)])
        self.temb = nn.ModuleList([_StackedLinear(M, time_dim, hidden) for _ in range(blocks)])
        self.lin2 = nn.ModuleList([_StackedLinear(M, hidden, hidden, 0.5) for _ in range(blocks)])
        self.out_norm = _StackedLayerNorm(M, hidden)
        self.out = _StackedLinear(M, hidden, dim, init_scale=0.1)
        # last, so that an unconditional ensemble draws the same weights as before it existed
        self.label = _StackedLinear(M, classes + 1, time_dim) if classes else None
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, _StackedLinear):
                module.reset(generator, shared_init)

    def spec(self) -> dict:
        return dict(kind="mlp", n_members=self.n_members, data_shape=list(self.data_shape),
                    hidden=self.hidden, blocks=self.blocks, time_dim=self.time_dim,
                    shared_init=self.shared_init, seed=self.seed, **({"classes": self.classes} if self.classes else {}))

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """eps [M, B, ...] for x [M, B, ...], t [M, B] or [B] and, for class-conditional
        members, ``labels`` int64 [M, B] or [B] (-1: no condition; None: none for any row)."""
        M, B = x.shape[:2]
        e = timestep_embedding(t, self.time_dim).to(x.dtype)
        if e.dim() == 2:  # timesteps shared by all members
            e = e.expand(M, B, self.time_dim)
        e = self.time(e)
        if self.label is not None:
            e = e + self.label(label_rows(labels, (M, B), self.classes, x))
        elif labels is not None:
            raise ArchitectureError("these members are unconditional: they take no labels")
        e = F.silu(e)
        h = self.inp(x.reshape(M, B, -1))
        for norm, lin1, temb, lin2 in zip(self.norms, self.lin1, self.temb, self.lin2):
            h = h + lin2(F.silu(lin1(F.silu(norm(h))) + temb(e)))
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)
