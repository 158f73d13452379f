"""Config files: TOML (or YAML with PyYAML installed), read into the steps' options dataclasses.

Keys are the command-line options without their dashes (``batch-size`` or ``batch_size``).
Top-level keys apply to every step that has the option; a table named after a step applies to
that step only and wins over the top level; on the command line, flags win over both::

    data = "images/"          # plan
    members = 16
    [train]
    steps = 3500
    lr = 3e-3
    hflip = true

A step's files (``out``, ``plan``, ``checkpoint``, ``results``) may be given too; the command
line reads them (:meth:`Config.files`), an :class:`~ensattr_fast.Audit` keeps its own.

>>> config = load_config("audit.toml")      # doctest: +SKIP
>>> config["train"].train.steps             # doctest: +SKIP
3500
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping

from ..errors import ConfigError
from ..runtime.fields import leaves, update
from .files import STEP_FILES
from .options import STEP_OPTIONS

__all__ = ["Config", "load_config", "read_config"]


def read_config(path: os.PathLike) -> dict:
    """The mapping a TOML or YAML file holds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"config file {path}: YAML needs PyYAML (pip install pyyaml), or use TOML") from None
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of options, not {type(loaded).__name__}")
            return loaded
    except ConfigError:
        raise
    except Exception as error:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"config file {path} cannot be parsed: {error}") from None
    raise ConfigError(f"config file {path}: use .toml, .yaml or .yml")


def _known(step: str) -> Dict[str, str]:
    """The keys ``step`` takes: option dests and file names, each to what it is."""
    keys = {leaf.dest: "option" for leaf in leaves(STEP_OPTIONS[step])}
    keys.update({role.name: "file" for role in STEP_FILES[step]})
    return keys


class Config(Mapping):
    """What a config file gives each step: ``config[step]`` is the step's options dataclass
    (defaults, then the top-level keys it has, then its own table); ``config.values(step)`` the
    raw values, files included. A top-level key that no step has, a table that names no step,
    and a key of a step's table that the step does not have are errors: they would otherwise
    be silently ignored. Values are checked when a step's options are asked for (a top-level
    ``seeds`` may suit ``sample`` and not ``lds``)."""

    def __init__(self, mapping: Mapping[str, Any], path: os.PathLike = "config"):
        self.path = Path(path)
        tables = {k for k, v in mapping.items() if isinstance(v, dict)}
        strange = sorted(tables - set(STEP_OPTIONS))
        if strange:
            raise ConfigError(f"{path}: [{strange[0]}] is not a step ({', '.join(sorted(STEP_OPTIONS))})")
        known = {step: _known(step) for step in STEP_OPTIONS}
        everywhere = set().union(*known.values())
        unknown = sorted(k for k in mapping if k not in tables and k.replace("-", "_") not in everywhere)
        if unknown:
            raise ConfigError(f"{path}: no step takes the option {unknown[0]!r}")
        self._values: Dict[str, Dict[str, Any]] = {}
        for step, keys in known.items():
            values = {k.replace("-", "_"): v for k, v in mapping.items()
                      if k not in tables and k.replace("-", "_") in keys}
            own = mapping.get(step, {})
            strange = sorted(k for k in own if k.replace("-", "_") not in keys)
            if strange:
                raise ConfigError(f"{path}: [{step}] has options that `ensattr {step}` does not take: "
                                  f"{', '.join(strange)}")
            values.update({k.replace("-", "_"): v for k, v in own.items()})
            self._values[step] = values

    def values(self, step: str) -> Dict[str, Any]:
        """The raw values the file gives ``step``, by option or file name."""
        return dict(self._values[step])

    def files(self, step: str) -> Dict[str, Path]:
        """The files the config gives ``step`` (``out``, ``plan``, ``checkpoint``, ``results``)."""
        names = {role.name for role in STEP_FILES[step]}
        return {k: Path(v) for k, v in self._values[step].items() if k in names}

    def options(self, step: str, base: Any = None, skip: Iterable[str] = ()) -> Any:
        """``base`` (default: the step's defaults) with the options the file gives ``step``
        (but those named in ``skip``: flags given over them)."""
        names = {role.name for role in STEP_FILES[step]} | set(skip)
        given = {k: v for k, v in self._values[step].items() if k not in names}
        return update(base if base is not None else STEP_OPTIONS[step](), given, f"{self.path} [{step}]")

    def __getitem__(self, step: str) -> Any:
        if step not in STEP_OPTIONS:
            raise KeyError(step)
        return self.options(step)

    def __iter__(self) -> Iterator[str]:
        return iter(STEP_OPTIONS)

    def __len__(self) -> int:
        return len(STEP_OPTIONS)


def load_config(path: os.PathLike) -> Config:
    """The options of every step from a TOML or YAML file (see the module's docstring):
    ``load_config("audit.toml")["train"]`` is a :class:`~ensattr_fast.steps.TrainOptions`."""
    return Config(read_config(path), path)
