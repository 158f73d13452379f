"""Progress of long runs (training, sampling, attribution).

On a terminal: a tqdm bar. Elsewhere (batch jobs, SLURM logs, pipes), where a bar would vanish
or fill the log with carriage returns: one line on stderr every 5 %, at most one every second
and at least one a minute while work goes on, and a last one when it ends::

    train: 40/200 steps (20%), 123 steps/s, ETA 0:00:02, loss 0.0412

``ENSATTR_PROGRESS=bar|lines|off`` overrides the choice; ``ENSATTR_PROGRESS_SECONDS`` sets the
shortest time between two lines (default 1).
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from typing import Callable, Optional, TextIO

__all__ = ["Progress", "style", "note"]

STYLES = ("bar", "lines", "off")
EVERY_PERCENT = 5
MIN_SECONDS = 1.0
MAX_SECONDS = 60.0


def note(text: str) -> None:
    """Tell the user, on stderr, of a choice a step made for them (an option it had to clamp)."""
    from . import distributed

    if distributed.world().main:
        print(f"note: {text}", file=sys.stderr, flush=True)


def style(stream: Optional[TextIO] = None) -> str:
    """``bar`` when ``stream`` (stderr) is a terminal, ``lines`` when it is not (a file, a
    pipe, a batch system's log); ``ENSATTR_PROGRESS`` wins when it names one of them."""
    chosen = os.environ.get("ENSATTR_PROGRESS", "").strip().lower()
    if chosen in STYLES:
        return chosen
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def _min_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("ENSATTR_PROGRESS_SECONDS", MIN_SECONDS)))
    except ValueError:
        return MIN_SECONDS


class Progress:
    """``total`` units of work (``unit``: plural, e.g. ``steps``) under the name ``desc``;
    ``initial`` of them done before (a resumed run). ``update(n)`` may add fractions."""

    def __init__(self, total: float, desc: str, unit: str, initial: float = 0, enabled: bool = True,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                 min_seconds: Optional[float] = None, max_seconds: float = MAX_SECONDS):
        self.stream = sys.stderr if stream is None else stream
        self.style = style(self.stream) if enabled else "off"
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.clock, self.postfix = clock, {}
        self.min_seconds = _min_seconds() if min_seconds is None else min_seconds
        self.max_seconds = max_seconds
        self.start = self.last_time = clock()
        self.last_bucket, self.printed_n = self._bucket(), None
        self.bar = None
        if self.style == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s"), file=self.stream,
                            dynamic_ncols=True)

    def _bucket(self) -> int:
        return int(100 * self.n / self.total // EVERY_PERCENT) if self.total else 0

    def update(self, n: float = 1) -> None:
        self.n += n
        if abs(self.n - self.total) <= 1e-9 * max(1.0, self.total):  # fractions that add up to the total
            self.n = self.total
        if self.bar is not None:
            self.bar.update(n)
        if self.style != "lines":
            return
        now, bucket = self.clock(), self._bucket()
        waited = now - self.last_time
        if (self.n >= self.total or (bucket > self.last_bucket and waited >= self.min_seconds)
                or waited >= self.max_seconds):
            self._line(now)

    def set_postfix(self, **values) -> None:
        """Values shown after the rate (``loss=0.0412``)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line, e.g. ``train: 40/200 steps (20%), 123 steps/s, ETA 0:00:02``."""
        now = self.clock() if now is None else now
        done = self.n - self.initial
        rate = done / (now - self.start) if now > self.start else 0.0
        percent = int(100 * self.n / self.total) if self.total else 100
        eta = _duration((self.total - self.n) / rate) if rate > 0 else "?"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return (f"{self.desc}: {_count(self.n)}/{_count(self.total)} {self.unit} ({percent}%), "
                f"{_rate(rate)} {self.unit}/s, ETA {eta}{extra}")

    def _line(self, now: float) -> None:
        if self.printed_n == self.n:
            return
        print(self.line(now), file=self.stream, flush=True)
        self.last_time, self.last_bucket, self.printed_n = now, self._bucket(), self.n

    def close(self) -> None:
        """End the bar, or write the last line (where the work stopped) if not yet written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.style == "lines" and self.n > self.initial:
            self._line(self.clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _count(n: float) -> str:
    return f"{math.floor(n + 1e-9):,}"


def _rate(rate: float) -> str:
    if rate >= 100:
        return f"{rate:,.0f}"
    return f"{rate:.3g}"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
