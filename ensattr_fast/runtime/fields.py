"""The types of the command line's values: each option's type and range, shared by the flags
and the ``--config`` file (whose values go through the same parsers), and a parser whose every
refusal is one line."""

from __future__ import annotations

import argparse
import math
from typing import List

from .errors import ConfigError

__all__ = ["BIG", "SEED_LIMIT", "UsageError"]

#: counts no run of this package comes near; anything larger is a typo
BIG = 10**9
SEED_LIMIT = 2**63


class UsageError(ConfigError):
    """A refused command line; ``prog`` is the command (``ensattr train``)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with every refused argument one :class:`UsageError` line (no usage block)."""

    def error(self, message):
        raise UsageError(self.prog, message)


def _int(low: int, high: int = BIG):
    """An integer in [low, high], from a flag or a config value."""
    def parse(text) -> int:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value}")
        return value
    return parse


def _float(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A finite number in the interval from ``low`` to ``high`` (ends open where asked)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text!r}")
        return value
    return parse


def _width(text) -> int:
    value = _int(8, 4096)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the UNet's group norms), got {value}")
    return value


def _seeds(text: str) -> List[int]:
    """``256`` (seeds 0..255), ``100:164`` (a range) or ``1,5,9`` (a list): distinct seeds in
    [0, 2^63) (none at all is the step's to refuse)."""
    text = str(text).strip()
    seed = _int(0, SEED_LIMIT - 1)
    try:
        if ":" in text:
            start, stop = (seed(v) for v in text.split(":"))
            seeds = list(range(start, stop))
        elif "," in text:
            seeds = [seed(v) for v in text.split(",")]
        else:
            seeds = list(range(_int(0, BIG)(text)))
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"seeds are N, A:B or a,b,c with each seed in [0, 2^63): {error}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} lists a seed twice: every sample needs its own seed")
    return seeds


def _device(text) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, available on this machine."""
    import torch

    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} usable CUDA devices")
    return str(text).strip()


def _units(text) -> List[int]:
    """Unit ids, comma-separated (``3,17,250``); whether they exist is the code's to say."""
    unit = _int(-2**62, 2**62)
    try:
        units = [unit(v) for v in str(text).split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"unit ids are comma-separated integers, e.g. 3,17,250: {error}") from None
    return units


def _unit_kind(kinds):
    """One of ``kinds`` (``example``, ``class``, ``group``), or ``clusters:K`` with an integer
    K >= 2 (written back as ``clusters:K``, the form plans store)."""
    fixed = [kind for kind in kinds if ":" not in kind]

    def parse(text) -> str:
        text = str(text).strip()
        if text in fixed:
            return text
        name, colon, count = text.partition(":")
        if name == "clusters" and colon:
            try:
                return f"clusters:{_int(2, BIG)(count)}"
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(f"clusters:K takes a number of clusters K: {error}") from None
        raise argparse.ArgumentTypeError(f"must be {', '.join(fixed)} or clusters:K (K >= 2), got {text!r}")
    return parse
