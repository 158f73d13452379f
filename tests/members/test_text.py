"""Text-conditioned members (issue 21, item 1): diffusers ``UNet2DConditionModel`` members built
from a config, cross-attending to an embedding per example. Each member is the UNet alone under
its embedding; guided, ablated sampling through the fused step equals the guided combination in
plain torch; training takes each example's own embedding; gradient features are each example's
under its embedding. Skipped without diffusers."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import assert_close_to_scale  # noqa: E402
from ensattr_fast import codes  # noqa: E402
from ensattr_fast.attribution.gradients import FeatureSpec, gradient_features  # noqa: E402
from ensattr_fast.data import Dataset  # noqa: E402
from ensattr_fast.diffusion.sampling import ablation_weights, check_conditions, run_trajectories, seeded_normal  # noqa: E402,E501
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler  # noqa: E402
from ensattr_fast.errors import ArchitectureError, DataError  # noqa: E402
from ensattr_fast.members import MemberOptions, build_members  # noqa: E402
from ensattr_fast.members.text import sample_index  # noqa: E402
from ensattr_fast.training import TrainConfig, Trainer  # noqa: E402

SCHEDULE = NoiseSchedule.linear(100)
SHAPE, L, D = (1, 8, 8), 3, 8
UNET = dict(block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=4)


def _members(n=3, seed=0):
    ensemble = build_members(MemberOptions(arch="diffusers-text", unet_config=UNET), n, SHAPE, False, seed,
                             condition_shape=(L, D)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ensemble.set_conditions(train=3 * torch.randn(5, L, D, generator=g), samples=3 * torch.randn(4, L, D, generator=g))
    return ensemble


def test_each_member_is_the_unet_alone_under_its_embedding():
    ensemble = _members()
    x, t = torch.randn(3, 5, *SHAPE), torch.randint(0, 100, (5,))
    index = torch.tensor([0, 4, -1, -2, -5])  # training examples 0 and 4, none, samples 0 and 3
    embeddings = torch.stack([ensemble.train_conditions[0], ensemble.train_conditions[4], torch.zeros(L, D),
                              ensemble.sample_conditions[0], ensemble.sample_conditions[3]])
    with torch.no_grad():
        together = ensemble(x, t, index)
        for m in range(3):
            unet = ensemble.member(m).unet.eval()
            assert isinstance(unet, diffusers.UNet2DConditionModel)
            alone = unet(x[m], t, encoder_hidden_states=embeddings).sample
            assert torch.allclose(alone, together[m], atol=1e-5)
        assert torch.equal(ensemble(x, t), ensemble(x, t, torch.full((5,), -1)))  # no condition: the empty one
        assert (together - ensemble(x, t)).abs().amax() > 1e-3  # the embedding is heard


def _guided_in_plain_torch(ensemble, sampler, seeds, weights, sample_of, index):
    w = sampler.guidance
    x = seeded_normal(seeds, 0, SHAPE).flatten(1)[sample_of].double()
    M, T = ensemble.n_members, len(sample_of)
    with torch.no_grad():
        for k, step in enumerate(sampler.plan(SCHEDULE)):
            t = torch.full((T,), step.t)
            inputs = x.float().view(1, T, *SHAPE).expand(M, -1, -1, -1, -1)
            conditional = ensemble(inputs, t, index[sample_of]).flatten(2).double()
            unconditional = ensemble(inputs, t, torch.full((T,), -1)).flatten(2).double()
            eps = (weights.T[:, :, None] * ((1 + w) * conditional - w * unconditional)).sum(0)
            x0 = (step.a * x + step.b * eps).clamp(-1, 1)
            x = step.c * x0 + step.d * x
            if step.s:
                x = x + step.s * seeded_normal(seeds, k + 1, SHAPE).flatten(1)[sample_of].double()
    return x.float().view(T, *SHAPE)


@pytest.mark.parametrize("guidance,eta", [(0.0, 0.0), (2.0, 0.0), (3.0, 1.0)])
def test_guided_ablated_sampling_under_embeddings_equals_plain_torch(guidance, eta):
    ensemble = _members(4)
    code = codes.balanced_constant_weight(6, 4, seed=0)
    seeds, index = [3, 7, 11], sample_index(torch.tensor([0, 2, 3]))
    sampler = Sampler("ddim", steps=5, eta=eta, guidance=guidance)
    every = ablation_weights(code, [[], [1], [2, 5]])[None].expand(3, -1, -1).reshape(9, -1)
    sample_of = torch.arange(3).repeat_interleave(3)
    fused = run_trajectories(ensemble, SCHEDULE, sampler, seeds, every.float(), sample_of, labels=index)
    want = _guided_in_plain_torch(ensemble, sampler, seeds, every, sample_of, index)
    assert torch.allclose(fused.images, want, atol=5e-5), (fused.images - want).abs().max()


def test_indices_without_an_embedding_and_guidance_without_conditions_are_refused():
    ensemble = _members()
    with pytest.raises(DataError, match="no text condition for sample 4 of the 4"):
        check_conditions(ensemble, sample_index(torch.tensor([0, 4])), 2)
    with pytest.raises(DataError, match="no text condition for training example 5 of 5"):
        check_conditions(ensemble, torch.tensor([5]), 1)
    with pytest.raises(DataError, match="needs a condition per sample"):
        check_conditions(ensemble, None, 2, guidance=2.0)
    with pytest.raises(DataError, match="conditions \\[L, D\\] = \\[3, 8\\]"):
        ensemble.set_conditions(samples=torch.zeros(2, 3, 9))
    with pytest.raises(ArchitectureError, match="needs an array 'conditions'"):
        build_members(MemberOptions(arch="diffusers-text", unet_config=UNET), 2, SHAPE, False, 0)


def test_training_takes_each_examples_own_embedding_and_drops_to_the_empty_one():
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(12, *SHAPE, generator=g) * 2 - 1, name="toy", conditions=torch.randn(12, L, D,
                                                                                                     generator=g))
    ensemble = build_members(MemberOptions(arch="diffusers-text", unet_config=UNET), 4, SHAPE, True, 0,
                             condition_shape=(L, D))
    trainer = Trainer(ensemble, data, codes.balanced_constant_weight(6, 4, seed=0), torch.arange(12) % 6,
                      [str(u) for u in range(6)], SCHEDULE, TrainConfig(steps=2, batch_size=6, cond_dropout=0.5), "cpu")
    assert torch.equal(trainer.labels, torch.arange(12))
    assert torch.equal(ensemble.train_conditions, data.conditions)
    draw = trainer._draw()
    labels = trainer._labels(draw)
    dropped = draw["drop"]
    assert torch.equal(labels[~dropped], draw["index"][~dropped]) and (labels[dropped] == -1).all()
    losses = trainer.train_step()
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    with pytest.raises(DataError, match="has no conditions"):
        Trainer(ensemble, Dataset(data.images, name="bare"), codes.balanced_constant_weight(6, 4, seed=0),
                torch.arange(12) % 6, [str(u) for u in range(6)], SCHEDULE, TrainConfig(steps=1, batch_size=6), "cpu")


def test_gradient_features_are_each_examples_under_its_embedding():
    ensemble = _members(2)
    images = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    index = torch.tensor([2, -1, -3])
    spec = FeatureSpec(kind="dtrak", timesteps=2, dim=16, seed=1)
    together = gradient_features(ensemble, SCHEDULE, images, spec, batch=3, labels=index)
    for i in range(3):
        alone = gradient_features(ensemble, SCHEDULE, images[i:i + 1], spec, batch=1, labels=index[i:i + 1])
        assert_close_to_scale(together[:, i:i + 1], alone)
    unconditional = gradient_features(ensemble, SCHEDULE, images, spec, batch=3)
    assert_close_to_scale(unconditional[:, 1], together[:, 1])
    assert (unconditional[:, 0] - together[:, 0]).abs().amax() > 1e-6
