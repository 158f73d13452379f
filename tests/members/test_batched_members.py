"""Batched convolutional members equal the same members run one by one: the built-in UNet in
grouped convolutions (StackedUNet) and diffusers' UNet2DModel folded into the batch
(FoldedEnsemble), for the forward, the backward, forward-mode AD (first-order Jacobians),
per-example gradients (gradient features) and passes of members."""

import pytest
import torch
from torch.func import jvp

from conftest import assert_close_to_scale

from ensattr_fast.attribution import first_order_grams
from ensattr_fast.attribution.gradients import FeatureSpec, _noised, _value, gradient_features, per_example_gradients
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedUNet, UNetMember, VmapEnsemble, build_ensemble
from ensattr_fast.members.passes import MemberPasses, Passes

SCHEDULE = NoiseSchedule.linear()
M, B = 3, 4
UNET = dict(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8)


def stacked_unet():
    return StackedUNet(M, (2, 8, 8), width=8, time_dim=16, seed=3)


def diffusers_members():
    pytest.importorskip("diffusers")
    from ensattr_fast.members import diffusers_ensemble
    return diffusers_ensemble(UNET, M, seed=3)


ENSEMBLES = {"unet": stacked_unet, "diffusers": diffusers_members}


def inputs(shared_t=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, B, 2, 8, 8, generator=g)
    t = torch.randint(0, 1000, (B,) if shared_t else (M, B), generator=g)
    return x, t


def one_by_one(ensemble, x, t):
    members = [ensemble.member(m).eval() for m in range(M)]
    return torch.stack([members[m](x[m], t[m] if t.dim() == 2 else t) for m in range(M)])


@pytest.mark.parametrize("arch", ENSEMBLES)
@pytest.mark.parametrize("shared_t", [False, True])
def test_batched_forward_equals_the_members_one_by_one(arch, shared_t):
    ensemble = ENSEMBLES[arch]().eval()
    x, t = inputs(shared_t)
    with torch.no_grad():
        assert_close_to_scale(ensemble(x, t), one_by_one(ensemble, x, t))


@pytest.mark.parametrize("arch", ENSEMBLES)
def test_batched_gradients_equal_the_members_one_by_one(arch):
    ensemble = ENSEMBLES[arch]().train()
    x, t = inputs()
    target = torch.randn_like(x)
    (ensemble(x, t) - target).square().mean().backward()
    stacked = ensemble.stacked_parameters()
    for m in range(M):
        member = ensemble.member(m)
        (member(x[m], t[m]) - target[m]).square().mean().div(M).backward()
        scale = max(p.grad.abs().max().item() for p in member.parameters())
        for name, p in member.named_parameters():  # a bias before a norm has a zero gradient
            assert_close_to_scale(stacked[name].grad[m], p.grad, rel=1e-5, scale=scale)


def _contiguous_norms(module):
    """torch's forward-mode group norm fails on a non-contiguous input (diffusers' attention
    output), so the reference gives its group norms contiguous inputs, as the ensemble does."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.GroupNorm):
            layer.register_forward_pre_hook(lambda _, args: (args[0].contiguous(),))
    return module


@pytest.mark.parametrize("arch", ENSEMBLES)
def test_batched_forward_mode_derivatives_equal_the_members_one_by_one(arch):
    ensemble = ENSEMBLES[arch]().eval()
    x, t = inputs()
    tangent = torch.randn_like(x)
    _, got = jvp(lambda z: ensemble(z, t), (x,), (tangent,))
    for m in range(M):
        member = _contiguous_norms(ensemble.member(m).eval())
        _, want = jvp(lambda z: member(z, t[m]), (x[m],), (tangent[m],))
        assert_close_to_scale(got[m], want, rel=1e-4)


def test_grouped_unet_equals_the_vmapped_unet_in_features_and_first_order_grams():
    grouped = stacked_unet().eval()
    vmapped = VmapEnsemble(lambda: UNetMember(2, 8, 16), M, (2, 8, 8), seed=3).eval()
    images = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(kind="dtrak", timesteps=2, dim=16, seed=4)
    want = gradient_features(vmapped, SCHEDULE, images, spec, batch=2)
    assert_close_to_scale(gradient_features(grouped, SCHEDULE, images, spec, batch=2), want, rel=1e-4)
    sampler = Sampler("ddim", 3)
    a, b = first_order_grams(grouped, SCHEDULE, sampler, [1, 2]), first_order_grams(vmapped, SCHEDULE, sampler, [1, 2])
    assert_close_to_scale(a.samples, b.samples, rel=1e-4)
    assert_close_to_scale(a.exact, b.exact, rel=1e-3)
    assert_close_to_scale(a.direct, b.direct, rel=1e-3)


@pytest.mark.parametrize("arch", ENSEMBLES)
def test_per_example_gradients_equal_the_members_one_by_one(arch):
    ensemble = ENSEMBLES[arch]().eval()
    images = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(kind="dtrak", timesteps=2)
    x_t, t, eps = _noised(images, spec, SCHEDULE, "cpu")
    per_example, names, params = per_example_gradients(ensemble, spec)
    got = per_example(params, x_t, t, eps)  # name -> [n, M, ...], as gradient features take them
    named = {id(p): name for name, p in ensemble.named_parameters()}
    got = {k: got[named[id(p)]] for k, p in ensemble.stacked_parameters().items()}  # by a member's names
    for m in range(M):
        member = ensemble.member(m).eval()
        for i in range(len(images)):
            value = _value(member(x_t[i], t)[None], eps, spec.kind).mean(-1).sum()
            want = torch.autograd.grad(value, list(member.parameters()))
            scale = max(g.abs().max().item() for g in want)
            for (name, _), w in zip(member.named_parameters(), want):
                assert_close_to_scale(got[name][i, m], w, scale=scale)


def test_grouped_unet_passes_of_members_give_the_same_gradients():
    """To float rounding: oneDNN's grouped convolutions may sum in another order for another
    number of groups (so do the vmapped UNet's, whose batching rule makes the same calls)."""
    ensemble = StackedUNet(4, (2, 8, 8), width=8, time_dim=16, seed=3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, B, 2, 8, 8, generator=g), torch.randint(0, 1000, (4, B), generator=g)
    grads = []
    for passes in (Passes(), Passes(members_per_pass=2, checkpoint_activations=True), Passes(members_per_pass=1)):
        ensemble.zero_grad(set_to_none=True)
        for cut, forward in MemberPasses(ensemble, passes).passes():
            forward(x[cut], t[cut]).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in ensemble.named_parameters()})
    scale = max(g.abs().max().item() for g in grads[0].values())
    for other in grads[1:]:
        for k in grads[0]:
            assert_close_to_scale(other[k], grads[0][k], scale=scale)


def test_grouped_unet_selects_members_rebuilds_from_its_spec_and_keeps_the_vmapped_state():
    ensemble = stacked_unet().eval()
    x, t = inputs()
    with torch.no_grad():
        out = ensemble(x, t)
        assert torch.equal(ensemble.select(range(1, 3))(x[1:], t[1:]), out[1:])
        rebuilt = build_ensemble(ensemble.spec()).eval()
        assert torch.equal(rebuilt(x, t), out)  # the same seed draws the same members
        before = VmapEnsemble(lambda: UNetMember(2, 8, 16), M, (2, 8, 8), seed=3)  # the unet before issue 13
        assert list(before.state_dict()) == list(ensemble.state_dict())
        assert [k for k, _ in before.named_parameters()] == [k for k, _ in ensemble.named_parameters()]
        other = StackedUNet(M, (2, 8, 8), width=8, time_dim=16, seed=9).eval()
        other.load_state_dict(before.state_dict())
        assert torch.equal(other(x, t), out)
