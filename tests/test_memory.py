"""The memory budget (``--memory``, ``Audit(memory=...)``, ``ENSATTR_MEMORY``): where it comes
from, and that blocks are sized from it. That a small budget changes the blocks and never the
answers: tests/codes (duplicates, clusters), tests/store/test_features_file.py (features)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.runtime import memory
from ensattr_fast.steps.features import block_rows

GIB = 1 << 30


@pytest.fixture(autouse=True)
def fresh_budget(monkeypatch):
    monkeypatch.delenv("ENSATTR_MEMORY", raising=False)
    memory.set_budget(None)
    yield
    memory.set_budget(None)


def test_the_budget_comes_from_the_call_then_the_environment_then_the_machine(monkeypatch):
    machine = memory.budget()
    assert machine >= GIB
    monkeypatch.setenv("ENSATTR_MEMORY", "1.5")
    assert memory.budget() == int(1.5 * GIB)
    memory.set_budget(0.25)
    assert memory.budget() == GIB // 4
    with memory.budget_of(3):
        assert memory.budget() == 3 * GIB
    assert memory.budget() == GIB // 4
    memory.set_budget(None)
    monkeypatch.setenv("ENSATTR_MEMORY", "lots")
    with pytest.raises(ValueError, match="ENSATTR_MEMORY='lots'"):
        memory.budget()
    for wrong in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of GiB"):
            memory.set_budget(wrong)


def test_blocks_follow_the_budget():
    with memory.budget_of(2):  # the fixed blocks of the scale benchmark's figures
        assert block_rows(20, 1024) == (256 << 20) // (20 * 1024 * 4)
        at_two = block_rows(4, 4096)
    with memory.budget_of(1):
        assert block_rows(4, 4096) == at_two // 2
    with memory.budget_of(1 / 1024):
        assert block_rows(20, 1024) == 64  # never fewer than 64 examples a block


def test_memory_on_the_command_line_and_in_python(tmp_path, capsys):
    np.save(tmp_path / "forty.npy", ef.load_digits().images[:40].numpy())
    argv = ["plan", "--data", str(tmp_path / "forty.npy"), "--members", "8"]
    assert main([*argv, "--out", str(tmp_path / "small.h5"), "--memory", "0.001"]) == 0
    assert main([*argv, "--out", str(tmp_path / "large.h5")]) == 0
    assert memory.budget() >= GIB  # --memory held for its command only
    with h5py.File(tmp_path / "small.h5", "r") as s, h5py.File(tmp_path / "large.h5", "r") as g:
        assert np.array_equal(s["code"][()], g["code"][()])
        assert np.array_equal(s["duplicates/set_of"][()], g["duplicates/set_of"][()])
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "x.h5"), "--memory", "0"]) == 2
    assert "--memory: must be a finite number in (0," in capsys.readouterr().err
    ef.Audit(tmp_path / "p.h5", memory=0.5)
    assert memory.budget() == GIB // 2
