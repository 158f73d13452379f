"""A planted copy found in a member: a member that saw a canary (a digit mirrored, many copies)
draws it, ``ensattr memorization`` finds the copy and proves it by exact ablation (the
counterfactual leaves the canary, beyond the phantom floor); the members that never saw the
canary draw no copy of it."""

import dataclasses

import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.data import Dataset, load_data, load_digits, plant_canaries, units_for
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.errors import CodeError, DataError
from ensattr_fast.evaluation.lds import train_full_model
from ensattr_fast.evaluation.memorization import parse_generator, random_subsets
from ensattr_fast.members import MemberOptions
from ensattr_fast.store import read_memorization
from ensattr_fast.training import TrainConfig
from ensattr_fast.training.checkpoint import Checkpoint

MEMBERS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """16 digits and one canary of 32 copies (17 units), 10 MLP members, through the steps."""
    work = tmp_path_factory.mktemp("memorization")
    digits = load_digits()
    planted = plant_canaries(Dataset(digits.images[:16], digits.labels[:16], "16 digits"), canaries=1, copies=32)
    save_canaries(work / "data.npz", work / "groups.csv", planted)
    assert main(["plan", "--out", str(work / "plan.h5"), "--data", str(work / "data.npz"), "--units", "group",
                 "--metadata", str(work / "groups.csv"), "--members", str(MEMBERS), "--design", "balanced"]) == 0
    config = TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup=20, ema_decay=None, seed=0)
    ef.Audit(plan=work / "plan.h5", checkpoint=work / "ensemble.pt", progress=False).train(
        ef.TrainOptions(train=config, architecture=MemberOptions(hidden=128, blocks=1)))
    code = Checkpoint.load(work / "ensemble.pt").code
    return work, planted.units[0], code


def test_plant_canaries_makes_one_unit_per_canary():
    digits = load_digits()
    planted = plant_canaries(Dataset(digits.images[:40], digits.labels[:40], "40"), canaries=2, copies=5, seed=3)
    units = units_for(planted.data, "group")
    assert len(planted.data) == 50 and planted.units == (40, 41)
    assert units.names[40:] == ("canary 0", "canary 1") and units.sizes[40:].tolist() == [5, 5]
    assert torch.equal(units.unit_of[:40], torch.arange(40))
    mirrored = digits.images[list(planted.sources)].flip(-1)
    assert torch.equal(planted.data.images[40::5], mirrored)
    with pytest.raises(DataError):
        plant_canaries(Dataset(digits.images[:4]), canaries=5)


def test_a_planted_copy_found_in_a_member(trained, capsys):
    work, canary, code = trained
    member = int(torch.nonzero(code[canary])[0])
    out = work / "member.h5"
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(out), "--generator",
                 f"member:{member}", "--seeds", "24", "--sampling-steps", "20"]) == 0
    line = capsys.readouterr().out
    assert " of 24 samples are near-copies (< 1) of a training unit; " in line and line.count("\n") == 1
    found = read_memorization(out)
    copies = (found["is_copy"] == 1) & (found["nearest_unit"] == canary)
    assert copies.sum() >= 4, found["nearest_distance"]
    assert found["floor"].shape == (24, 64) and found["images"].shape == (24, 1, 8, 8)
    assert found["attrs"]["generator"]["spec"] == f"member:{member}"
    # each copy's counterfactual (the canary's excluders, same noise) leaves the canary ...
    assert (found["proof_distance"][copies] >= 1.0).all()
    assert (found["moved"][copies] > np.nanmedian(found["floor"][copies], 1)).all()
    # ... and is proven against the phantom floor
    # (6 of 8 here: with 10 members some phantoms keep a single includer and land as far)
    assert found["proven"][copies].mean() >= 0.6, (found["pvalue"][copies], found["qvalue"][copies])
    assert (found["proven"] == 1).sum() >= 4 and not found["proven"][~copies].any()
    assert np.isnan(found["proof_images"][found["is_copy"] == 0]).all()


def test_the_excluders_draw_no_copy_of_the_canary(trained):
    work, canary, code = trained
    excluders = ",".join(str(int(m)) for m in torch.nonzero(code[canary] == 0).flatten())
    arrays = ef.Audit(checkpoint=work / "ensemble.pt").memorization(
        work / "excluders.h5", generator=f"members:{excluders}", seeds=range(24), threshold=1.0, phantoms=8).arrays
    assert not ((arrays["is_copy"] == 1) & (arrays["nearest_unit"] == canary)).any()
    assert (arrays["nearest_unit"] != canary).mean() >= 0.9


def test_no_file_replaced_without_overwrite(trained, capsys):
    work, _, _ = trained
    argv = ["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "again.h5"),
            "--seeds", "2", "--sampling-steps", "2", "--phantoms", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("value", ["member:", "member:1,2", "members:1,1", "members:-1", "all", "member:x", ""])
def test_the_cli_refuses_bad_generators_in_one_line(trained, capsys, value):
    work, _, _ = trained
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "bad.h5"),
                 "--generator", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensattr memorization: error: ") and err.count("\n") == 1
    assert not (work / "bad.h5").exists()


def test_members_the_checkpoint_lacks_are_refused(trained, capsys):
    work, _, _ = trained
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "bad.h5"),
                 "--generator", f"members:0,{MEMBERS}"]) == 2
    assert f"member {MEMBERS} is out of range" in capsys.readouterr().err
    assert not (work / "bad.h5").exists()


def test_generators_and_phantom_subsets():
    assert parse_generator(" members:3, 1").members == (3, 1)
    assert parse_generator("full").members is None
    with pytest.raises(CodeError):
        parse_generator("member:1,2")
    subsets = random_subsets(range(6), 3, 50, avoid=[(0, 1, 2)], seed=1)
    assert len(subsets) == 19 and (0, 1, 2) not in subsets and len(set(subsets)) == 19
    assert random_subsets(range(16), 8, 5, avoid=[], seed=2) == random_subsets(range(16), 8, 5, avoid=[], seed=2)


def test_another_model_as_generator_is_proven_by_the_ensemble(trained, capsys):
    work, canary, code = trained
    ensemble = Checkpoint.load(work / "ensemble.pt")
    full = train_full_model(work / "full.pt", load_data(ensemble.data_source), ensemble.unit_of, len(code),
                            TrainConfig(steps=20, batch_size=16, warmup=5, ema_decay=None), ensemble.spec,
                            progress=False)
    # every sample a "copy" at this threshold: each proof runs on the ensemble's excluders
    arrays = ef.Audit(checkpoint=work / "ensemble.pt").memorization(
        work / "other.h5", generator="full", seeds=range(3), threshold=50.0, generator_checkpoint=work / "full.pt",
        phantoms=4).arrays
    assert arrays["is_copy"].all() and np.isfinite(arrays["proof_distance"]).all()
    assert arrays["floor"].shape == (3, 4) and np.isfinite(arrays["pvalue"]).all()
    assert read_memorization(work / "other.h5")["attrs"]["generator"]["checkpoint"] == str(work / "full.pt")
    other = dataclasses.replace(full, data_fingerprint="0" * 64)
    other.save(work / "elsewhere.pt")
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "x.h5"),
                 "--generator-checkpoint", str(work / "elsewhere.pt")]) == 2
    assert "trained on other data" in capsys.readouterr().err
