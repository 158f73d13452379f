"""``ef.Audit``: the command line and the object share one implementation (they write the same
files, bit for bit), every command reads its checkpoint once, options come from one place
(flags, config files and keywords are the same fields), and the object keeps what it read."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import ensattr_fast as ef
import ensattr_fast.training.checkpoint as checkpoint_module
from conftest import hdf5_items, same_value

from ensattr_fast.cli.main import main
from ensattr_fast.cli.parser import parse
from ensattr_fast.data import load_digits
from ensattr_fast.runtime.fields import leaves
from ensattr_fast.steps.options import STEP_OPTIONS

PLAN = ["--members", "6", "--design", "balanced"]
TRAIN = ["--steps", "20", "--batch-size", "8", "--hidden", "32", "--blocks", "1", "--lr", "3e-3"]
SAMPLE = ["--seeds", "4", "--sampling-steps", "5"]
ATTRIBUTE = ["--method", "first_order,loss,dtrak", "--samples", "3", "--check", "2", "--phantoms", "4",
             "--projection-dim", "64"]
ABLATE = ["--units", "0,5", "--samples", "2", "--phantoms", "3", "--overwrite"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("data") / "twelve.npy"
    np.save(where, load_digits().images[:12].numpy())
    return where


def _cli_run(folder: Path, data: Path) -> None:
    for argv in (["plan", "--out", "plan.h5", "--data", str(data), *PLAN],
                 ["train", "--plan", "plan.h5", "--out", "ensemble.pt", *TRAIN],
                 ["sample", "--checkpoint", "ensemble.pt", "--out", "results.h5", *SAMPLE],
                 ["attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5", *ATTRIBUTE],
                 ["ablate", "--checkpoint", "ensemble.pt", "--results", "results.h5", *ABLATE],
                 ["metrics", "--results", "results.h5", "--checkpoint", "ensemble.pt", "--samples", "2"]):
        assert main(argv) == 0, argv


def _audit_run(data: Path) -> ef.Audit:
    audit = ef.Audit.create(str(data), members=6, workdir=".", design="balanced", progress=False)
    audit.train(steps=20, batch_size=8, hidden=32, blocks=1, lr=3e-3)
    audit.sample(seeds=4, sampling_steps=5)
    audit.attribute(methods=["first_order", "loss", "dtrak"], samples=3, check=2, phantoms=4, projection_dim=64)
    audit.ablate([0, 5], samples=2, phantoms=3, overwrite=True)
    audit.metrics(samples=2)
    return audit


def _assert_equal(a, b, where: str) -> None:
    """Checkpoint payloads equal: tensors bit for bit, containers entry by entry."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_the_command_line_and_the_audit_write_identical_files(data, tmp_path, monkeypatch):
    for name, run in (("cli", lambda: _cli_run(tmp_path / "cli", data)), ("audit", lambda: _audit_run(data))):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        run()
    for name in ("plan.h5", "results.h5"):
        cli, audit = hdf5_items(tmp_path / "cli" / name), hdf5_items(tmp_path / "audit" / name)
        assert sorted(cli) == sorted(audit), (name, set(cli) ^ set(audit))
        differ = [key for key in cli if not same_value(cli[key], audit[key])]
        assert not differ, (name, differ)
        assert any(key.startswith("@options_") for key in cli), name  # the options are recorded, equally
    cli = torch.load(tmp_path / "cli" / "ensemble.pt", weights_only=True)
    audit = torch.load(tmp_path / "audit" / "ensemble.pt", weights_only=True)
    _assert_equal(cli, audit, "checkpoint")
    recorded = json.loads(cli["config"])["options"]
    assert (recorded["train"]["steps"] == 20 and recorded["architecture"]["hidden"] == 32
            and recorded["out"] == "ensemble.pt")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        audit = ef.Audit.create(str(data), members=6, workdir=".", units="clusters:3", design="sparse",
                                progress=False)  # group units, so that the audit runs too
        audit.train(steps=10, batch_size=8, hidden=32, blocks=1)
        audit.sample(seeds=4, sampling_steps=4)
    finally:
        os.chdir(cwd)
    return folder


@pytest.mark.parametrize("argv", [
    ["attribute", "--method", "first_order,loss", "--samples", "3", "--check", "2", "--phantoms", "3"],
    ["ablate", "--units", "1", "--phantoms", "2", "--overwrite"],
    ["audit", "--samples", "2", "--top-groups", "1", "--examples", "2", "--phantoms", "2", "--overwrite"],
    ["metrics", "--samples", "2"],
])
def test_every_command_reads_its_checkpoint_once(trained, tmp_path, monkeypatch, argv):
    results = tmp_path / "results.h5"
    results.write_bytes((trained / "results.h5").read_bytes())
    scans, hashes = [], []
    scan = checkpoint_module._scan
    monkeypatch.setattr(checkpoint_module, "_scan", lambda path: scans.append(path) or scan(path))
    import ensattr_fast.store.hdf5 as hdf5

    file_hash = hdf5.file_hash
    monkeypatch.setattr(hdf5, "file_hash", lambda path: hashes.append(path) or file_hash(path))
    assert main([*argv, "--checkpoint", str(trained / "ensemble.pt"), "--results", str(results)]) == 0
    assert [Path(p) for p in scans] == [trained / "ensemble.pt"] and not hashes


def test_the_checkpoints_hash_is_that_of_its_bytes(trained):
    import hashlib

    loaded = ef.Checkpoint.load(trained / "ensemble.pt")
    assert loaded.file_hash == hashlib.sha256((trained / "ensemble.pt").read_bytes()).hexdigest()
    with ef.open_results(trained / "results.h5") as r:
        assert r.attrs["checkpoint_hash"] == loaded.file_hash


def test_flags_config_files_and_keywords_are_the_same_options(tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text('members = 10\nseed = 3\n[train]\nsteps = 4\nbatch-size = 8\nno-clip = true\n'
                      '[attribute]\nmethod = ["loss", "dtrak"]\nphantoms = 7\n'.replace("no-clip = true\n", ""))
    loaded = ef.load_config(config)
    assert loaded["train"].train.steps == 4 and loaded["train"].train.seed == 3
    assert loaded["plan"].members == 10 and loaded["attribute"].methods == ("loss", "dtrak")
    assert loaded["attribute"].floor.phantoms == 7
    command = parse(["train", "--config", str(config), "--plan", "p.h5", "--out", "e.pt", "--steps", "6"])
    assert command.options.train.steps == 6 and command.options.train.batch_size == 8  # the flag wins
    audit = ef.Audit(config=config)
    assert audit._options(ef.TrainOptions, None, {"steps": 9}).train == ef.TrainConfig(steps=9, batch_size=8, seed=3)
    with pytest.raises(ef.ConfigError, match="--steps must be an integer"):
        audit._options(ef.TrainOptions, None, {"steps": 0})
    with pytest.raises(ef.ConfigError, match="no option 'stepz'"):
        audit._options(ef.TrainOptions, None, {"stepz": 9})


def test_every_option_is_one_field_with_its_flag_help_and_range():
    for step, cls in STEP_OPTIONS.items():
        flags = [leaf.flag for leaf in leaves(cls)]
        assert len(flags) == len(set(flags)), step
        for leaf in leaves(cls):
            assert leaf.option.help, (step, leaf.flag)
            if leaf.default is not None and leaf.option.convert is None:
                assert leaf.option.kind.parse(leaf.default) == leaf.default, (step, leaf.flag)
    with pytest.raises(ef.ConfigError, match="attribute: topk must be an integer"):
        ef.AttributeOptions(topk=0)
    with pytest.raises(ef.ConfigError, match="seeds"):
        ef.SampleOptions(seeds=[1, 1])


def test_the_audit_keeps_what_it_read(trained, monkeypatch):
    audit = ef.Audit.open(trained)
    first = audit.samples()
    assert first.images.shape == (4, 1, 8, 8) and first.seeds == [0, 1, 2, 3]
    reads = []
    import ensattr_fast.steps.session as session

    monkeypatch.setattr(session, "read_samples", lambda *a, **k: reads.append(a) or (_ for _ in ()).throw(
        AssertionError("read again")))
    again = audit.samples(2)
    assert torch.equal(again.images, first.images[:2]) and not reads
    assert audit.checkpoint is audit.checkpoint
