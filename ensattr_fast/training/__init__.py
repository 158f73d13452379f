"""Training every member of an encoded ensemble in one process, in the same steps.

Member m minimises the epsilon-prediction loss over the examples of the units it sees
(``code[u, m] = 1``). Each step evaluates all members in one batched call and reduces with the
fused ``masked_member_mse``; Adam on stacked parameters is exactly per-member Adam.

Modes (docs/method.md, "Common random numbers"):

- ``independent``: the seed's way; each member its own initial weights and its own (t, eps).
- ``shared_noise``: shared initial weights; every step one draw of (t, eps) shared by all
  members, each with its own batch of its own units.
- ``masked_batch``: shared initial weights; one batch of (x0, t, eps) for all members, each
  member's loss masked to its own units, so two members differ only by their data. The batch
  holds 2 B examples so that each member still learns from about B per step.

The members run in ``config.precision`` (float32 weights, Adam state and loss in every one;
see :mod:`ensattr_fast.members.passes`), in passes of K members and with activation checkpointing
where asked (``passes``): the gradients of a pass are those of one pass over all members.
"""

from .checkpoint import Checkpoint
from .config import MODES, TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "MODES", "Checkpoint"]
