"""Adapter members: M low-rank (LoRA, Hu et al. 2021) updates of one frozen base model, run
batched in one call.

Member m's linear map is y = x W + b + s (x A_m) B_m, s = alpha / rank, with A_m [fan_in, r]
drawn as peft draws it (uniform, bound 1 / sqrt(fan_in)) and B_m [r, fan_out] zero, so every
member starts as the base. The base layer runs once as one GEMM over the rows of all members
[M x B, fan_in]; each member's update as two batched products. Layer norms stay the base's. A
class-conditional fine-tune trains the small label embedding in full per member (peft's
``modules_to_save``); a class the base never saw starts as its empty label, the unconditional
model.

Written here because neither peft nor diffusers evaluates M adapters each on its own batch in one
call, which ablated sampling needs: their LoRA layers run one adapter at a time, or add several
into one output. The base's weights are buffers that are neither saved (a checkpoint holds the
adapters, the base's path and its hash) nor stacked over members: every member, shard and pass of
members shares the one copy.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ArchitectureError
from .base import Ensemble
from .mlp import StackedMLP, _StackedLayerNorm, _StackedLinear
from .plain import PlainMLP, plain_member

__all__ = ["LoraEnsemble", "ADAPTED_LAYERS"]


class _FrozenLinear(nn.Module):
    """The base's linear map, shared by all members: one GEMM over every row of every member."""

    def __init__(self, layer: _StackedLinear):
        super().__init__()
        self.register_buffer("weight", layer.weight.detach()[0].clone(), persistent=False)  # [fan_in, fan_out]
        self.register_buffer("bias", layer.bias.detach()[0, 0].clone(), persistent=False)  # [fan_out]

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _LoraLinear(nn.Module):
    """The base's map plus each member's low-rank update s (x A_m) B_m."""

    def __init__(self, layer: _StackedLinear, members: int, rank: int, alpha: float):
        super().__init__()
        fan_in, fan_out = layer.weight.shape[1:]
        self.base = _FrozenLinear(layer)
        self.down = _StackedLinear(members, fan_in, rank, bias=False)  # A: peft's bound 1 / sqrt(fan_in)
        self.up = _StackedLinear(members, rank, fan_out, init_scale=0.0, bias=False)  # B = 0
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


def _frozen_norm(norm: _StackedLayerNorm) -> _StackedLayerNorm:
    frozen = copy.copy(norm)
    frozen._parameters, frozen._buffers, frozen._non_persistent_buffers_set = {}, {}, set()
    for name, value in norm.named_parameters(recurse=False):
        frozen.register_buffer(name, value.detach().clone(), persistent=False)  # [1, 1, dim]: any member count
    return frozen


#: the base layers that take a low-rank update (peft's ``target_modules``), by their names in the MLP
ADAPTED_LAYERS = ("time", "inp", "lin1", "temb", "lin2", "out")


class LoraEnsemble(Ensemble):
    """``n_members`` rank-``rank`` LoRA adapters on the one-model MLP ``base`` (frozen).

    ``classes``: a class-conditional fine-tune (at least the base's classes): the label embedding
    is each member's own, starting from the base's (rows of new classes from its empty label).
    ``base_ref``: where the base came from ({"path", "sha256"}), kept in :meth:`spec`."""

    def __init__(self, base: Ensemble, n_members: int, rank: int = 8, alpha: Optional[float] = None,
                 seed: int = 0, shared_init: bool = False, classes: int = 0, base_ref: Optional[dict] = None):
        super().__init__()
        if not isinstance(base, StackedMLP) or base.n_members != 1:
            raise ArchitectureError(f"adapter members are built on one MLP model (train --all-units --models 1), not "
                                    f"{type(base).__name__} of {base.n_members} members")
        if not 1 <= rank <= 4096:
            raise ArchitectureError(f"--rank must be in [1, 4096], got {rank}")
        classes = max(classes, base.classes)
        self.n_members, self.data_shape, self.classes = n_members, base.data_shape, classes
        self.rank, self.alpha, self.seed, self.shared_init = rank, float(alpha or rank), seed, shared_init
        self.base_ref = dict(base_ref or {})
        net = copy.deepcopy(base).requires_grad_(False)
        net.n_members, net.classes = n_members, classes
        generator = torch.Generator().manual_seed(seed)
        for name in ADAPTED_LAYERS:
            layers = getattr(net, name)
            adapted = [_LoraLinear(layer, n_members, rank, self.alpha) for layer in
                       (layers if isinstance(layers, nn.ModuleList) else [layers])]
            for layer in adapted:
                for part in (layer.down, layer.up):
                    part.reset(generator, shared_init)
            setattr(net, name, nn.ModuleList(adapted) if isinstance(layers, nn.ModuleList) else adapted[0])
        net.norms = nn.ModuleList([_frozen_norm(norm) for norm in net.norms])
        net.out_norm = _frozen_norm(net.out_norm)
        net.label = _label_embedding(base, n_members, classes) if classes else None
        self.net = net
        start = _label_embedding(base, 1, classes) if classes else None  # the base's, kept for plain_base
        self.register_buffer("base_label_weight", start.weight.detach()[0] if start else torch.zeros(0),
                             persistent=False)
        self.register_buffer("base_label_bias", start.bias.detach()[0, 0] if start else torch.zeros(0),
                             persistent=False)

    @classmethod
    def rebuild(cls, spec: dict, base: Ensemble) -> "LoraEnsemble":
        return cls(base, spec["n_members"], spec["rank"], spec["alpha"], spec.get("seed", 0),
                   spec.get("shared_init", False), spec.get("classes", 0), spec["base"])

    def spec(self) -> dict:
        return dict(kind="lora", n_members=self.n_members, data_shape=list(self.data_shape), rank=self.rank,
                    alpha=self.alpha, seed=self.seed, shared_init=self.shared_init, base=self.base_ref,
                    **({"classes": self.classes} if self.classes else {}))

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """As :meth:`StackedMLP.forward`: eps [M, B, ...] for x [M, B, ...] and t [M, B] or [B]."""
        return self.net(x, t, labels)

    def plain_base(self) -> PlainMLP:
        """The frozen base as a plain module in the members' label layout (their classes, the
        empty label last; new classes as the base's empty label): what peft loads an exported
        member (:func:`~.export.export_adapter`) onto."""
        base = StackedMLP(1, self.data_shape, self.net.hidden, self.net.blocks, self.net.time_dim,
                          classes=self.classes)
        with torch.no_grad():
            for name, target in base.named_modules():
                if isinstance(target, (_StackedLinear, _StackedLayerNorm)):
                    source = self.net.get_submodule(name)
                    frozen = source.base if isinstance(source, _LoraLinear) else source
                    weight, bias = (self.base_label_weight, self.base_label_bias) if name == "label" else \
                        (frozen.weight, frozen.bias)
                    target.weight.copy_(weight.reshape(target.weight.shape))
                    target.bias.copy_(bias.reshape(target.bias.shape))
        return plain_member(base.to(self.base_label_weight.device))

    def merged(self) -> StackedMLP:
        """The members as full MLPs, each layer W + s A_m B_m (peft's ``merge_and_unload``): the
        same functions in another parametrisation, M times the base's weights."""
        net = self.net
        full = StackedMLP(self.n_members, self.data_shape, net.hidden, net.blocks, net.time_dim, classes=self.classes)
        with torch.no_grad():
            for name, module in full.named_modules():
                source = net.get_submodule(name) if name else None
                if isinstance(source, _LoraLinear):
                    module.weight.copy_(source.base.weight + source.scale * source.down.weight @ source.up.weight)
                    module.bias.copy_(source.base.bias.expand_as(module.bias))
                elif isinstance(module, (_StackedLinear, _StackedLayerNorm)):  # the label embedding, the norms
                    module.weight.copy_(source.weight.expand_as(module.weight))
                    module.bias.copy_(source.bias.expand_as(module.bias))
        return full.to(next(self.parameters()).device)


def _label_embedding(base: StackedMLP, members: int, classes: int) -> _StackedLinear:
    """Each member's own label embedding over ``classes`` (+ the empty label), from the base's:
    its classes as they are, new classes and the empty label from its empty label (or zero for
    an unconditional base: every label starts as the base)."""
    label = _StackedLinear(members, classes + 1, base.time_dim)
    with torch.no_grad():
        label.weight.zero_()
        label.bias.zero_()
        if base.label is not None:
            weight, known = base.label.weight.detach()[0], base.classes
            label.weight[:, :known] = weight[:known]
            label.weight[:, known:] = weight[known]
            label.bias.copy_(base.label.bias.detach()[0].expand_as(label.bias))
    return label
