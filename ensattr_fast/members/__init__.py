"""Ensembles: M denoisers evaluated together, each on its own batch.

An :class:`Ensemble` maps x [M, B, *data_shape] and timesteps t [M, B] (or [B], shared) to
noise predictions [M, B, *data_shape] with one call: member m sees only x[m]. Built in:

- :class:`StackedMLP`: a residual MLP denoiser with a time embedding whose weights are stacked
  [M, ...] and applied with batched matmuls (the demo's default);
- :class:`VmapEnsemble`: any ``nn.Module`` with ``forward(x, t)``, its parameters stacked and the
  module vmapped over members;
- :class:`FoldedEnsemble`: any convolutional member module (Conv2d, ConvTranspose2d, GroupNorm,
  Linear layers), its members folded into the batch and its layers into grouped convolutions and
  batched matmuls: twice as fast as vmap on CPU;
- :class:`StackedUNet`: the built-in small UNet (:class:`UNetMember`), written folded into
  grouped convolutions (a quarter faster again);
- diffusers' ``UNet2DModel`` (:func:`diffusers_ensemble`), folded; each member saved as a
  diffusers model folder (:func:`save_member`) and folders loaded back as an ensemble
  (:func:`load_members`);
- diffusers' ``UNet2DConditionModel`` (:class:`TextEnsemble`), vmapped, cross-attending to an
  embedding per example (text conditions, :mod:`.text`);
- :class:`LoraEnsemble`: M low-rank adapters on one frozen base model (a fine-tune), the base run
  once over all members' rows; each member exports as a peft adapter (:func:`export_adapter`)
  onto the base as a plain module (:class:`PlainMLP`, :func:`plain_member`).

The three batched kinds store the same state (a VmapEnsemble's) and differ only in the forward.

Members share initial weights when ``shared_init`` is set (common random numbers: two members
then differ only by what they were trained on). The architectures are registered by name in
:data:`ARCHITECTURES` (see :mod:`ensattr_fast.members.registry`).
"""

from .adapters import LoraEnsemble
from .base import Ensemble, PackedLayout, timestep_embedding
from .diffusers_unet import SEED_CIFAR10, DiffusersMember, diffusers_ensemble, load_members, member_unet, save_member
from .export import export_adapter
from .folded import FoldedEnsemble
from .mlp import StackedMLP
from .plain import PlainMLP, plain_member
from .registry import ARCHITECTURES, Architecture, MemberOptions, build_ensemble, build_members
from .text import TextEnsemble, TextMember, text_ensemble
from .unet import StackedUNet, UNetMember
from .vmap import VmapEnsemble

__all__ = ["Ensemble", "StackedMLP", "LoraEnsemble", "StackedUNet", "VmapEnsemble", "FoldedEnsemble", "UNetMember",
           "DiffusersMember", "PackedLayout",
           "build_ensemble", "diffusers_ensemble", "save_member", "load_members", "member_unet", "SEED_CIFAR10",
           "build_members", "MemberOptions", "Architecture", "ARCHITECTURES", "timestep_embedding", "export_adapter",
           "PlainMLP", "plain_member", "TextEnsemble", "TextMember", "text_ensemble"]
