"""How the members run: in which precision, how many of them per forward pass, with or without
activation checkpointing and ``torch.compile``. Only the precision changes what they compute
(and ``compile``, by rounding); passes of K members give the same numbers as one pass of all.

Precisions (``PRECISIONS``), each bit for bit reproducible on one device:

- ``fp32``: float32 throughout; on CUDA TF32 is switched off for matmuls and convolutions
  (torch leaves it on for cuDNN convolutions by default).
- ``tf32``: float32 weights and data, matmuls and convolutions in TF32 on CUDA (Ampere and
  later). On the CPU this is the same as fp32.
- ``bf16``, ``fp16``: the member forward under ``torch.autocast``; weights, optimiser state and
  the loss stay float32. fp16 training scales the loss (``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..runtime.fields import Int, Maybe, Switch, check_fields, option
from .base import shared_buffers

__all__ = ["PRECISIONS", "Passes", "MemberPasses", "precision_scope", "check_precision"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the members in ``precision`` on ``device`` (see the module's docstring); the global
    TF32 flags are put back on exit."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_tf32(precision == "tf32"))
        if precision in _AUTOCAST:
            stack.enter_context(torch.autocast(device.type, dtype=_AUTOCAST[precision]))
        yield


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    # torch >= 2.9 refuses a mix of its legacy (allow_tf32) and new (fp32_precision) flags
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        conv, attribute, value = torch.backends.cudnn.conv, "fp32_precision", "tf32" if on else "ieee"
    else:
        conv, attribute, value = torch.backends.cudnn, "allow_tf32", on
    before = getattr(matmul, attribute), getattr(conv, attribute)
    setattr(matmul, attribute, value)
    setattr(conv, attribute, value)
    try:
        yield
    finally:
        setattr(matmul, attribute, before[0])
        setattr(conv, attribute, before[1])


@dataclasses.dataclass(frozen=True)
class Passes:
    """How the members are evaluated, none of which changes their numbers (beyond the
    rounding of compiled kernels).

    ``members_per_pass``: K members per forward (and backward) pass, for ensembles whose
    activations do not fit at once (None: all). ``checkpoint_activations``: keep no
    activations of the member forward for the backward, recompute them (training).
    ``compile``: ``torch.compile`` the member forward (slow to start; pays on long runs).
    ``shard_members``: under torchrun, sampling and ablation split the members over the ranks
    (each holds its own; member outputs gathered every step) instead of the trajectories, for
    ensembles larger than one device (:mod:`ensattr_fast.members.sharded`)."""

    members_per_pass: Optional[int] = option(None, Maybe(Int(1, 4096)),
                                             "evaluate the members K at a time (less memory, the same numbers; "
                                             "default: all at once)")
    checkpoint_activations: bool = option(False, Switch(), "recompute the members' activations in the backward "
                                                           "instead of keeping them")
    compile: bool = option(False, Switch(), "torch.compile the member forward (slow start)")
    shard_members: bool = option(False, Switch(), "under torchrun: each rank holds its share of the members "
                                                  "(the same numbers)")

    def __post_init__(self):
        check_fields(self, "passes: ")


class MemberPasses:
    """The forward of ``ensemble`` in passes of ``passes.members_per_pass`` members.

    Passes hold at most K members, as evenly split as can be. A pass runs a skeleton of its
    members (``Ensemble.select``, its own weights dropped to the
    meta device) on views of the ensemble's stacked parameters and buffers: gradients land in
    the ensemble's own ``.grad``, and members never share weights, so a backward per pass
    gives every member the gradient of one backward over all of them. The numbers are those
    of one pass bit for bit where the batched kernels compute each member alone whatever the
    batch holds (the stacked MLP's batched matmuls); convolution members run as grouped
    convolutions (the built-in UNet, vmapped modules), whose kernels round differently for
    another number of groups (about 1e-7 on the CPU).
    """

    def __init__(self, ensemble, passes: Passes = Passes()):
        self.ensemble, self.options = ensemble, passes
        self.ranges = _balanced(ensemble.n_members, passes.members_per_pass or ensemble.n_members)
        if len(self.ranges) == 1:
            self._forwards: List[Callable] = [ensemble]
        else:
            self._forwards = [self._part_forward(ensemble.select(members).to("meta"), members)
                              for members in self.ranges]
        if passes.compile:
            self._forwards = [torch.compile(f) for f in self._forwards]

    @property
    def chunked(self) -> bool:
        return len(self.ranges) > 1 or self.options.compile or self.options.checkpoint_activations

    def _part_forward(self, part, members: range) -> Callable:
        ensemble, cut = self.ensemble, slice(members.start, members.stop)
        shared = shared_buffers(ensemble)

        def forward(x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
            part.train(ensemble.training)
            state = {name: v[cut] for name, v in ensemble.named_parameters()}
            state.update({name: v if name in shared else v[cut] for name, v in ensemble.named_buffers()})
            return functional_call(part, state, (x, t) if labels is None else (x, t, labels))
        return forward

    def passes(self) -> Iterator[Tuple[slice, Callable[[Tensor, Tensor], Tensor]]]:
        """(members of the pass as a slice, forward(x [K, B, ...], t [K, B] or [B]))."""
        for members, forward in zip(self.ranges, self._forwards):
            if self.options.checkpoint_activations:
                forward = _checkpointed(forward)
            yield slice(members.start, members.stop), forward

    def __call__(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Member outputs [M, B, ...] for x [M, B, ...], t [M, B] or [B] and (class-conditional
        members) labels [M, B] or [B], pass by pass."""
        outputs = [forward(x[cut], *(v[cut] if v.dim() == 2 else v for v in (t, labels) if v is not None))
                   for cut, forward in self.passes()]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def forward_packed(self, x_packed: Tensor, t: int, layout, labels: Optional[Tensor] = None) -> Tensor:
        """``Ensemble.forward_packed`` pass by pass: member outputs for packed rows [P, ...]."""
        if not self.chunked:
            return self.ensemble.forward_packed(x_packed, t, layout, labels)
        padded = layout.pad(x_packed)
        steps = torch.full(padded.shape[:2], t, dtype=torch.long, device=x_packed.device)
        return layout.unpad(self(padded, steps, None if labels is None else layout.pad(labels)))


def _balanced(M: int, K: int) -> List[range]:
    """Consecutive ranges of at most K of the M members, as even as can be (6 by 5: 3 + 3, not
    5 + 1): the fewest passes, none of them a straggler."""
    n = -(-M // max(1, K))
    size, extra = divmod(M, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _checkpointed(forward: Callable) -> Callable:
    def run(x: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(x, t, *labels)
        return checkpoint(forward, x, t, *labels, use_reentrant=False)
    return run
