"""diffusers: the schedules and sampler steps equal diffusers' schedulers for the same config,
and an ensemble of UNet2DModel members trains and samples. Skipped without diffusers."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ensattr_fast import codes  # noqa: E402
from ensattr_fast.checkpoint import Checkpoint  # noqa: E402
from ensattr_fast.data import Dataset  # noqa: E402
from ensattr_fast.members import build_ensemble, diffusers_ensemble  # noqa: E402
from ensattr_fast.sampling import sample  # noqa: E402
from ensattr_fast.schedules import NoiseSchedule, Sampler  # noqa: E402
from ensattr_fast.training import TrainConfig, Trainer  # noqa: E402

UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8)


def _in_float64(scheduler, schedule):
    """diffusers keeps its schedule in float32 (compared above); give it ours in float64 so
    that the steps compare to float64 precision."""
    scheduler.betas = torch.tensor(schedule.betas, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = schedule.alphas_cumprod
    return scheduler


def _our_step(step, x, eps, noise, clip):
    x0 = step.a * x + step.b * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    return step.c * x0 + step.d * x + step.s * noise


def test_alphas_cumprod_equal_diffusers():
    ours = NoiseSchedule.linear()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eta,clip", [(0.0, True), (0.5, True), (1.0, False)])
def test_ddim_steps_equal_diffusers(eta, clip):
    schedule, ours = NoiseSchedule.linear(), Sampler("ddim", 50, eta, (-1.0, 1.0) if clip else None)
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                     clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
                                     timestep_spacing="leading", steps_offset=0)
    theirs = _in_float64(theirs, schedule)
    theirs.set_timesteps(50)
    plan = ours.plan(schedule)
    assert [s.t for s in plan] == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for step in plan:
        x, eps, noise = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        want = theirs.step(eps, step.t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        torch.testing.assert_close(_our_step(step, x, eps, noise, clip), want, rtol=1e-10, atol=1e-10)


def test_ddpm_steps_equal_diffusers():
    schedule, ours = NoiseSchedule.linear(), Sampler("ddpm", None, 1.0, (-1.0, 1.0))
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                     variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0)
    theirs = _in_float64(theirs, schedule)
    theirs.set_timesteps(1000)
    plan = ours.plan(schedule)
    assert [s.t for s in plan] == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    for step in plan[::37] + plan[-3:]:
        x, eps = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
        want = theirs.step(eps, step.t, x, generator=torch.Generator().manual_seed(step.t)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(step.t), dtype=x.dtype)
        torch.testing.assert_close(_our_step(step, x, eps, noise, True), want, rtol=1e-10, atol=1e-10)
        assert math.isclose(step.s**2, float(theirs._get_variance(step.t)) if step.t else 0.0, rel_tol=1e-10, abs_tol=1e-15)


def test_unet2dmodel_ensemble_trains_and_samples(tmp_path):
    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    units = codes.Units.per_example(24)
    code = codes.balanced_constant_weight(24, 4, seed=0, allow_duplicates=True)
    ensemble = diffusers_ensemble(UNET, 4, shared_init=True)
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    trainer = Trainer(ensemble, Dataset(images), code, units.unit_of, units.names, NoiseSchedule.linear(),
                      TrainConfig(steps=3, batch_size=4, warmup=1))
    losses = trainer.train(checkpoint=tmp_path / "unet.pt", progress=False)
    assert torch.isfinite(losses).all()
    changed = [not torch.equal(before[k], v) for k, v in ensemble.state_dict().items()]
    assert any(changed)
    rebuilt = Checkpoint.load(tmp_path / "unet.pt").build()  # from the spec alone: config travels as JSON
    x = sample(rebuilt, NoiseSchedule.linear(), Sampler("ddim", 5), [0, 1])
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert build_ensemble(rebuilt.spec()).n_members == 4
