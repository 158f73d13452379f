"""Generators: which members of a model draw the samples that ``memorization`` searches for copies."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import CodeError

__all__ = ["Generator", "parse_generator"]


@dataclasses.dataclass(frozen=True)
class Generator:
    """Which members of a model sample: all of them (``members`` None) or the listed ones,
    equally weighted. ``name`` is the form it was given in (``full``, ``member:3``,
    ``members:0,2,5``)."""

    name: str
    members: Optional[Tuple[int, ...]] = None

    def weights(self, n_members: int) -> Tensor:
        """Member weights float64 [M]: 1/|G| on the generator's members."""
        chosen = range(n_members) if self.members is None else self.members
        bad = [m for m in chosen if not 0 <= m < n_members]
        if bad:
            raise CodeError(f"generator {self.name}: member {bad[0]} is out of range: the model has {n_members}")
        keep = torch.zeros(n_members, dtype=torch.float64)
        keep[list(chosen)] = 1.0
        return keep / keep.sum()


def parse_generator(text: str) -> Generator:
    """``full``, ``member:M`` or ``members:a,b,c`` (distinct member ids >= 0); anything else
    raises :class:`CodeError`."""
    text = str(text).strip()
    if text == "full":
        return Generator("full")
    kind, colon, rest = text.partition(":")
    if colon and kind in ("member", "members"):
        parts = [p.strip() for p in rest.split(",")]
        if all(p.isdigit() for p in parts) and (kind == "members" or len(parts) == 1):
            ids = tuple(int(p) for p in parts)
            if len(set(ids)) == len(ids) and all(m < 2**31 for m in ids):
                return Generator(f"{kind}:{','.join(map(str, ids))}", ids)
    raise CodeError(f"generator must be full, member:M or members:a,b,c (distinct member ids), got {text!r}")
