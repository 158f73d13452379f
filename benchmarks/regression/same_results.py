"""Does this tree write the very files an older commit writes?
``python -m benchmarks.regression.same_results [--reference COMMIT] [--units example|class] [--keep DIR]``

Runs ``ensattr demo`` in a short configuration twice from the same seeds, once with the
package of a reference commit (``--reference``, default b3b9e29, the last commit before the
package was laid out in sub-packages and the steps took options dataclasses) and once with this
tree's package, then compares every dataset of ``results.h5`` and ``plan.h5`` bit for bit
(dtype, shape and bytes, NaN equal to NaN), every root and dataset attribute except those that
carry versions, and every tensor of the checkpoints. Exit code 1 and the differences when
anything differs.

Both runs go through ``python -m ensattr_fast`` (the one command line entry point both layouts
have: the reference's ``ensattr_fast/cli.py`` is ``ensattr_fast/cli/main.py`` here), each with
only its own tree on ``PYTHONPATH`` and a check that the package imported is that tree's.

The reference tree is exported with ``git archive``; its compiled library is the one this tree
loads, which is only right while the C++ sources that library was built from are the
reference's up to formatting (checked: comments, whitespace and the order of ``#include`` lines
are ignored, so a clang-format pass does not count; ``csrc/cuda/`` is ignored when the library
was built without CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
#: attributes that say which software wrote a file, not what it holds
VOLATILE_ATTRS = {"versions"}
SHORT = ["--steps", "150", "--samples", "16", "--attribute", "8", "--per-sample", "4"]


def _source(text: bytes) -> tuple:
    """C++/CUDA source up to what clang-format changes: without comments and whitespace, string
    literals it split joined again, ``#include`` lines as a sorted list beside the rest."""
    text = re.sub(rb"//[^\n]*|/\*.*?\*/", b"", text, flags=re.S)
    lines = [line.strip() for line in text.splitlines()]
    includes = sorted(re.sub(rb"\s+", b"", line) for line in lines if line.startswith(b"#include"))
    rest = re.sub(rb"\s+", b"", b"\n".join(line for line in lines if not line.startswith(b"#include")))
    return includes, rest.replace(b'""', b"")


def _csrc_changes(reference: str, cuda: bool) -> list:
    """The files under csrc/ whose source differs beyond formatting between ``reference`` and
    this working tree (what the library this tree loads was built from); ``csrc/cuda/`` only
    when that library has CUDA kernels."""
    def wanted(path: str) -> bool:
        return cuda or not path.startswith("csrc/cuda/")

    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", reference, "--", "csrc"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    theirs = {path for path in listed if wanted(path)}
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "csrc"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    ours = {path for path in listed if wanted(path) and (ROOT / path).is_file()}
    changed = sorted(theirs ^ ours)
    for path in sorted(theirs & ours):
        old = subprocess.run(["git", "show", f"{reference}:{path}"], cwd=ROOT, check=True,
                             capture_output=True).stdout
        if _source(old) != _source((ROOT / path).read_bytes()):
            changed.append(path)
    return changed


def _export(reference: str, where: Path) -> Path:
    import ensattr_fast

    changed = _csrc_changes(reference, ensattr_fast.build_info()["cuda"])
    if changed:
        raise SystemExit(f"csrc/ differs between {reference} and this tree beyond formatting ({', '.join(changed)}): "
                         "the reference would run with a library built from other sources; build the reference's "
                         "own library")
    tree = where / "reference"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", reference], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    library = next(Path(ensattr_fast.__file__).parent.glob("_C*.so"))
    shutil.copy(library, tree / "ensattr_fast" / library.name)
    return tree


def _demo(out: Path, args: list, tree: Path) -> None:
    """``python -m ensattr_fast demo --out OUT ARGS`` with the package of ``tree`` (checked)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = ("import runpy, ensattr_fast; from pathlib import Path; "
            f"assert Path(ensattr_fast.__file__).resolve().is_relative_to({str(tree.resolve())!r}), "
            "ensattr_fast.__file__; runpy.run_module('ensattr_fast', run_name='__main__', alter_sys=True)")
    subprocess.run([sys.executable, "-c", code, "demo", "--out", str(out), *args], cwd=out.parent, env=env,
                   check=True)


def _attrs(obj) -> dict:
    return {k: v for k, v in obj.attrs.items() if k not in VOLATILE_ATTRS}


def _same_value(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return a.tobytes() == b.tobytes() or bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def compare_hdf5(reference: Path, ours: Path) -> tuple[int, list]:
    """(objects compared, differences) between two HDF5 files, every dataset and attribute."""
    differences, compared = [], 0
    with h5py.File(reference, "r") as a, h5py.File(ours, "r") as b:
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        for name in sorted(set(names_a) ^ set(names_b)):
            differences.append(f"{ours.name}: /{name} only in {'reference' if name in names_a else 'ours'}")
        for name in ["/"] + sorted(set(names_a) & set(names_b)):
            x, y = a[name], b[name]
            compared += 1
            if isinstance(x, h5py.Dataset) and not _same_value(x[()], y[()]):
                differences.append(f"{ours.name}: /{name} differs ({x.dtype} {x.shape} vs {y.dtype} {y.shape})")
            ax, ay = _attrs(x), _attrs(y)
            for key in sorted(set(ax) | set(ay)):
                if key not in ax or key not in ay or not _same_value(ax[key], ay[key]):
                    differences.append(f"{ours.name}: attribute {key!r} of {name} differs")
    return compared, differences


def compare_checkpoints(reference: Path, ours: Path) -> tuple[int, list]:
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (reference, ours))
    differences, compared = [], 0

    def walk(x, y, where):
        nonlocal compared
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                if key not in x or key not in y:
                    differences.append(f"{ours.name}: {where}/{key} in one only")
                else:
                    walk(x[key], y[key], f"{where}/{key}")
        elif isinstance(x, torch.Tensor):
            compared += 1
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                differences.append(f"{ours.name}: tensor {where} differs")
        elif isinstance(x, str) and where.endswith(("config", "spec")):
            compared += 1
            x, y = json.loads(x), json.loads(y)
            x.pop("versions", None), y.pop("versions", None)
            if x != y:
                differences.append(f"{ours.name}: {where} differs")
        else:
            compared += 1
            if x != y:
                differences.append(f"{ours.name}: {where} differs ({x!r} vs {y!r})")

    walk(a, b, "")
    return compared, differences


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.regression.same_results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="b3b9e29", help="the commit whose files ours must equal "
                        "(default: b3b9e29, the layout before sub-packages)")
    parser.add_argument("--units", choices=["example", "class"], default="example")
    parser.add_argument("--keep", type=Path, help="keep both runs' files in this folder; a reference run "
                        "already there is reused")
    args = parser.parse_args(argv)
    where = Path(tempfile.mkdtemp(prefix="same_results.")) if args.keep is None else args.keep
    where.mkdir(parents=True, exist_ok=True)
    demo_args = SHORT + ["--units", args.units]
    runs = {"reference": where / "reference_run" / "demo", "ours": where / "our_run" / "demo"}
    reuse = (runs["reference"] / "results.h5").exists()
    tree = None if reuse else _export(args.reference, where)
    shutil.rmtree(runs["ours"].parent, ignore_errors=True)
    for name, out in runs.items():
        if name == "reference" and reuse:
            print(f"== reference: reusing {out}", flush=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {name}: ensattr demo {' '.join(demo_args)}", flush=True)
        _demo(out, demo_args, tree if name == "reference" else ROOT)
    total, differences = 0, []
    for file in ("plan.h5", "results.h5"):
        n, d = compare_hdf5(runs["reference"] / file, runs["ours"] / file)
        total, differences = total + n, differences + d
    n, d = compare_checkpoints(runs["reference"] / "ensemble.pt", runs["ours"] / "ensemble.pt")
    total, differences = total + n, differences + d
    print(f"\nreference {args.reference} vs this tree, demo --units {args.units}: {total} objects compared "
          f"(datasets, groups and attributes of plan.h5 and results.h5; checkpoint entries), "
          f"{len(differences)} differ")
    for line in differences:
        print("  " + line)
    if args.keep is None:
        shutil.rmtree(where, ignore_errors=True)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
