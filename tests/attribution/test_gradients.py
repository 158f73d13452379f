"""Gradient features and TRAK scores against dense reference computations of the same numbers:
full per-example gradients from torch.func, projected by explicit matrices; the kernel by an
explicit inverse; the member combinations by loops."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from ensattr_fast import codes
from ensattr_fast.attribution.gradients import CountSketch, FeatureSpec, combine, gradient_features, member_scores
from ensattr_fast.attribution.methods import METHODS, get_method
from ensattr_fast.members import StackedMLP, UNetMember, VmapEnsemble
from ensattr_fast.members.mlp import _StackedLinear
from ensattr_fast.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()


def dense_gradients(ensemble, images, spec):
    """Per-example gradients {name: [n, M, ...]} of the spec's function, by torch.func."""
    t, eps = spec.draws(SCHEDULE, ensemble.data_shape)
    abar = SCHEDULE.alphas_cumprod.float()[t].view(-1, *([1] * len(ensemble.data_shape)))
    params = {k: v.detach() for k, v in ensemble.named_parameters()}

    def f(params, x):
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
        out = functional_call(ensemble, params, (x_t.expand(ensemble.n_members, *x_t.shape), t))
        value = out.pow(2).flatten(2).sum(-1) if spec.kind == "dtrak" else (out - eps).pow(2).flatten(2).mean(-1)
        return value.mean(-1).sum()

    return vmap(grad(f), in_dims=(None, 0))(params, images)


@pytest.mark.parametrize("kind", ["dtrak", "trak"])
def test_mlp_features_are_rank_one_projections_of_the_gradients(kind):
    ensemble = StackedMLP(3, (1, 4, 4), hidden=8, blocks=1, time_dim=8, seed=1)
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = FeatureSpec(kind=kind, timesteps=4, dim=6, seed=2)
    got = gradient_features(ensemble, SCHEDULE, images, spec, batch=2)
    grads = dense_gradients(ensemble, images, spec)
    # the same projections, drawn in the same order, as explicit [P, dim] matrices per layer
    g = torch.Generator().manual_seed(spec.seed + 1)
    names = {module: name for name, module in ensemble.named_modules()}
    want = torch.zeros(3, 5, spec.dim)
    for layer in [m for m in ensemble.modules() if isinstance(m, _StackedLinear)]:
        u = torch.randn(layer.weight.shape[1] + 1, spec.dim, generator=g)
        v = torch.randn(layer.weight.shape[2], spec.dim, generator=g)
        weight = grads[f"{names[layer]}.weight"]  # [n, M, fan_in, fan_out]
        bias = grads[f"{names[layer]}.bias"][:, :, 0]  # [n, M, fan_out]
        want += torch.einsum("nmab,aj,bj->mnj", weight, u[:-1], v).double().float()
        want += torch.einsum("nmb,j,bj->mnj", bias, u[-1], v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_generic_members_use_a_count_sketch_of_the_full_gradient():
    ensemble = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=8), 2, (1, 8, 8), seed=0)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(kind="dtrak", timesteps=3, dim=16, seed=4)
    got = gradient_features(ensemble, SCHEDULE, images, spec, batch=2)
    grads = dense_gradients(ensemble, images, spec)
    names = [k for k, _ in ensemble.named_parameters()]
    sketch = CountSketch([grads[k][0, 0].numel() for k in names], spec.dim, spec.seed + 1)
    flat = torch.cat([grads[k].flatten(2) for k in names], -1)  # [n, M, P]
    matrix = torch.zeros(flat.shape[-1], spec.dim)  # the sketch as an explicit matrix
    offset = 0
    for index, sign in zip(sketch.index, sketch.sign):
        matrix[torch.arange(offset, offset + len(index)), index] = sign
        offset += len(index)
    torch.testing.assert_close(got, (flat @ matrix).transpose(0, 1), rtol=1e-4, atol=1e-5)


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
    assert (get_method("trak_includers").feature_kind, get_method("trak_includers").combination) == ("trak", "includers")
    assert (get_method("dtrak_contrast").feature_kind, get_method("dtrak_contrast").combination) == ("dtrak", "contrast")
    assert get_method("first_order").feature_kind is None and "dtrak_median" not in METHODS


def test_attribute_streams_gradient_methods(tmp_path):
    """``ensattr attribute --method dtrak,...`` writes each matrix, its top-k and done flags;
    the mean equals the combination of the member scores computed directly."""
    import h5py
    import numpy as np

    from ensattr_fast.checkpoint import Checkpoint
    from ensattr_fast.cli import main
    from ensattr_fast.data import load_digits

    plan, ckpt, results = tmp_path / "plan.h5", tmp_path / "ensemble.pt", tmp_path / "results.h5"
    assert main(["plan", "--out", str(plan), "--members", "16"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "4", "--hidden", "16",
                 "--blocks", "1", "--batch-size", "8"]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(results), "--seeds", "3", "--sampling-steps", "3"]) == 0
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--samples", "3",
                 "--method", "dtrak,dtrak_includers,dtrak_contrast", "--block-rows", "2", "--check", "1"]) == 0
    checkpoint = Checkpoint.load(ckpt)
    ensemble, spec = checkpoint.build(), FeatureSpec("dtrak")
    with h5py.File(results, "r") as f:
        samples = torch.from_numpy(f["samples/images"][()])
        train = torch.from_numpy(f["statistics/features_dtrak_train"][()])  # kept for resumes
        queries = torch.from_numpy(f["statistics/features_dtrak"][()])
        torch.testing.assert_close(train[:, :8], gradient_features(ensemble, SCHEDULE, load_digits().images[:8], spec))
        torch.testing.assert_close(queries, gradient_features(ensemble, SCHEDULE, samples, spec))
        per_member = member_scores(train, queries, checkpoint.unit_of, 1797)
        for method, how in (("dtrak", "mean"), ("dtrak_includers", "includers"), ("dtrak_contrast", "contrast")):
            scores, top = f[f"influence/{method}"][()], f[f"topk/{method}/index"][()]
            np.testing.assert_allclose(scores, combine(per_member, checkpoint.code, how).numpy(), rtol=1e-5, atol=1e-7)
            assert f[f"progress/{method}"][()].all() and f[f"progress/{method}_topk"][()].all()
            assert (top[:, 0] == scores.argmax(1)).all()
        assert f["counterfactuals/units"].shape == (3, 1)
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--method", "dtrak_median"]) == 2
