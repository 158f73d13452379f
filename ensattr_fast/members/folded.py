"""Any convolutional member module as an ensemble, its members folded into the batch.

:class:`FoldedEnsemble` runs one copy of the member's own ``forward`` on x [M*B, ...] (member m's
examples are rows m*B .. (m+1)*B - 1) and t [M*B], after replacing every layer with weights by
one that holds the M members' weights stacked [M, ...] under the same names and applies member
m's weights to member m's rows: a convolution moves the members into its channels and runs one
convolution of M times the groups, a group norm normalises and applies each member's affine, a
linear layer is a batched matmul. Everything else (activations, attention, concatenations,
up- and downsampling, dropout) treats the rows as a batch, as it does for one member. The
member's forward must therefore treat its examples independently (no batch norm), which every
diffusion UNet does.

Against ``torch.func.vmap`` over stacked parameters (:class:`VmapEnsemble`, with diffusers'
group norms given contiguous inputs so that vmap runs them), for 8 diffusers ``UNet2DModel``
members (3x32x32, block channels (32, 64), 4 examples each; CPU time of one thread, fastest of
5): 374 ms per forward against 818 ms, 995 ms per forward and backward against 1,996 ms
(vmap's batching rules move the member dimension around every layer). The members called one
by one took 292 ms and 1,205 ms.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vmap import VmapEnsemble


def _stacked(members: int, tensor) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(torch.empty(members, *tensor.shape))


class _Conv(nn.Module):
    """M ``nn.Conv2d`` or ``nn.ConvTranspose2d`` on rows [M*B, C, H, W]."""

    def __init__(self, conv: nn.Module, members: int):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise TypeError(f"FoldedEnsemble folds zero-padded convolutions only, "
                            f"not padding_mode={conv.padding_mode!r}")
        self.weight, self.bias = _stacked(members, conv.weight), _stacked(members, conv.bias)
        self.transposed, self.groups = isinstance(conv, nn.ConvTranspose2d), conv.groups
        self.options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        if self.transposed:
            self.options["output_padding"] = conv.output_padding

    def forward(self, x: Tensor) -> Tensor:
        M = self.weight.shape[0]
        h = x.unflatten(0, (M, -1)).transpose(0, 1).flatten(1, 2)  # [B, M*C, H, W]
        bias = None if self.bias is None else self.bias.flatten()
        conv = F.conv_transpose2d if self.transposed else F.conv2d
        y = conv(h, self.weight.flatten(0, 1), bias, groups=M * self.groups, **self.options)
        return y.unflatten(1, (M, -1)).transpose(0, 1).flatten(0, 1)


class _GroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, members: int):
        super().__init__()
        self.weight, self.bias = _stacked(members, norm.weight), _stacked(members, norm.bias)
        self.num_groups, self.eps = norm.num_groups, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        # contiguous: group_norm asks a non-contiguous input (an attention block's output) for
        # its memory format, which vmap (per-example gradients) cannot answer
        y = F.group_norm(x.contiguous(), self.num_groups, None, None, self.eps)
        if self.weight is None:
            return y
        M = self.weight.shape[0]
        shape = (M, 1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), y.unflatten(0, (M, -1)), self.weight.view(shape)).flatten(0, 1)


class _Linear(nn.Module):
    def __init__(self, linear: nn.Linear, members: int):
        super().__init__()
        self.weight, self.bias = _stacked(members, linear.weight), _stacked(members, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        M = self.weight.shape[0]
        rows = x.reshape(M, -1, x.shape[-1])
        if self.bias is None:
            y = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias[:, None], rows, self.weight.transpose(1, 2))
        return y.view(*x.shape[:-1], -1)


class _Embedding(nn.Module):
    """M ``nn.Embedding`` tables: row i of member m's rows looks up member m's table."""

    def __init__(self, embedding: nn.Embedding, members: int):
        super().__init__()
        self.weight = _stacked(members, embedding.weight)

    def forward(self, index: Tensor) -> Tensor:
        M = self.weight.shape[0]
        member = torch.arange(M, device=index.device).repeat_interleave(index.shape[0] // M)
        return self.weight[member, index]


_FOLDED = {nn.Conv2d: _Conv, nn.ConvTranspose2d: _Conv, nn.GroupNorm: _GroupNorm, nn.Linear: _Linear,
           nn.Embedding: _Embedding}


def _fold_layers(module: nn.Module, members: int) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if type(child) in _FOLDED:
            module._modules[name] = _FOLDED[type(child)](child, members)
        elif any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
            raise TypeError(f"FoldedEnsemble cannot fold a {type(child).__name__} ({name}): use VmapEnsemble")
        else:
            _fold_layers(child, members)


class FoldedEnsemble(VmapEnsemble):
    """Members ``factory()`` (an ``nn.Module`` with ``forward(x [B, *data_shape], t [B])``
    built from Conv2d, ConvTranspose2d, GroupNorm and Linear layers) folded into the batch.

    The members are built and stored as a :class:`VmapEnsemble` stores them (the same state,
    spec, :meth:`member` and :meth:`select`): only the forward differs.
    """

    def __init__(self, factory: Callable[[], nn.Module], n_members: int, data_shape: Sequence[int],
                 shared_init: bool = False, seed: int = 0, spec: dict | None = None):
        super().__init__(factory, n_members, data_shape, shared_init, seed, spec)
        folded = copy.deepcopy(self._base[0])
        with torch.device("meta"):
            _fold_layers(folded, n_members)
        self._folded = [folded]  # a skeleton: the weights come from the stacked state

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        M, B = x.shape[:2]
        conditions = [c.expand(M, B).flatten() for c in (t, labels) if c is not None]
        return self._on_stacked(self._folded[0], x.flatten(0, 1), *conditions).unflatten(0, (M, B))
