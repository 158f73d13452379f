"""Adapter members (issue 21, item 2): M LoRA adapters on one frozen MLP base, run batched. Each
is checked against the same member run alone, and against its merged full model (W + s A B,
plain StackedMLP members): forward, a training step, guided ablated sampling, the first-order
Jacobians and the gradient features."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from ensattr_fast import codes
from ensattr_fast.attribution import projection
from ensattr_fast.attribution.first_order import first_order_grams
from ensattr_fast.attribution.gradients import FeatureSpec, gradient_features, linear_layers
from ensattr_fast.data import Dataset
from ensattr_fast.diffusion.sampling import ablation_weights, run_trajectories
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.errors import ArchitectureError
from ensattr_fast.members import LoraEnsemble, StackedMLP
from ensattr_fast.members.passes import MemberPasses, Passes
from ensattr_fast.training import TrainConfig
from ensattr_fast.training.trainer import Trainer

SCHEDULE = NoiseSchedule.linear(100)
SHAPE = (1, 4, 4)


def _adapters(classes=5, base_classes=3, members=4, rank=2, seed=0) -> LoraEnsemble:
    """Adapters whose updates are not zero (as after training), on a conditional base."""
    base = StackedMLP(1, SHAPE, hidden=16, blocks=2, time_dim=8, seed=1, classes=base_classes).eval()
    ensemble = LoraEnsemble(base, members, rank=rank, seed=seed, classes=classes).eval()
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in ensemble.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (3.0 if "label" in name else 0.3))
    return ensemble


@pytest.fixture(scope="module")
def adapters():
    return _adapters()


def _inputs(M, B=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 4])[:B]
    return torch.randn(M, B, *SHAPE, generator=g), torch.randint(0, 100, (M, B), generator=g), labels.expand(M, B)


def test_each_member_is_its_merged_model_and_itself_alone(adapters):
    x, t, labels = _inputs(4)
    together = adapters(x, t, labels)
    merged = adapters.merged()
    assert torch.allclose(merged(x, t, labels), together, atol=1e-5)
    assert torch.allclose(merged(x, t), adapters(x, t), atol=1e-5)
    for m in range(4):
        alone = adapters.select(range(m, m + 1))
        assert torch.allclose(alone(x[m:m + 1], t[m:m + 1], labels[m:m + 1]), together[m:m + 1], atol=1e-6)
    assert (adapters(x, t, labels) - adapters(x, t)).abs().amax() > 1e-2  # the labels are heard


def test_new_adapters_are_the_base_and_new_classes_start_unconditional():
    base = StackedMLP(1, SHAPE, hidden=16, blocks=2, time_dim=8, seed=1, classes=3).eval()
    fresh = LoraEnsemble(base, 3, rank=2, seed=0, classes=5).eval()
    x, t, _ = _inputs(3)
    rows, steps = x.reshape(1, 21, *SHAPE), t.reshape(1, 21)
    for label, as_base in ((0, 0), (2, 2), (3, -1), (4, -1), (-1, -1)):  # classes 3, 4 are new
        got = fresh(x, t, torch.full((3, 7), label))
        want = base(rows, steps, torch.full((1, 21), as_base)).reshape(got.shape)
        assert torch.allclose(got, want, atol=1e-6), label
    unconditional = LoraEnsemble(StackedMLP(1, SHAPE, hidden=16, blocks=1, time_dim=8, seed=2), 2, rank=1,
                                 classes=4)
    assert torch.allclose(unconditional(x[:2], t[:2], torch.full((2, 7), 3)), unconditional(x[:2], t[:2]))


def test_the_base_is_one_shared_frozen_copy_that_no_checkpoint_holds(adapters):
    base_weights = {name for name, _ in adapters.named_buffers()}
    assert base_weights and not base_weights & set(adapters.state_dict())
    assert all(p.shape[0] == 4 for p in adapters.parameters())  # only the adapters train, stacked over members
    part = adapters.select(range(1, 3))
    assert part.net.inp.base.weight.data_ptr() == adapters.net.inp.base.weight.data_ptr()
    assert torch.equal(part.net.inp.down.weight, adapters.net.inp.down.weight[1:3])
    # per member: r (fan_in + fan_out) per adapted layer, and the label embedding (6 labels, bias)
    layers = [(8, 8), (16, 16), (16, 16), (16, 16), (8, 16), (8, 16), (16, 16), (16, 16), (16, 16)]
    per_member = sum(2 * (a + b) for a, b in layers) + (6 + 1) * 8
    assert sum(p.numel() for p in adapters.parameters()) == 4 * per_member


def test_a_training_step_gives_each_member_the_gradient_it_has_alone(adapters):
    x, t, labels = _inputs(4, seed=3)
    eps = torch.randn_like(x)

    def loss(ensemble, m=slice(None)):
        ensemble.zero_grad()
        (ensemble(x[m], t[m], labels[m]) - eps[m]).pow(2).mean(tuple(range(1, x.dim()))).sum().backward()
        return {k: v.grad.clone() for k, v in ensemble.named_parameters()}

    together = loss(adapters)
    for m in range(4):
        alone = adapters.select(range(m, m + 1))
        for name, g in loss(alone, slice(m, m + 1)).items():
            assert torch.allclose(g[0], together[name][m], atol=1e-6), name
    passes = MemberPasses(adapters, Passes(members_per_pass=3))  # passes of 2 + 2 share the base
    adapters.zero_grad()
    (passes(x, t, labels) - eps).pow(2).mean(tuple(range(1, x.dim()))).sum().backward()
    for name, p in adapters.named_parameters():
        assert torch.allclose(p.grad, together[name], atol=1e-6), name
    adapters.zero_grad()


def test_training_moves_the_adapters_only_and_the_optimiser_holds_them_only():
    base = StackedMLP(1, SHAPE, hidden=16, blocks=1, time_dim=8, seed=1, classes=2).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ensemble = LoraEnsemble(base, 4, rank=2, classes=2)
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(32, *SHAPE, generator=g) * 2 - 1, torch.arange(32) % 2, name="two")
    code = codes.balanced_constant_weight(6, 4, seed=0)
    trainer = Trainer(ensemble, data, code, torch.arange(32) % 6, [str(i) for i in range(6)], SCHEDULE,
                      TrainConfig(steps=5, batch_size=8, lr=1e-2), "cpu")
    shared = {k: v.clone() for k, v in ensemble.named_buffers()}
    trainer.train(progress=False)
    assert all(torch.equal(v, shared[k]) for k, v in ensemble.named_buffers())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert ensemble.net.inp.up.weight.abs().amax() > 0  # B left zero: the members moved
    held = sum(s["exp_avg"].numel() for s in trainer.optimizer.state.values())
    assert held == sum(p.numel() for p in ensemble.parameters())


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_guided_ablated_sampling_equals_the_merged_members(adapters, guidance):
    code = codes.balanced_constant_weight(6, 4, seed=0)
    seeds, labels = [3, 7, 11], torch.tensor([4, 0, -1])
    sampler = Sampler("ddim", steps=6, eta=1.0, guidance=guidance)
    weights = ablation_weights(code, [[], [1], [3, 5]])
    every = weights[None].expand(3, -1, -1).reshape(9, -1).float()
    sample_of = torch.arange(3).repeat_interleave(3)
    got = run_trajectories(adapters, SCHEDULE, sampler, seeds, every, sample_of, labels=labels).images
    want = run_trajectories(adapters.merged(), SCHEDULE, sampler, seeds, every, sample_of, labels=labels).images
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_first_order_jacobians_are_the_merged_members(adapters):
    sampler = Sampler("ddim", steps=4, guidance=1.5)
    labels = torch.tensor([3, -1])
    got = first_order_grams(adapters, SCHEDULE, sampler, [1, 2], labels=labels)
    want = first_order_grams(adapters.merged(), SCHEDULE, sampler, [1, 2], labels=labels)
    assert torch.allclose(got.samples, want.samples, atol=1e-4)
    for gram in ("exact", "direct"):
        assert torch.allclose(getattr(got, gram), getattr(want, gram), rtol=1e-3, atol=1e-4), gram


def _dense_gradients(ensemble, images, labels, spec):
    """Per-example gradients {name: [n, M, ...]} of the conditional D-TRAK function, by torch.func."""
    t, eps = spec.draws(SCHEDULE, ensemble.data_shape)
    abar = SCHEDULE.alphas_cumprod.float()[t].view(-1, *([1] * len(SHAPE)))
    params = {k: v.detach() for k, v in ensemble.named_parameters()}

    def f(params, x, label):
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
        out = functional_call(ensemble, params, (x_t.expand(ensemble.n_members, *x_t.shape), t, label.expand(len(t))))
        return out.pow(2).flatten(2).sum(-1).mean(-1).sum()

    each = [grad(f)(params, x, label) for x, label in zip(images, labels)]  # one_hot does not vmap over labels
    return {k: torch.stack([g[k] for g in each]) for k in params}


@pytest.mark.parametrize("per_member", [True, False])
def test_gradient_features_project_the_adapters_gradients(adapters, per_member):
    """Rank-one projections of each low-rank factor's and the label embedding's per-example
    gradient; the factors have no bias, so no bias term enters."""
    images = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 3, 4, -1, 2])
    spec = FeatureSpec(kind="dtrak", timesteps=3, dim=6, seed=2, per_member_projection=per_member)
    got = gradient_features(adapters, SCHEDULE, images, spec, batch=2, labels=labels)
    grads = _dense_gradients(adapters, images, labels, spec)
    names = {module: name for name, module in adapters.named_modules()}
    layers = linear_layers(adapters)
    assert {f"{names[layer]}.weight" for layer in layers} == {k for k in grads if k.endswith("weight")}
    want = torch.zeros(4, 5, spec.dim)
    for m in range(4):
        g = torch.Generator().manual_seed(projection.member_seed(spec.seed, m) if per_member else spec.seed + 1)
        for layer in layers:
            u = torch.randn(layer.weight.shape[1] + 1, spec.dim, generator=g)
            v = torch.randn(layer.weight.shape[2], spec.dim, generator=g)
            want[m] += torch.einsum("nab,aj,bj->nj", grads[f"{names[layer]}.weight"][:, m], u[:-1], v)
            if layer.bias is not None:
                want[m] += torch.einsum("nb,j,bj->nj", grads[f"{names[layer]}.bias"][:, m, 0], u[-1], v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_adapters_need_one_mlp_model_and_a_rank():
    with pytest.raises(ArchitectureError, match="one MLP model"):
        LoraEnsemble(StackedMLP(2, SHAPE, hidden=8, blocks=1), 4)
    with pytest.raises(ArchitectureError, match="--rank"):
        LoraEnsemble(StackedMLP(1, SHAPE, hidden=8, blocks=1), 4, rank=0)


def test_a_plain_member_is_the_stacked_member():
    from ensattr_fast.members.plain import plain_member

    ensemble = StackedMLP(3, SHAPE, hidden=16, blocks=2, time_dim=8, seed=3, classes=4)
    x, t, labels = torch.randn(6, *SHAPE), torch.randint(0, 100, (6,)), torch.tensor([0, 1, 2, 3, -1, 1])
    together = ensemble(x.expand(3, *x.shape), t, labels)
    for m in range(3):
        assert torch.allclose(plain_member(ensemble, m)(x, t, labels), together[m], atol=1e-6)


def test_each_exported_member_is_that_member_when_peft_loads_it_onto_the_plain_base(adapters, tmp_path):
    peft = pytest.importorskip("peft")
    from ensattr_fast.members.export import export_adapter

    x, t, labels = torch.randn(6, *SHAPE), torch.randint(0, 100, (6,)), torch.tensor([0, 1, 3, 4, -1, 2])
    together = adapters(x.expand(4, *x.shape), t, labels)
    for m in (0, 3):
        folder = export_adapter(adapters, m, tmp_path / f"member{m}")
        model = peft.PeftModel.from_pretrained(adapters.plain_base(), folder).eval()
        assert torch.allclose(model(x, t, labels), together[m], atol=1e-5)
    base = StackedMLP(1, SHAPE, hidden=16, blocks=2, time_dim=8, seed=1, classes=3).eval()  # the fixture's base
    known = labels.clamp(max=2)  # the plain base alone is the base, on the base's classes
    assert torch.allclose(adapters.plain_base()(x, t, known), base(x[None], t, known)[0], atol=1e-6)


def test_a_resumed_fine_tune_is_the_uninterrupted_one_bit_for_bit(tmp_path):
    from ensattr_fast.training.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(32, *SHAPE, generator=g) * 2 - 1, torch.arange(32) % 2, name="two")
    base = StackedMLP(1, SHAPE, hidden=16, blocks=1, time_dim=8, seed=1, classes=2).eval()

    def trainer():
        return Trainer(LoraEnsemble(base, 4, rank=2, classes=2), data, codes.balanced_constant_weight(6, 4, seed=0),
                       torch.arange(32) % 6, [str(i) for i in range(6)], SCHEDULE,
                       TrainConfig(steps=12, batch_size=8, lr=1e-2), "cpu")

    uninterrupted = trainer()
    uninterrupted.train(progress=False)
    first = trainer()
    for _ in range(5):
        first.train_step()
    first.checkpoint().save(tmp_path / "ck.pt")
    resumed = trainer()
    resumed.restore(Checkpoint.load(tmp_path / "ck.pt"))
    resumed.train(progress=False)
    for key, value in uninterrupted.ensemble.state_dict().items():
        assert torch.equal(value, resumed.ensemble.state_dict()[key]), key
