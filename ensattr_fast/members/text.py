"""Text-conditioned members (``pip install ensattr_fast[diffusers]``): diffusers'
``UNet2DConditionModel`` built from a config (nothing downloaded), cross-attending to one
embedding [L, D] per example, e.g. a text encoder's outputs computed beforehand; batched by vmap
over the stacked parameters (:class:`VmapEnsemble`), its attention in plain matmuls as for the
``UNet2DModel`` members (forward-mode derivatives, which first-order Jacobians need).

Conditions travel through the package as indices, as class labels do: index i >= 0 is training
example i's embedding (the data's ``conditions``), -1 the empty condition (zeros: the
unconditional model that ``--cond-dropout`` trains and guidance pushes away from), and -2 - s
the embedding of sample s (the seeds' ``--condition-file``). The ensemble holds them in one
table, shared by every member and never saved, and looks each row's embedding up as it runs. Sampling,
guided and ablated, member passes and shards, training, first-order Jacobians and gradient
features then carry a text condition exactly as they carry a label, with no path of their own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArchitectureError, DataError
from .vmap import VmapEnsemble

__all__ = ["TextMember", "TextEnsemble", "text_ensemble", "sample_index"]


def sample_index(samples: Tensor) -> Tensor:
    """The condition index of samples ``samples`` (their rows of the sample table): -2 - s."""
    return -2 - samples.long()


class TextMember(nn.Module):
    """One ``UNet2DConditionModel`` of ``config`` as a member: ``forward(x, t, condition [B, L, D])``
    returns the predicted noise."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
            from diffusers.models.attention_processor import AttnProcessor
        except ImportError:
            raise ImportError("text-conditioned members need diffusers: pip install ensattr_fast[diffusers]") from None
        self.unet = UNet2DConditionModel(**config)
        self.unet.set_attn_processor(AttnProcessor())

    def forward(self, x: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=condition).sample


class TextEnsemble(VmapEnsemble):
    """M :class:`TextMember` of one config, their parameters stacked [M, ...]; ``forward(x, t,
    index)`` takes condition indices (see the module's docstring), [M, B] or [B]."""

    def __init__(self, config: dict, n_members: int, data_shape: Sequence[int], condition_shape: Sequence[int],
                 shared_init: bool = False, seed: int = 0, spec: Optional[dict] = None):
        super().__init__(lambda: TextMember(config), n_members, data_shape, shared_init, seed, spec)
        self.condition_shape = tuple(int(v) for v in condition_shape)
        # the embeddings condition indices point to, shared by the members and never saved: the
        # training examples' rows, the empty condition's (zeros), the samples' rows
        self.register_buffer("conditions_table", torch.zeros(1, *self.condition_shape), persistent=False)
        self._n_train = 0

    @property
    def train_conditions(self) -> Tensor:
        """The training examples' embeddings [n, L, D] (condition indices 0..n-1)."""
        return self.conditions_table[:self._n_train]

    @property
    def sample_conditions(self) -> Tensor:
        """The samples' embeddings [S, L, D] (condition indices -2..-1-S)."""
        return self.conditions_table[self._n_train + 1:]

    def set_conditions(self, train: Optional[Tensor] = None, samples: Optional[Tensor] = None) -> None:
        """The embeddings that condition indices point to: the training examples' [n, L, D]
        and the samples' [S, L, D] (each left as it is where not given)."""
        like = self.conditions_table
        for table in (train, samples):
            if table is not None and (tuple(table.shape[1:]) != self.condition_shape or table.dim() != 3):
                raise DataError(f"these members take conditions [L, D] = {list(self.condition_shape)}, got "
                                f"{list(table.shape[1:])}")
        train = self.train_conditions if train is None else train.to(like.device, like.dtype)
        samples = self.sample_conditions if samples is None else samples.to(like.device, like.dtype)
        self.conditions_table = torch.cat([train, like.new_zeros(1, *self.condition_shape), samples])
        self._n_train = len(train)

    def example_conditions(self, data) -> Tensor:
        """The condition index of every training example of ``data`` (their own rows), with
        ``data.conditions`` made the training table."""
        if data.conditions is None:
            raise DataError(f"these members are text-conditioned, but {data.name} has no conditions (an array "
                            f"'conditions' [n, L, D] beside the images)")
        self.set_conditions(train=data.conditions)
        return torch.arange(len(data))

    def check_indices(self, index: Tensor) -> None:
        """A :class:`DataError` for a condition index with no embedding in the tables."""
        index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise DataError(f"condition indices must be integers, got {index.dtype}")
        n, s = len(self.train_conditions), len(self.sample_conditions)
        bad = index[(index >= n) | (index < -1 - s)]
        if len(bad):
            where = (f"training example {int(bad[0])} of {n}" if bad[0] >= 0
                     else f"sample {int(-2 - bad[0])} of the {s} given conditions (--condition-file)")
            raise DataError(f"no text condition for {where}")

    def embed(self, index: Tensor) -> Tensor:
        """The embedding [*index.shape, L, D] of each condition index (vmap-safe: one gather)."""
        index = index.to(self.conditions_table.device)
        return self.conditions_table[torch.where(index >= 0, index, self._n_train - 1 - index)]

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if labels is None:  # no condition: the unconditional model
            labels = torch.full(t.shape, -1, dtype=torch.long, device=t.device)
        return self._vmapped(x, (t, self.embed(labels).to(x.dtype)), (t.dim() == 2, labels.dim() == 2))


def text_ensemble(config: dict, n_members: int, data_shape: Sequence[int], condition_shape: Sequence[int],
                  shared_init: bool = False, seed: int = 0) -> TextEnsemble:
    """M text-conditioned members of ``config`` (UNet2DConditionModel arguments; its
    ``cross_attention_dim`` set to the embeddings' D) for data of ``data_shape``."""
    L, D = condition_shape
    given = config.get("cross_attention_dim", D)
    if given != D:
        raise ArchitectureError(f"the UNet config has cross_attention_dim = {given} but the conditions D = {D}")
    config = dict(config, cross_attention_dim=D)
    spec = dict(kind="diffusers-text", config=config, n_members=n_members, data_shape=list(data_shape),
                condition_shape=[L, D], shared_init=shared_init, seed=seed)
    return TextEnsemble(config, n_members, data_shape, (L, D), shared_init, seed, spec)
