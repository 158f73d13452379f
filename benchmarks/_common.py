"""What every benchmark shares: the record format, side-by-side timing, result checks."""

from __future__ import annotations

import dataclasses
import os
import resource
from typing import Callable, List, Optional

import torch
from torch.utils import benchmark as tbench


@dataclasses.dataclass
class Record:
    """One figure. ``ratio`` is baseline time / our time for timings, ours / baseline for
    throughputs; ``target`` says what an issue asks of the figure and ``met`` whether it holds."""

    name: str
    value: float
    unit: str
    baseline: Optional[float] = None
    ratio: Optional[float] = None
    target: Optional[str] = None
    met: Optional[bool] = None

    def as_dict(self) -> dict:
        """Plain JSON values (figures computed with numpy come as numpy scalars)."""
        out = dataclasses.asdict(self)
        for key in ("value", "baseline", "ratio"):
            out[key] = None if out[key] is None else float(out[key])
        out["met"] = None if out["met"] is None else bool(out["met"])
        return out


class Suite:
    """Collects measurements for one printed ``Compare`` table and the records of the run."""

    def __init__(self, label: str, quick: bool):
        self.label = label
        self.quick = quick
        self.measurements: List[tbench.Measurement] = []
        self.records: List[Record] = []

    def time(self, fn: Callable[[], object], case: str, impl: str) -> float:
        """Median seconds per call of ``fn`` (after a warm-up call)."""
        fn()
        timer = tbench.Timer(
            stmt="fn()", globals={"fn": fn}, label=self.label, sub_label=case, description=impl,
            num_threads=torch.get_num_threads(),
        )
        measurement = timer.blocked_autorange(min_run_time=0.3 if self.quick else 1.5)
        self.measurements.append(measurement)
        return measurement.median

    def record(self, record: Record) -> Record:
        self.records.append(record)
        return record

    def compare_times(self, case: str, ours: Callable, baseline: Callable, baseline_name: str,
                      min_ratio: Optional[float] = None) -> Record:
        """Time ours and the baseline side by side; ratio = baseline time / our time."""
        t_ours = self.time(ours, case, "ensattr_fast")
        t_base = self.time(baseline, case, baseline_name)
        ratio = t_base / t_ours
        return self.record(Record(
            name=f"{self.label}: {case}", value=t_ours * 1e3, unit="ms", baseline=t_base * 1e3,
            ratio=ratio, target=None if min_ratio is None else f"ratio >= {min_ratio}",
            met=None if min_ratio is None else ratio >= min_ratio,
        ))

    def print_table(self) -> None:
        if self.measurements:
            tbench.Compare(self.measurements).print()


def check_close(got, want, what: str, **tolerances) -> None:
    """Benchmarks time only results that are right."""
    for g, w in zip(got, want):
        try:
            torch.testing.assert_close(g, w, equal_nan=True, **tolerances)
        except AssertionError as error:
            raise AssertionError(f"{what}: result differs from the reference") from error


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text
