"""The kinds of option values: each a type and a range, with one ``parse`` that takes a flag's
text, a config file's value or a Python value, and says in one line what is wrong with a bad
one (it completes "--flag ...": "must be an integer in [1, 10], got 0")."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

__all__ = ["BIG", "SEED_LIMIT", "Kind", "Int", "Float", "Choice", "Switch", "Text", "FilePath", "Seeds", "Device",
           "Units", "Labels", "UnitKind", "Width", "Maybe"]

#: counts no run of this package comes near; anything larger is a typo
BIG = 10**9
SEED_LIMIT = 2**63


class Kind:
    """The type and range of an option's values. ``parse`` takes a flag's text, a config
    file's value or a Python value and returns the value, or raises ValueError with a message
    that completes "--flag ..." ("must be an integer in [1, 10], got 0")."""

    choices: Optional[Sequence[str]] = None
    switch = False  # a flag without a value (store_true)

    def parse(self, value: Any) -> Any:
        raise NotImplementedError


def _text(value: Any) -> str:
    if isinstance(value, (bool, dict, list, tuple)) or value is None:
        raise ValueError(f"takes a single value, got {value!r}")
    return str(value).strip()


class Int(Kind):
    """An integer in [low, high]."""

    def __init__(self, low: int, high: int = BIG):
        self.low, self.high = low, high

    def parse(self, value: Any) -> int:
        try:
            number = int(_text(value), 10)
        except ValueError:
            raise ValueError(f"must be an integer in [{self.low}, {self.high}], got {value!r}") from None
        if not self.low <= number <= self.high:
            raise ValueError(f"must be an integer in [{self.low}, {self.high}], got {number}")
        return number


class Float(Kind):
    """A finite number in the interval from ``low`` to ``high`` (ends open where asked)."""

    def __init__(self, low: float, high: float, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(self, value: Any) -> float:
        try:
            number = float(_text(value))
        except ValueError:
            raise ValueError(f"must be a number in {self.interval}, got {value!r}") from None
        inside = ((number > self.low if self.low_open else number >= self.low)
                  and (number < self.high if self.high_open else number <= self.high))
        if not math.isfinite(number) or not inside:
            raise ValueError(f"must be a finite number in {self.interval}, got {value!r}")
        return number


class Choice(Kind):
    """One of ``choices`` (strings, or numbers matched by their text)."""

    def __init__(self, *choices: Any):
        self.choices = tuple(choices)

    def parse(self, value: Any) -> Any:
        text = _text(value)
        for choice in self.choices:
            if text == str(choice):
                return choice
        raise ValueError(f"must be one of {list(self.choices)}, got {value!r}")


class Switch(Kind):
    """On or off: a flag without a value; in a config file, true or false only."""

    switch = True

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value


class Text(Kind):
    """Any non-empty text."""

    def parse(self, value: Any) -> str:
        text = _text(value)
        if not text:
            raise ValueError("must not be empty")
        return text


class FilePath(Kind):
    """A file's path (whether it exists is the step's to say)."""

    def parse(self, value: Any) -> Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ValueError(f"must be a file's path, got {value!r}")
        return Path(value)


class Maybe(Kind):
    """``kind``, or None (an option that may be left out)."""

    def __init__(self, kind: Kind):
        self.kind, self.choices, self.switch = kind, kind.choices, kind.switch

    def parse(self, value: Any) -> Any:
        return None if value is None else self.kind.parse(value)


class Seeds(Kind):
    """``256`` (seeds 0..255), ``100:164`` (a range), ``1,5,9`` (a list), or a list of seeds:
    distinct seeds in [0, 2^63), as a tuple (none at all is the step's to refuse)."""

    def parse(self, value: Any) -> Tuple[int, ...]:
        seed = Int(0, SEED_LIMIT - 1)
        try:
            if isinstance(value, (list, tuple, range)):
                seeds = [seed.parse(v) for v in value]
            else:
                text = _text(value)
                if ":" in text:
                    start, stop = (seed.parse(v) for v in text.split(":"))
                    seeds = list(range(start, stop))
                elif "," in text:
                    seeds = [seed.parse(v) for v in text.split(",")]
                else:
                    seeds = list(range(Int(0, BIG).parse(text)))
        except ValueError as error:
            raise ValueError(f"seeds are N, A:B or a,b,c with each seed in [0, 2^63): {error}") from None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{value!r} lists a seed twice: every sample needs its own seed")
        return tuple(seeds)


class Device(Kind):
    """``cpu``, ``cuda`` or ``cuda:N``, available on this machine."""

    def parse(self, value: Any) -> str:
        import torch

        text = _text(value)
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"must be cpu, cuda or cuda:N, got {value!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"must be cpu, cuda or cuda:N, got {value!r}")
        if device.type == "cuda" and (not torch.cuda.is_available()
                                      or (device.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"{value!r}: this machine has {torch.cuda.device_count()} usable CUDA devices")
        return text


class Units(Kind):
    """Unit ids, comma-separated (``3,17,250``) or a list; whether they exist is the code's to say."""

    def parse(self, value: Any) -> Tuple[int, ...]:
        unit = Int(-2**62, 2**62)
        parts = value if isinstance(value, (list, tuple, range)) else _text(value).split(",")
        try:
            return tuple(unit.parse(v) for v in parts)
        except ValueError as error:
            raise ValueError(f"unit ids are comma-separated integers, e.g. 3,17,250: {error}") from None


class Labels(Kind):
    """Class labels, comma-separated (``3`` for every sample, ``0,1,2,...`` one per sample), -1
    for none; whether the members know them is the sampler's to say."""

    def parse(self, value: Any) -> Tuple[int, ...]:
        label = Int(-1, 2**31)
        parts = value if isinstance(value, (list, tuple, range)) else _text(value).split(",")
        try:
            return tuple(label.parse(v) for v in parts)
        except ValueError as error:
            raise ValueError(f"labels are comma-separated integers >= -1, e.g. 3 or 0,1,2: {error}") from None


class UnitKind(Kind):
    """One of ``kinds`` (``example``, ``class``, ``group``), or ``clusters:K`` with K >= 2
    (written back as ``clusters:K``, the form plans store)."""

    def __init__(self, kinds: Sequence[str]):
        self.fixed = [kind for kind in kinds if ":" not in kind]

    def parse(self, value: Any) -> str:
        text = _text(value)
        if text in self.fixed:
            return text
        name, colon, count = text.partition(":")
        if name == "clusters" and colon:
            try:
                return f"clusters:{Int(2, BIG).parse(count)}"
            except ValueError as error:
                raise ValueError(f"clusters:K takes a number of clusters K: {error}") from None
        raise ValueError(f"must be {', '.join(self.fixed)} or clusters:K (K >= 2), got {value!r}")


class Width(Int):
    """Channels of the built-in UNet: a multiple of 8 (its group norms)."""

    def __init__(self):
        super().__init__(8, 4096)

    def parse(self, value: Any) -> int:
        number = super().parse(value)
        if number % 8:
            raise ValueError(f"must be a multiple of 8 (the UNet's group norms), got {number}")
        return number
