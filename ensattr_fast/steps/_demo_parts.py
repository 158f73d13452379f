"""What the demo and the fine-tune demo share: the timed step lines, the attribution of the first
samples with its exact check, and the judged quality written to the results file with the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from torch import Tensor

from ..data import Dataset
from ..evaluation.floors import summary
from ..evaluation.judge import DigitJudge, train_judge
from ..store import ResultsWriter
from .attribute import attribute
from .options import AttributeOptions, DemoOptions, ReportOptions
from .report import report
from .session import Session


def step(name: str, start: float) -> None:
    """One line: the seconds since ``start``, then what was done."""
    print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)


def attribute_first(session: Session, options: DemoOptions, what: str, start: float) -> None:
    """Influence of every unit on the first ``options.attribute`` samples (the default methods),
    and the exact check of each sample's top ``options.per_sample`` units."""
    n = min(options.attribute, options.samples)
    attribution = attribute(session, AttributeOptions(samples=n, topk=max(10, options.per_sample),
                                                      check=options.per_sample, device=options.device))
    step(f"influence of {what} on {n} samples; exact check of each sample's top {options.per_sample}: "
         f"{attribution.agreement}", start)


def judge_and_report(session: Session, out: Path, data: Dataset, drawn: Tensor, start: float,
                     more: Callable[[DigitJudge, dict], None] = lambda judge, quality: None) -> dict:
    """The noise floor's summary; the quality of ``drawn`` by a judge trained on ``data`` (and
    what ``more`` adds), kept in the results file; the report under ``out``. Returns the quality."""
    print(summary(session.results), flush=True)
    judge = train_judge(data)
    quality = judge.judge(drawn)
    quality["held_out_confident"] = judge.held_out_confident
    more(judge, quality)
    with ResultsWriter(session.results, "a") as writer:
        writer.set_attrs(quality=quality)
    report(session, out / "report.png", ReportOptions(overwrite=True))
    step(f"report -> {out / 'report.png'}, {out / 'report.html'}", start)
    return quality
