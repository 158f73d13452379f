"""Faults of long jobs: ``ensattr train`` killed with SIGKILL at random moments and resumed
each time ends with the weights of an uninterrupted run, bit for bit; a killed ``ensattr
sample`` resumes to the file of an uninterrupted run. (Attribution: tests/test_store.py.)"""

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import torch

from ensattr_fast.cli.main import main
from ensattr_fast.training.checkpoint import Checkpoint

STEPS = 1000  # far more than five kills can reach: each run lives one checkpoint and a moment
TRAIN = ["--steps", str(STEPS), "--hidden", "32", "--blocks", "1", "--batch-size", "32", "--checkpoint-every", "20",
         "--mode", "independent"]


def _train(plan, out, *extra):
    command = [sys.executable, "-m", "ensattr_fast", "train", "--plan", str(plan), "--out", str(out), *TRAIN, *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _step(path) -> int:
    try:
        return Checkpoint.load(path).step
    except Exception:  # not written yet
        return -1


def test_five_random_kills_then_resume_end_bit_identical(tmp_path):
    plan = tmp_path / "plan.h5"
    assert main(["plan", "--out", str(plan), "--members", "4", "--units", "class"]) == 0
    whole = _train(plan, tmp_path / "whole.pt")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    chance = random.Random(7)
    out, kills, last = tmp_path / "killed.pt", 0, -1
    while kills < 5:
        run = _train(plan, out, "--resume")
        # wait until this run has written a checkpoint past the last one, then kill it at a
        # random moment: between checkpoints, or while it writes one
        deadline = time.monotonic() + 120
        while _step(out) <= last and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(chance.uniform(0.0, 0.15))
        assert run.poll() is None, "the run ended before it could be killed: give it more steps"
        run.send_signal(signal.SIGKILL)
        run.wait()
        kills += 1
        last = _step(out)
        assert 0 < last < STEPS  # a checkpoint always survives the kill, and it is sound
    resumed = _train(plan, out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a, b = Checkpoint.load(tmp_path / "whole.pt"), Checkpoint.load(out)
    assert a.step == b.step == STEPS
    for state in ("ensemble", "ema"):
        for key, value in getattr(a, state).items():
            assert torch.equal(getattr(b, state)[key], value), key
    for x, y in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


def _flags(path):
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return f["progress/samples"][()]
    except (OSError, KeyError):  # not created yet
        return None


def test_killed_sampling_resumes_to_the_same_file(tmp_path):
    plan, ckpt = tmp_path / "plan.h5", tmp_path / "ensemble.pt"
    assert main(["plan", "--out", str(plan), "--members", "4", "--units", "class"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "5", "--hidden", "32",
                 "--blocks", "1"]) == 0
    args = ["sample", "--checkpoint", str(ckpt), "--seeds", "400", "--chunk", "8", "--sampling-steps", "20"]
    assert main([*args, "--out", str(tmp_path / "whole.h5")]) == 0

    out = tmp_path / "killed.h5"
    run = subprocess.Popen([sys.executable, "-m", "ensattr_fast", *args, "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (flags := _flags(out)) is None or not flags.any():
        assert run.poll() is None and time.monotonic() < deadline, "sampling ended before it could be killed"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    flags = _flags(out)
    assert 0 < flags.sum() < len(flags)  # killed midway
    assert main([*args, "--out", str(out)]) == 2  # a plain run refuses to overwrite it
    assert main([*args, "--out", str(out), "--resume"]) == 0
    with h5py.File(tmp_path / "whole.h5", "r") as a, h5py.File(out, "r") as b:
        assert np.array_equal(a["samples/images"][()], b["samples/images"][()])
        assert b["progress/samples"][()].all()
