"""First-order and loss-based attribution against finite differences and dense references."""

import pytest
import torch

from ensattr_fast import codes
from ensattr_fast.attribution import first_order_grams, group_code, member_losses
from ensattr_fast.diffusion.sampling import ablation_weights, run_trajectories, sample
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedMLP
from ensattr_fast.ops import code_scores

SCHEDULE = NoiseSchedule.linear(100)


@pytest.fixture(scope="module")
def ensemble():
    torch.manual_seed(0)
    e = StackedMLP(6, (1, 3, 3), hidden=24, blocks=1, seed=2).double().eval()
    with torch.no_grad():  # members that differ visibly, as trained ones do
        e.out.weight.mul_(10)
    return e


def _finite_difference(ensemble, sampler, seed, direction, h=1e-5):
    M = ensemble.n_members
    w0 = torch.full((1, M), 1.0 / M, dtype=torch.float64)
    weights = torch.cat([w0 + h * direction, w0 - h * direction])
    out = run_trajectories(ensemble, SCHEDULE, sampler, [seed], weights, torch.zeros(2, dtype=torch.long))
    return (out.images[0] - out.images[1]).flatten() / (2 * h)


@pytest.mark.parametrize("sampler", [Sampler("ddim", 6, 1.0, clip=None), Sampler("ddim", 6, 0.0, clip=(-1.0, 1.0))])
def test_gram_is_the_jacobian_through_the_sampler(ensemble, sampler):
    grams = first_order_grams(ensemble, SCHEDULE, sampler, [4, 5], chunk=1)
    torch.testing.assert_close(grams.samples.double(), sample(ensemble, SCHEDULE, sampler, [4, 5]))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(ensemble.n_members, generator=g, dtype=torch.float64)
        v -= v.mean()
        jv = _finite_difference(ensemble, sampler, 4, v)
        torch.testing.assert_close(v @ grams.exact[0] @ v, jv.dot(jv), rtol=1e-4, atol=1e-10)
    # the direct variant drops the path through x_t, which matters here
    assert not torch.allclose(grams.direct[0], grams.exact[0], rtol=1e-2)


def test_first_order_scores_predict_small_ablations(ensemble):
    """For a unit set whose ablation moves the weights a little, ||J v|| matches the exact change."""
    sampler = Sampler("ddim", 6, 1.0, clip=None)
    grams = first_order_grams(ensemble, SCHEDULE, sampler, [9])
    code = codes.random_constant_weight(10, 6, seed=0)
    v = (ablation_weights(code, [[3]]) - 1.0 / 6)[0]
    jv = _finite_difference(ensemble, sampler, 9, v)
    score = code_scores(code, gram=grams.exact).scores[0, 3]
    torch.testing.assert_close(score, jv.norm(), rtol=1e-5, atol=1e-8)


def test_member_losses_match_a_per_member_loop(ensemble):
    images = torch.rand(5, 1, 3, 3, dtype=torch.float64) * 2 - 1
    L = member_losses(ensemble, SCHEDULE, images, draws=7, seed=3, chunk=2)
    assert L.shape == (5, ensemble.n_members)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(SCHEDULE.steps, (7,), generator=g)
    eps = torch.randn(7, 1, 3, 3, generator=g)
    for m in range(ensemble.n_members):
        for q in range(5):
            x_t = SCHEDULE.add_noise(images[q].expand(7, -1, -1, -1), t, eps.double())
            inputs = torch.zeros(ensemble.n_members, 7, 1, 3, 3, dtype=torch.float64)
            inputs[m] = x_t
            pred = ensemble(inputs, t.expand(ensemble.n_members, -1))[m]
            want = ((pred - eps.double()) ** 2).mean()
            torch.testing.assert_close(L[q, m], want, rtol=1e-5, atol=1e-8)


def test_loss_influence_is_the_excluder_minus_includer_contrast(ensemble):
    images = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    L = member_losses(ensemble, SCHEDULE, images, draws=5)
    code = codes.balanced_constant_weight(12, 6, seed=1)
    scores = code_scores(code, losses=L).scores
    excl = (code == 0).double()
    want = L @ (excl / excl.sum(1, keepdim=True)).T - L @ ((1 - excl) / (1 - excl).sum(1, keepdim=True)).T
    torch.testing.assert_close(scores, want)


def test_group_code_intersects_excluders():
    code = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.uint8)
    groups = group_code(code, [[0, 1], [2], []])
    assert groups.tolist() == [[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
    w = ablation_weights(code, [[0, 1]])
    assert torch.equal(w[0] > 0, groups[0] == 0)
