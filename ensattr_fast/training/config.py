"""The settings of a training run, stored in its checkpoints (``config["train"]``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..errors import ConfigError
from ..execution import check_precision

__all__ = ["TrainConfig", "MODES"]

MODES = ("independent", "shared_noise", "masked_batch")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr_final_fraction * lr
    lr_final_fraction: float = 0.1
    mode: str = "shared_noise"
    ema_decay: Optional[float] = 0.995
    seed: int = 0
    hflip: bool = False  # random horizontal flips of the training images (the seed's CIFAR-10 setting)
    precision: str = "fp32"  # of the member forward: fp32, tf32, bf16 or fp16 (execution.PRECISIONS)

    def __post_init__(self):
        check_precision(self.precision)
        if self.mode not in MODES:
            raise ConfigError(f"training mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError(f"steps >= 0 and batch_size >= 1 needed, got {self.steps}, {self.batch_size}")

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.lr_final_fraction + (1 - self.lr_final_fraction) * cosine)
