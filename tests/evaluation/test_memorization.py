"""A planted copy found in a member: a member that saw a canary (a digit mirrored, many copies)
draws it, ``ensattr memorization`` finds the copy and proves it by exact ablation (the
counterfactual leaves the canary, beyond the phantom floor); the members that never saw the
canary draw no copy of it."""

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.data import Dataset, load_data, load_digits, plant_canaries, units_for
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.errors import CodeError, DataError
from ensattr_fast.evaluation.lds import train_full_model
from ensattr_fast.evaluation.memorization import REASONS, parse_generator, proof_pool, random_subsets
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
    assert " of 24 samples are near-copies (< 1) of training units; " in line and line.count("\n") == 1
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
    # the embedding sends every image to one point: each sample copies every unit, and no member
    # excludes them all (the ensemble path itself: test_proof_pools_remove_every_copied_unit)
    sys.modules["planted_embedding"] = types.SimpleNamespace(embed=lambda x: 100.0 * (x.flatten(1)[:, :1] > 9))
    arrays = ef.Audit(checkpoint=work / "ensemble.pt").memorization(
        work / "other.h5", generator="full", seeds=range(3), threshold=1.0, generator_checkpoint=work / "full.pt",
        phantoms=4, embed="planted_embedding:embed").arrays
    assert arrays["is_copy"].all() and (arrays["copied_units"] >= 0).sum(1).tolist() == [len(code)] * 3
    assert (arrays["reason"] == REASONS.index("no member excludes every copied unit")).all()
    assert not arrays["proven"].any() and np.isnan(arrays["proof_distance"]).all()
    found = read_memorization(work / "other.h5")
    assert found["attrs"]["generator"]["checkpoint"] == str(work / "full.pt")
    assert found["attrs"]["reasons"] == list(REASONS) and found["attrs"]["embed"] == "planted_embedding:embed"
    other = dataclasses.replace(full, data_fingerprint="0" * 64)
    other.save(work / "elsewhere.pt")
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "x.h5"),
                 "--generator-checkpoint", str(work / "elsewhere.pt")]) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_proof_pools_remove_every_copied_unit():
    code = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.uint8)
    full = torch.full((4,), 0.25, dtype=torch.float64)
    assert proof_pool(full, code, code, [0]) == ("generator", [0, 1, 2, 3], [2, 3])
    assert proof_pool(full, code, code, [0, 1]) == ("generator", [0, 1, 2, 3], [3])  # excluded both
    assert proof_pool(full, code, code, [1, 2]) == ("none", [0, 1, 2, 3], [])  # no member excludes both
    member0 = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    assert proof_pool(member0, code, code, [0, 3]) == ("ensemble", [0, 1, 2, 3], [3])  # it saw them: E_0 & E_3
    assert proof_pool(member0, code, code, [1]) == ("never", [0], [])  # member 0 never trained on unit 1
    everything = torch.ones_like(code)  # another model, trained on every unit
    assert proof_pool(torch.ones(1, dtype=torch.float64), everything[:, :1], code, [0]) == \
        ("ensemble", [0, 1, 2, 3], [2, 3])


def test_pixels_and_an_identity_embedding_give_the_same_proofs(trained):
    work, canary, code = trained
    member = int(torch.nonzero(code[canary])[0])
    sys.modules["identity_embedding"] = types.SimpleNamespace(embed=lambda x: 2.0 * x.flatten(1))
    audit = ef.Audit(checkpoint=work / "ensemble.pt")
    common = dict(generator=f"member:{member}", seeds=range(6), phantoms=8, sampling_steps=20)
    pixels = audit.memorization(work / "pixels.h5", threshold=1.0, **common).arrays
    embedded = audit.memorization(work / "embedded.h5", threshold=2.0, embed="identity_embedding:embed",
                                  **common).arrays
    assert pixels["is_copy"].any()
    for key in ("is_copy", "copied_units", "proven", "reason"):
        assert np.array_equal(pixels[key], embedded[key]), key
    np.testing.assert_allclose(2 * pixels["proof_distance"], embedded["proof_distance"], rtol=1e-4)
    with pytest.raises(DataError, match="--embed no_such_module:f: cannot import it"):
        audit.memorization(work / "bad.h5", embed="no_such_module:f", **common)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    """The trained fixture's data planned one unit per image (the canary's 32 copies scattered
    over 32 units, kept there), 10 members."""
    work = tmp_path_factory.mktemp("scattered")
    digits = load_digits()
    planted = plant_canaries(Dataset(digits.images[:16], digits.labels[:16], "16 digits"), canaries=1, copies=32)
    save_canaries(work / "data.npz", work / "groups.csv", planted)
    assert main(["plan", "--out", str(work / "plan.h5"), "--data", str(work / "data.npz"), "--duplicates", "keep",
                 "--members", str(MEMBERS), "--design", "balanced"]) == 0
    config = TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup=20, ema_decay=None, seed=0)
    ef.Audit(plan=work / "plan.h5", checkpoint=work / "ensemble.pt", progress=False).train(
        ef.TrainOptions(train=config, architecture=MemberOptions(hidden=128, blocks=1)))
    return work, Checkpoint.load(work / "ensemble.pt").code


def test_scattered_copies_say_why_they_are_not_proven(scattered, capsys):
    work, code = scattered
    member = int(code[16:].sum(0).argmax())  # the member that saw the most copies of the canary
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "m.h5"),
                 "--generator", f"member:{member}", "--seeds", "48", "--sampling-steps", "20",
                 "--phantoms", "8"]) == 0
    line = capsys.readouterr().out
    found = read_memorization(work / "m.h5")
    copies = found["is_copy"] == 1
    assert copies.sum() >= 3, line
    copied = found["copied_units"][copies]
    assert ((copied >= 16).sum(1) >= 16).all()  # every copy is a copy of many of the canary's units
    # the member saw some of them, and no member excluded them all: no counterfactual exists
    assert (found["reason"][copies] == REASONS.index("no member excludes every copied unit")).all()
    assert f"not proven: {copies.sum()} no member excludes every copied unit" in line


def test_the_null_check_proves_non_copies_against_their_nearest_unit(trained, capsys):
    work, canary, code = trained
    excluders = ",".join(str(int(m)) for m in torch.nonzero(code[canary] == 0).flatten())
    assert main(["memorization", "--checkpoint", str(work / "ensemble.pt"), "--out", str(work / "null.h5"),
                 "--generator", f"members:{excluders}", "--seeds", "8", "--sampling-steps", "10",
                 "--phantoms", "8", "--null-check", "--statistic", "floor"]) == 0
    line = capsys.readouterr().out
    found = read_memorization(work / "null.h5")
    clean = found["is_copy"] == 0
    assert clean.sum() >= 6
    assert np.isfinite(found["pvalue"][clean]).all() and np.isfinite(found["pvalue_trend"][clean]).all()
    assert np.array_equal(found["pvalue"], found["pvalue_floor"], equal_nan=True)  # --statistic floor
    assert not found["proven"][clean].any() and (found["reason"][clean] == REASONS.index("not a copy")).all()
    assert f"null check: {found['false_flag'].sum()} of {clean.sum()} non-copies pass" in line
    assert found["attrs"]["null_check"] is True and found["attrs"]["statistic"] == "floor"


@pytest.mark.parametrize("kind,transform", [("upside_down", lambda x: x.flip(-2)), ("rotate", lambda x: x.rot90(
    1, (-2, -1))), ("negative", lambda x: -x), ("transpose", lambda x: x.transpose(-1, -2))])
def test_canaries_of_other_kinds(kind, transform):
    digits = load_digits()
    planted = plant_canaries(Dataset(digits.images[:60], digits.labels[:60], "60"), canaries=2, copies=3,
                             kinds=("mirror", kind), min_distance=2.0)
    sources = list(planted.sources)
    assert len(set(sources)) == 2
    assert torch.equal(planted.data.images[60], digits.images[sources[0]].flip(-1))
    assert torch.equal(planted.data.images[63:66], transform(digits.images[sources[1]])[None].expand(3, -1, -1, -1))
    with pytest.raises(DataError, match="canary kinds must be among"):
        plant_canaries(Dataset(digits.images[:60]), kinds=("blur",))



def test_the_planted_null_proves_non_copies_against_units_drawn_apart_from_them(trained, capsys):
    work, canary, code = trained
    excluders = ",".join(str(int(m)) for m in torch.nonzero(code[canary] == 0).flatten())
    args = ["memorization", "--checkpoint", str(work / "ensemble.pt"), "--generator", f"members:{excluders}",
            "--seeds", "8", "--sampling-steps", "10", "--phantoms", "8", "--null-check"]
    assert main(args + ["--out", str(work / "nearest.h5")]) == 0
    assert main(args + ["--out", str(work / "planted.h5"), "--null-target", "planted"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    nearest, planted = read_memorization(work / "nearest.h5"), read_memorization(work / "planted.h5")
    clean = planted["is_copy"] == 0
    assert clean.sum() >= 6 and np.array_equal(nearest["is_copy"], planted["is_copy"])
    assert np.array_equal(nearest["null_units"][clean], nearest["nearest_unit"][clean])
    assert (planted["null_units"][clean] >= 0).all() and (planted["null_units"][~clean] == -1).all()
    # units drawn at random, not the samples' nearest: the proofs are of other units
    assert (planted["null_units"][clean] != planted["nearest_unit"][clean]).mean() > 0.5
    # tested wherever some generating member saw the unit (the others have nothing to remove)
    assert np.isfinite(planted["pvalue"][clean]).sum() >= 3 and not planted["proven"][clean].any()
    assert "a planted near-copy's units" in line and planted["attrs"]["null_target"] == "planted"
