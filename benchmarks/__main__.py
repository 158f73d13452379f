"""Run the benchmark suite: ``python -m benchmarks [--quick] [--json PATH] [--only NAME ...]``.

Every ``benchmarks/benchmark_*.py`` module has ``run(quick, device) -> Suite``; each checks its
results against the reference before timing them and times ours and the baseline side by side
in the same run, so ratios hold on a noisy machine.
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


def _modules(only):
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("benchmark_"))
    if only:
        names = [n for n in names if any(o in n for o in only)]
    return [importlib.import_module(f"benchmarks.{n}") for n in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="main cases only (under 5 minutes)")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose name contains these")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args(argv)

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
