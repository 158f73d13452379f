"""How many times does each command read its checkpoint? ``python -m benchmarks.regression.checkpoint_reads``

Builds one audit with large members (a checkpoint of ~200 MB, so that it dominates what a
command reads), then runs ``sample``, ``attribute`` (with its exact check), ``ablate`` and
``metrics`` on it with the package of a reference commit (``--reference``, default b3b9e29) and
with this tree, each in a fresh process, and reads that process's ``rchar`` (bytes read through
``read()`` calls, /proc/self/io) at exit. Reads are reported as multiples of the checkpoint's
size, after subtracting what importing the package and the step's other files cost (measured by
the same command on a tiny checkpoint). Pages the checkpoint's load maps (``torch.load(mmap=True)``)
come from the page cache the one read filled; they count as memory, not as reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .same_results import ROOT, _export

#: a process's own bytes read through read() calls, printed at its exit
_MEASURED = ("import atexit, runpy, sys, ensattr_fast; from pathlib import Path; "
             "assert Path(ensattr_fast.__file__).resolve().is_relative_to({tree!r}), ensattr_fast.__file__; "
             "atexit.register(lambda: print('RCHAR', open('/proc/self/io').read().split()[1], file=sys.stderr)); "
             "runpy.run_module('ensattr_fast', run_name='__main__', alter_sys=True)")

COMMANDS = {
    "sample": ["sample", "--checkpoint", "{ckpt}", "--out", "{work}/r-{tag}.h5", "--seeds", "2", "--sampling-steps",
               "4"],
    "attribute": ["attribute", "--checkpoint", "{ckpt}", "--results", "{work}/r-{tag}.h5", "--method",
                  "first_order,loss", "--samples", "2", "--check", "2", "--phantoms", "2"],
    "ablate": ["ablate", "--checkpoint", "{ckpt}", "--results", "{work}/r-{tag}.h5", "--units", "3", "--phantoms",
               "2", "--overwrite"],
    "metrics": ["metrics", "--checkpoint", "{ckpt}", "--results", "{work}/r-{tag}.h5", "--samples", "2"],
}


def _run(tree: Path, argv: list, cwd: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree), ENSATTR_PROGRESS="off")
    code = _MEASURED.format(tree=str(tree.resolve()))
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {tree}: {done.stderr[-2000:]}")
    return int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("RCHAR")))


def _checkpoint(work: Path, name: str, hidden: int) -> Path:
    from ensattr_fast.cli.main import main

    plan = work / "plan.h5"
    if not plan.exists():
        assert main(["plan", "--out", str(plan), "--members", "16"]) == 0
    out = work / f"{name}.pt"
    assert main(["train", "--plan", str(plan), "--out", str(out), "--steps", "1", "--hidden", str(hidden),
                 "--blocks", "3", "--batch-size", "8"]) == 0
    return out


def measure(reference: str, work: Path) -> dict:
    trees = {"reference": _export(reference, work), "ours": ROOT}
    checkpoints = {"big": _checkpoint(work, "big", 512), "tiny": _checkpoint(work, "tiny", 8)}
    size = checkpoints["big"].stat().st_size - checkpoints["tiny"].stat().st_size
    table = {}
    for tag, tree in trees.items():
        for which, ckpt in checkpoints.items():
            for command, argv in COMMANDS.items():  # in order: sample makes the file the others read
                argv = [a.format(ckpt=ckpt, work=work, tag=f"{tag}-{which}") for a in argv]
                table.setdefault(tag, {}).setdefault(command, {})[which] = _run(tree, argv, work)
    out = {"checkpoint_bytes": checkpoints["big"].stat().st_size, "reference": reference, "commands": {}}
    for command in COMMANDS:
        out["commands"][command] = {tag: round((table[tag][command]["big"] - table[tag][command]["tiny"]) / size, 2)
                                    for tag in trees}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.regression.checkpoint_reads", description=__doc__)
    parser.add_argument("--reference", default="b3b9e29")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-reads-"))
    try:
        found = measure(args.reference, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint {found['checkpoint_bytes'] / 2**20:.0f} MiB; reads of it per command "
          f"({args.reference} -> this tree):")
    for command, row in found["commands"].items():
        print(f"  {command:<10} {row['reference']:5.2f} -> {row['ours']:5.2f}")
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
