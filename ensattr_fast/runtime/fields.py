"""Typed option fields: an options dataclass says once, in each field's metadata, the flag that
sets it, its help, and the type and range of its values (a :class:`~.kinds.Kind`). Its
``__post_init__`` calls :func:`check_fields`, which checks and normalises every value against
them, whatever gave it (a flag, a config file, Python). The command line's parser is generated
from the same fields (:mod:`ensattr_fast.cli.parser`), config files are read into the same
dataclasses (:func:`build`), so each option is written once.

>>> @dataclasses.dataclass(frozen=True)
... class Options:
...     steps: int = option(2000, Int(1), "optimisation steps")
...     def __post_init__(self):
...         check_fields(self)
>>> build(Options, {"steps": "30"}).steps
30
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from .kinds import (BIG, SEED_LIMIT, Choice, Device, FilePath, Float, Int, Kind, Maybe, Seeds, Switch, Text, UnitKind,
                    Units, Width)

__all__ = ["BIG", "SEED_LIMIT", "Kind", "Int", "Float", "Choice", "Switch", "Text", "FilePath", "Seeds", "Device",
           "Units", "UnitKind", "Width", "Maybe", "Option", "option", "nested", "check_fields", "leaves", "Leaf",
           "build", "update", "as_record"]

@dataclasses.dataclass(frozen=True)
class Option:
    """What a field's metadata holds: its help, its kind, its flag (default ``--field-name``),
    whether the command line requires it, and ``convert``, where the flag gives another form
    than the field holds (``--no-clip`` sets ``clip`` to None): then ``kind`` is the flag's and
    the dataclass checks the field itself."""

    help: str
    kind: Kind
    flag: Optional[str] = None
    convert: Optional[Callable[[Any], Any]] = None
    required: bool = False


def option(default: Any = dataclasses.MISSING, kind: Optional[Kind] = None, help: str = "", *,
           flag: Optional[str] = None, convert: Optional[Callable[[Any], Any]] = None,
           required: bool = False) -> Any:
    """A dataclass field that is an option: ``steps: int = option(2000, Int(1), "steps")``."""
    meta = Option(help, kind or Text(), flag, convert, required)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"option": meta})
    return dataclasses.field(default=default, metadata={"option": meta})


@dataclasses.dataclass(frozen=True)
class _Nested:
    cls: type
    skip: Tuple[str, ...]
    defaults: Mapping[str, Any]


def nested(cls: type, skip: Sequence[str] = (), **defaults: Any) -> Any:
    """A field holding another options dataclass (``TrainConfig`` inside the train step's
    options), with some of its defaults changed and some fields not offered (``skip``)."""
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"nested": _Nested(cls, tuple(skip), dict(defaults))})


def check_fields(obj: Any, what: str = "") -> None:
    """Check every option field of ``obj`` against its kind, normalising it (lists of seeds to
    tuples, text to numbers); a value out of range is one :class:`ConfigError` naming it
    (``what``: the words before its name, e.g. "training ")."""
    for f in dataclasses.fields(obj):
        meta = f.metadata.get("option")
        if meta is None or meta.convert is not None:
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        try:
            parsed = meta.kind.parse(value)
        except ValueError as error:
            raise ConfigError(f"{what}{f.name.replace('_', ' ')} {error}") from None
        object.__setattr__(obj, f.name, parsed)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option of a (nested) options dataclass: its flag's ``dest`` (also its config key),
    the path of field names to it, its metadata and its default."""

    dest: str
    path: Tuple[str, ...]
    option: Option
    default: Any

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.path[-1].replace("_", "-")


def leaves(cls: type, skip: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None,
           prefix: Tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every option of ``cls``, nested dataclasses walked into, in field order."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if "nested" in f.metadata:
            inner = f.metadata["nested"]
            yield from leaves(inner.cls, inner.skip, inner.defaults, prefix + (f.name,))
        elif "option" in f.metadata:
            meta = f.metadata["option"]
            if f.name in defaults:
                default = defaults[f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            flag = meta.flag or "--" + f.name.replace("_", "-")
            yield Leaf(flag.lstrip("-").replace("-", "_"), prefix + (f.name,), meta, default)


def build(cls: type, values: Mapping[str, Any], where: str = "options") -> Any:
    """``cls`` with the options ``values`` gives by ``dest`` (flags' and config keys' names,
    dashes or underscores), each parsed by its kind; the others keep their defaults. An unknown
    name or a bad value is one :class:`ConfigError` naming it and ``where`` it came from."""
    return update(cls(), values, where)


def update(obj: Any, values: Mapping[str, Any], where: str = "options") -> Any:
    """A copy of the options ``obj`` with the options ``values`` gives (as :func:`build`).
    A field's own name serves where no flag has it (``methods`` for ``--method``); through it,
    a field a flag converts takes the field's value (``clip=None`` for ``--no-clip``)."""
    by_dest = {leaf.dest: leaf for leaf in leaves(type(obj))}
    names = [leaf.path[-1] for leaf in by_dest.values()]
    by_name = {leaf.path[-1]: leaf for leaf in by_dest.values() if names.count(leaf.path[-1]) == 1}
    tree: Dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        leaf = by_dest.get(key) or by_name.get(key)
        if leaf is None:
            raise ConfigError(f"{where}: no option {key!r} (options: {', '.join(sorted(by_dest))})")
        as_field = key not in by_dest and leaf.option.convert is not None
        try:
            parsed = value if as_field else leaf.option.kind.parse(value)
        except ValueError as error:
            raise ConfigError(f"{where}: {leaf.flag} {error}") from None
        node = tree
        for name in leaf.path[:-1]:
            node = node.setdefault(name, {})
        node[leaf.path[-1]] = leaf.option.convert(parsed) if leaf.option.convert and not as_field else parsed
    return _replace(obj, tree)


def _replace(obj: Any, tree: Mapping[str, Any]) -> Any:
    if not tree:
        return obj
    changes = {name: _replace(getattr(obj, name), value) if isinstance(value, dict) and
               dataclasses.is_dataclass(getattr(obj, name)) else value for name, value in tree.items()}
    return dataclasses.replace(obj, **changes)


def as_record(obj: Any) -> Dict[str, Any]:
    """``obj`` as JSON values (nested dataclasses as objects, tuples as lists, paths as text),
    the form steps keep their options in."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple, range)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value
    return plain(obj)


def flags_of(cls: type) -> List[str]:
    """Every flag of ``cls`` (for tests and help texts)."""
    return [leaf.flag for leaf in leaves(cls)]
