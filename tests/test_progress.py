"""Progress of long runs: a bar on a terminal; in a log, a line with rate and ETA every 5 %,
at most one a second (ENSATTR_PROGRESS_SECONDS) and at least one a minute."""

import io
import os
import re
import subprocess
import sys

import pytest

from ensattr_fast.cli.main import main
from ensattr_fast.runtime.progress import Progress, style

LINE = re.compile(r"^train: (\d+)/200 steps \((\d+)%\), [\d.,]+ steps/s, ETA \d+:\d\d:\d\d(, loss [\d.]+)?$")


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_choice_between_bar_and_lines(monkeypatch):
    monkeypatch.delenv("ENSATTR_PROGRESS", raising=False)
    assert style(Terminal()) == "bar"
    assert style(io.StringIO()) == "lines"
    assert style(object()) == "lines"  # no isatty at all
    monkeypatch.setenv("ENSATTR_PROGRESS", "off")
    assert style(Terminal()) == "off" and style(io.StringIO()) == "off"
    monkeypatch.setenv("ENSATTR_PROGRESS", "lines")
    assert style(Terminal()) == "lines"
    monkeypatch.setenv("ENSATTR_PROGRESS", "nonsense")  # ignored
    assert style(Terminal()) == "bar"


def test_a_terminal_gets_the_bar_and_no_lines(monkeypatch):
    monkeypatch.delenv("ENSATTR_PROGRESS", raising=False)
    out = Terminal()
    with Progress(10, "train", "steps", stream=out) as bar:
        assert bar.bar is not None
        for _ in range(10):
            bar.update()
    assert "\r" in out.getvalue() and "train: 10/10 steps (100%)" not in out.getvalue()


def test_lines_every_five_percent_with_rate_and_eta(monkeypatch):
    monkeypatch.delenv("ENSATTR_PROGRESS", raising=False)
    out, clock = io.StringIO(), Clock()
    with Progress(200, "train", "steps", stream=out, clock=clock, min_seconds=0) as bar:
        for step in range(200):
            clock.now += 0.01
            bar.update()
            if step == 100:
                bar.set_postfix(loss="0.0412")
    lines = out.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[3] == "train: 40/200 steps (20%), 100 steps/s, ETA 0:00:02"
    assert lines[-1] == "train: 200/200 steps (100%), 100 steps/s, ETA 0:00:00, loss 0.0412"


def test_lines_are_spaced_by_time_both_ways(monkeypatch):
    monkeypatch.delenv("ENSATTR_PROGRESS", raising=False)
    out, clock = io.StringIO(), Clock()
    fast = Progress(1000, "sample", "samples", stream=out, clock=clock, min_seconds=1.0)
    for _ in range(999):  # 5 % every 0.05 s: a line a second at most
        clock.now += 0.001
        fast.update()
    assert len(out.getvalue().splitlines()) == 0
    clock.now = 1.0
    fast.update()
    assert out.getvalue().splitlines() == ["sample: 1,000/1,000 samples (100%), 1,000 samples/s, ETA 0:00:00"]

    out, clock = io.StringIO(), Clock()
    slow = Progress(10_000, "attribute", "blocks", initial=2_000, stream=out, clock=clock, min_seconds=1.0)
    for _ in range(3):  # 1 % a minute: a line a minute at least
        clock.now += 61
        slow.update(100)
    assert out.getvalue().splitlines()[-1] == "attribute: 2,300/10,000 blocks (23%), 1.64 blocks/s, ETA 1:18:17"
    slow.close()  # the last state is on the last line already: nothing more
    assert len(out.getvalue().splitlines()) == 3


def test_fractions_add_up_and_an_early_end_is_reported(monkeypatch):
    monkeypatch.delenv("ENSATTR_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress(256, "sample", "samples", stream=out, min_seconds=3600) as bar:
        for _ in range(50):
            bar.update(256 / 50)
    assert out.getvalue().splitlines()[-1].startswith("sample: 256/256 samples (100%)")
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress(100, "train", "steps", stream=out, min_seconds=3600) as bar:
            bar.update(7)
            raise KeyboardInterrupt
    assert out.getvalue().startswith("train: 7/100 steps (7%)")
    quiet = io.StringIO()
    with Progress(5, "train", "steps", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_a_training_job_logs_progress_lines(tmp_path):
    """``ensattr train`` with stderr into a pipe (a batch job): lines, not a vanished bar."""
    plan = tmp_path / "plan.h5"
    assert main(["plan", "--out", str(plan), "--members", "4", "--units", "class"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "ENSATTR_PROGRESS"}
    run = subprocess.run([sys.executable, "-m", "ensattr_fast", "train", "--plan", str(plan),
                          "--out", str(tmp_path / "e.pt"), "--steps", "200", "--hidden", "8", "--blocks", "1",
                          "--batch-size", "4", "--checkpoint-every", "0"],
                         capture_output=True, text=True, timeout=600,
                         env=dict(env, ENSATTR_PROGRESS_SECONDS="0", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    *lines, cost = run.stderr.splitlines()
    assert re.match(r"^train: peak memory [\d.]+ GiB, CPU [\d.]+ s, wall [\d.]+ s$", cost), cost  # the last line
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line)[2]) for line in lines] == list(range(5, 101, 5))
    assert any(line.startswith("train: 40/200 steps (20%), ") for line in lines)
    assert "\r" not in run.stderr
