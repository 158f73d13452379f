"""diffusers' ``UNet2DModel`` as members (``pip install ensattr_fast[diffusers]``): batched by
folding the members into the batch and their weights into grouped convolutions and batched
matmuls (:class:`FoldedEnsemble`, twice as fast as vmap over stacked parameters, see there),
and each member saved as, or loaded from, a diffusers model folder
(``UNet2DModel.save_pretrained``), for use in a diffusers pipeline.

Each member's attention runs as diffusers' plain ``AttnProcessor`` (matmul, softmax, matmul):
the fused attention kernel that ``UNet2DModel`` uses by default on CPU has no forward-mode
derivative, which first-order Jacobians need. Both compute the same up to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArchitectureError
from .folded import FoldedEnsemble

#: The seed paper's CIFAR-10 UNet: the DDPM model of Ho et al. (2020) as diffusers ports it
#: (google/ddpm-cifar10-32) with its dropout of 0.1: 35.75M parameters at 3x32x32.
SEED_CIFAR10 = dict(
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=None, dropout=0.1, norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional",
)


def _unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("diffusers members need diffusers: pip install ensattr_fast[diffusers]") from None
    return UNet2DModel


class DiffusersMember(nn.Module):
    """A diffusers ``UNet2DModel`` built from its config, as a member: ``forward(x, t)``
    returns the predicted noise; its attention in plain matmuls (see the module's docstring).

    Class-conditional where the config has ``num_class_embeds`` = classes + 1 (diffusers' class
    embedding, added to the time embedding): ``forward(x, t, labels)``, label -1 (or no labels)
    the empty condition, the last embedding."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnProcessor

        self.unet = _unet2d()(**config)
        self.classes = max(0, (config.get("num_class_embeds") or 0) - 1)
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if not self.classes:
            if labels is not None:
                raise ArchitectureError("these members are unconditional: they take no labels")
            return self.unet(x, t).sample
        labels = torch.full_like(t, -1) if labels is None else labels.expand_as(t)
        return self.unet(x, t, class_labels=torch.where(labels < 0, self.classes, labels)).sample


def _shape(config: dict) -> tuple:
    size = config.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (config.get("in_channels", 3), *size)


def diffusers_ensemble(config: dict, n_members: int, shared_init: bool = False, seed: int = 0) -> FoldedEnsemble:
    """M ``UNet2DModel`` members of one config, batched, their parameters stacked [M, ...]
    (class-conditional on ``num_class_embeds`` - 1 classes where the config has them)."""
    classes = max(0, (config.get("num_class_embeds") or 0) - 1)
    spec = dict(kind="diffusers", config=config, n_members=n_members, data_shape=list(_shape(config)),
                shared_init=shared_init, seed=seed, **({"classes": classes} if classes else {}))
    ensemble = FoldedEnsemble(lambda: DiffusersMember(config), n_members, _shape(config), shared_init, seed, spec)
    ensemble.classes = classes
    return ensemble


def member_unet(ensemble: FoldedEnsemble, m: int):
    """Member m of a diffusers ensemble as a plain ``UNet2DModel`` (a copy of its weights)."""
    config = ensemble.spec()["config"]
    unet = _unet2d()(**config).to(next(ensemble.parameters()).device)
    unet.load_state_dict({k[len("unet."):]: v for k, v in ensemble.member(m).state_dict().items()})
    return unet


def save_member(ensemble: FoldedEnsemble, m: int, folder) -> Path:
    """Save member m as a diffusers model folder (``UNet2DModel.from_pretrained`` reads it)."""
    member_unet(ensemble, m).save_pretrained(folder)
    return Path(folder)


def load_members(folders: Sequence) -> FoldedEnsemble:
    """An ensemble of the ``UNet2DModel`` folders ``folders`` (all of one config), member m
    from ``folders[m]``: any member or sub-ensemble saved by :func:`save_member`, or any other
    UNet2DModel of one config."""
    unets = [_unet2d().from_pretrained(folder, low_cpu_mem_usage=False) for folder in folders]
    configs = [{k: v for k, v in dict(u.config).items() if not k.startswith("_")} for u in unets]
    for folder, config in zip(folders, configs):
        if config != configs[0]:
            raise ValueError(f"load_members: {folder} has another UNet2DModel config than {folders[0]}")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in configs[0].items()}
    ensemble = diffusers_ensemble(config, len(unets))
    weights = [u.state_dict() for u in unets]
    state = {f"unet.{k}": torch.stack([w[k] for w in weights]) for k in weights[0]}
    ensemble.load_stacked(state)
    return ensemble
