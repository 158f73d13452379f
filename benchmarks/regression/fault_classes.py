"""Issue 18's classes of faults, each as a user meets it, with the package of an older commit
and with this tree: ``python -m benchmarks.regression.fault_classes [--reference b3b9e29]``.

Each case runs ``python -m ensattr_fast ...`` in a fresh process on copies of one small audit
and says whether the behaviour is right (refused in one line with the inputs untouched, clamped
with a note, or strict JSON) or wrong (what happened instead). The random faults (a full disk, a
read-only folder, kills, damaged files) are in tests/steps/test_fault_fuzz.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from .same_results import ROOT, _export

TRAIN = ["--steps", "20", "--hidden", "32", "--blocks", "1", "--batch-size", "8"]


def _ensattr(tree: Path, cwd: Path, *argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), ENSATTR_PROGRESS="off")
    return subprocess.run([sys.executable, "-m", "ensattr_fast", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(done, *files) -> bool:
    return done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def _strict(text: str) -> bool:
    def refuse(token):
        raise ValueError(token)
    try:
        json.loads(text, parse_constant=refuse)
        return True
    except ValueError:
        return False


def _recorded_data(work: Path) -> Path:
    """The training data the audit's plan (and so its checkpoint) records."""
    with h5py.File(work / "plan.h5") as f:
        return Path(json.loads(f.attrs["plan"])["dataset"]["path"])


def _setup(tree: Path, work: Path) -> None:
    np.save(work / "data.npy", np.random.default_rng(5).integers(0, 255, (40, 1, 8, 8), dtype=np.uint8))
    for argv in (["plan", "--out", "plan.h5", "--data", work / "data.npy", "--members", "8"],
                 ["train", "--plan", "plan.h5", "--out", "ensemble.pt", *TRAIN],
                 ["sample", "--checkpoint", "ensemble.pt", "--out", "results.h5", "--seeds", "6",
                  "--sampling-steps", "4"]):
        done = _ensattr(tree, work, *argv)
        if done.returncode:
            raise SystemExit(f"{argv}: {done.stderr[-1000:]}")


def _cases():
    """(name, function(tree, work) -> (right: bool, what happened))."""
    def data_as_json(tree, work):
        data = _recorded_data(work)
        before = _digest(data)
        done = _ensattr(tree, work, "metrics", "--results", "results.h5", "--checkpoint", "ensemble.pt",
                        "--json", data, "--overwrite")
        kept = _digest(data) == before
        return _refused(done) and kept, f"exit {done.returncode}, training data {'kept' if kept else 'REPLACED'}"

    def data_as_memorization(tree, work):
        data = _recorded_data(work)
        before = _digest(data)
        done = _ensattr(tree, work, "memorization", "--checkpoint", "ensemble.pt", "--out", data,
                        "--overwrite", "--seeds", "2", "--sampling-steps", "2", "--phantoms", "2")
        kept = _digest(data) == before
        return _refused(done) and kept, f"exit {done.returncode}, training data {'kept' if kept else 'REPLACED'}"

    def code_bit_flipped(tree, work):
        with h5py.File(work / "results.h5", "a") as f:
            f["code"][0, 0] = 1 - f["code"][0, 0]
        done = _ensattr(tree, work, "ablate", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--units", "1",
                        "--phantoms", "2")
        return _refused(done), f"exit {done.returncode}: {done.stderr.strip()[-120:]}"

    def resume_other_steps(tree, work):
        before = _digest(work / "ensemble.pt")
        done = _ensattr(tree, work, "train", "--plan", "plan.h5", "--out", "ensemble.pt", "--resume", "--steps", "40",
                        *TRAIN[2:])
        kept = _digest(work / "ensemble.pt") == before
        return _refused(done) and kept, f"exit {done.returncode}, checkpoint {'kept' if kept else 'trained on'}"

    def two_configs(tree, work):
        (work / "a.toml").write_text("steps = 3\n")
        (work / "b.toml").write_text("steps = 5\n")
        done = _ensattr(tree, work, "train", "--plan", "plan.h5", "--out", "e.pt", "--config", "a.toml",
                        "--config", "b.toml", *TRAIN[2:])
        return _refused(done), f"exit {done.returncode}"

    def topk_above_units(tree, work):
        done = _ensattr(tree, work, "attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                        "--samples", "2", "--method", "loss", "--topk", "100", "--check", "0")
        with h5py.File(work / "results.h5") as f:
            padded = int((f["topk/loss/index"][()] < 0).sum()) if "topk/loss/index" in f else -1
        right = done.returncode == 0 and padded == 0 and "note:" in done.stderr
        return right, f"exit {done.returncode}, {padded} slots padded with -1"

    def check_above_topk(tree, work):
        done = _ensattr(tree, work, "attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                        "--samples", "2", "--method", "first_order", "--topk", "3", "--check", "6")
        return _refused(done), f"exit {done.returncode}"

    def fractional_unit_set(tree, work):
        (work / "sets.json").write_text(json.dumps({"a": [1.5, "7", True]}))
        done = _ensattr(tree, work, "attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                        "--samples", "2", "--method", "loss", "--check", "0", "--groups", "sets.json")
        return _refused(done), f"exit {done.returncode}"

    def audit_of_examples(tree, work):
        done = _ensattr(tree, work, "audit", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                        "--samples", "1", "--phantoms", "2")
        return _refused(done), f"exit {done.returncode}"

    def projection_above_gradient(tree, work):
        start = time.monotonic()
        done = _ensattr(tree, work, "attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                        "--samples", "2", "--method", "dtrak", "--projection-dim", str(2**20), "--check", "0")
        return _refused(done), f"exit {done.returncode} after {time.monotonic() - start:.0f} s"

    def strict_json(tree, work):
        _ensattr(tree, work, "ablate", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--units=-1",
                 "--phantoms", "2")  # no unit in any slot: no effect to take a median of
        done = _ensattr(tree, work, "metrics", "--results", "results.h5", "--json", "m.json")
        right = done.returncode == 0 and _strict((work / "m.json").read_text())
        return right, f"exit {done.returncode}, JSON {'strict' if right else 'holds NaN'}"

    def reader_holds_the_file(tree, work):
        with h5py.File(work / "results.h5", "r"):
            start = time.monotonic()
            done = _ensattr(tree, work, "attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                            "--samples", "4", "--check", "0", "--method", "dtrak,loss")
            took = time.monotonic() - start
        right = _refused(done) and "open in process" in done.stderr
        return right, f"exit {done.returncode} after {took:.0f} s: {done.stderr.strip()[-100:]}"

    return [("metrics --json DATA --overwrite", data_as_json), ("memorization --out DATA --overwrite",
            data_as_memorization), ("/code with one bit flipped", code_bit_flipped),
            ("train --resume with another --steps", resume_other_steps), ("--config twice", two_configs),
            ("--topk above the units", topk_above_units), ("--check above --topk", check_above_topk),
            ("unit sets of 1.5, '7', true", fractional_unit_set), ("audit of single-example units", audit_of_examples),
            ("--projection-dim above a gradient", projection_above_gradient), ("NaN in --json", strict_json),
            ("a plain reader holds the results file", reader_holds_the_file)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.regression.fault_classes", description=__doc__)
    parser.add_argument("--reference", default="b3b9e29")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="fault-classes-"))
    try:
        trees = {args.reference: _export(args.reference, top), "this tree": ROOT}
        table = {}
        for label, tree in trees.items():
            base = top / f"base-{label.replace(' ', '-')}"
            base.mkdir()
            _setup(tree, base)
            for name, case in _cases():
                work = top / f"{label.replace(' ', '-')}-{len(table.get(name, {}))}-{abs(hash(name))}"
                shutil.copytree(base, work)
                pristine = (base / "data.npy").read_bytes()
                right, what = case(tree, work)
                (base / "data.npy").write_bytes(pristine)  # what a wrong run replaced, back for the next
                table.setdefault(name, {})[label] = dict(right=right, what=what)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    for name, row in table.items():
        cells = "  |  ".join(f"{label}: {'right' if r['right'] else 'WRONG'} ({r['what']})" for label, r in row.items())
        print(f"{name:<42} {cells}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0 if all(row["this tree"]["right"] for row in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
