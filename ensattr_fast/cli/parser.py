"""The ``ensattr`` parser, generated from the steps' options dataclasses
(:mod:`ensattr_fast.steps.options`) and their files: every flag's type, range, choices and
help come from one field's metadata. Values come, from strongest to weakest, from the flags, a
``--config`` file, and the dataclasses' defaults; every refusal is one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from ..errors import ConfigError
from ..runtime.fields import Kind, Leaf, leaves, update
from ..runtime.kinds import Float
from ..steps.config_file import Config, load_config
from ..steps.files import STEP_FILES
from ..steps.options import STEP_OPTIONS

__all__ = ["UsageError", "Command", "parser", "parse"]

DESCRIPTION = """The ``ensattr`` command line: ``demo``, and ``plan``, ``train``, ``sample``, ``ablate``,
``attribute``, ``audit``, ``memorization``, ``metrics``, ``lds``, ``report`` as separate steps over
files; each is a method of :class:`ensattr_fast.Audit`.

Under ``torchrun`` (``torchrun --nproc_per_node 2 -m ensattr_fast train ...``) ``train``,
``sample``, ``ablate`` and ``attribute`` split their work across the ranks (see
:mod:`ensattr_fast.runtime.distributed`); rank 0 writes the files and prints."""


class UsageError(ConfigError):
    """A refused command line; ``prog`` is the command (``ensattr train``)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with every refused argument one :class:`UsageError` line (no usage block)."""

    def error(self, message):
        raise UsageError(self.prog, message)


class _Once(argparse.Action):
    """An option given at most once (a second ``--config`` would leave one of them unused)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise UsageError(parser.prog, f"{option_string} is given twice: one config file per run")
        setattr(namespace, self.dest, values)


class Command(NamedTuple):
    """A parsed command line: the step, its options, its files by role and the config file."""

    step: str
    options: Any
    files: Dict[str, Optional[Path]]
    config: Optional[Config]
    memory: Optional[float] = None  # GiB, --memory


def _argument_type(kind: Kind):
    def parse(text: str):
        try:
            return kind.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = type(kind).__name__.lower()  # argparse names the type in some messages
    return parse


def _help(leaf: Leaf) -> str:
    default = leaf.default
    if leaf.option.kind.switch or default is None or (isinstance(default, tuple) and len(default) > 8):
        return leaf.option.help
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{leaf.option.help} (default: {shown})"


def _add_step(sub, step: str) -> None:
    cls = STEP_OPTIONS[step]
    p = sub.add_parser(step, help=cls.__doc__.split("\n\n")[0].split(": ", 1)[-1].strip(), description=cls.__doc__)
    for role in STEP_FILES[step]:
        p.add_argument(f"--{role.name}", type=Path, default=argparse.SUPPRESS,
                       help=role.help + (f" (default: {role.default})" if role.default else ""))
    for leaf in leaves(cls):
        kind = leaf.option.kind
        arguments: Dict[str, Any] = dict(dest=leaf.dest, default=argparse.SUPPRESS, help=_help(leaf))
        if kind.switch:
            arguments["action"] = "store_true"
        elif kind.choices is not None:
            arguments.update(choices=[str(c) for c in kind.choices])  # argparse's own "invalid choice" line
        else:
            arguments["type"] = _argument_type(kind)
        p.add_argument(leaf.flag, **arguments)
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, action=_Once,
                   help="TOML or YAML file of options (flags win over it); one per run")
    p.add_argument("--memory", type=_argument_type(Float(0, 2**20, low_open=True)), default=None,
                   help="GiB the step plans its blocks from (default: ENSATTR_MEMORY, else an eighth of this "
                        "machine's memory); the command's peak is printed at its end")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="ensattr", description=DESCRIPTION)
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for step in STEP_OPTIONS:
        _add_step(sub, step)
    return top


def parse(argv: Optional[List[str]] = None) -> Command:
    """The command line ``argv`` as the step, its options and files: flags over the
    ``--config`` file over the defaults; a missing required file is one :class:`UsageError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(parser().parse_args(argv))
    step = given.pop("command")
    prog = f"ensattr {step}"
    config_path = given.pop("config", None)
    memory = given.pop("memory", None)
    config = load_config(config_path) if config_path is not None else None
    roles = {role.name: role for role in STEP_FILES[step]}
    from_file = config.values(step) if config is not None else {}
    files = {name: Path(from_file[name]) if name in from_file else None for name in roles}
    files.update({name: value for name, value in given.items() if name in roles})
    for name, role in roles.items():
        if files[name] is None and role.default is not None:
            files[name] = Path(role.default)
    missing = [f"--{name}" for name, role in roles.items() if role.required and files[name] is None]
    flags = {dest: value for dest, value in given.items() if dest not in roles}
    required = [leaf for leaf in leaves(STEP_OPTIONS[step]) if leaf.option.required]
    missing += [leaf.flag for leaf in required if leaf.dest not in flags and leaf.dest not in from_file]
    if missing:
        raise UsageError(prog, f"the following arguments are required: {', '.join(missing)}")
    options = STEP_OPTIONS[step]()
    if config is not None:
        options = config.options(step, options, skip=set(flags))
    try:
        options = update(options, flags, prog)
    except ConfigError as error:
        raise UsageError(prog, str(error).removeprefix(f"{prog}: ")) from None
    return Command(step, options, files, config, memory)
