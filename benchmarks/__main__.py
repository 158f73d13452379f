"""Run the benchmark suite: ``python -m benchmarks [--quick] [--json PATH] [--only NAME ...]``.

Every timing benchmark (``benchmarks/timing/benchmark_*.py``) has ``run(quick, device) ->
Suite``; each checks its results against the reference before timing them and times ours and
the baseline side by side in the same run, so ratios hold on a noisy machine. The trust
measurements (``benchmarks/studies/benchmark_trust_*.py``, answer quality rather than speed,
minutes of training each) run the same way but only when ``--only`` names them: ``--only
trust`` runs all three. ``--only`` selects the benchmarks whose module name contains one of
its words (``--only training`` runs ``benchmark_training``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import torch

from . import _common

#: the sub-packages whose ``benchmark_*`` modules the runner finds, and whether a run without
#: ``--only`` runs them (the trust studies run only when named)
PACKAGES = (("timing", True), ("studies", False))


def _names(only=None):
    """The ``benchmarks.<package>.benchmark_*`` modules to run: with ``only``, those of any
    package whose name contains one of its words; without, every timing benchmark."""
    root = Path(__file__).parent
    names = []
    for package, by_default in PACKAGES:
        for module in sorted(m.name for m in pkgutil.iter_modules([str(root / package)])
                             if m.name.startswith("benchmark_")):
            if (any(o in module for o in only) if only else by_default):
                names.append(f"benchmarks.{package}.{module}")
    return names


def _modules(only):
    return [importlib.import_module(name) for name in _names(only)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="main cases only (under 5 minutes)")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose name contains these (timing "
                        "benchmarks and the trust studies: --only trust)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args(argv)
    if args.only and not _names(args.only):
        known = ", ".join(name.rsplit(".", 1)[1].removeprefix("benchmark_") for name in _names([""]))
        parser.error(f"--only {' '.join(args.only)}: no benchmark has that in its name (benchmarks: {known})")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    print(f"machine: {_common.machine()}", flush=True)
    records, start = [], time.perf_counter()
    for module in _modules(args.only):
        for device in devices:
            suite = module.run(args.quick, device)
            suite.print_table()
            records += suite.records
    print(f"\n{'figure':<78} {'value':>12} {'baseline':>12} {'ratio':>7}  target")
    for r in records:
        baseline = "" if r.baseline is None else f"{r.baseline:12.4g}"
        ratio = "" if r.ratio is None else f"{r.ratio:7.2f}"
        target = "" if r.target is None else f"{r.target} {'MET' if r.met else 'MISSED'}"
        print(f"{r.name[:78]:<78} {r.value:12.4g} {baseline:>12} {ratio:>7}  {target}  [{r.unit}]")
    print(f"\n{len(records)} figures in {time.perf_counter() - start:.0f} s")
    if args.json:
        payload = [r.as_dict() for r in records]
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
