"""What an audit of N units costs (issue 20): each command of an audit run as a user runs it
(``python -m ensattr_fast <step>``, one process per step) on N synthetic units, its wall time,
CPU time and peak resident memory (the line every command prints at its end), the files' sizes,
and the fitted exponent of each step's CPU time in N (CPU time rather than wall: this machine
is shared, and CPU time is what contention disturbs least).

The data: N 8x8 images, the digits cycled with Gaussian noise (sd 0.3, clipped to [-1, 1]), one
unit each; planned with ``--duplicates off`` (the duplicate search is quadratic and has its own
benchmark); M = 20 members up to N = 10^5, 24 past it (M = 20 has too few distinct rows for
2 x 10^5 units). Small members (``--hidden 32 --blocks 1``) trained 20 steps: training's cost is
its steps, not N, and the quality of the model does not change what the other steps cost.

Steps: plan, train, sample (64 seeds, 20 DDIM steps), "attribute first order" (first order,
direct and loss, 64 samples, the exact check of each one's top 2), "attribute dtrak" (64
samples; its training features go to the features file beside the checkpoint; up to
``$ENSATTR_SCALE_DTRAK_MAX`` units, default 10^5), then D-TRAK again on 64 other samples with the
features read back from that file (the scoring rate, per core of this 2-core machine, whole
command), memorization (16 seeds, 8 phantoms), report.

``$ENSATTR_SCALE_N`` (e.g. ``1000,10000``) picks the sizes; the quick form (CI) runs 1,000 and
3,000. Targets: peak memory under 4 GiB at N >= 10^5, results file under 200 MB at 10^5, D-TRAK's
CPU time per example within 1.2x of its time at the smallest N, no step superlinear in N.
``$ENSATTR_SCALE_DIR`` keeps the audits' folders (default: a new temporary folder).

Every step runs under ``--memory $ENSATTR_SCALE_MEMORY`` (GiB, default 2: the blocks the
figures of BENCHMARKS.md were taken with). At the largest N that runs D-TRAK, its training
features are then computed twice more from scratch, under a 0.25 and a 4 GiB budget, side by
side: peak memory and time of each, and whether the scores are the same.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from ensattr_fast.data import load_digits

from .._common import Record, Suite

COST = re.compile(r"^(\w+): peak memory ([\d.]+) GiB, CPU ([\d.]+) s, wall ([\d.]+) s$", re.M)
GIB_LIMIT, RESULTS_MB_LIMIT = 4.0, 200.0


def synthetic(n: int, path: Path, seed: int = 0) -> None:
    """N noisy digits [n, 1, 8, 8] in [-1, 1] as an .npy file, written in blocks."""
    digits = load_digits().images.numpy()
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 1, 8, 8))
    for start in range(0, n, 1 << 16):
        stop = min(n, start + (1 << 16))
        base = digits[np.arange(start, stop) % len(digits)]
        out[start:stop] = np.clip(base + rng.normal(0, 0.3, base.shape), -1, 1)
    out.flush()


def _step(args: List[str], work: Path, memory: str = "") -> Dict[str, float]:
    """Run one command in its own process under ``--memory`` (GiB); its cost line, parsed (wall:
    the whole process, imports included)."""
    started = time.monotonic()
    memory = memory or os.environ.get("ENSATTR_SCALE_MEMORY", "2")
    done = subprocess.run([sys.executable, "-m", "ensattr_fast", *args, "--memory", memory], cwd=work,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ensattr {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-2000:]}")
    found = COST.findall(done.stderr)
    if not found:
        raise RuntimeError(f"ensattr {args[0]} printed no cost line:\n{done.stderr[-1000:]}")
    _, peak, cpu, _ = found[-1]
    return dict(peak=float(peak), cpu=float(cpu), wall=time.monotonic() - started)


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else float("nan")


def audit_costs(n: int, work: Path, dtrak: bool) -> Dict[str, Dict[str, float]]:
    """Every step's cost at N = ``n`` in ``work``; file sizes under ``files``."""
    work.mkdir(parents=True, exist_ok=True)
    synthetic(n, work / "data.npy")
    members = "20" if n <= 100_000 else "24"
    check = "attribute first order"  # with direct and loss, and the exact check
    steps = {
        "plan": ["plan", "--data", "data.npy", "--units", "example", "--members", members, "--duplicates", "off",
                 "--out", "plan.h5"],
        "train": ["train", "--plan", "plan.h5", "--out", "ensemble.pt", "--steps", "20", "--hidden", "32",
                  "--blocks", "1", "--batch-size", "128", "--checkpoint-every", "0"],
        "sample": ["sample", "--checkpoint", "ensemble.pt", "--out", "results.h5", "--seeds", "64",
                   "--sampling-steps", "20"],
        check: ["attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5", "--samples", "64",
                "--method", "first_order,direct,loss", "--check", "2"],
    }
    if dtrak:
        steps["attribute dtrak"] = ["attribute", "--checkpoint", "ensemble.pt", "--results", "results.h5",
                                    "--samples", "64", "--method", "dtrak", "--check", "0"]
        # other samples, the training features read back from the features file
        steps["sample (other seeds)"] = ["sample", "--checkpoint", "ensemble.pt", "--out", "other.h5", "--seeds",
                                         "64:128", "--sampling-steps", "20"]
        steps["attribute dtrak, features on disk"] = ["attribute", "--checkpoint", "ensemble.pt", "--results",
                                                      "other.h5", "--samples", "64", "--method", "dtrak",
                                                      "--check", "0"]
    steps["memorization"] = ["memorization", "--checkpoint", "ensemble.pt", "--out", "copies.h5", "--seeds", "16",
                             "--sampling-steps", "20", "--phantoms", "8"]
    steps["report"] = ["report", "--results", "results.h5", "--out", "report.png"]
    costs = {}
    for name, args in steps.items():
        costs[name] = _step(args, work)
        print(f"N = {n:,}: {name}: {costs[name]}", flush=True)
    costs["files"] = dict(plan=_mb(work / "plan.h5"), checkpoint=_mb(work / "ensemble.pt"),
                          results=_mb(work / "results.h5"), features=_mb(work / "ensemble.pt.features.h5"))
    return costs


def budget_costs(work: Path, budgets=("0.25", "4")) -> Dict[str, Dict[str, float]]:
    """D-TRAK's training features computed from scratch under each budget, in the audit of
    ``work``: each one's cost, and the largest difference of its scores from the first's."""
    import h5py

    _step(["sample", "--checkpoint", "ensemble.pt", "--out", "budget.h5", "--seeds", "128:192",
           "--sampling-steps", "20"], work)
    costs, first = {}, None
    for budget in budgets:
        (work / "ensemble.pt.features.h5").unlink(missing_ok=True)
        shutil.copy(work / "budget.h5", work / f"budget-{budget}.h5")
        costs[budget] = _step(["attribute", "--checkpoint", "ensemble.pt", "--results", f"budget-{budget}.h5",
                               "--samples", "64", "--method", "dtrak", "--check", "0"], work, budget)
        with h5py.File(work / f"budget-{budget}.h5", "r") as f:
            scores = f["influence/dtrak"][()]
        first = scores if first is None else first
        costs[budget]["difference"] = float(np.abs(scores - first).max())
        print(f"--memory {budget}: {costs[budget]}", flush=True)
    return costs


def exponent(sizes: List[int], values: List[float]) -> float:
    """The least-squares slope of log(value) on log(N): cost ~ N^slope."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-3)), 1)[0])


def run(quick: bool, device: str) -> Suite:
    suite = Suite("scale: what an audit of N units costs", quick)
    listed = os.environ.get("ENSATTR_SCALE_N")
    sizes = [int(float(s)) for s in listed.split(",")] if listed else ([1000, 3000] if quick else
                                                                       [1000, 10_000, 100_000, 1_000_000])
    dtrak_max = int(float(os.environ.get("ENSATTR_SCALE_DTRAK_MAX", 100_000)))
    kept = os.environ.get("ENSATTR_SCALE_DIR")
    root = Path(kept or tempfile.mkdtemp(prefix="ensattr-scale-"))
    try:
        table = {n: audit_costs(n, root / f"n{n}", n <= dtrak_max) for n in sizes}
        dtrak = [n for n in sizes if n <= dtrak_max]
        budgets = budget_costs(root / f"n{dtrak[-1]}") if dtrak else {}
    finally:
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    steps = [s for s in table[sizes[0]] if s != "files"]
    for step in steps:
        measured = [n for n in sizes if step in table[n]]
        for n in measured:
            cost = table[n][step]
            big = n >= 100_000
            suite.record(Record(name=f"{step} at N = {n:,}: peak memory", value=cost["peak"], unit="GiB",
                                target=f"< {GIB_LIMIT}" if big else None,
                                met=cost["peak"] < GIB_LIMIT if big else None))
            suite.record(Record(name=f"{step} at N = {n:,}: wall (CPU {cost['cpu']:.0f} s)", value=cost["wall"],
                                unit="s"))
        if len(measured) < 2:
            continue
        slope = exponent(measured, [table[n][step]["cpu"] for n in measured])
        suite.record(Record(name=f"{step}: exponent of CPU time in N ({measured[0]:,}..{measured[-1]:,})",
                            value=slope, unit="", target="<= 1.1", met=bool(slope <= 1.1)))
    dtrak = [n for n in sizes if "attribute dtrak" in table[n]]
    if len(dtrak) > 1:
        per = {n: table[n]["attribute dtrak"]["cpu"] / n for n in dtrak}
        for n in dtrak[1:]:
            ratio = per[n] / per[dtrak[0]]
            suite.record(Record(name=f"D-TRAK CPU time per example at N = {n:,} over N = {dtrak[0]:,}", value=ratio,
                                unit="x", target="<= 1.2", met=bool(ratio <= 1.2)))
    for n in dtrak:
        wall = table[n]["attribute dtrak, features on disk"]["wall"]
        suite.record(Record(name=f"D-TRAK scores from the features file at N = {n:,} (64 samples, whole command, "
                                 f"{wall:.0f} s)", value=64 * n / wall / 2, unit="(sample, unit)/s per core"))
    for budget, cost in budgets.items():
        suite.record(Record(name=f"D-TRAK at N = {dtrak[-1]:,}, features from scratch under --memory {budget}: peak "
                                 f"memory (CPU {cost['cpu']:.0f} s, scores differ by {cost['difference']:.1e})",
                            value=cost["peak"], unit="GiB"))
    for n in sizes:
        files = table[n]["files"]
        suite.record(Record(name=f"files at N = {n:,}: results (features file {files['features']:.0f} MB, "
                                 f"checkpoint {files['checkpoint']:.0f} MB, plan {files['plan']:.0f} MB)",
                            value=files["results"], unit="MB", target=f"< {RESULTS_MB_LIMIT}" if n == 100_000 else None,
                            met=files["results"] < RESULTS_MB_LIMIT if n == 100_000 else None))
    return suite
