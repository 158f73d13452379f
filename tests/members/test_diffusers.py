"""diffusers: the schedules and sampler steps equal diffusers' schedulers for the same config;
an ensemble of UNet2DModel members trains and samples; members saved as diffusers folders load
back and run in a diffusers pipeline; the presets. Skipped without diffusers."""

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import assert_close_to_scale  # noqa: E402
from ensattr_fast import codes  # noqa: E402
from ensattr_fast.data import Dataset  # noqa: E402
from ensattr_fast.diffusion.sampling import sample  # noqa: E402
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler  # noqa: E402
from ensattr_fast.members import (  # noqa: E402
    MemberOptions,
    StackedUNet,
    build_ensemble,
    build_members,
    diffusers_ensemble,
    load_members,
    member_unet,
    save_member,
)
from ensattr_fast.training import TrainConfig, Trainer  # noqa: E402
from ensattr_fast.training.checkpoint import Checkpoint  # noqa: E402

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
        assert math.isclose(step.s**2, float(theirs._get_variance(step.t)) if step.t else 0.0,
                            rel_tol=1e-10, abs_tol=1e-15)


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


def test_members_saved_as_diffusers_folders_load_back_and_run_in_a_pipeline(tmp_path):
    ensemble = diffusers_ensemble(UNET, 3, seed=1).eval()
    folders = [save_member(ensemble, m, tmp_path / f"member{m}") for m in (2, 0)]
    loaded = load_members(folders).eval()
    x, t = torch.randn(3, 2, 1, 8, 8), torch.randint(0, 1000, (3, 2))
    with torch.no_grad():
        want = ensemble(x, t)[[2, 0]]
        torch.testing.assert_close(loaded(x[[2, 0]], t[[2, 0]]), want, rtol=0, atol=1e-5 * want.abs().max().item())
        unet = diffusers.UNet2DModel.from_pretrained(folders[0], low_cpu_mem_usage=False).eval()
        assert torch.equal(unet(x[2], t[2]).sample, member_unet(ensemble, 2).eval()(x[2], t[2]).sample)
        # diffusers' own attention (not the vmap-safe one of the ensemble): the same to rounding
        torch.testing.assert_close(unet(x[2], t[2]).sample, want[0], rtol=0, atol=1e-5 * want.abs().max().item())
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="another UNet2DModel config"):
        other = diffusers_ensemble(dict(UNET, layers_per_block=2), 1)
        load_members([folders[0], save_member(other, 0, tmp_path / "other")])


def test_dropout_is_drawn_per_member_in_training_and_off_in_evaluation():
    ensemble = diffusers_ensemble(dict(UNET, dropout=0.5), 2, shared_init=True)
    x, t = torch.randn(1, 2, 1, 8, 8).expand(2, 2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        out = ensemble.train()(x, t)
        assert not torch.equal(out[0], out[1])
        out = ensemble.eval()(x, t)
        assert torch.equal(out[0], out[1])


def test_presets_unet_small_and_the_seed_papers_cifar10_unet():
    small = build_members(MemberOptions(arch="unet-small", width=8), 2, (3, 32, 32), True, 0)
    assert isinstance(small, StackedUNet) and small.width == 32 and small.parameters_per_member() == 163_747
    seed = build_members(MemberOptions(arch="seed-cifar10"), 1, (3, 32, 32), True, 0)
    assert seed.parameters_per_member() == 35_746_307  # Ho et al. (2020): 35.7M
    config = seed.spec()["config"]
    assert config["block_out_channels"] == [128, 256, 256, 256] and config["dropout"] == 0.1
    assert build_ensemble(json.loads(json.dumps(seed.spec()))).parameters_per_member() == 35_746_307
    tuned = build_members(MemberOptions(arch="seed-cifar10", unet_config={"dropout": 0.0}), 1, (1, 16, 16), True, 0)
    assert tuned.spec()["config"]["dropout"] == 0.0 and tuned.data_shape == (1, 16, 16)


def test_conditional_diffusers_members_are_each_member_alone_with_its_label():
    """``--conditional`` diffusers members: UNet2DModel's class embedding over the classes and the
    empty label (-1), folded over members; each member equals its plain UNet2DModel given the
    label, and guided ablated sampling equals the members evaluated one by one."""
    from ensattr_fast.diffusion.sampling import ablation_weights, run_trajectories

    ensemble = build_members(MemberOptions(arch="diffusers", unet_config=UNET, conditional=True), 4, (1, 8, 8),
                             False, 0, classes=3).eval()
    assert ensemble.classes == 3 and ensemble.spec()["classes"] == 3
    assert ensemble.spec()["config"]["num_class_embeds"] == 4
    x, t = torch.randn(4, 5, 1, 8, 8), torch.randint(0, 1000, (4, 5))
    labels = torch.tensor([0, 1, 2, -1, 1])
    together = ensemble(x, t, labels)
    for m in range(4):
        unet = member_unet(ensemble, m).eval()
        alone = unet(x[m], t[m], class_labels=torch.where(labels < 0, 3, labels)).sample
        assert torch.allclose(together[m], alone, atol=1e-5)
    assert (together - ensemble(x, t)).abs().amax() > 1e-4  # the labels are heard
    rebuilt = build_ensemble(ensemble.spec())
    rebuilt.load_state_dict(ensemble.state_dict())
    assert torch.equal(rebuilt.eval()(x, t, labels), together)

    code = codes.balanced_constant_weight(6, 4, seed=0)
    sampler, seeds, schedule = Sampler("ddim", steps=3, eta=1.0, guidance=2.0), [1, 2], NoiseSchedule.linear()
    weights = ablation_weights(code, [[], [2]])
    every, sample_of = weights[None].expand(2, -1, -1).reshape(4, -1).float(), torch.arange(2).repeat_interleave(2)
    fused = run_trajectories(ensemble, schedule, sampler, seeds, every, sample_of, labels=torch.tensor([2, -1]))
    one_by_one = run_trajectories(_OneByOne(ensemble), schedule, sampler, seeds, every, sample_of,
                                  labels=torch.tensor([2, -1]))
    assert torch.allclose(fused.images, one_by_one.images, atol=1e-4)


class _OneByOne(torch.nn.Module):
    """The members of a folded ensemble called one after another as plain UNet2DModels."""

    def __init__(self, ensemble):
        super().__init__()
        self.n_members, self.data_shape, self.classes = ensemble.n_members, ensemble.data_shape, ensemble.classes
        self.unets = torch.nn.ModuleList([member_unet(ensemble, m).eval() for m in range(ensemble.n_members)])

    def forward_packed(self, x_packed, t, layout, labels=None):
        out = torch.empty_like(x_packed)
        for m, unet in enumerate(self.unets):
            rows = layout.member == m
            if rows.any():
                index = torch.where(labels[rows] < 0, self.classes, labels[rows])
                out[rows] = unet(x_packed[rows], torch.full((int(rows.sum()),), t), class_labels=index).sample
        return out


def test_conditional_diffusers_features_are_the_gradients_under_each_label():
    """Gradient features of conditional generic members: each example's gradient of its loss
    under its own label, the same as one example at a time."""
    from ensattr_fast.attribution.gradients import FeatureSpec, gradient_features

    ensemble = build_members(MemberOptions(arch="diffusers", unet_config=UNET, conditional=True), 2, (1, 8, 8),
                             False, 0, classes=3).eval()
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([2, -1, 0])
    spec, schedule = FeatureSpec(kind="trak", timesteps=2, dim=16, seed=1), NoiseSchedule.linear()
    together = gradient_features(ensemble, schedule, images, spec, batch=3, labels=labels)
    for i in range(3):
        alone = gradient_features(ensemble, schedule, images[i:i + 1], spec, batch=1, labels=labels[i:i + 1])
        assert_close_to_scale(together[:, i:i + 1], alone)
    unlabelled = gradient_features(ensemble, schedule, images, spec, batch=3)
    assert_close_to_scale(unlabelled[:, 1], together[:, 1])  # -1 is no label
    assert (unlabelled[:, 0] - together[:, 0]).abs().amax() > 1e-6


def test_export_writes_diffusers_members_that_from_pretrained_runs(tmp_path):
    from ensattr_fast.cli.main import main

    import numpy as np

    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "toy.npy", images.numpy())
    (tmp_path / "unet.json").write_text(json.dumps(UNET))
    argv = [["plan", "--data", tmp_path / "toy.npy", "--members", 8, "--out", tmp_path / "plan.h5"],
            ["train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "ens.pt", "--arch", "diffusers",
             "--unet-config", tmp_path / "unet.json", "--steps", 2, "--batch-size", 4],
            ["export", "--checkpoint", tmp_path / "ens.pt", "--out", tmp_path / "members", "--members", "2"]]
    for args in argv:
        assert main([str(a) for a in args]) == 0
    ensemble = Checkpoint.load(tmp_path / "ens.pt").build().eval()
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "members" / "member-02").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, ensemble(x.expand(8, *x.shape), t)[2], atol=1e-4)


def test_a_diffusers_folder_is_a_base_that_members_fine_tune_in_full(tmp_path, capsys):
    import numpy as np

    from ensattr_fast.cli.main import main
    from ensattr_fast.members.diffusers_unet import DiffusersMember

    unet = diffusers.UNet2DModel(**UNET).eval()
    unet.save_pretrained(tmp_path / "base")
    np.save(tmp_path / "toy.npy", (torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).numpy())
    run = lambda *args: main([str(a) for a in args])  # noqa: E731
    assert run("plan", "--data", tmp_path / "toy.npy", "--members", 8, "--out", tmp_path / "plan.h5") == 0
    assert run("train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "tuned.pt", "--base", tmp_path / "base",
               "--tune", "full", "--steps", 1, "--batch-size", 4, "--lr", "1e-30") == 0
    tuned = Checkpoint.load(tmp_path / "tuned.pt").build()
    alone = DiffusersMember(dict(unet.config)).eval()  # the base with plain-matmul attention, as members run it
    alone.unet.load_state_dict(unet.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])
    with torch.no_grad():
        assert torch.allclose(tuned(x.expand(8, *x.shape), t), alone(x, t).expand(8, -1, -1, -1, -1), atol=1e-4)
    capsys.readouterr()
    assert run("train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "lora.pt", "--base", tmp_path / "base",
               "--steps", 1) == 2
    assert "adapters are built for mlp bases; fine-tune it in full" in capsys.readouterr().err
