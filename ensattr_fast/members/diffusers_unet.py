"""diffusers' ``UNet2DModel`` as a member (``pip install ensattr_fast[diffusers]``)."""

from __future__ import annotations

from torch import Tensor, nn

from .vmap import VmapEnsemble


class DiffusersMember(nn.Module):
    """A diffusers ``UNet2DModel`` built from its config, as a member: ``forward(x, t)``
    returns the predicted noise (``pip install ensattr_fast[diffusers]``)."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ImportError("diffusers members need diffusers: pip install ensattr_fast[diffusers]") from None
        self.unet = UNet2DModel(**config)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def diffusers_ensemble(config: dict, n_members: int, shared_init: bool = False, seed: int = 0) -> "VmapEnsemble":
    """M ``UNet2DModel`` members of one config, their parameters stacked. torch's vmap cannot
    batch diffusers' GroupNorm layers yet, so the members run one after another."""
    size = config.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (config.get("in_channels", 3), *size)
    spec = dict(kind="diffusers", config=config, n_members=n_members, data_shape=list(shape),
                shared_init=shared_init, seed=seed)
    return VmapEnsemble(lambda: DiffusersMember(config), n_members, shape, shared_init, seed, spec, vectorize=False)
