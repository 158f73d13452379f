"""Nothing lost: one writer per file, no output written over an existing file or an input, a
group of datasets replaced whole, and every long step resumed after a SIGKILL at a random
moment by the same command, as a user runs it (subprocesses, default options), ending with the
files of an uninterrupted run, dataset by dataset."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ensattr_fast.cli.main import main
from ensattr_fast.runtime.files import holder

TRAIN = ["--steps", "30", "--hidden", "32", "--blocks", "1", "--batch-size", "16"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


def spawn(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ensattr_fast", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_datasets(a, b) -> None:
    x, y = datasets(a), datasets(b)
    assert sorted(x) == sorted(y)
    for name in x:
        same = x[name].dtype == y[name].dtype and x[name].shape == y[name].shape and (
            np.array_equal(x[name], y[name], equal_nan=x[name].dtype.kind == "f"))
        assert same, name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """plan.h5 and ensemble.pt of 40 small images under a code of 8 members, and results.h5
    with 6 samples."""
    d = tmp_path_factory.mktemp("nothing_lost")
    np.save(d / "toy.npy", np.random.default_rng(3).integers(0, 255, (40, 1, 8, 8), dtype=np.uint8))
    assert ensattr("plan", "--out", d / "plan.h5", "--data", d / "toy.npy", "--members", 8) == 0
    assert ensattr("train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", *TRAIN) == 0
    assert ensattr("sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", 6,
                   "--sampling-steps", 10) == 0
    return d


@pytest.fixture
def files(run, tmp_path):
    for name in ("toy.npy", "plan.h5", "ensemble.pt", "results.h5"):
        shutil.copy(run / name, tmp_path / name)
    return tmp_path


# ------------------------------------------------------- 1. a second writer is refused


def test_a_second_writer_is_refused_while_attribute_writes(files, capsys):
    results = files / "results.h5"
    attribute = spawn("attribute", "--checkpoint", files / "ensemble.pt", "--results", results, "--method",
                      "first_order,direct,loss", "--block-rows", 1, "--block-units", 1, "--check", 0)
    deadline = time.monotonic() + 60
    while holder(results) is None:
        assert attribute.poll() is None and time.monotonic() < deadline, attribute.stderr.read()
        time.sleep(0.01)
    # what `ensattr sample --resume` did on d7851f2: recover the file of a "killed" writer and
    # replace it, while attribute went on writing into the old one
    assert ensattr("sample", "--checkpoint", files / "ensemble.pt", "--out", results, "--resume", "--seeds", 6,
                   "--sampling-steps", 10) == 2
    err = capsys.readouterr().err
    assert f"is being written by process {attribute.pid} (ensattr attribute)" in err, err
    assert attribute.wait(timeout=300) == 0, attribute.stderr.read()
    with h5py.File(results, "r") as f:
        for method in ("first_order", "direct", "loss"):
            assert f[f"progress/{method}"][()].all() and f[f"progress/{method}_topk"][()].all(), method
            assert np.isfinite(f[f"influence/{method}"][()]).all(), method
    assert holder(results) is None  # the lock went with its writer


# ------------------------------------- 2. a group of datasets is replaced as a whole


def test_ablate_after_attribute_replaces_the_whole_counterfactuals_group(files, capsys):
    results = files / "results.h5"
    assert ensattr("attribute", "--checkpoint", files / "ensemble.pt", "--results", results, "--method",
                   "first_order,loss", "--samples", 4, "--check", 3) == 0
    with h5py.File(results, "r") as f:
        assert {"predicted_first_order", "predicted_loss"} <= set(f["counterfactuals"])
    before = digest(results)
    assert ensattr("ablate", "--checkpoint", files / "ensemble.pt", "--results", results, "--units", "0,1") == 2
    assert "already holds counterfactuals (of `ensattr attribute`); pass --overwrite" in capsys.readouterr().err
    assert digest(results) == before
    assert ensattr("ablate", "--checkpoint", files / "ensemble.pt", "--results", results, "--units", "0,1",
                   "--overwrite") == 0
    with h5py.File(results, "r") as f:
        assert sorted(f["counterfactuals"]) == ["distance", "floor_code", "floor_distance", "images", "pvalue",
                                                "qvalue", "significant", "units",
                                                "zscore"]  # no predictions of other units
        assert f["counterfactuals/units"].shape == (6, 2)
    assert ensattr("metrics", "--results", results) == 0  # it died with a broadcasting error on d7851f2


# ----------------------------------------- 3. and 4. outputs over files and over inputs


def test_train_refuses_an_existing_checkpoint_and_its_own_plan(files, capsys):
    checkpoint, plan = files / "ensemble.pt", files / "plan.h5"
    kept = {path: digest(path) for path in (checkpoint, plan)}
    assert ensattr("train", "--plan", plan, "--out", checkpoint, *TRAIN) == 2
    assert f"--out {checkpoint} exists; pass --overwrite to replace it or --resume to continue it" in (
        capsys.readouterr().err)
    assert ensattr("train", "--plan", plan, "--out", plan, *TRAIN, "--overwrite") == 2
    assert f"--out {plan} is also the --plan this step reads" in capsys.readouterr().err
    assert {path: digest(path) for path in kept} == kept
    assert ensattr("train", "--plan", plan, "--out", checkpoint, *TRAIN, "--overwrite") == 0


@pytest.mark.parametrize("output", ["results.h5", "ensemble.pt"])
def test_metrics_json_never_writes_over_an_input(files, capsys, output):
    results = files / "results.h5"
    kept = {path: digest(path) for path in (results, files / "ensemble.pt")}
    assert ensattr("metrics", "--results", results, "--checkpoint", files / "ensemble.pt", "--json",
                   files / output, "--overwrite") == 2
    assert f"--json {files / output} is also the --" in capsys.readouterr().err
    assert {path: digest(path) for path in kept} == kept


def test_json_and_png_outputs_are_refused_when_they_exist(files, capsys):
    (files / "m.json").write_text("keep me")
    assert ensattr("metrics", "--results", files / "results.h5", "--json", files / "m.json") == 2
    assert (files / "m.json").read_text() == "keep me"
    assert ensattr("metrics", "--results", files / "results.h5", "--json", files / "m.json", "--overwrite") == 0
    assert (files / "m.json").read_text().startswith("{")
    assert not [p for p in files.iterdir() if p.name.startswith(".m.json")]  # no temporary file left


# --------------------------------------------- 5. resume after SIGKILL, as users run it


def _killed_then_rerun(argv, started, seed, rerun_extra=()):
    """Start ``ensattr argv``, SIGKILL it at a random moment after ``started()`` holds, then
    run the same command (plus ``rerun_extra``) until it succeeds; returns the kills made."""
    chance, kills = random.Random(seed), 0
    for _ in range(3):
        process = spawn(*argv, *(rerun_extra if kills else ()))
        deadline = time.monotonic() + 120
        while not started() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(chance.uniform(0.0, 2.0))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert ensattr(*argv, *rerun_extra) == 0
    return kills


def _flags(path, name):
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return f[name][()] if name in f else None
    except OSError:
        return None


@pytest.mark.slow
def test_attribute_killed_at_random_moments_resumes_by_the_same_command(files):
    whole = files / "whole.h5"
    shutil.copy(files / "results.h5", whole)
    argv = ["attribute", "--checkpoint", files / "ensemble.pt", "--results"]  # default options
    assert ensattr(*argv, whole) == 0
    killed = files / "results.h5"
    kills = _killed_then_rerun([*argv, killed], lambda: holder(killed) is not None, 11)
    assert kills >= 1
    assert_same_datasets(whole, killed)
    assert ensattr(*argv, killed) == 0  # a plain re-run on the finished file is no error and changes nothing
    assert_same_datasets(whole, killed)


@pytest.mark.slow
def test_sample_killed_at_random_moments_resumes_with_resume(files):
    argv = ["sample", "--checkpoint", files / "ensemble.pt", "--seeds", 300, "--chunk", 4, "--out"]
    assert ensattr(*argv, files / "whole.h5") == 0
    killed = files / "killed.h5"
    assert _killed_then_rerun([*argv, killed], lambda: holder(killed) is not None, 12, rerun_extra=("--resume",)) >= 1
    assert_same_datasets(files / "whole.h5", killed)


@pytest.mark.slow
def test_ablate_killed_at_a_random_moment_is_run_again(files):
    whole = files / "whole.h5"
    shutil.copy(files / "results.h5", whole)
    argv = ["ablate", "--checkpoint", files / "ensemble.pt", "--results"]  # default: the 4 nearest units
    assert ensattr(*argv, whole) == 0
    killed = files / "results.h5"
    process = spawn(*argv, killed)
    time.sleep(random.Random(13).uniform(0.5, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    extra = ["--overwrite"] if _flags(killed, "counterfactuals/units") is not None else []
    assert ensattr(*argv, killed, *extra) == 0
    assert_same_datasets(whole, killed)


# --------------------------------------------------------------------- 6. security


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_could_run_code_is_refused_in_our_words(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"format": "ensattr_fast.checkpoint/1", "spec": _RunsCode()}, tmp_path / "evil.pt")
    assert ensattr("sample", "--checkpoint", tmp_path / "evil.pt", "--out", tmp_path / "r.h5") == 2
    err = capsys.readouterr().err
    assert "holds Python objects other than tensors and plain values; ensattr_fast never loads those" in err
    assert "weights_only" not in err and "trust" not in err  # no hint to load it unsafely
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "r.h5").exists()


def test_outputs_go_into_folders_that_do_not_exist_yet(files):
    new = files / "new" / "deeper"
    assert ensattr("plan", "--out", new / "plan.h5", "--data", files / "toy.npy", "--members", 8) == 0
    assert ensattr("train", "--plan", new / "plan.h5", "--out", new / "a" / "e.pt", "--steps", 1, "--hidden", 8,
                   "--blocks", 1) == 0
    assert ensattr("sample", "--checkpoint", new / "a" / "e.pt", "--out", new / "b" / "r.h5", "--seeds", 1,
                   "--sampling-steps", 2) == 0
    assert ensattr("metrics", "--results", new / "b" / "r.h5", "--json", new / "c" / "m.json") == 0
    assert sorted(p.name for p in new.rglob("*") if p.is_file()) == ["e.pt", "m.json", "plan.h5", "r.h5"]
