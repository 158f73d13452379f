"""diffusers' ``UNet2DModel`` as members (``pip install ensattr_fast[diffusers]``): batched with
stacked parameters under ``torch.func.vmap``, and each member saved as, or loaded from, a
diffusers model folder (``UNet2DModel.save_pretrained``), for use in a diffusers pipeline.

Two things in a ``UNet2DModel`` stop vmap, and each member is built without them: its
``nn.GroupNorm`` layers ask a non-contiguous input (the output of an attention block) for its
memory format, which vmap cannot answer, so they normalise a contiguous copy instead; and its
default attention calls a CPU kernel that vmap has no batching rule for (and forward-mode AD no
formula), so the attention runs as diffusers' plain ``AttnProcessor`` (matmul, softmax, matmul).
Both compute the same as the originals up to float rounding. The members' folded-into-groups
alternative (see :mod:`.unet`) does not apply here: diffusers' blocks concatenate and split
channels, which would mix the members.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vmap import VmapEnsemble

#: The seed paper's CIFAR-10 UNet: the DDPM model of Ho et al. (2020) as diffusers ports it
#: (google/ddpm-cifar10-32) with its dropout of 0.1: 35.75M parameters at 3x32x32.
SEED_CIFAR10 = dict(
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=None, dropout=0.1, norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional",
)


class _ContiguousGroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def _unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("diffusers members need diffusers: pip install ensattr_fast[diffusers]") from None
    return UNet2DModel


class DiffusersMember(nn.Module):
    """A diffusers ``UNet2DModel`` built from its config, as a member: ``forward(x, t)``
    returns the predicted noise; made safe for vmap (see the module's docstring)."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnProcessor

        self.unet = _unet2d()(**config)
        for module in self.unet.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = _ContiguousGroupNorm
            elif isinstance(module, Attention):
                module.set_processor(AttnProcessor())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def _shape(config: dict) -> tuple:
    size = config.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (config.get("in_channels", 3), *size)


def diffusers_ensemble(config: dict, n_members: int, shared_init: bool = False, seed: int = 0,
                       vectorize: bool = True) -> VmapEnsemble:
    """M ``UNet2DModel`` members of one config, their parameters stacked [M, ...] and the
    members vmapped (``vectorize=False``: called one after another, on the same weights)."""
    spec = dict(kind="diffusers", config=config, n_members=n_members, data_shape=list(_shape(config)),
                shared_init=shared_init, seed=seed)
    return VmapEnsemble(lambda: DiffusersMember(config), n_members, _shape(config), shared_init, seed, spec,
                        vectorize=vectorize)


def member_unet(ensemble: VmapEnsemble, m: int):
    """Member m of a diffusers ensemble as a plain ``UNet2DModel`` (a copy of its weights)."""
    config = ensemble.spec()["config"]
    unet = _unet2d()(**config).to(next(ensemble.parameters()).device)
    unet.load_state_dict({k[len("unet."):]: v for k, v in ensemble.member(m).state_dict().items()})
    return unet


def save_member(ensemble: VmapEnsemble, m: int, folder) -> Path:
    """Save member m as a diffusers model folder (``UNet2DModel.from_pretrained`` reads it)."""
    member_unet(ensemble, m).save_pretrained(folder)
    return Path(folder)


def load_members(folders: Sequence, vectorize: bool = True) -> VmapEnsemble:
    """An ensemble of the ``UNet2DModel`` folders ``folders`` (all of one config), member m
    from ``folders[m]``: any member or sub-ensemble saved by :func:`save_member`, or any other
    UNet2DModel of one config."""
    unets = [_unet2d().from_pretrained(folder, low_cpu_mem_usage=False) for folder in folders]
    configs = [{k: v for k, v in dict(u.config).items() if not k.startswith("_")} for u in unets]
    for folder, config in zip(folders, configs):
        if config != configs[0]:
            raise ValueError(f"load_members: {folder} has another UNet2DModel config than {folders[0]}")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in configs[0].items()}
    ensemble = diffusers_ensemble(config, len(unets), vectorize=vectorize)
    weights = [u.state_dict() for u in unets]
    state = {f"unet.{k}": torch.stack([w[k] for w in weights]) for k in weights[0]}
    ensemble.load_stacked(state)
    return ensemble
