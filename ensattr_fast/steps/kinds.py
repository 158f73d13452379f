"""The kinds of the steps' own option values (methods by name, unit sets, generators), which
check against the registries of the layers below; and the reader of unit-set files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from ..attribution.methods import GRADIENT, METHODS, get_method, parse_methods
from ..errors import CodeError, DataError, MethodError
from ..evaluation.memorization import parse_generator
from ..runtime.kinds import FilePath, Kind

__all__ = ["MethodList", "MethodName", "GradientMethod", "UnitSets", "GeneratorName", "read_groups"]


class MethodList(Kind):
    """Method names, comma-separated or a list (each checked against the registry)."""

    def parse(self, value) -> Tuple[str, ...]:
        try:
            return tuple(m.name for m in parse_methods(value if isinstance(value, (list, tuple)) else str(value)))
        except MethodError as error:
            raise ValueError(str(error)) from None


class MethodName(Kind):
    def parse(self, value) -> str:
        try:
            return get_method(str(value).strip()).name
        except MethodError as error:
            raise ValueError(str(error)) from None


class UnitSets(Kind):
    """Unit sets: a JSON file {name: [units]} (read when the step runs), or such a mapping."""

    def parse(self, value):
        if isinstance(value, dict):
            return _groups_of(value, "groups")
        return FilePath().parse(value)


def _groups_of(groups, where) -> Dict[str, List[int]]:
    """Name -> a non-empty list of distinct unit ids (integers: not 1.5, "7" or true)."""
    example = '{"artist 7": [3, 18, 40]}'
    if not isinstance(groups, dict) or not groups:
        raise DataError(f"{where} must map names to lists of unit ids, e.g. {example}")
    out = {}
    for name, units in groups.items():
        if not isinstance(units, (list, tuple)) or not units:
            raise DataError(f"{where}: unit set {name!r} must be a non-empty list of unit ids, e.g. {example}")
        bad = [u for u in units if isinstance(u, bool) or not isinstance(u, (int, np.integer))]
        if bad:
            raise DataError(f"{where}: unit set {name!r} holds {bad[0]!r}, not a unit id (an integer)")
        if len(set(units)) != len(units):
            raise DataError(f"{where}: unit set {name!r} names a unit twice")
        out[str(name)] = [int(u) for u in units]
    return out


def read_groups(groups: Union[os.PathLike, dict]) -> Dict[str, List[int]]:
    """Unit sets from a JSON file mapping names to unit lists (or such a mapping), e.g.
    {"artist 7": [3, 18, 40]}.

    Under a constant-weight code the excluders of a set are the members that excluded every
    unit of it, so sets of more than a few units have none (their scores are NaN): plan large
    groups as units with a sparse exclusion design instead.
    """
    if isinstance(groups, dict):
        return _groups_of(groups, "groups")
    try:
        loaded = json.loads(Path(groups).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"groups file {groups} cannot be read as JSON {{name: [units]}}: {error}") from None
    return _groups_of(loaded, f"groups file {groups}")


class GradientMethod(Kind):
    @property
    def choices(self):
        return tuple(m for m in METHODS if METHODS[m].scorer is GRADIENT)

    def parse(self, value) -> str:
        if str(value).strip() not in self.choices:
            raise ValueError(f"must be a gradient method ({', '.join(self.choices)}), got {value!r}")
        return str(value).strip()


class GeneratorName(Kind):
    """``full``, ``member:M`` or ``members:a,b,c``, in its normal form."""

    def parse(self, value) -> str:
        try:
            return parse_generator(str(value)).name
        except CodeError as error:
            raise ValueError(str(error)) from None
