"""The settings of a training run, stored in its checkpoints (``config["train"]``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..errors import ConfigError
from ..members.passes import PRECISIONS
from ..runtime.fields import SEED_LIMIT, Choice, Float, Int, Switch, check_fields, option

__all__ = ["TrainConfig", "MODES"]

MODES = ("independent", "shared_noise", "masked_batch")


def _ema(decay: float) -> Optional[float]:
    return decay or None  # --ema 0: no EMA


@dataclasses.dataclass
class TrainConfig:
    """How every member is trained: the steps, batches and learning rate they share, how their
    random numbers are drawn (``mode``), and the precision of their forward."""

    steps: int = option(2000, Int(1), "optimisation steps")
    batch_size: int = option(128, Int(1, 2**20), "examples per member and step")
    lr: float = option(1e-3, Float(0, 10, low_open=True), "peak learning rate (Adam)")
    warmup: int = option(100, Int(0), "linear warm-up steps, then cosine decay to --lr-final-fraction x --lr")
    lr_final_fraction: float = option(0.1, Float(0, 1), "the learning rate at the last step, as a fraction of --lr")
    mode: str = option("shared_noise", Choice(*MODES),
                       "independent members, shared (t, eps) draws, or one masked batch")
    ema_decay: Optional[float] = option(0.995, Float(0, 1, high_open=True), "EMA decay (0: none)", flag="--ema",
                                        convert=_ema)
    seed: int = option(0, Int(0, SEED_LIMIT - 1), "seed of the initial weights and of every draw")
    hflip: bool = option(False, Switch(), "random horizontal flips of the training images")
    cond_dropout: float = option(0.1, Float(0, 1), "class-conditional members: the share of examples trained "
                                                   "without their label (the unconditional model guidance needs)")
    precision: str = option("fp32", Choice(*PRECISIONS),
                            "of the members: fp32; tf32 (CUDA matmuls and convolutions; the CPU stays fp32); bf16 or "
                            "fp16 autocast with float32 weights, Adam state and loss (fp16: loss scaling)")

    def __post_init__(self):
        check_fields(self, "training ")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"training ema_decay must lie in [0, 1) or be None, got {self.ema_decay}")

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.lr_final_fraction + (1 - self.lr_final_fraction) * cosine)
