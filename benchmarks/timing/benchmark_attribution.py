"""Attribution at audit scale: every unit scored for many samples and streamed to HDF5 (time,
peak memory, and the time h5py alone takes to write the same blocks), and first-order
influence for the demo (Jacobians through the sampler, then every unit)."""

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ensattr_fast import codes
from ensattr_fast.attribution import first_order_grams
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedMLP
from ensattr_fast.ops import code_scores

from .._common import Record, Suite

# Each child process measures its own peak memory; both write the same matrix in the same
# block shape, one through ensattr_fast's streamed store, one with h5py alone.
_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import h5py, numpy as np, torch
    N, S, M, block_rows, block_units, what, path = {args!r}
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if what == "ensattr_fast":
        from ensattr_fast.steps.scoring import stream_influence
        code = (torch.rand(N, M, generator=g).argsort(1) < M // 2).to(torch.uint8)
        J = torch.randn(S, 64, M, generator=g)
        gram = J.transpose(1, 2) @ J
        start = time.perf_counter()
        stream_influence(path, code, {{"first_order": ("first_order", gram)}}, k=10,
                         block_rows=block_rows, block_units=block_units, progress=False)
    else:
        block = np.random.default_rng(0).random((block_rows, block_units), dtype=np.float32)
        with h5py.File(path, "w") as f:
            d = f.create_dataset("influence", (S, N), "f4",
                                 chunks=(min(S, block_rows, 64), min(N, block_units, 8192)))
            for r in range(0, S, block_rows):
                for u in range(0, N, block_units):
                    d[r : r + block_rows, u : u + block_units] = block[: min(block_rows, S - r),
                                                                       : min(block_units, N - u)]
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(seconds=seconds, peak_rss=rss)))
    """
)


def _child(args) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(args=args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _streaming(suite: Suite) -> None:
    N, S, M, rows, units = 100_000, 1024, 32, 64, 16384
    with tempfile.TemporaryDirectory() as tmp:
        ours = _child((N, S, M, rows, units, "ensattr_fast", str(Path(tmp) / "a.h5")))
        plain = _child((N, S, M, rows, units, "h5py", str(Path(tmp) / "b.h5")))
    case = f"N={N} units x S={S} samples, M={M}, blocks {rows}x{units}"
    ratio = ours["seconds"] / plain["seconds"]
    suite.record(Record(name=f"streamed first-order influence, seconds: {case}", value=ours["seconds"],
                        unit="s", target="value < 60", met=ours["seconds"] < 60))
    suite.record(Record(name=f"streamed influence vs h5py alone writing it (time ratio): {case}",
                        value=ours["seconds"], unit="s", baseline=plain["seconds"],
                        ratio=plain["seconds"] / ours["seconds"], target="ours <= 1.5 x h5py",
                        met=ratio <= 1.5))
    gib = ours["peak_rss"] / 2**30
    suite.record(Record(name=f"streamed influence peak RSS: {case}", value=gib, unit="GiB",
                        target="value < 1.5 (GB)", met=ours["peak_rss"] < 1.5e9))


def _first_order_demo(suite: Suite, device: str) -> None:
    M, S, N = 16, 32, 1797
    ensemble = StackedMLP(M, (1, 8, 8), seed=0).eval().to(device)  # timing needs no training
    code = codes.balanced_constant_weight(N, M, seed=0)
    schedule, sampler = NoiseSchedule.linear(), Sampler("ddim", 50, 0.0)
    start = time.perf_counter()
    grams = first_order_grams(ensemble, schedule, sampler, list(range(S)))
    for gram in (grams.exact, grams.direct):
        code_scores(code, gram=gram, k=10)
    seconds = time.perf_counter() - start
    suite.record(Record(name=f"first-order influence, all {N} units x {S} demo samples ({device}, "
                             f"{len(sampler.plan(schedule))} steps)", value=seconds, unit="s",
                        target="value < 120", met=seconds < 120))


def run(quick: bool, device: str) -> Suite:
    suite = Suite("attribution", quick)
    if device == "cpu":
        _streaming(suite)
    _first_order_demo(suite, device)
    return suite
