"""How the members run (ensattr_fast.members.passes): precisions replay bit for bit within themselves
and resume bit for bit; passes of K members and activation checkpointing give the numbers of
one pass over all members, bit for bit; torch.compile agrees with eager within rounding."""

import dataclasses

import pytest
import torch

from ensattr_fast import codes
from ensattr_fast.data import Dataset
from ensattr_fast.diffusion.sampling import ablate, sample
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.errors import ConfigError
from ensattr_fast.members import MemberOptions, StackedMLP, UNetMember, VmapEnsemble, build_members
from ensattr_fast.members.passes import MemberPasses, Passes, precision_scope
from ensattr_fast.training import TrainConfig, Trainer
from ensattr_fast.training.checkpoint import Checkpoint, CheckpointError

SCHEDULE = NoiseSchedule.linear(200)
M = 6


def make_trainer(precision="fp32", steps=8, passes=Passes(), ensemble=None, mode="shared_noise"):
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(16, 1, 4, 4, generator=g) * 2 - 1, torch.arange(16) % 3, name="toy")
    units = codes.Units.per_example(len(data))
    code = codes.random_constant_weight(len(data), M, seed=1)
    ensemble = ensemble or StackedMLP(M, data.data_shape, hidden=16, blocks=1, shared_init=True, seed=0)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, mode=mode, precision=precision)
    return Trainer(ensemble, data, code, units.unit_of, units.names, SCHEDULE, config, passes=passes)


def unet_ensemble():
    return VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=16), M, (1, 4, 4), shared_init=True)


def assert_same_state(a: Trainer, b: Trainer):
    for key, value in a.ensemble.state_dict().items():
        assert torch.equal(value, b.ensemble.state_dict()[key]), key
    for x, y in zip(a.optimizer.state_dict()["state"].values(), b.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_replays_and_resumes_bit_for_bit(tmp_path, precision):
    first, second = make_trainer(precision), make_trainer(precision)
    first.train(progress=False)
    second.train(progress=False)
    assert_same_state(first, second)
    # fp32 master weights and Adam state; the members did run in half precision
    assert all(p.dtype == torch.float32 for p in first.ensemble.parameters())
    assert all(v.dtype == torch.float32 for s in first.optimizer.state.values() for k, v in s.items() if k != "step")
    fp32 = make_trainer("fp32")
    fp32.train(progress=False)
    assert not torch.equal(fp32.ensemble.inp.weight, first.ensemble.inp.weight)
    torch.testing.assert_close(fp32.ensemble.inp.weight, first.ensemble.inp.weight, rtol=0, atol=0.05)

    stopped = make_trainer(precision)
    for _ in range(3):
        stopped.train_step()
    stopped.checkpoint().save(tmp_path / "ck.pt")
    checkpoint = Checkpoint.load(tmp_path / "ck.pt")
    assert checkpoint.config["train"]["precision"] == precision
    assert ("grad_scaler" in checkpoint.config) == (precision == "fp16")
    resumed = make_trainer(precision)
    resumed.restore(checkpoint)
    resumed.train(progress=False)
    assert_same_state(first, resumed)
    with pytest.raises(CheckpointError, match=f"trained in {precision}, this run is fp32: resume with --precision"):
        make_trainer("fp32").restore(checkpoint)


def test_fp16_loss_scale_is_kept_and_restored(tmp_path):
    trainer = make_trainer("fp16")
    assert trainer.scaler.is_enabled() and not make_trainer("bf16").scaler.is_enabled()
    trainer.train_step()
    trainer.scaler.update(1024.0)  # a scale the default (2^16) would not have
    trainer.checkpoint().save(tmp_path / "ck.pt")
    resumed = make_trainer("fp16")
    resumed.restore(Checkpoint.load(tmp_path / "ck.pt"))
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale() == 1024.0


def test_precision_is_checked():
    with pytest.raises(ConfigError, match=r"precision must be one of \[.fp32., .tf32., .bf16., .fp16.\], got .fp64."):
        TrainConfig(precision="fp64")
    with pytest.raises(ConfigError, match="precision must be one of"):
        Sampler(precision="half")


def test_tf32_is_fp32_on_the_cpu():
    a, b = make_trainer("fp32"), make_trainer("tf32")
    a.train(progress=False)
    b.train(progress=False)
    assert_same_state(a, b)
    with precision_scope("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("mode", ["independent", "shared_noise", "masked_batch"])
def test_passes_of_k_members_train_bit_identically(mode):
    """Members share no weights: a backward per pass gives each member the gradient that one
    backward over all gives it; the MLP's batched matmuls compute each member alone, so the
    weights after training are those of one pass, bit for bit."""
    whole = make_trainer(mode=mode, steps=4)
    whole.train(progress=False)
    for passes in (Passes(members_per_pass=4), Passes(members_per_pass=1, checkpoint_activations=True),
                   Passes(checkpoint_activations=True)):
        parts = make_trainer(mode=mode, steps=4, passes=passes)
        losses = parts.train_step()
        assert losses.shape == (M,)
        parts.train(progress=False)
        assert_same_state(whole, parts)


@pytest.mark.parametrize("arch", ["vmap", "unet"])
def test_passes_of_convolution_members_agree_within_rounding(arch):
    """Convolution members run as one grouped convolution (vmapped, or the built-in UNet's
    own), whose kernels round differently for another number of groups: outputs and gradients
    agree to rounding (not bit for bit; Adam can grow that where a gradient is near zero)."""
    if arch == "vmap":
        ensemble = unet_ensemble()
    else:
        ensemble = build_members(MemberOptions(arch="unet", width=8), M, (1, 4, 4), True, 0)
    x, t = torch.randn(M, 8, 1, 4, 4), torch.randint(0, 200, (M, 8))
    ensemble(x, t).square().sum().backward()
    whole = {k: p.grad.clone() for k, p in ensemble.named_parameters()}
    for k in (1, 4):
        ensemble.zero_grad(set_to_none=True)
        for cut, forward in MemberPasses(ensemble, Passes(members_per_pass=k)).passes():
            out = forward(x[cut], t[cut])
            torch.testing.assert_close(out, ensemble(x[cut], t[cut]) if k == M else ensemble(x, t)[cut],
                                       rtol=1e-5, atol=1e-6)
            out.square().sum().backward()
        for name, p in ensemble.named_parameters():
            torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-5)
    if arch == "vmap":  # passes and checkpointing run through the trainer too
        trainer = make_trainer(mode="independent", steps=3, ensemble=unet_ensemble(),
                               passes=Passes(members_per_pass=3, checkpoint_activations=True))
        trainer.train(progress=False)


def test_passes_in_bf16_train_bit_identically():
    whole, parts = make_trainer("bf16"), make_trainer("bf16", passes=Passes(members_per_pass=2))
    whole.train(progress=False)
    parts.train(progress=False)
    assert_same_state(whole, parts)


def test_activation_checkpointing_gives_the_same_gradients():
    ensemble = unet_ensemble()
    x, t = torch.randn(M, 5, 1, 4, 4), torch.randint(0, 200, (M, 5))
    grads = []
    for passes in (Passes(), Passes(checkpoint_activations=True)):  # with passes: the MLP's training test
        ensemble.zero_grad(set_to_none=True)
        for cut, forward in MemberPasses(ensemble, passes).passes():
            forward(x[cut], t[cut]).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in ensemble.named_parameters()})
    for other in grads[1:]:
        assert all(torch.equal(grads[0][k], other[k]) for k in grads[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_in_passes_and_precisions_replays_bit_for_bit(precision):
    ensemble = make_trainer().ensemble.eval()
    sampler = Sampler("ddim", steps=5, eta=0.5, precision=precision)
    seeds, code = [3, 9, 11], codes.random_constant_weight(16, M, seed=1)
    full = sample(ensemble, SCHEDULE, sampler, seeds)
    assert torch.equal(full, sample(ensemble, SCHEDULE, sampler, seeds))
    cf = ablate(ensemble, SCHEDULE, sampler, code, seeds, [[0], [5], []]).images
    for k in (1, 4):
        passes = Passes(members_per_pass=k)
        assert torch.equal(full, sample(ensemble, SCHEDULE, sampler, seeds, passes))
        assert torch.equal(cf, ablate(ensemble, SCHEDULE, sampler, code, seeds, [[0], [5], []], passes=passes).images)
    assert torch.equal(cf[2], full)
    if precision != "fp32":
        fp32 = sample(ensemble, SCHEDULE, dataclasses.replace(sampler, precision="fp32"), seeds)
        assert not torch.equal(full, fp32)
        torch.testing.assert_close(full, fp32, rtol=0, atol=0.1)


def test_passes_are_checked():
    with pytest.raises(ConfigError, match=r"members per pass must be an integer in \[1, 4096\], got 0"):
        Passes(members_per_pass=0)
    ensemble = StackedMLP(M, (1, 4, 4), hidden=8, blocks=1)
    assert MemberPasses(ensemble, Passes(members_per_pass=4)).ranges == [range(0, 3), range(3, 6)]
    assert MemberPasses(ensemble, Passes(members_per_pass=1)).ranges == [range(m, m + 1) for m in range(M)]
    assert MemberPasses(ensemble, Passes(members_per_pass=99)).ranges == [range(0, 6)]


@pytest.mark.slow
def test_compiled_members_agree_with_eager():
    """torch.compile fuses and reorders floating-point work: equal within rounding, not bit for bit."""
    eager, compiled = make_trainer(steps=3), make_trainer(steps=3, passes=Passes(compile=True))
    eager.train(progress=False)
    compiled.train(progress=False)
    for key, value in eager.ensemble.state_dict().items():
        torch.testing.assert_close(compiled.ensemble.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_samples_default_to_the_training_precision_and_replay_in_it(tmp_path):
    """``ensattr sample`` samples in the checkpoint's precision unless told otherwise and records
    it with the sampler, so that every replay (ablate, attribute's check) draws the same sample."""
    from ensattr_fast.cli.main import main
    from ensattr_fast.diffusion.sampling import replay
    from ensattr_fast.store import read_sampler, read_samples

    plan, ck = tmp_path / "plan.h5", tmp_path / "e.pt"
    assert main(["plan", "--out", str(plan), "--members", "4", "--units", "class"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ck), "--steps", "3", "--hidden", "8", "--blocks", "1",
                 "--batch-size", "4", "--precision", "bf16", "--members-per-pass", "3"]) == 0
    assert Checkpoint.load(ck).config["train"]["precision"] == "bf16"
    args = ["sample", "--checkpoint", str(ck), "--seeds", "3", "--sampling-steps", "3"]
    assert main([*args, "--out", str(tmp_path / "s.h5")]) == 0
    assert main([*args, "--out", str(tmp_path / "p.h5"), "--members-per-pass", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "f.h5"), "--precision", "fp32"]) == 0
    sampler = read_sampler(tmp_path / "s.h5")
    assert sampler.precision == "bf16" and read_sampler(tmp_path / "f.h5").precision == "fp32"
    seeds, images = read_samples(tmp_path / "s.h5", 3)
    assert torch.equal(images, read_samples(tmp_path / "p.h5", 3)[1])
    assert not torch.equal(images, read_samples(tmp_path / "f.h5", 3)[1])
    checkpoint = Checkpoint.load(ck)
    full = torch.full((3, 1, 4), 0.25, dtype=torch.float64)
    again = replay(checkpoint.build(), checkpoint.schedule, sampler, seeds, full).images[:, 0]
    assert torch.equal(again, images)
    assert main(["ablate", "--checkpoint", str(ck), "--results", str(tmp_path / "s.h5"), "--units", "0",
                 "--phantoms", "2"]) == 0
