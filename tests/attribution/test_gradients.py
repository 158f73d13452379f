"""Gradient features and TRAK scores against dense reference computations of the same numbers:
full per-example gradients from torch.func, projected by explicit matrices; the kernel by an
explicit inverse; the member combinations by loops."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from ensattr_fast import codes
from ensattr_fast.attribution import full_kernel as exact_module
from ensattr_fast.attribution import projection
from ensattr_fast.attribution.gradients import CountSketch, FeatureSpec, combine, gradient_features, member_scores
from ensattr_fast.attribution.methods import METHODS, get_method
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.errors import ConfigError, MethodError
from ensattr_fast.members import StackedMLP, UNetMember, VmapEnsemble
from ensattr_fast.members.mlp import _StackedLinear

DIGIT_UNITS = 1794  # the 1,797 digits planned one unit per image, their 3 near-duplicate pairs grouped

SCHEDULE = NoiseSchedule.linear()


def dense_gradients(ensemble, images, spec):
    """Per-example gradients {name: [n, M, ...]} of the spec's function, by torch.func."""
    t, eps = spec.draws(SCHEDULE, ensemble.data_shape)
    abar = SCHEDULE.alphas_cumprod.to(images.dtype)[t].view(-1, *([1] * len(ensemble.data_shape)))
    params = {k: v.detach() for k, v in ensemble.named_parameters()}

    def f(params, x):
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
        out = functional_call(ensemble, params, (x_t.expand(ensemble.n_members, *x_t.shape), t))
        value = out.pow(2).flatten(2).sum(-1) if spec.kind == "dtrak" else (out - eps).pow(2).flatten(2).mean(-1)
        return value.mean(-1).sum()

    return vmap(grad(f), in_dims=(None, 0))(params, images)


@pytest.mark.parametrize("kind,per_member", [("dtrak", True), ("trak", True), ("dtrak", False), ("trak", False)])
def test_mlp_features_are_rank_one_projections_of_the_gradients(kind, per_member):
    ensemble = StackedMLP(3, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=1)
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = FeatureSpec(kind=kind, timesteps=4, dim=6, seed=2, per_member_projection=per_member)
    got = gradient_features(ensemble, SCHEDULE, images, spec, batch=2)
    grads = dense_gradients(ensemble, images, spec)
    # the same projections, drawn in the same order, as explicit [P, dim] matrices per layer:
    # member m's from the seed (seed, m), or one shared from seed + 1
    names = {module: name for name, module in ensemble.named_modules()}
    want = torch.zeros(3, 5, spec.dim)
    for m in range(3):
        g = torch.Generator().manual_seed(projection.member_seed(spec.seed, m) if per_member else spec.seed + 1)
        for layer in [module for module in ensemble.modules() if isinstance(module, _StackedLinear)]:
            u = torch.randn(layer.weight.shape[1] + 1, spec.dim, generator=g)
            v = torch.randn(layer.weight.shape[2], spec.dim, generator=g)
            weight = grads[f"{names[layer]}.weight"][:, m]  # [n, fan_in, fan_out]
            bias = grads[f"{names[layer]}.bias"][:, m, 0]  # [n, fan_out]
            want[m] += torch.einsum("nab,aj,bj->nj", weight, u[:-1], v)
            want[m] += torch.einsum("nb,j,bj->nj", bias, u[-1], v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_generic_members_use_a_count_sketch_of_the_full_gradient():
    ensemble = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=8), 2, (1, 8, 8), seed=0)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grads = dense_gradients(ensemble, images, FeatureSpec(kind="dtrak", timesteps=3, seed=4))
    names = [k for k, _ in ensemble.named_parameters()]
    flat = torch.cat([grads[k].flatten(2) for k in names], -1)  # [n, M, P]
    for per_member in (True, False):
        spec = FeatureSpec(kind="dtrak", timesteps=3, dim=16, seed=4, per_member_projection=per_member)
        got = gradient_features(ensemble, SCHEDULE, images, spec, batch=2)
        for m in range(2):
            seed = projection.member_seed(spec.seed, m) if per_member else spec.seed + 1
            sketch = CountSketch([grads[k][0, 0].numel() for k in names], spec.dim, seed)
            matrix = torch.zeros(flat.shape[-1], spec.dim)  # the sketch as an explicit matrix
            offset = 0
            for index, sign in zip(sketch.index, sketch.sign):
                matrix[torch.arange(offset, offset + len(index)), index] = sign
                offset += len(index)
            torch.testing.assert_close(got[m], flat[:, m] @ matrix, rtol=1e-4, atol=1e-5)


def test_member_scores_are_the_regularised_kernel_summed_over_each_units_examples():
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(2, 7, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    unit_of = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = member_scores(train, queries, unit_of, 4, damping=0.1)
    for m in range(2):
        phi = train[m].double()
        kernel = phi.T @ phi
        kernel += 0.1 * kernel.diagonal().mean() * torch.eye(4, dtype=torch.float64)
        per_example = queries[m].double() @ torch.linalg.inv(kernel) @ phi.T
        want = torch.stack([per_example[:, unit_of == u].sum(1) for u in range(4)], 1)
        torch.testing.assert_close(got[m], want.float(), rtol=1e-5, atol=1e-6)


def test_member_scores_with_more_dimensions_than_examples_solve_the_same_kernel_in_the_dual():
    g = torch.Generator().manual_seed(3)
    train, queries = torch.randn(2, 5, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    unit_of = torch.tensor([0, 1, 1, 2, 3])
    got = member_scores(train, queries, unit_of, 4, damping=0.1)
    for m in range(2):
        phi = train[m].double()
        kernel = phi.T @ phi
        kernel += 0.1 * kernel.diagonal().mean() * torch.eye(9, dtype=torch.float64)
        per_example = queries[m].double() @ torch.linalg.inv(kernel) @ phi.T  # the primal, d x d
        want = torch.zeros(3, 4, dtype=torch.float64).index_add_(1, unit_of, per_example)
        torch.testing.assert_close(got[m], want.float(), rtol=1e-5, atol=1e-6)


def test_combinations_of_member_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 2, 6, generator=g)
    code = codes.balanced_constant_weight(6, 4, seed=0)
    torch.testing.assert_close(combine(scores, code, "mean"), scores.mean(0))
    for u in range(6):
        sees = code[u].bool()
        torch.testing.assert_close(combine(scores, code, "includers")[:, u], scores[sees, :, u].mean(0))
        torch.testing.assert_close(combine(scores, code, "contrast")[:, u],
                                   scores[sees, :, u].mean(0) - scores[~sees, :, u].mean(0))
    with pytest.raises(ValueError, match="combination must be one of"):
        combine(scores, code, "median")


def test_method_names():
    assert (get_method("dtrak").feature_kind, get_method("dtrak").combination) == ("dtrak", "mean")
    assert (get_method("trak_includers").feature_kind,
            get_method("trak_includers").combination) == ("trak", "includers")
    assert (get_method("dtrak_contrast").feature_kind,
            get_method("dtrak_contrast").combination) == ("dtrak", "contrast")
    assert get_method("first_order").feature_kind is None and "dtrak_median" not in METHODS


def test_attribute_streams_gradient_methods(tmp_path):
    """``ensattr attribute --method dtrak,...`` writes each matrix, its top-k and done flags;
    the mean equals the combination of the member scores computed directly."""
    import h5py
    import numpy as np

    from ensattr_fast.cli.main import main
    from ensattr_fast.data import load_digits
    from ensattr_fast.training.checkpoint import Checkpoint

    plan, ckpt, results = tmp_path / "plan.h5", tmp_path / "ensemble.pt", tmp_path / "results.h5"
    assert main(["plan", "--out", str(plan), "--members", "16"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "4", "--hidden", "16",
                 "--blocks", "1", "--batch-size", "8"]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(results), "--seeds", "3",
                 "--sampling-steps", "3"]) == 0
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--samples", "3",
                 "--method", "dtrak,dtrak_includers,dtrak_contrast", "--block-rows", "2", "--check", "1"]) == 0
    checkpoint = Checkpoint.load(ckpt)
    ensemble, spec = checkpoint.build(), FeatureSpec("dtrak")
    with h5py.File(str(ckpt) + ".features.h5", "r") as f:  # the training features: beside the checkpoint
        (name,) = [k for k in f if k.startswith("dtrak-")]
        assert f[name].attrs["complete"] and f[name]["done"][()].all()
        train = torch.from_numpy(f[name]["features"][()])
        gram = torch.from_numpy(f[name]["gram"][()])
        torch.testing.assert_close(gram, train.double().transpose(1, 2) @ train.double())
    with h5py.File(results, "r") as f:
        assert "features_dtrak_train" not in f["statistics"]  # results files stay small
        samples = torch.from_numpy(f["samples/images"][()])
        queries = torch.from_numpy(f["statistics/features_dtrak"][()])
        torch.testing.assert_close(train[:, :8], gradient_features(ensemble, SCHEDULE, load_digits().images[:8], spec))
        torch.testing.assert_close(queries, gradient_features(ensemble, SCHEDULE, samples, spec))
        per_member = member_scores(train, queries, checkpoint.unit_of, len(checkpoint.code))
        for method, how in (("dtrak", "mean"), ("dtrak_includers", "includers"), ("dtrak_contrast", "contrast")):
            scores, top = f[f"influence/{method}"][()], f[f"topk/{method}/index"][()]
            np.testing.assert_allclose(scores, combine(per_member, checkpoint.code, how).numpy(), rtol=1e-5, atol=1e-7)
            assert f[f"progress/{method}"][()].all() and f[f"progress/{method}_topk"][()].all()
            assert (top[:, 0] == scores.argmax(1)).all()
        assert f["counterfactuals/units"].shape == (3, 1)
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--method", "dtrak_median"]) == 2


# ---- issue 12, item 6: per-member projections, the dimension, the exact kernel ----

def frozen_shared_features(ensemble, images, spec, batch):
    """The features as computed before issue 12 (one projection shared by all members), kept
    verbatim so that ``per_member_projection=False`` is checked bit for bit against it."""
    from ensattr_fast.attribution.gradients import _noised, _value

    M, shape, K = ensemble.n_members, ensemble.data_shape, spec.timesteps
    if not isinstance(ensemble, StackedMLP):
        params = {k: v.detach() for k, v in ensemble.named_parameters()}
        buffers = {k: v.detach() for k, v in ensemble.named_buffers()}
        names = list(params)
        sketch = CountSketch([params[k][0].numel() for k in names], spec.dim, spec.seed + 1)

        def f(params, x_t, t, eps):
            out = functional_call(ensemble, (params, buffers), (x_t.expand(M, *x_t.shape), t))
            return _value(out, eps, spec.kind).mean(-1).sum()

        per_example = vmap(grad(f), in_dims=(None, 0, None, None))
        features = torch.zeros(M, len(images), spec.dim)
        for start in range(0, len(images), batch):
            x_t, t, eps = _noised(images[start : start + batch], spec, SCHEDULE, "cpu")
            grads = per_example(params, x_t, t, eps)
            parts = [grads[k].reshape(len(x_t) * M, -1) for k in names]
            features[:, start : start + len(x_t)] = sketch(parts).view(len(x_t), M, -1).transpose(0, 1)
        return features
    layers = [m for m in ensemble.modules() if isinstance(m, _StackedLinear)]
    g = torch.Generator().manual_seed(spec.seed + 1)
    projections = [(torch.randn(layer.weight.shape[1] + 1, spec.dim, generator=g),
                    torch.randn(layer.weight.shape[2], spec.dim, generator=g)) for layer in layers]
    seen = {}

    def remember(layer, inputs, output):
        seen[layer] = [inputs[0].detach(), None]
        output.register_hook(lambda grad_out: seen[layer].__setitem__(1, grad_out.detach()))

    handles = [layer.register_forward_hook(remember) for layer in layers]
    features = torch.zeros(M, len(images), spec.dim)
    for start in range(0, len(images), batch):
        x_t, t, eps = _noised(images[start : start + batch], spec, SCHEDULE, "cpu")
        n = len(x_t)
        rows = x_t.reshape(n * K, *shape)
        out = ensemble(rows.expand(M, *rows.shape), t.repeat(n))
        value = _value(out, eps.repeat(n, *([1] * len(shape))), spec.kind)
        ensemble.zero_grad(set_to_none=True)
        (value.sum() / K).backward()
        block = torch.zeros(M, n, spec.dim)
        for layer, (u, v) in zip(layers, projections):
            x, dy = seen[layer]
            xu = torch.baddbmm(u[-1].expand(M, 1, -1), x, u[:-1].expand(M, *u[:-1].shape))
            block += (xu * (dy @ v)).view(M, n, K, spec.dim).sum(2)
        features[:, start : start + n] = block
    for handle in handles:
        handle.remove()
    ensemble.zero_grad(set_to_none=True)
    return features


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_a_shared_projection_reproduces_the_features_before_issue_12_bit_for_bit(arch):
    if arch == "mlp":
        ensemble, shape = StackedMLP(3, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=1), (1, 4, 4)
    else:
        ensemble, shape = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=8), 2, (1, 8, 8), seed=0), (1, 8, 8)
    images = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for kind in ("dtrak", "trak"):
        spec = FeatureSpec(kind=kind, timesteps=3, dim=12, seed=5, per_member_projection=False)
        got = gradient_features(ensemble, SCHEDULE, images, spec, batch=2)
        assert torch.equal(got, frozen_shared_features(ensemble, images, spec, 2))
        # the default draws a projection per member: other numbers, from the same gradients
        assert not torch.equal(got, gradient_features(ensemble, SCHEDULE, images, FeatureSpec(kind, 3, 12, 5), batch=2))


def test_large_dims_in_column_chunks_and_directions_drawn_again_give_the_same_features(monkeypatch):
    ensemble = StackedMLP(3, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=1)
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    specs = [FeatureSpec(timesteps=3, dim=40, seed=1, per_member_projection=p) for p in (True, False)]
    want = [gradient_features(ensemble, SCHEDULE, images, spec, batch=2) for spec in specs]
    monkeypatch.setattr(projection, "_CHUNK_NUMBERS", 7 * 3 * 2 * 3)  # 7 columns per chunk
    monkeypatch.setattr(projection, "_CACHE_BYTES", 0)  # each member's directions drawn per batch
    for spec, expected in zip(specs, want):
        torch.testing.assert_close(gradient_features(ensemble, SCHEDULE, images, spec, batch=2), expected)


def test_feature_spec_range_checks_and_names():
    with pytest.raises(ConfigError, match="dim must be >= 1, got 0"):
        FeatureSpec(dim=0)
    with pytest.raises(ConfigError, match="timesteps must be >= 1, got -1"):
        FeatureSpec(timesteps=-1)
    assert FeatureSpec().per_member_projection and not FeatureSpec().exact
    assert (FeatureSpec().tag, FeatureSpec(dim=4096).tag, FeatureSpec(per_member_projection=False).tag) == (
        "", "_d4096", "_shared")
    assert projection.member_seed(0, 1) == projection.member_seed(0, 1) != projection.member_seed(1, 0)


def brute_force_exact_scores(ensemble, train, queries, spec, damping):
    """Full per-example gradients by torch.func (the linear layers' weights and biases, which
    the MLP features project), and the kernel in the dual, all in float64: [M, Q, n]."""
    grads = dense_gradients(ensemble, torch.cat([train, queries]), spec)
    layers = [name for name, module in ensemble.named_modules() if isinstance(module, _StackedLinear)]
    n, M = len(train), ensemble.n_members
    flat = torch.cat([torch.cat([grads[f"{n}.weight"], grads[f"{n}.bias"]], 2).flatten(2) for n in layers], -1)
    out = []
    for m in range(M):
        phi, q = flat[:n, m], flat[n:, m]  # [n, P], [Q, P]
        lam = damping * (phi.T @ phi).diagonal().mean()  # the projected path's rule
        out.append(q @ phi.T @ torch.linalg.inv(phi @ phi.T + lam * torch.eye(n, dtype=phi.dtype)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dtrak", "trak"])
def test_exact_kernel_equals_a_brute_force_computation(kind, monkeypatch):
    ensemble = StackedMLP(2, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=3).double()
    images = torch.rand(11, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    train, queries, spec = images[:8], images[8:], FeatureSpec(kind=kind, timesteps=3, exact=True)
    monkeypatch.setattr(exact_module, "_BLOCK_BYTES", 2 * 3 * 568 * 8)  # blocks of 3 examples: 8 = 3 + 3 + 2
    gram, cross, P = exact_module.exact_grams(ensemble, SCHEDULE, train, queries, spec)
    got = exact_module.exact_example_scores(gram, cross, P, damping=0.1)
    torch.testing.assert_close(got, brute_force_exact_scores(ensemble, train, queries, spec, 0.1),
                               rtol=1e-9, atol=1e-12)
    unit_of = torch.tensor([0, 0, 1, 2, 2, 3, 3, 3])
    units = exact_module.exact_member_scores(ensemble, SCHEDULE, train, queries, spec, unit_of, 4, damping=0.1)
    torch.testing.assert_close(units, torch.zeros(2, 3, 4).index_add_(2, unit_of, got.float()))


def test_exact_kernel_of_generic_members_uses_all_their_gradients():
    ensemble = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=8), 2, (1, 8, 8), seed=0)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(timesteps=2, exact=True)
    grads = dense_gradients(ensemble, images, spec)
    flat = torch.cat([g.flatten(2) for g in grads.values()], -1).double()  # [n, M, P]
    gram, cross, P = exact_module.exact_grams(ensemble, SCHEDULE, images[:3], images[3:], spec)
    assert P == flat.shape[-1]
    want = torch.einsum("amp,bmp->mab", flat, flat)
    torch.testing.assert_close(gram, want[:, :3, :3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cross, want[:, 3:, :3], rtol=1e-5, atol=1e-7)


def test_exact_kernel_refuses_training_sets_past_its_budget():
    ensemble = StackedMLP(2, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=3)
    images = torch.zeros(10, 1, 4, 4)
    with pytest.raises(MethodError,
                       match=r"exact kernel needs .* n=8 training examples.*limit of 1,000 bytes") as error:
        exact_module.exact_member_scores(ensemble, SCHEDULE, images[:8], images[8:], FeatureSpec(exact=True),
                                         torch.arange(8), 8, budget=1000)
    assert "\n" not in str(error.value)


def _spearman(a, b):
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def test_projected_scores_tend_to_the_exact_kernel_as_the_dimension_grows():
    ensemble = StackedMLP(2, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=3)
    images = torch.rand(36, 1, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    train, queries = images[:30], images[30:]
    spec = FeatureSpec(timesteps=3, seed=1)
    gram, cross, P = exact_module.exact_grams(ensemble, SCHEDULE, train, queries, spec)
    exact = exact_module.exact_example_scores(gram, cross, P)
    unit_of = torch.arange(30)
    rho = {}
    for dim in (8, 4096):
        sub = FeatureSpec(timesteps=3, seed=1, dim=dim)
        projected = member_scores(gradient_features(ensemble, SCHEDULE, train, sub),
                                  gradient_features(ensemble, SCHEDULE, queries, sub), unit_of, 30)
        rho[dim] = sum(_spearman(projected[m], exact[m]) for m in range(2)) / 2
    assert rho[4096] > 0.9 and rho[4096] > rho[8] + 0.2, rho


def test_attribute_takes_the_projection_dimension(tmp_path):
    import h5py

    from ensattr_fast.cli.main import main
    from ensattr_fast.cli.parser import UsageError, parse

    options = parse(["attribute", "--checkpoint", "c", "--results", "r"]).options
    assert (options.projection_dim, options.exact_kernel) == (1024, False)
    with pytest.raises(UsageError, match=r"--projection-dim: must be an integer in \[1, 1048576\], got 0"):
        parse(["attribute", "--checkpoint", "c", "--results", "r", "--projection-dim", "0"])
    plan, ckpt, results = tmp_path / "plan.h5", tmp_path / "ensemble.pt", tmp_path / "results.h5"
    assert main(["plan", "--out", str(plan), "--members", "16"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "2", "--hidden", "8",
                 "--blocks", "1", "--batch-size", "8"]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(results), "--seeds", "2",
                 "--sampling-steps", "2"]) == 0
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--method", "dtrak",
                 "--projection-dim", "24", "--check", "0", "--keep-features"]) == 0
    with h5py.File(results, "r") as f:
        assert f["statistics/features_dtrak_d24_train"].shape == (16, 1797, 24)  # one row per image
        assert f["influence/dtrak"].shape == (2, DIGIT_UNITS)


@pytest.mark.parametrize("adapters", [False, True])
def test_the_exact_kernel_of_conditional_members_takes_each_example_under_its_label(adapters):
    """Class-conditional members: every training example's gradient under its own label, every
    query's under its own (-1: none), against torch.func one example at a time."""
    from ensattr_fast.members import LoraEnsemble

    base = StackedMLP(1 if adapters else 2, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=3, classes=3)
    ensemble = (LoraEnsemble(base, 2, rank=2, classes=3) if adapters else base).double()
    with torch.no_grad():
        for p in ensemble.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
    images = torch.rand(9, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, -1, 2])
    spec = FeatureSpec(kind="dtrak", timesteps=3, exact=True)
    t, eps = spec.draws(SCHEDULE, (1, 4, 4))
    abar = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    params = {k: v.detach() for k, v in ensemble.named_parameters()}

    def f(params, x, label):
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps.double()
        out = functional_call(ensemble, params, (x_t.expand(2, *x_t.shape), t, label.expand(len(t))))
        return out.pow(2).flatten(2).sum(-1).mean(-1).sum()

    each = [grad(f)(params, x, label) for x, label in zip(images, labels)]
    layers = [name for name, module in ensemble.named_modules() if isinstance(module, _StackedLinear)]
    flat = torch.stack([torch.cat([torch.cat([g[f"{n}.weight"], g[f"{n}.bias"]], 1).flatten(1)
                                   if f"{n}.bias" in g else g[f"{n}.weight"].flatten(1) for n in layers], -1)
                        for g in each], 1)  # [M, 9, P]
    gram, cross, P = exact_module.exact_grams(ensemble, SCHEDULE, images[:6], images[6:], spec,
                                              labels=(labels[:6], labels[6:]))
    assert P == flat.shape[-1]
    torch.testing.assert_close(gram, flat[:, :6] @ flat[:, :6].transpose(1, 2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cross, flat[:, 6:] @ flat[:, :6].transpose(1, 2), rtol=1e-9, atol=1e-12)
