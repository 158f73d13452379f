"""Noise schedules and the per-step coefficients of the DDPM and DDIM samplers.

Every sampler step has the form that the fused ``ensemble_step`` op applies:

    x0_hat = clip(a x_t + b eps_bar),    x_prev = c x0_hat + d x_t + s z

with z standard normal. Timesteps follow the diffusers convention: indices 0..T-1 into
``alphas_cumprod``, sampled from T-1 down; the step after index 0 uses abar = 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..members.passes import PRECISIONS, check_precision
from ..runtime.fields import Choice, Float, Int, Maybe, Switch, option

__all__ = ["NoiseSchedule", "SamplerStep", "Sampler"]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Variance schedule beta_1..beta_T (the seed: linear 1e-4..0.02, T = 1000)."""

    betas: Tuple[float, ...]

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The seed's schedule: betas linear from ``beta_start`` to ``beta_end`` over ``steps``."""
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        return cls(tuple(betas.tolist()))

    @property
    def steps(self) -> int:
        """T, the number of noise levels."""
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t = prod_{s <= t} (1 - beta_s), float64 [T]."""
        return torch.cumprod(1.0 - torch.tensor(self.betas, dtype=torch.float64), 0)

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with t broadcast over x0's trailing dims."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
        abar = abar.reshape(*abar.shape, *([1] * (x0.dim() - abar.dim())))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@dataclasses.dataclass(frozen=True)
class SamplerStep:
    """One sampler step: the member timestep and the coefficients (a, b, c, d, s)."""

    t: int
    a: float
    b: float
    c: float
    d: float
    s: float

    @property
    def coefficients(self) -> Tuple[float, float, float, float, float]:
        return (self.a, self.b, self.c, self.d, self.s)


def _clip(off: bool) -> Optional[Tuple[float, float]]:
    return None if off else (-1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """DDPM ancestral sampling (all T steps) or DDIM (``steps`` of them, stochasticity ``eta``).

    ``clip``: range of x0_hat, or None. DDIM with eta = 1 over all T steps equals DDPM.
    ``guidance``: classifier-free guidance w for class-conditional members sampled with labels.
    ``precision``: the members' precision (:data:`ensattr_fast.members.passes.PRECISIONS`); a
    sample replays bit for bit only in its own, so every replay of it takes the sampler it was
    drawn with. None: fp32 (``ensattr sample`` fills in the members' training precision).
    """

    kind: str = option("ddim", Choice("ddim", "ddpm"), "DDIM (any number of steps) or DDPM (all T)", flag="--sampler")
    steps: Optional[int] = option(50, Maybe(Int(1, 1000)), "DDIM steps", flag="--sampling-steps")
    eta: float = option(0.0, Float(0, 1), "DDIM stochasticity (0: deterministic, 1: DDPM-like)")
    clip: Optional[Tuple[float, float]] = option((-1.0, 1.0), Switch(), "do not clip x0-hat to [-1, 1]",
                                                 flag="--no-clip", convert=_clip)
    precision: Optional[str] = option(None, Maybe(Choice(*PRECISIONS)),
                                      "of the members (default: the precision they were trained in); recorded with "
                                      "the samples, whose every replay (ablate, attribute) uses it")
    guidance: float = option(0.0, Float(0, 1000), "classifier-free guidance w of conditional members: eps = "
                                                  "(1 + w) eps(x, c) - w eps(x), over the kept members")

    def __post_init__(self):
        if self.kind not in ("ddpm", "ddim"):
            raise ConfigError(f"sampler kind must be 'ddpm' or 'ddim', got {self.kind!r}")
        if self.kind == "ddim" and (self.steps is None or self.steps < 1):
            raise ConfigError(f"DDIM needs steps >= 1, got {self.steps}")
        if not isinstance(self.eta, (int, float)) or not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {self.eta}")
        if not isinstance(self.guidance, (int, float)) or not 0.0 <= self.guidance <= 1000:
            raise ConfigError(f"guidance must lie in [0, 1000], got {self.guidance}")
        if self.precision is not None:
            check_precision(self.precision)
        if self.clip is not None:
            object.__setattr__(self, "clip", tuple(float(c) for c in self.clip))
        if self.kind == "ddpm":  # DDPM runs every step of the schedule
            object.__setattr__(self, "steps", None)

    def plan(self, schedule: NoiseSchedule) -> List[SamplerStep]:
        """The steps to run, first (noisiest) to last."""
        if self.kind == "ddpm":
            return _ddpm_steps(schedule)
        return _ddim_steps(schedule, self.steps, self.eta)


def _x0_coefficients(abar: float) -> Tuple[float, float]:
    """x0_hat = a x_t + b eps for the epsilon parametrisation."""
    return 1.0 / math.sqrt(abar), -math.sqrt(1.0 - abar) / math.sqrt(abar)


def _ddpm_steps(schedule: NoiseSchedule) -> List[SamplerStep]:
    """Ancestral steps with the posterior variance beta_tilde (diffusers' 'fixed_small')."""
    abar = schedule.alphas_cumprod.tolist()
    steps = []
    for t in reversed(range(schedule.steps)):
        prev = abar[t - 1] if t > 0 else 1.0
        beta = schedule.betas[t]
        a, b = _x0_coefficients(abar[t])
        c = math.sqrt(prev) * beta / (1.0 - abar[t])
        d = math.sqrt(1.0 - beta) * (1.0 - prev) / (1.0 - abar[t])
        s = math.sqrt(max((1.0 - prev) / (1.0 - abar[t]) * beta, 0.0))
        steps.append(SamplerStep(t, a, b, c, d, s))
    return steps


def _ddim_steps(schedule: NoiseSchedule, n_steps: int, eta: float) -> List[SamplerStep]:
    """DDIM with diffusers' 'leading' spacing. The direction term uses the eps implied by the
    (possibly clipped) x0_hat, eps' = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), so that
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps' + sigma z."""
    if n_steps > schedule.steps:
        raise ConfigError(f"DDIM steps ({n_steps}) cannot exceed the schedule's {schedule.steps}")
    abar = schedule.alphas_cumprod.tolist()
    ratio = schedule.steps // n_steps
    steps = []
    for t in reversed(range(0, n_steps * ratio, ratio)):
        prev = abar[t - ratio] if t - ratio >= 0 else 1.0
        sigma = eta * math.sqrt((1 - prev) / (1 - abar[t]) * (1 - abar[t] / prev))
        direction = math.sqrt(max(1.0 - prev - sigma**2, 0.0))
        a, b = _x0_coefficients(abar[t])
        c = math.sqrt(prev) - direction * math.sqrt(abar[t]) / math.sqrt(1 - abar[t])
        d = direction / math.sqrt(1 - abar[t])
        steps.append(SamplerStep(t, a, b, c, d, sigma))
    return steps
