"""Config files for the ``ensattr`` steps: TOML (or YAML with PyYAML installed).

Keys are the command-line options without their dashes (``batch-size`` or ``batch_size``).
Top-level keys apply to every step that has the option; a table named after a step applies to
that step only and wins over the top level. Flags given on the command line win over both::

    data = "images/"          # plan
    members = 16
    [train]
    steps = 3500
    lr = 3e-3
    hflip = true
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Set

from .errors import ConfigError

__all__ = ["ConfigError", "read_config", "options_for", "config_value"]


def read_config(path: os.PathLike) -> dict:
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


def options_for(config: dict, command: str, known: Dict[str, Set[str]], path: os.PathLike = "config") -> dict:
    """The options of ``command`` in ``config`` (``known``: the options of every step, by
    step): top-level keys it has, then its own table. A top-level key that no step has, a
    table that names no step, and a key of a step's table that the step does not have are
    errors: they would otherwise be silently ignored."""
    tables = {k for k, v in config.items() if isinstance(v, dict)}
    strange = sorted(tables - set(known))
    if strange:
        raise ConfigError(f"{path}: [{strange[0]}] is not a step ({', '.join(sorted(known))})")
    everywhere = set().union(*known.values())
    unknown = sorted(k for k in config if k not in tables and k.replace("-", "_") not in everywhere)
    if unknown:
        raise ConfigError(f"{path}: no step takes the option {unknown[0]!r}")
    values = {k.replace("-", "_"): v for k, v in config.items()
              if k not in tables and k.replace("-", "_") in known[command]}
    own = config.get(command, {})
    unknown = sorted(k for k in own if k.replace("-", "_") not in known[command])
    if unknown:
        raise ConfigError(f"{path}: [{command}] has options that `ensattr {command}` does not take: {', '.join(unknown)}")
    values.update({k.replace("-", "_"): v for k, v in own.items()})
    return values


def config_value(action: argparse.Action, value, command: str, path) -> object:
    """What ``set_defaults`` takes for a config value: argparse converts string defaults with
    the option's type (and so checks them); flags take booleans only."""
    flag = f"{path}: {command}.{action.dest.replace('_', '-')}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or isinstance(value, dict):
        raise ConfigError(f"{flag} takes a value like its flag --{action.dest.replace('_', '-')}, got {value!r}")
    if isinstance(value, list):  # seeds = [1, 5, 9], method = ["loss", "dtrak"]
        value = ",".join(str(v) for v in value)
    if action.choices is not None and value not in action.choices and str(value) not in map(str, action.choices):
        raise ConfigError(f"{flag} must be one of {list(action.choices)}, got {value!r}")
    return value if isinstance(value, str) else str(value)
