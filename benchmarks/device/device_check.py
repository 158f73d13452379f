"""The device check's stages after the build: ``python -m benchmarks.device.device_check --out DIR``.

Run by ``benchmarks/device_check.sh`` (which builds the extension first). Each stage runs on
its own: one that fails is recorded with its error and the others still run, so a short GPU
lease always brings back every figure that could be measured. Everything lands in one JSON
(``DIR/device_check.json``) beside the log.

``--dry-run`` runs every stage on the CPU at the smallest sizes, so that CI keeps the script
working on a machine without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, List

import torch

from .. import _common


def _tests(out: Path, dry_run: bool) -> dict:
    """The op tests (CPU and, where a GPU is present, CUDA cases), counted from JUnit XML."""
    # the sampling tests wherever the tests tree keeps them (tests/ mirrors the package)
    sampling = sorted(str(path) for path in Path("tests").rglob("test_sampling.py"))
    paths = ["tests/ops/test_build.py"] if dry_run else ["tests/ops", *sampling]
    report = out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={report}", *paths]
    done = subprocess.run(command, text=True, capture_output=True)
    print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", flush=True)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    result = dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                  failed=failed, returncode=done.returncode)
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"{len(failed)} tests failed: {failed[:10]}")
    return result


def _benchmarks(names: List[str], device: str) -> Callable[[bool], list]:
    def stage(dry_run: bool) -> list:
        from .. import __main__ as runner

        records = []
        for module in runner._modules(names):
            suite = module.run(True, device)
            suite.print_table()
            records += [r.as_dict() for r in suite.records]
        return records

    return stage


def _hardware(stage: Callable[[], "_common.Suite"]) -> Callable[[bool], list]:
    return lambda dry_run: [r.as_dict() for r in stage().records]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device.device_check", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at the smallest sizes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import ensattr_fast

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("device check: no GPU is visible; give --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    result = dict(machine=_common.machine(), torch=torch.__version__, build=ensattr_fast.build_info(),
                  dry_run=args.dry_run, device=device, stages={})
    stages = {
        "tests": lambda dry: _tests(args.out, dry),
        "ops": _benchmarks(["masked_member_mse", "ensemble_step", "code_scores"], device),
    }
    from . import hardware

    stages.update({name: _hardware(stage) for name, stage in hardware.stages(device, args.dry_run).items()})
    start = time.perf_counter()
    for name, stage in stages.items():
        began = time.perf_counter()
        print(f"== device check: {name} ({began - start:.0f} s in)", flush=True)
        entry = dict(ok=True)
        try:
            entry["result"] = stage(args.dry_run)
        except Exception as error:  # one stage's failure must not lose the others' figures
            traceback.print_exc()
            entry.update(ok=False, error=f"{type(error).__name__}: {error}")
        entry["seconds"] = round(time.perf_counter() - began, 1)
        result["stages"][name] = entry
        (args.out / "device_check.json").write_text(json.dumps(result, indent=2))
    result["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2))

    print(f"\n{'figure':<90} {'value':>12} {'baseline':>12} {'ratio':>7}  target")
    for entry in result["stages"].values():
        if isinstance(entry.get("result"), list):
            for r in entry["result"]:
                ratio = "" if r["ratio"] is None else f"{r['ratio']:7.2f}"
                baseline = "" if r["baseline"] is None else f"{r['baseline']:12.4g}"
                target = "" if r["target"] is None else f"{r['target']} {'MET' if r['met'] else 'MISSED'}"
                print(f"{r['name'][:90]:<90} {r['value']:12.4g} {baseline:>12} {ratio:>7}  {target}  [{r['unit']}]")
    failed = [name for name, entry in result["stages"].items() if not entry["ok"]]
    print(f"device check: {len(stages) - len(failed)} of {len(stages)} stages passed in {result['seconds']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; figures in {args.out / 'device_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
