"""Each kind of fault has its own error class, the command line prints any of them as one line,
nothing changes a notebook's plotting backend, and the steps serve every member architecture
(``lds`` on a UNet checkpoint) and every results file (one without a plan asks for --data)."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast import errors
from ensattr_fast.attribution import get_method
from ensattr_fast.cli.main import main
from ensattr_fast.members import MemberOptions, build_members


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


def test_every_error_class_is_an_ensattr_error_and_a_value_error():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, ef.EnsattrError) and issubclass(cls, ValueError)
    assert len({getattr(errors, name) for name in errors.__all__}) == len(errors.__all__)


def test_each_fault_raises_its_own_class(tmp_path):
    with pytest.raises(errors.ArchitectureError, match="member architecture must be one of"):
        build_members(MemberOptions(arch="transformer"), 4, (1, 8, 8), True, 0)
    with pytest.raises(errors.ArchitectureError, match="sample_size"):
        build_members(MemberOptions(arch="diffusers", unet_config={"sample_size": 16}), 2, (1, 8, 8), True, 0)
    with pytest.raises(errors.MethodError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(errors.ConfigError, match="training mode"):
        ef.TrainConfig(mode="fastest")
    with pytest.raises(errors.ConfigError, match="eta"):
        ef.Sampler("ddim", 10, eta=2.0)


def test_a_plan_that_does_not_fit_its_data_is_a_data_error(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, (24, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "toy.npy", images)
    assert ensattr("plan", "--out", tmp_path / "plan.h5", "--data", tmp_path / "toy.npy", "--members", 8) == 0
    np.save(tmp_path / "toy.npy", images[:20])  # the data changed under the plan
    assert ensattr("train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "e.pt", "--steps", 1) == 2
    err = capsys.readouterr().err
    assert "the plan maps 24 examples but toy has 20" in err
    with pytest.raises(errors.DataError, match="the plan maps 24 examples"):
        ef.Audit(plan=tmp_path / "plan.h5", checkpoint=tmp_path / "e.pt").train(steps=1)


def test_the_command_line_prints_any_ensattr_error_as_one_line(monkeypatch, capsys, tmp_path):
    import ensattr_fast.cli.main as cli

    def refuse(*args):
        raise errors.StoreError("first line\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "report", refuse)
    assert ensattr("report", "--results", tmp_path / "r.h5", "--out", tmp_path / "r.png") == 2
    err = capsys.readouterr().err
    assert err == "ensattr report: error: first line second line\n"


def test_importing_the_package_leaves_the_plotting_backend_alone():
    code = ("import matplotlib; before = matplotlib.get_backend(); import ensattr_fast, ensattr_fast.cli.main, "
            "ensattr_fast.report.figures, ensattr_fast.steps; assert matplotlib.get_backend() == before, "
            "(before, matplotlib.get_backend()); print(before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lower() == "svg"


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """An 8-member UNet ensemble on 32 tiny images, sampled and attributed by loss."""
    d = tmp_path_factory.mktemp("unet")
    images = np.random.default_rng(1).integers(0, 255, (32, 1, 8, 8), dtype=np.uint8)
    np.save(d / "toy.npy", images)
    steps = [
        ["plan", "--out", d / "plan.h5", "--data", d / "toy.npy", "--members", 8],
        ["train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", "--arch", "unet", "--width", 8,
         "--steps", 2, "--batch-size", 4],
        ["sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", 3,
         "--sampling-steps", 2],
        ["attribute", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5", "--method", "loss",
         "--samples", 3, "--draws", 2, "--check", 1],
    ]
    for argv in steps:
        assert ensattr(*argv) == 0, argv
    return d


@pytest.mark.slow
def test_lds_trains_references_of_the_checkpoints_own_architecture(unet_run):
    d = unet_run
    assert ensattr("lds", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5", "--references",
                   d / "refs.pt", "--halves", 2, "--seeds", 1, "--steps", 1, "--draws", 4,
                   "--json", d / "lds.json") == 0
    table = json.loads((d / "lds.json").read_text())
    assert {"loss", "pixel_similarity", "pixel_nearest_10", "dtrak_one_model"} <= set(table)
    refs = ef.Checkpoint.load(d / "refs.pt")
    ensemble = ef.Checkpoint.load(d / "ensemble.pt")
    assert refs.spec["kind"] == "unet" and refs.spec["width"] == ensemble.spec["width"] == 8
    assert refs.spec["n_members"] == 2 and refs.spec["shared_init"] is False


def test_a_results_file_without_a_plan_asks_for_data(unet_run, tmp_path, capsys):
    results = tmp_path / "results.h5"
    results.write_bytes((unet_run / "results.h5").read_bytes())
    with h5py.File(results, "a") as f:
        del f.attrs["plan"]
    assert ensattr("report", "--results", results, "--out", tmp_path / "r.png") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not record its training data" in err and "--data" in err
    assert not (tmp_path / "r.png").exists()
    assert ensattr("report", "--results", results, "--out", tmp_path / "r.png", "--data", unet_run / "toy.npy") == 0
    assert (tmp_path / "r.png").stat().st_size > 0


def test_members_build_from_the_registry_as_before():
    # the registry builds exactly what the architectures' own constructors build
    a = build_members(MemberOptions(hidden=16, blocks=1), 3, (1, 8, 8), True, 5)
    b = ef.members.StackedMLP(3, (1, 8, 8), hidden=16, blocks=1, shared_init=True, seed=5)
    assert a.spec() == b.spec()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
