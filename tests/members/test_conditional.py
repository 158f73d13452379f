"""Class-conditional members and classifier-free guidance (issue 21, item 1): each member is its
conditional and unconditional model at once; guided sampling, full or ablated, runs through the
fused step's CSR weights ((1 + w) w_m on the labelled rows, -w w_m on the unlabelled), and must
equal the guided combination computed in plain torch, member by member."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_scale
from ensattr_fast import codes
from ensattr_fast.data import Dataset
from ensattr_fast.diffusion.sampling import ablation_weights, replay, run_trajectories, seeded_normal
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.errors import ArchitectureError, DataError
from ensattr_fast.members import MemberOptions, StackedMLP, build_members
from ensattr_fast.members.passes import Passes
from ensattr_fast.training import TrainConfig
from ensattr_fast.training.trainer import Trainer

SCHEDULE = NoiseSchedule.linear(100)
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def members():
    ensemble = StackedMLP(6, SHAPE, hidden=32, blocks=2, seed=1, classes=3).eval()
    with torch.no_grad():  # a label that changes the output a lot, so that guidance matters
        ensemble.label.weight.mul_(20)
    return ensemble


def test_each_member_is_the_member_alone_with_and_without_its_label(members):
    x, t = torch.randn(6, 7, *SHAPE), torch.randint(0, 100, (6, 7))
    labels = torch.tensor([0, 1, 2, -1, 0, 2, -1]).expand(6, 7)
    together = members(x, t, labels)
    for m in range(6):
        alone = members.select(range(m, m + 1))
        assert torch.allclose(alone(x[m:m + 1], t[m:m + 1], labels[m:m + 1]), together[m:m + 1], atol=1e-6)
    no_label = members(x, t, torch.full((6, 7), -1))
    assert torch.equal(members(x, t), no_label)  # no labels: every row unconditional
    assert (together - no_label).abs().amax() > 1e-2  # the label is heard


def test_an_unconditional_ensemble_is_what_it_was():
    """The label layer is built last: the other weights draw as before it existed; the spec and
    the forward of unconditional members are unchanged."""
    plain, conditional = StackedMLP(3, SHAPE, hidden=16, blocks=1, seed=4), StackedMLP(3, SHAPE, hidden=16,
                                                                                        blocks=1, seed=4, classes=2)
    theirs = dict(conditional.named_parameters())
    for name, value in plain.named_parameters():
        assert torch.equal(value, theirs[name]), name
    assert "classes" not in plain.spec() and conditional.spec()["classes"] == 2
    with pytest.raises(ArchitectureError, match="unconditional"):
        plain(torch.randn(3, 2, *SHAPE), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def _guided_in_plain_torch(members, sampler, seeds, weights, sample_of, labels):
    """Every member on every trajectory, with and without its label; the guided weighted sum;
    the sampler's update: what the fused step must compute."""
    w = sampler.guidance
    x = seeded_normal(seeds, 0, SHAPE).flatten(1)[sample_of].double()
    M, T = members.n_members, len(sample_of)
    for k, step in enumerate(sampler.plan(SCHEDULE)):
        t = torch.full((T,), step.t)
        inputs = x.float().view(1, T, *SHAPE).expand(M, -1, -1, -1, -1)
        conditional = members(inputs, t, labels[sample_of]).flatten(2).double()
        unconditional = members(inputs, t, torch.full((T,), -1)).flatten(2).double()
        guided = (1 + w) * conditional - w * unconditional  # [M, T, D]
        eps = (weights.T[:, :, None] * guided).sum(0)
        x0 = (step.a * x + step.b * eps).clamp(-1, 1)
        x = step.c * x0 + step.d * x
        if step.s:
            x = x + step.s * seeded_normal(seeds, k + 1, SHAPE).flatten(1)[sample_of].double()
    return x.float().view(T, *SHAPE)


@pytest.mark.parametrize("guidance", [0.0, 1.5, 4.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guided_ablated_sampling_equals_plain_torch(members, guidance, eta):
    code = codes.balanced_constant_weight(8, 6, seed=0)
    seeds, labels = [3, 7, 11], torch.tensor([2, 0, -1])
    sampler = Sampler("ddim", steps=8, eta=eta, guidance=guidance)
    weights = ablation_weights(code, [[], [1], [4, 6]])  # the full ensemble and two ablations
    every = weights[None].expand(3, -1, -1).reshape(9, -1)
    sample_of = torch.arange(3).repeat_interleave(3)
    fused = run_trajectories(members, SCHEDULE, sampler, seeds, every.float(), sample_of, labels=labels)
    want = _guided_in_plain_torch(members, sampler, seeds, every, sample_of, labels)
    assert torch.allclose(fused.images, want, atol=2e-5), (fused.images - want).abs().max()
    kept = int((every > 0).sum())
    assert fused.member_evaluations == 8 * kept * (2 if guidance else 1)  # twice the rows when guided
    # guidance moves a labelled sample, not the unlabelled one beyond the unguided run
    if guidance:
        plain = run_trajectories(members, SCHEDULE, Sampler("ddim", steps=8, eta=eta), seeds, every.float(),
                                 sample_of, labels=labels).images
        assert (fused.images[:6] - plain[:6]).abs().amax() > 1e-3


def test_guided_replays_are_the_same_in_passes_and_chunks(members):
    code = codes.balanced_constant_weight(8, 6, seed=0)
    seeds, labels = [1, 2, 3, 4], torch.tensor([0, 1, 2, 0])
    sampler = Sampler("ddim", steps=6, guidance=2.0)
    weights = ablation_weights(code, [[], [2], [5]])[None].expand(4, -1, -1)
    whole = replay(members, SCHEDULE, sampler, seeds, weights, labels=labels).images
    split = replay(members, SCHEDULE, sampler, seeds, weights, max_trajectories=3, passes=Passes(members_per_pass=2),
                   labels=labels).images
    assert torch.allclose(whole, split, atol=1e-6)
    alone = replay(members, SCHEDULE, sampler, seeds[2:3], weights[2:3], labels=labels[2:3]).images
    assert torch.allclose(alone[0], whole[2], atol=1e-6)  # a sample's replay does not depend on the others


@pytest.mark.parametrize("labels, guidance, message", [
    (torch.tensor([0, 3]), 1.0, "label 3 is not one the members were trained on"),
    (torch.tensor([0]), 1.0, "labels must be 2 integers, one per sample"),
    (torch.tensor([0.5, 1.0]), 1.0, "labels must be 2 integers"),
    (None, 1.0, "guidance 1.0 needs a label per sample"),
])
def test_labels_that_do_not_fit_are_refused(members, labels, guidance, message):
    with pytest.raises(DataError, match=message):
        run_trajectories(members, SCHEDULE, Sampler("ddim", steps=2, guidance=guidance), [1, 2],
                         torch.full((2, 6), 1 / 6), torch.arange(2), labels=labels)


def test_labels_for_unconditional_members_are_refused():
    plain = StackedMLP(2, SHAPE, hidden=8, blocks=1)
    with pytest.raises(DataError, match="unconditional"):
        run_trajectories(plain, SCHEDULE, Sampler("ddim", steps=2), [1], torch.full((1, 2), 0.5), torch.arange(1),
                         labels=torch.tensor([0]))


def _two_classes(n=64, seed=0, shape=(1, 2, 2)):
    """Class 0: images near -0.8; class 1: near +0.8."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = (labels.float() * 1.6 - 0.8).view(n, 1, 1, 1) + 0.05 * torch.randn(n, *shape, generator=g)
    return Dataset(images.clamp(-1, 1), labels, name="two classes")


def _trainer(data, mode="shared_noise", steps=500, dropout=0.1):
    shape = tuple(data.data_shape)
    code = codes.balanced_constant_weight(len(data), 4, seed=0, allow_duplicates=True)
    ensemble = build_members(MemberOptions(hidden=64, blocks=2, conditional=True), 4, shape, True, 0, classes=2)
    config = TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup=10, mode=mode, ema_decay=None,
                         cond_dropout=dropout)
    return Trainer(ensemble, data, code, torch.arange(len(data)), [str(i) for i in range(len(data))], SCHEDULE,
                   config)


def test_conditional_members_learn_each_class_and_guidance_draws_it():
    """Members trained with their labels (and without, 10% of the time) on two classes: guided
    by w = 3, every draw lands in the class it is asked for (unguided, one run of this setting
    drew 6 and 5 of 8)."""
    trainer = _trainer(_two_classes())
    trainer.train(progress=False)
    ensemble = trainer.ensemble.eval()
    labels = torch.tensor([0, 1] * 8)
    drawn = run_trajectories(ensemble, SCHEDULE, Sampler("ddim", steps=20, guidance=3.0), list(range(16)),
                             torch.full((16, 4), 0.25), torch.arange(16), labels=labels).images.flatten(1).mean(1)
    assert (drawn[labels == 0] < -0.6).all() and (drawn[labels == 1] > 0.6).all(), drawn


@pytest.mark.parametrize("mode", ["independent", "shared_noise", "masked_batch"])
@pytest.mark.parametrize("dropout", [0.0, 0.3, 1.0])
def test_labels_are_the_examples_dropped_at_the_asked_rate(mode, dropout):
    data = _two_classes(n=400)
    trainer = _trainer(data, mode, steps=1, dropout=dropout)
    draws = [trainer._draw() for _ in range(20)]
    labels = torch.stack([trainer._labels(d) for d in draws])
    index = torch.stack([d["index"] for d in draws])
    kept = labels >= 0
    assert torch.equal(labels[kept], data.labels[index[kept]])  # a kept label is the example's own
    assert abs((~kept).float().mean().item() - dropout) < 0.05
    assert trainer.train_step().isfinite().all()


def test_conditional_members_need_labels_and_an_architecture_that_takes_them(monkeypatch):
    from ensattr_fast.members import ARCHITECTURES

    with pytest.raises(ArchitectureError, match="--conditional needs class labels"):
        build_members(MemberOptions(conditional=True), 2, SHAPE, True, 0, classes=0)
    monkeypatch.setitem(ARCHITECTURES, "plugin", ARCHITECTURES["unet"])  # an architecture without labels
    with pytest.raises(ArchitectureError, match="built for --arch mlp, unet, unet-small, diffusers, seed-cifar10, "
                                                "not plugin"):
        build_members(MemberOptions(arch="plugin", conditional=True), 2, (1, 8, 8), True, 0, classes=2)
    ensemble = build_members(MemberOptions(hidden=8, blocks=1, conditional=True), 2, SHAPE, True, 0, classes=2)
    unlabelled = Dataset(torch.zeros(4, *SHAPE), None, name="unlabelled")
    with pytest.raises(DataError, match="class-conditional but unlabelled has no labels"):
        Trainer(ensemble, unlabelled, codes.balanced_constant_weight(2, 2, seed=0), torch.tensor([0, 1, 0, 1]),
                list("abcd"), SCHEDULE, TrainConfig(steps=1))


def test_conditional_unet_members_are_each_member_alone_with_its_label():
    """The built-in UNet with a label embedding: the grouped-convolution ensemble equals each
    member as a plain UNetMember given its labels, and unconditional members are as before."""
    from ensattr_fast.members import StackedUNet

    ensemble = build_members(MemberOptions(arch="unet", width=8, conditional=True), 3, (1, 8, 8), False, 0,
                             classes=4).eval()
    assert isinstance(ensemble, StackedUNet) and ensemble.spec()["classes"] == 4
    with torch.no_grad():
        ensemble.params["label__weight"].mul_(20)
    x, t = torch.randn(3, 5, 1, 8, 8), torch.randint(0, 1000, (3, 5))
    labels = torch.tensor([0, 3, -1, 2, 1])
    together = ensemble(x, t, labels)
    for m in range(3):
        assert torch.allclose(ensemble.member(m).eval()(x[m], t[m], labels), together[m], atol=1e-5)
    assert torch.allclose(ensemble(x, t), ensemble(x, t, torch.full((5,), -1)))
    assert (together - ensemble(x, t)).abs().amax() > 1e-3
    # the label layer is drawn last: with shared initial weights (the shared-noise and masked
    # modes) every other weight is as for unconditional members
    plain = StackedUNet(2, (1, 8, 8), width=8, seed=5, shared_init=True)
    theirs = dict(StackedUNet(2, (1, 8, 8), width=8, seed=5, shared_init=True, classes=3).named_parameters())
    assert all(torch.equal(v, theirs[k]) for k, v in plain.named_parameters())


def test_conditional_unet_features_are_the_gradients_under_each_label():
    from ensattr_fast.attribution.gradients import FeatureSpec, gradient_features

    ensemble = build_members(MemberOptions(arch="unet", width=8, conditional=True), 2, (1, 8, 8), False, 0,
                             classes=3).eval()
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([2, -1, 0])
    spec = FeatureSpec(kind="dtrak", timesteps=2, dim=16, seed=1)
    together = gradient_features(ensemble, SCHEDULE, images, spec, batch=3, labels=labels)
    for i in range(3):
        alone = gradient_features(ensemble, SCHEDULE, images[i:i + 1], spec, batch=1, labels=labels[i:i + 1])
        assert_close_to_scale(together[:, i:i + 1], alone)
    unlabelled = gradient_features(ensemble, SCHEDULE, images, spec, batch=3)
    assert_close_to_scale(unlabelled[:, 1], together[:, 1])
    assert (unlabelled[:, 0] - together[:, 0]).abs().amax() > 1e-6
