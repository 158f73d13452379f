"""Diffusion: noise schedules and the DDPM/DDIM samplers' coefficients (:mod:`.schedules`);
full and ablated sampling from recorded seeds, every member batched (:mod:`.sampling`)."""

from .sampling import ablate, ablation_weights, replay, run_trajectories, sample, seeded_normal
from .schedules import NoiseSchedule, Sampler, SamplerStep

__all__ = ["NoiseSchedule", "Sampler", "SamplerStep", "sample", "ablate", "replay", "run_trajectories",
           "ablation_weights", "seeded_normal"]
