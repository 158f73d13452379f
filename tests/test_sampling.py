"""Schedules, replayable sampling and exact batched ablation."""


import pytest
import torch

from ensattr_fast import codes
from ensattr_fast.codes import CodeError
from ensattr_fast.diffusion.sampling import ablate, ablation_weights, sample, seeded_normal
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedMLP

SCHEDULE = NoiseSchedule.linear(100)


@pytest.fixture(scope="module")
def ensemble():
    return StackedMLP(6, (1, 4, 4), hidden=32, blocks=2, seed=0).eval()


@pytest.fixture(scope="module")
def code():
    return codes.balanced_constant_weight(20, 6, seed=0)


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    ddpm = Sampler("ddpm").plan(SCHEDULE)
    ddim = Sampler("ddim", steps=100, eta=1.0).plan(SCHEDULE)
    for p, q in zip(ddpm, ddim):
        assert p.t == q.t
        assert p.coefficients == pytest.approx(q.coefficients, rel=1e-9, abs=1e-12)


def test_ddpm_step_is_the_posterior_mean():
    """Without noise and clipping, c x0 + d x_t is the mean of q(x_{t-1} | x_t, x0)."""
    abar = SCHEDULE.alphas_cumprod
    step = Sampler("ddpm", clip=None).plan(SCHEDULE)[10]
    t, beta = step.t, SCHEDULE.betas[step.t]
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    assert torch.allclose(step.a * x_t + step.b * eps, x0)
    mean = (abar[t - 1].sqrt() * beta * x0 + (1 - beta) ** 0.5 * (1 - abar[t - 1]) * x_t) / (1 - abar[t])
    assert torch.allclose(step.c * x0 + step.d * x_t, mean)


def test_deterministic_ddim_reconstructs_x0_from_exact_eps():
    """With eta = 0 and the true eps, every DDIM step lands on the same trajectory."""
    abar = SCHEDULE.alphas_cumprod
    steps = Sampler("ddim", steps=10, eta=0.0, clip=None).plan(SCHEDULE)
    x0, eps = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    x = abar[steps[0].t].sqrt() * x0 + (1 - abar[steps[0].t]).sqrt() * eps
    for step in steps:
        x = step.c * (step.a * x + step.b * eps) + step.d * x
    assert torch.allclose(x, x0)


def test_seeded_noise_depends_only_on_seed_and_stream():
    a = seeded_normal([5, 9, 11], 3, (2, 2))
    b = seeded_normal([11, 5], 3, (2, 2))
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(seeded_normal([5], 4, (2, 2))[0], a[0])


@pytest.mark.parametrize("sampler", [Sampler("ddim", 20, 1.0), Sampler("ddim", 10, 0.0), Sampler("ddpm", clip=None)])
def test_replay_is_bit_identical(ensemble, sampler):
    first = sample(ensemble, SCHEDULE, sampler, [3, 4, 5])
    assert torch.equal(first, sample(ensemble, SCHEDULE, sampler, [3, 4, 5]))
    assert first.abs().max() <= 1.0 + 1e-6 or sampler.clip is None


def test_full_ensemble_equals_ablation_of_the_empty_set(ensemble, code):
    sampler = Sampler("ddim", 20, 1.0)
    seeds = list(range(10))
    full = sample(ensemble, SCHEDULE, sampler, seeds)
    result = ablate(ensemble, SCHEDULE, sampler, code, seeds, [[], [0], [1, 2]])
    assert torch.equal(result.images[0], full)
    assert not torch.equal(result.images[1], full)


def _naive_trajectory(ensemble, sampler, seed, weights):
    """One trajectory, one member at a time, the sampler written out in plain torch."""
    shape = ensemble.data_shape
    x = seeded_normal([seed], 0, shape)[0]
    for k, step in enumerate(sampler.plan(SCHEDULE)):
        eps_bar = torch.zeros(shape)
        for m in torch.nonzero(weights).flatten().tolist():
            x_in = torch.zeros(ensemble.n_members, 1, *shape)
            x_in[m, 0] = x
            eps_bar += weights[m] * ensemble(x_in, torch.full((ensemble.n_members, 1), step.t))[m, 0]
        x0 = step.a * x + step.b * eps_bar
        if sampler.clip is not None:
            x0 = x0.clamp(*sampler.clip)
        x = step.c * x0 + step.d * x + step.s * seeded_normal([seed], k + 1, shape)[0]
    return x


def test_batched_ablation_matches_one_at_a_time(ensemble, code):
    sampler = Sampler("ddim", 8, 1.0)
    unit_sets = [[3], [7, 11], []]
    result = ablate(ensemble, SCHEDULE, sampler, code, [21, 22], unit_sets)
    weights = ablation_weights(code, unit_sets).float()
    for a in range(len(unit_sets)):
        for s, seed in enumerate([21, 22]):
            want = _naive_trajectory(ensemble, sampler, seed, weights[a])
            torch.testing.assert_close(result.images[a, s], want, rtol=1e-4, atol=1e-5)


def test_each_member_is_evaluated_only_where_kept(ensemble, code):
    sampler = Sampler("ddim", 5, 1.0)
    unit_sets = [[u] for u in range(8)]
    seeds = [0, 1, 2]
    result = ablate(ensemble, SCHEDULE, sampler, code, seeds, unit_sets)
    excluders = sum(int((code[u] == 0).sum()) for u in range(8))
    assert result.member_evaluations == len(seeds) * excluders * 5  # S * sum_a |E_a| per step
    assert excluders == 8 * 3  # constant weight: M/2 = 3 excluders per unit


def test_per_sample_unit_sets_and_chunking_agree(ensemble, code):
    sampler = Sampler("ddim", 6, 1.0)
    sets = [[[1], [2]], [[3], [4]], [[5], [1]]]
    whole = ablate(ensemble, SCHEDULE, sampler, code, [7, 8, 9], sets, per_sample=True)
    chunked = ablate(ensemble, SCHEDULE, sampler, code, [7, 8, 9], sets, per_sample=True, max_trajectories=2)
    assert whole.images.shape == (3, 2, 1, 4, 4)
    torch.testing.assert_close(whole.images, chunked.images)
    alone = ablate(ensemble, SCHEDULE, sampler, code, [9], [[5]])
    torch.testing.assert_close(whole.images[2, 0], alone.images[0, 0])


def test_ablation_weights_and_errors(code):
    w = ablation_weights(code, [[], [0], [0, 1]])
    assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(w[1] > 0, code[0] == 0)
    assert torch.equal(w[2] > 0, (code[0] == 0) & (code[1] == 0))
    with pytest.raises(CodeError, match="unit 20 is out of range"):
        ablation_weights(code, [[20]])
    every = [u for u in range(len(code))]
    with pytest.raises(CodeError, match="leaves no member"):
        ablation_weights(code, [every])
