"""One member of the MLP ensembles as a plain torch module (``nn.Linear``, ``nn.LayerNorm``), for
the tools that take any ``nn.Module``: peft loads an exported adapter member onto the plain base
(:func:`~ensattr_fast.members.export.export_adapter`), the per-model baselines train it."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import label_rows, timestep_embedding
from .mlp import StackedMLP

__all__ = ["PlainMLP", "plain_member"]


class PlainMLP(nn.Module):
    """:class:`StackedMLP`'s denoiser for one model: forward(x [*B, *data_shape], t [*B], labels
    [*B] or None) -> eps [*B, *data_shape], any leading batch dimensions (kronfluence reads an
    example's K noised copies [n, K, ...] as one example's tokens); its layers carry the stacked
    ensemble's names."""

    def __init__(self, data_shape: Sequence[int], hidden: int = 256, blocks: int = 3, time_dim: int = 128,
                 classes: int = 0):
        super().__init__()
        dim = math.prod(data_shape)
        self.data_shape, self.time_dim, self.classes = tuple(data_shape), time_dim, classes
        self.time = nn.Linear(time_dim, time_dim)
        self.inp = nn.Linear(dim, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(blocks)])
        self.lin1 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(blocks)])
        self.temb = nn.ModuleList([nn.Linear(time_dim, hidden) for _ in range(blocks)])
        self.lin2 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(blocks)])
        self.out_norm, self.out = nn.LayerNorm(hidden), nn.Linear(hidden, dim)
        self.label = nn.Linear(classes + 1, time_dim) if classes else None

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        e = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.label is not None:
            e = e + self.label(label_rows(labels, t.shape, self.classes, x))
        e = F.silu(e)
        h = self.inp(x.flatten(x.dim() - len(self.data_shape)))
        for norm, lin1, temb, lin2 in zip(self.norms, self.lin1, self.temb, self.lin2):
            h = h + lin2(F.silu(lin1(F.silu(norm(h))) + temb(e)))
        return self.out(F.silu(self.out_norm(h))).view(x.shape)


def plain_member(ensemble: StackedMLP, member: int = 0) -> PlainMLP:
    """Member ``member`` of ``ensemble`` as a :class:`PlainMLP` with its weights."""
    plain = PlainMLP(ensemble.data_shape, ensemble.hidden, ensemble.blocks, ensemble.time_dim, ensemble.classes)
    stacked = dict(ensemble.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(stacked[name].weight[member].T)
                module.bias.copy_(stacked[name].bias[member, 0])
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(stacked[name].weight[member, 0])
                module.bias.copy_(stacked[name].bias[member, 0])
    return plain.to(next(ensemble.parameters()).device)
