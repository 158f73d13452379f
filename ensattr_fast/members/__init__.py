"""Ensembles: M denoisers evaluated together, each on its own batch.

An :class:`Ensemble` maps x [M, B, *data_shape] and timesteps t [M, B] (or [B], shared) to
noise predictions [M, B, *data_shape] with one call: member m sees only x[m]. Built in:

- :class:`StackedMLP`: a residual MLP denoiser with a time embedding whose weights are stacked
  [M, ...] and applied with batched matmuls (the demo's default);
- :class:`VmapEnsemble`: any ``nn.Module`` with ``forward(x, t)`` (for example
  :class:`UNetMember`), its parameters stacked and the module vmapped over members;
- diffusers' ``UNet2DModel`` (:func:`diffusers_ensemble`).

Members share initial weights when ``shared_init`` is set (common random numbers: two members
then differ only by what they were trained on). The architectures are registered by name in
:data:`ARCHITECTURES` (see :mod:`ensattr_fast.members.registry`).
"""

from .base import Ensemble, PackedLayout, timestep_embedding
from .diffusers_unet import DiffusersMember, diffusers_ensemble
from .mlp import StackedMLP
from .registry import ARCHITECTURES, Architecture, MemberOptions, build_ensemble, build_members
from .unet import UNetMember
from .vmap import VmapEnsemble

__all__ = ["Ensemble", "StackedMLP", "VmapEnsemble", "UNetMember", "DiffusersMember", "PackedLayout",
           "build_ensemble", "diffusers_ensemble", "build_members", "MemberOptions", "Architecture",
           "ARCHITECTURES", "timestep_embedding"]
