"""Write docs/api.md from the package's docstrings and option fields: every name of
``ensattr_fast.__all__``, its signature and the first paragraph of its docstring; every options
dataclass as a table of its options (flag, default, help). ``python docs/make_api.py`` rewrites
the page; tests/test_api_docs.py checks that the page is what this script writes."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import ensattr_fast as ef
from ensattr_fast.runtime.fields import leaves

PAGE = Path(__file__).with_name("api.md")

SECTIONS = {
    "The lifecycle": ["Audit"],
    "What the steps return": ["Plan", "Training", "Samples", "Counterfactuals", "Attribution", "GroupAudit",
                              "Copies"],
    "The options of every step": ["PlanOptions", "TrainOptions", "SampleOptions", "AblateOptions",
                                  "AttributeOptions", "GroupAuditOptions", "MemorizationOptions", "MetricsOptions",
                                  "LdsOptions", "ReportOptions", "DemoOptions"],
    "The parts options share": ["TrainConfig", "MemberOptions", "Sampler", "Passes", "NoiseFloor", "NoiseSchedule",
                                "Config", "load_config"],
    "Files and data": ["open_results", "Results", "Checkpoint", "Dataset", "load_dataset", "load_digits"],
    "Errors": ["EnsattrError", "CodeError", "DataError", "ArchitectureError", "CheckpointError", "StoreError",
               "DiskError", "MethodError", "ConfigError"],
    "Kernels and the build": ["ops", "build_info", "__version__"],
}


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _signature(obj, name: str) -> str:
    """``name(a, b=1, *, c=None)``: the parameters and defaults, without annotations."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    shown = signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                          for p in signature.parameters.values()],
                              return_annotation=inspect.Signature.empty)
    return f"{name}{shown}".replace("'", '"')


def _value(value) -> str:
    if isinstance(value, tuple) and len(value) > 6:
        return f"{value[0]}..{value[-1]} ({len(value)})"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _options_table(cls) -> list:
    rows = ["| option (Python name) | flag | default | what it does |", "| --- | --- | --- | --- |"]
    for leaf in leaves(cls):
        name = ".".join(leaf.path)
        help_text = leaf.option.help.replace("|", "\\|")
        rows.append(f"| `{name}` | `{leaf.flag}` | `{_value(leaf.default)}` | {help_text} |")
    return rows


def _methods(cls) -> list:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (classmethod, property))):
            continue
        target = member.__func__ if isinstance(member, classmethod) else member
        target = target.fget if isinstance(target, property) else target
        shown = name if isinstance(member, property) else _signature(target, name).replace("(self, ", "(").replace(
            "(self)", "()").replace("(cls, ", "(")
        out.append(f"- `{shown}`: {_first_paragraph(target)}")
    return out


def render() -> str:
    lines = ["# API", "",
             "`import ensattr_fast as ef`: the names below are the whole public face; the building blocks "
             "(members, samplers, scores, codes) are reachable in their packages (docs/architecture.md). "
             "This page is written by `python docs/make_api.py` from the docstrings and option fields; "
             "`tests/test_api_docs.py` checks that it is current.", ""]
    for section, names in SECTIONS.items():
        lines += [f"## {section}", ""]
        for name in names:
            obj = getattr(ef, name)
            if name == "__version__":
                lines += ["### `ef.__version__`", "", "The package's version.", ""]
                continue
            if inspect.ismodule(obj):
                lines += [f"### `ef.{name}`", "", _first_paragraph(obj), ""]
                lines += [f"- `{n}`: {_first_paragraph(getattr(obj, n))}" for n in obj.__all__
                          if callable(getattr(obj, n))] + [""]
                continue
            lines += [f"### `ef.{_signature(obj, name)}`" if not dataclasses.is_dataclass(obj) or not
                      list(leaves(obj)) else f"### `ef.{name}`", "", _first_paragraph(obj), ""]
            if dataclasses.is_dataclass(obj) and list(leaves(obj)):
                lines += _options_table(obj) + [""]
            elif inspect.isclass(obj) and not issubclass(obj, Exception):
                methods = _methods(obj)
                if methods:
                    lines += methods + [""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)
