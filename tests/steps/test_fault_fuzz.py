"""The fault fuzzer. Every writing command runs on a small filesystem and meets a fault at a
random moment: the disk fills up (ENOSPC), the filesystem turns read-only (EROFS), or the
process is killed (SIGKILL). Then the same command runs again once the fault is gone, and must
end with the files of an uninterrupted run, dataset by dataset, or refuse a damaged file in one
line (and, the file restored, give those files). Never a traceback, a stale lock, a temporary
file left beside the outputs, or a result that differs silently. Then every reading command
meets damaged inputs (truncated, bit-flipped, hand-edited HDF5 and checkpoints): one line, no
traceback, no input changed.

The faults need a small tmpfs, so root; skipped where none can be mounted."""

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import hdf5_items, same_value

from ensattr_fast.cli.main import main
from ensattr_fast.data import load_digits

SIZE_MB = 24
TRAIN = ["--hidden", "32", "--blocks", "1", "--batch-size", "8"]
#: every writing command, run from the disk's folder with relative paths; sample and train
#: continue their output by --resume, so the same command is what runs again
COMMANDS = {
    "plan": ["plan", "--out", "p2.h5", "--data", "{data}", "--members", "8"],
    "train": ["train", "--plan", "plan.h5", "--out", "e2.pt", "--steps", "200", "--checkpoint-every", "50",
              "--resume", *TRAIN],
    "sample": ["sample", "--checkpoint", "ensemble.pt", "--out", "r2.h5", "--seeds", "600", "--chunk", "50",
               "--sampling-steps", "10", "--resume"],
    "attribute": ["attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--samples", "16",
                  "--block-rows", "4", "--block-units", "8", "--check", "2", "--phantoms", "3",
                  "--projection-dim", "64"],
    "ablate": ["ablate", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--units", "1,7",
               "--phantoms", "3", "--samples", "8"],
    "audit": ["audit", "--checkpoint", "groups.pt", "--results", "grouped.h5", "--samples", "4", "--top-groups", "2",
              "--examples", "3", "--phantoms", "3"],
    "metrics": ["metrics", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--samples", "4",
                "--json", "m.json"],
    "lds": ["lds", "--checkpoint", "ensemble.pt", "--results", "checked.h5", "--references", "refs.pt",
            "--halves", "2", "--seeds", "1", "--steps", "20", "--draws", "4", "--json", "lds.json"],
    "memorization": ["memorization", "--checkpoint", "ensemble.pt", "--out", "copies.h5", "--seeds", "24",
                     "--sampling-steps", "6", "--phantoms", "4", "--threshold", "50"],
    "report": ["report", "--results", "checked.h5", "--out", "report.png"],
}
OUTPUTS = {"plan": ["p2.h5"], "train": ["e2.pt"], "sample": ["r2.h5"], "attribute": ["results.h5"],
           "ablate": ["results.h5"], "audit": ["grouped.h5"], "metrics": ["m.json", "results.h5"],
           "lds": ["lds.json", "refs.pt", "checked.h5"], "memorization": ["copies.h5"],
           "report": ["report.png", "report.html"]}
INPUTS = ("plan.h5", "ensemble.pt", "results.h5", "checked.h5", "groups.pt", "grouped.h5")
#: commands whose outputs appear whole or not at all (renamed into place)
ATOMIC = {"plan", "memorization", "report"}
#: random moments per fault: the full disk is the one that most often leaves a damaged file
TRIALS = {"full": 2, "readonly": 1, "kill": 1}


def _cli(argv, cwd):
    env = dict(os.environ, ENSATTR_PROGRESS="off", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ensattr_fast", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def _remount(folder: Path, mode: str) -> bool:
    """Whether the folder's filesystem was remounted ``mode``. The kernel can refuse a remount
    read-only for a moment (busy, on a loaded machine): tried for up to about 2 s; the trial
    then goes on without its fault, the outputs still compared."""
    for _ in range(20):
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], capture_output=True).returncode == 0:
            return True
        time.sleep(0.1)
    if mode == "rw":
        raise RuntimeError(f"{folder} stays read-only")
    return False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The inputs every command reads, made on the ordinary disk."""
    where = tmp_path_factory.mktemp("inputs")
    np.save(where / "forty.npy", load_digits().images[:40].numpy())
    cwd = os.getcwd()
    os.chdir(where)
    try:
        for argv in (["plan", "--out", "plan.h5", "--data", str(where / "forty.npy"), "--members", "8"],
                     ["train", "--plan", "plan.h5", "--out", "ensemble.pt", "--steps", "30", *TRAIN],
                     ["sample", "--checkpoint", "ensemble.pt", "--out", "results.h5", "--seeds", "16",
                      "--sampling-steps", "6"],
                     ["plan", "--out", "gplan.h5", "--data", str(where / "forty.npy"), "--members", "8",
                      "--units", "clusters:4", "--design", "sparse"],
                     ["train", "--plan", "gplan.h5", "--out", "groups.pt", "--steps", "20", *TRAIN],
                     ["sample", "--checkpoint", "groups.pt", "--out", "grouped.h5", "--seeds", "4",
                      "--sampling-steps", "4"]):
            assert main(argv) == 0, argv
        shutil.copy("results.h5", "checked.h5")
        assert main(["attribute", "--checkpoint", "ensemble.pt", "--results", "checked.h5", "--samples", "4",
                     "--method", "first_order,loss", "--check", "2", "--phantoms", "2"]) == 0
    finally:
        os.chdir(cwd)
    return where


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    where = tmp_path_factory.mktemp("disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no small filesystem can be mounted here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fresh(folder: Path, inputs: Path) -> None:
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in INPUTS:
        shutil.copy(inputs / name, folder / name)


def _argv(command: str, inputs: Path) -> list:
    return [a.format(data=inputs / "forty.npy") for a in COMMANDS[command]]


def _tensors(value, where=""):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _tensors(inner, f"{where}/{key}")


def _assert_same_outputs(reference: Path, ours: Path, names: list) -> None:
    for name in names:
        a, b = reference / name, ours / name
        assert b.exists(), name
        if name.endswith(".h5"):
            want, got = hdf5_items(a, ("versions",)), hdf5_items(b, ("versions",))
            assert sorted(want) == sorted(got), (name, set(want) ^ set(got))
            differ = [k for k in want if not same_value(want[k], got[k])]
            assert not differ, (name, differ)
        elif name.endswith(".pt"):
            want, got = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert want["step"] == got["step"] and want["config"] == got["config"], name
            mine = dict(_tensors(got))
            for key, value in _tensors(want):
                assert torch.equal(value, mine[key]), (name, key)
        elif name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".lock") or ".tmp" in p.name)


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict:
    """Each command's outputs from an uninterrupted run, and how long it took."""
    found = {}
    for command in COMMANDS:
        folder = tmp_path_factory.mktemp(f"reference-{command}")
        _fresh(folder, inputs)
        start = time.monotonic()
        run = _cli(_argv(command, inputs), folder)
        assert run.wait(timeout=600) == 0, run.stderr.read()
        found[command] = (folder, time.monotonic() - start)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(TRIALS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_fault_at_any_moment_then_the_same_command(command, fault, inputs, disk, references):
    reference, took = references[command]
    chance = random.Random(f"{command}-{fault}")
    for trial in range(TRIALS[fault]):
        _fresh(disk, inputs)
        run = _cli(_argv(command, inputs), disk)
        time.sleep(chance.uniform(0.3, max(0.4, took)))
        filler, readonly = None, False
        if fault == "full":
            filler = _fill(disk)
        elif fault == "readonly":
            readonly = _remount(disk, "ro")
        else:
            run.send_signal(signal.SIGKILL)
        code = run.wait(timeout=600)
        err = run.stderr.read()
        if filler is not None:
            filler.unlink()
        if readonly:
            _remount(disk, "rw")
        if fault != "kill":
            assert code in (0, 2) and "Traceback" not in err, (trial, code, err[-3000:])
            if code == 2:
                assert err.strip().splitlines()[-1].startswith(f"ensattr {command}: error: "), err[-2000:]
            assert not _leftovers(disk), (trial, _leftovers(disk), err[-2000:])
        whole = all((disk / name).exists() for name in OUTPUTS[command])
        if code != 0 and not (fault == "kill" and whole and command in ATOMIC):
            # stopped by the fault: the same command again, once the fault is gone (a kill after an
            # atomic output appeared leaves it whole: it is compared as it is)
            again = _cli(_argv(command, inputs), disk)
            code, err = again.wait(timeout=600), again.stderr.read()
            if code == 2 and "damaged" in err:  # refused in one line, never half reused
                assert err.count("\n") == 1, err
                _fresh(disk, inputs)  # the user restores (or makes again) the damaged file
                again = _cli(_argv(command, inputs), disk)
                code, err = again.wait(timeout=600), again.stderr.read()
            assert code == 0, (trial, fault, err[-3000:])
        assert not _leftovers(disk), (trial, _leftovers(disk))
        _assert_same_outputs(reference, disk, OUTPUTS[command])


# ---------------------------------------------------------------------------- damaged inputs


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = random.Random(str(path)).randrange(len(data) // 4, len(data))
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _edit(path: Path, how: str) -> None:
    with h5py.File(path, "a") as f:
        if how == "code-reshaped":
            code = f["code"][()]
            del f["code"]
            f["code"] = code.reshape(-1)
        elif how == "code-nan":
            code = f["code"][()].astype(np.float32)
            code[0, 0] = np.nan
            del f["code"]
            f["code"] = code
        elif how == "code-bit":
            f["code"][0, 0] = 1 - f["code"][0, 0]
        elif how == "deep-json":
            f.attrs["sampler"] = "[" * 100000 + "]" * 100000
        elif how == "no-seeds" and "samples/seed" in f:
            del f["samples/seed"]


DAMAGES = ["truncate", "flip", "code-reshaped", "code-nan", "code-bit", "deep-json", "no-seeds"]
READERS = {name: argv for name, argv in COMMANDS.items() if name not in ("plan",)}


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(READERS))
def test_damaged_inputs_are_refused_in_one_line(command, inputs, tmp_path):
    for damage in DAMAGES:
        folder = tmp_path / damage
        folder.mkdir()
        _fresh(folder, inputs)
        argv = _argv(command, inputs)
        targets = [a for a in argv if a in INPUTS]
        for target in targets:
            path = folder / target
            if damage == "truncate":
                _truncate(path)
            elif damage == "flip":
                _flip(path)
            elif path.suffix == ".h5":
                _edit(path, damage)
        before = _digest(folder)
        run = _cli(argv, folder)
        code, err = run.wait(timeout=600), run.stderr.read()
        assert code in (0, 2), (damage, code, err[-2000:])
        assert "Traceback" not in err, (damage, err[-3000:])
        if code == 2:
            assert err.strip().splitlines()[-1].startswith(f"ensattr {command}: error: "), (damage, err[-2000:])
        after = _digest(folder)
        changed = [n for n in before if after.get(n) != before[n]
                   and not (code == 0 and n in OUTPUTS[command])]
        assert not changed, (damage, changed)


@pytest.mark.slow
def test_an_output_too_large_for_the_disk_is_refused_before_the_work(inputs, disk):
    _fresh(disk, inputs)
    start = time.monotonic()
    run = _cli(["sample", "--checkpoint", "ensemble.pt", "--out", "big.h5", "--seeds", str(200_000)], disk)
    code, err = run.wait(timeout=600), run.stderr.read()
    assert code == 2 and err.count("\n") == 1, err
    assert "needs about 49.8 MiB and the disk of" in err and "free" in err, err
    assert time.monotonic() - start < 30 and not (disk / "big.h5").exists() and not _leftovers(disk)
