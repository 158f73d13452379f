"""Auditing a fine-tune on the command line (issue 21, items 2 and 4): a class-conditional base
trained on the digits 0-4 (``train --all-units``), adapter members fine-tuned on the digits 5-9
over it (``train --base``), then sampling the new classes with guidance, attribution, the exact
check, and LDS with reference adapters on the same base. A base that is missing, changed, of
another shape or not one model is refused in one line before anything is written."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.diffusion.sampling import sample
from ensattr_fast.members import LoraEnsemble
from ensattr_fast.store import read_sampler
from ensattr_fast.training import Checkpoint

TRAIN = ["--steps", "30", "--hidden", "32", "--blocks", "1", "--batch-size", "16"]
LABELS = [5, 6, 7, 8, 9, -1]


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    digits = ef.load_digits()
    images, labels = digits.images.numpy(), digits.labels.numpy()
    np.savez(d / "old.npz", images=images[labels < 5][:150], labels=labels[labels < 5][:150])
    np.savez(d / "new.npz", images=images[labels >= 5][:60], labels=labels[labels >= 5][:60])
    assert ensattr("plan", "--data", d / "old.npz", "--out", d / "base_plan.h5") == 0
    assert ensattr("train", "--plan", d / "base_plan.h5", "--out", d / "base.pt", "--all-units", "--conditional",
                   *TRAIN) == 0
    assert ensattr("plan", "--data", d / "new.npz", "--members", "8", "--out", d / "plan.h5") == 0
    assert ensattr("train", "--plan", d / "plan.h5", "--out", d / "adapters.pt", "--base", d / "base.pt",
                   "--conditional", "--rank", "4", *TRAIN) == 0
    assert ensattr("sample", "--checkpoint", d / "adapters.pt", "--out", d / "results.h5", "--seeds", "6",
                   "--labels", ",".join(map(str, LABELS)), "--guidance", "2", "--sampling-steps", "6") == 0
    return d


def test_the_checkpoint_holds_the_adapters_and_names_its_base(finetune):
    checkpoint = Checkpoint.load(finetune / "adapters.pt")
    base = Checkpoint.load(finetune / "base.pt")
    assert checkpoint.spec["kind"] == "lora" and checkpoint.spec["rank"] == 4
    assert checkpoint.spec["base"] == {"path": str((finetune / "base.pt").resolve()), "sha256": base.file_hash}
    assert checkpoint.spec["classes"] == 10 and base.spec["classes"] == 5  # the new classes 5-9 join the base's
    assert all(k.endswith(("down.weight", "up.weight")) or ".label." in k for k in checkpoint.ensemble)
    ensemble = checkpoint.build()
    assert isinstance(ensemble, LoraEnsemble) and ensemble.n_members == 8
    frozen = base.build()  # the base as trained, untouched by the fine-tune
    assert torch.equal(ensemble.net.inp.base.weight, frozen.inp.weight[0])


def test_the_samples_replay_on_the_rebuilt_adapters(finetune):
    checkpoint = Checkpoint.load(finetune / "adapters.pt")
    with h5py.File(finetune / "results.h5", "r") as f:
        stored, seeds = f["samples/images"][()], f["samples/seed"][()]
    again = sample(checkpoint.build(), checkpoint.schedule, read_sampler(finetune / "results.h5"), list(seeds),
                   labels=torch.tensor(LABELS))
    assert np.array_equal(again.numpy(), stored)


def test_attribution_and_the_exact_check_run_on_adapters(finetune, tmp_path):
    results = tmp_path / "results.h5"
    shutil.copy(finetune / "results.h5", results)
    assert ensattr("attribute", "--checkpoint", finetune / "adapters.pt", "--results", results,
                   "--method", "dtrak") == 0
    with h5py.File(results, "r") as f:
        scores = f["influence/dtrak"][()] if "influence/dtrak" in f else f["influence/scores"][()]
    assert scores.shape[0] == 6 and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert ensattr("ablate", "--checkpoint", finetune / "adapters.pt", "--results", results, "--overwrite") == 0


def test_lds_trains_reference_adapters_on_the_same_base(finetune, tmp_path):
    results = tmp_path / "results.h5"
    shutil.copy(finetune / "results.h5", results)
    assert ensattr("attribute", "--checkpoint", finetune / "adapters.pt", "--results", results) == 0
    assert ensattr("lds", "--checkpoint", finetune / "adapters.pt", "--results", results, "--references",
                   tmp_path / "refs.pt", "--halves", "2", "--seeds", "1", "--steps", "10", "--draws", "8",
                   "--json", tmp_path / "lds.json") == 0
    base = Checkpoint.load(finetune / "adapters.pt").spec["base"]
    for name in ("refs.pt", "refs.full.pt", "refs.full.x8.pt"):  # the references, one and M full-data adapters
        reference = Checkpoint.load(tmp_path / name)
        assert reference.spec["kind"] == "lora" and reference.spec["base"] == base, name
    table = json.loads((tmp_path / "lds.json").read_text())
    assert {"dtrak", "loss", "dtrak_one_model"} <= set(table)
    assert all(row["n"] >= 4 and row["mean"] is not None for row in table.values()), table


def _refused(capsys, argv, message):
    capsys.readouterr()
    assert ensattr(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_changed_or_missing_base_is_refused(finetune, tmp_path, capsys):
    base = tmp_path / "base.pt"
    shutil.copy(finetune / "base.pt", base)
    out = tmp_path / "adapters.pt"
    assert ensattr("train", "--plan", finetune / "plan.h5", "--out", out, "--base", base, "--conditional",
                   "--rank", "2", "--steps", "5", "--batch-size", "16") == 0
    changed = Checkpoint.load(base)
    changed.step += 1  # another file: the same weights, saved again with another step
    changed.save(base)
    argv = ["sample", "--checkpoint", out, "--out", tmp_path / "r.h5", "--seeds", "2"]
    _refused(capsys, argv, "has changed since they were trained on it")
    base.unlink()
    _refused(capsys, argv, "is missing")
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("make_base, message", [
    ("adapters", "holds adapter members"),
    ("two models", "holds 2 models; a base is one model"),
    ("other shape", "models data of shape"),
    ("none", "no such file"),
])
def test_a_base_that_does_not_fit_is_refused_before_anything_is_written(finetune, tmp_path, capsys, make_base,
                                                                        message):
    base = {"adapters": finetune / "adapters.pt", "none": tmp_path / "nothing.pt"}.get(make_base)
    if make_base == "two models":
        base = tmp_path / "two.pt"
        assert ensattr("train", "--plan", finetune / "base_plan.h5", "--out", base, "--all-units", "--models", "2",
                       "--steps", "2", "--hidden", "8", "--blocks", "1", "--batch-size", "4") == 0
    elif make_base == "other shape":
        images = np.random.default_rng(0).uniform(-1, 1, (40, 1, 4, 4)).astype(np.float32)
        np.savez(tmp_path / "small.npz", images=images)
        assert ensattr("plan", "--data", tmp_path / "small.npz", "--out", tmp_path / "small_plan.h5") == 0
        base = tmp_path / "small.pt"
        assert ensattr("train", "--plan", tmp_path / "small_plan.h5", "--out", base, "--all-units", "--steps", "2",
                       "--hidden", "8", "--blocks", "1", "--batch-size", "4") == 0
    out = tmp_path / "adapters.pt"
    _refused(capsys, ["train", "--plan", finetune / "plan.h5", "--out", out, "--base", base, "--steps", "2"], message)
    assert not out.exists()


def test_the_finetune_demo_refuses_a_base_of_the_users(finetune, tmp_path, capsys):
    _refused(capsys, ["demo", "--finetune", "--out", tmp_path, "--base", finetune / "base.pt"], "trains its own base")
    assert not list(tmp_path.iterdir())


def test_a_rank_of_zero_and_the_base_as_output_are_refused(finetune, capsys):
    _refused(capsys, ["train", "--plan", finetune / "plan.h5", "--out", finetune / "x.pt", "--base",
                      finetune / "base.pt", "--rank", "0"], "--rank")
    _refused(capsys, ["train", "--plan", finetune / "plan.h5", "--out", finetune / "x.pt", "--base",
                      finetune / "base.pt", "--arch", "unet"], "--arch unet does not apply")
    assert not (finetune / "x.pt").exists()
    before = (finetune / "base.pt").read_bytes()
    _refused(capsys, ["train", "--plan", finetune / "plan.h5", "--out", finetune / "base.pt", "--base",
                      finetune / "base.pt", "--overwrite"], "--base")
    assert (finetune / "base.pt").read_bytes() == before


def test_the_finetune_demo_runs_end_to_end(tmp_path, capsys):
    """``demo --finetune`` in CI size: the base on 0-4, adapters on 5-9, guided samples of the new
    classes, attribution with its exact check, the report."""
    assert ensattr("demo", "--finetune", "--out", tmp_path, "--steps", "20", "--samples", "10", "--attribute", "2",
                   "--per-sample", "2", "--sampling-steps", "5", "--hidden", "32", "--blocks", "1", "--rank", "2",
                   "--batch-size", "32") == 0
    assert "each new class drawn (confidently) when asked for" in capsys.readouterr().out
    checkpoint = Checkpoint.load(tmp_path / "ensemble.pt")
    assert checkpoint.spec["kind"] == "lora" and checkpoint.spec["rank"] == 2 and checkpoint.code.shape[1] == 16
    assert len(checkpoint.unit_of) == int((ef.load_digits().labels >= 5).sum())  # the digits 5-9 are the fine-tune
    with h5py.File(tmp_path / "results.h5", "r") as f:
        assert f["samples/label"][()].tolist() == [5, 6, 7, 8, 9] * 2
        quality = json.loads(f.attrs["quality"])
        assert set(quality["drawn_as_asked"]) == {"5", "6", "7", "8", "9"}
    for name in ("base.pt", "report.png", "report.html"):
        assert (tmp_path / name).is_file()


def test_the_finetune_demo_ablates_each_new_class(tmp_path, capsys):
    """``demo --finetune --units class``: the five new classes as units on a sparse design, every
    sample drawn again without each class by the adapters that never saw it."""
    assert ensattr("demo", "--finetune", "--units", "class", "--out", tmp_path, "--steps", "20", "--samples", "10",
                   "--sampling-steps", "5", "--hidden", "32", "--blocks", "1", "--rank", "2", "--batch-size",
                   "32") == 0
    assert "the adapters that never saw c draw a confident c" in capsys.readouterr().out
    checkpoint = Checkpoint.load(tmp_path / "ensemble.pt")
    assert checkpoint.unit_names == ["5", "6", "7", "8", "9"] and checkpoint.code.shape == (5, 10)
    with h5py.File(tmp_path / "results.h5", "r") as f:
        assert f["counterfactuals/units"].shape == (10, 5)
        assert set(json.loads(f.attrs["quality"])["ablated_drawn_as_asked"]) == {"5", "6", "7", "8", "9"}


def test_adapters_sharded_over_ranks_sample_and_ablate_like_one_process(finetune, tmp_path):
    """``--shard-members`` under torchrun: each rank holds its share of the adapters (and the one
    base); the files equal one process's bit for bit."""
    from test_distributed import ensattr as launch

    for ranks, flags in ((1, []), (2, ["--shard-members"])):
        results = str(tmp_path / f"results{ranks}.h5")
        launch(ranks, "sample", "--checkpoint", str(finetune / "adapters.pt"), "--out", results, "--seeds", "4",
               "--labels", "5,6,7,-1", "--guidance", "2", "--sampling-steps", "4", *flags)
        launch(ranks, "ablate", "--checkpoint", str(finetune / "adapters.pt"), "--results", results, "--nearest",
               "2", "--phantoms", "4", *flags)
    with h5py.File(tmp_path / "results1.h5", "r") as one, h5py.File(tmp_path / "results2.h5", "r") as two:
        for name in ("samples/images", "counterfactuals/images", "counterfactuals/pvalue"):
            assert np.array_equal(one[name][()], two[name][()], equal_nan=True), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_adapters_train_and_sample_in_half_precision(finetune, tmp_path, precision):
    out = tmp_path / "adapters.pt"
    assert ensattr("train", "--plan", finetune / "plan.h5", "--out", out, "--base", finetune / "base.pt",
                   "--conditional", "--rank", "2", "--steps", "5", "--batch-size", "16", "--precision", precision) == 0
    assert ensattr("sample", "--checkpoint", out, "--out", tmp_path / "r.h5", "--seeds", "3", "--labels", "5",
                   "--sampling-steps", "3", "--precision", precision) == 0
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert np.isfinite(f["samples/images"][()]).all()


def test_the_python_lifecycle_audits_a_fine_tune(finetune, tmp_path):
    """``ef.Audit`` on the fine-tuning data: train adapters on the base, sample the new classes
    guided, score them, ablate: the same objects as for members of their own."""
    audit = ef.Audit.create(data=str(finetune / "new.npz"), members=8, workdir=tmp_path / "audit", progress=False)
    audit.train(base=str(finetune / "base.pt"), rank=2, conditional=True, steps=10, batch_size=16, hidden=32,
                blocks=1)
    assert isinstance(audit.checkpoint.build(), LoraEnsemble)
    samples = audit.sample(seeds="4", labels="5,6,7,8", guidance=2, sampling_steps=4)
    assert tuple(samples.images.shape) == (4, 1, 8, 8)
    attribution = audit.attribute(methods="loss", draws=2, samples=2, check=1)
    assert attribution.agreement is not None
    found = audit.ablate([0, 1], samples=2, overwrite=True)
    assert tuple(found.images.shape[:2]) == (2, 2)
    folders = audit.export(members="0,7")
    assert [f.relative_to(tmp_path / "audit").as_posix() for f in folders] == ["members/member-00", "members/member-07"]
    assert all((f / "adapter_config.json").exists() for f in folders)


def test_export_writes_members_that_peft_runs_as_the_ensemble_does(finetune, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "members"
    assert ensattr("export", "--checkpoint", finetune / "adapters.pt", "--out", out, "--members", "1,6") == 0
    assert sorted(p.name for p in out.iterdir()) == ["member-01", "member-06"]
    ensemble = Checkpoint.load(finetune / "adapters.pt").build().eval()  # EMA weights, as sampling uses
    x, t, labels = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,)), torch.tensor([5, 6, 9, -1, 7])
    together = ensemble(x.expand(ensemble.n_members, *x.shape), t, labels)
    for m in (1, 6):
        member = peft.PeftModel.from_pretrained(ensemble.plain_base(), out / f"member-{m:02d}").eval()
        assert torch.allclose(member(x, t, labels), together[m], atol=1e-5)
    written = (out / "member-01" / "adapter_model.safetensors").stat().st_mtime_ns
    _refused(capsys, ["export", "--checkpoint", finetune / "adapters.pt", "--out", out, "--members", "1"],
             "member-01 exists")
    _refused(capsys, ["export", "--checkpoint", finetune / "adapters.pt", "--out", out, "--members", "8"],
             "member 8 is not one of the 8 members")
    _refused(capsys, ["export", "--checkpoint", finetune / "base.pt", "--out", tmp_path / "base"],
             "these are mlp members")
    assert not (tmp_path / "base").exists()
    assert (out / "member-01" / "adapter_model.safetensors").stat().st_mtime_ns == written
    assert ensattr("export", "--checkpoint", finetune / "adapters.pt", "--out", out, "--members", "1",
                   "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["member-01", "member-06"]  # nothing half-written left


def test_export_never_replaces_the_checkpoint_it_reads(finetune, tmp_path, capsys):
    folder = tmp_path / "member-00"
    folder.mkdir()
    shutil.copy(finetune / "adapters.pt", folder / "adapters.pt")
    _refused(capsys, ["export", "--checkpoint", folder / "adapters.pt", "--out", tmp_path, "--members", "0",
                      "--overwrite"], "holds the --checkpoint this step reads")
    assert (folder / "adapters.pt").exists()


def test_a_full_finetune_starts_every_member_as_the_base_on_any_architecture(tmp_path, capsys):
    """``--tune full``: members of the base's own architecture (here the built-in UNet), each
    starting as the base and training every weight; the checkpoint runs without the base."""
    from ensattr_fast.members import MemberOptions, build_members
    from ensattr_fast.training.checkpoint import load_base

    digits = ef.load_digits()
    images, labels = digits.images.numpy(), digits.labels.numpy()
    np.savez(tmp_path / "old.npz", images=images[:60], labels=labels[:60])
    np.savez(tmp_path / "new.npz", images=images[60:100], labels=labels[60:100])
    assert ensattr("plan", "--data", tmp_path / "old.npz", "--out", tmp_path / "base_plan.h5") == 0
    assert ensattr("train", "--plan", tmp_path / "base_plan.h5", "--out", tmp_path / "base.pt", "--all-units",
                   "--arch", "unet", "--width", 8, "--conditional", "--steps", 3, "--batch-size", 4) == 0
    base, ref = load_base(tmp_path / "base.pt")
    members = build_members(MemberOptions(base=str(tmp_path / "base.pt"), tune="full", conditional=True), 4,
                            (1, 8, 8), True, 0, 10, base, ref)
    assert type(members) is type(base) and all(p.requires_grad for p in members.parameters())
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([3, 400, 900]), torch.tensor([1, -1, 9])
    with torch.no_grad():
        assert torch.allclose(members.eval()(x.expand(4, *x.shape), t, labels), base(x[None], t, labels), atol=1e-5)
    assert ensattr("plan", "--data", tmp_path / "new.npz", "--members", 8, "--out", tmp_path / "plan.h5") == 0
    assert ensattr("train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "tuned.pt", "--base",
                   tmp_path / "base.pt", "--tune", "full", "--conditional", "--steps", 2, "--batch-size", 4) == 0
    (tmp_path / "base.pt").unlink()  # full members hold every weight: the base is not needed to run them
    assert ensattr("sample", "--checkpoint", tmp_path / "tuned.pt", "--out", tmp_path / "r.h5", "--seeds", 2,
                   "--labels", "3,8", "--guidance", 1, "--sampling-steps", 3) == 0


def test_a_full_finetune_that_adds_classes_is_refused(finetune, tmp_path, capsys):
    _refused(capsys, ["train", "--plan", finetune / "plan.h5", "--out", tmp_path / "x.pt", "--base",
                      finetune / "base.pt", "--tune", "full", "--conditional", "--steps", 1],
             "--tune full keeps the base's 5 classes")
    assert not (tmp_path / "x.pt").exists()
