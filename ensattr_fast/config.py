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

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["ConfigError", "read_config", "options_for"]


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


def options_for(config: dict, command: str, known: set, path: os.PathLike = "config") -> dict:
    """The options of ``command`` in ``config``: top-level keys it knows, then its own table
    (where an unknown key is an error: it would otherwise be silently ignored)."""
    steps_tables = {k for k, v in config.items() if isinstance(v, dict)}
    values = {k.replace("-", "_"): v for k, v in config.items()
              if k not in steps_tables and k.replace("-", "_") in known}
    own = config.get(command, {})
    unknown = sorted(k for k in own if k.replace("-", "_") not in known)
    if unknown:
        raise ConfigError(f"{path}: [{command}] has options that `ensattr {command}` does not take: {', '.join(unknown)}")
    values.update({k.replace("-", "_"): v for k, v in own.items()})
    return values
