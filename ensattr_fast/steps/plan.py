"""``plan``: the code (which member trains on which unit) and the units, in a plan file."""

from __future__ import annotations

import dataclasses
import os

from .. import codes
from ..data import load_data, units_for
from ..runtime.files import atomic_output, check_output, writing
from ..store import ResultsWriter, parse_json, read_hdf5, versions
from .options import PlanOptions

__all__ = ["Plan", "plan", "design_reason"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a plan holds: the code's statistics, the design used and why it fits the units."""

    stats: codes.CodeStats
    design: str
    reason: str


def plan(path: os.PathLike, options: PlanOptions = PlanOptions()) -> Plan:
    """Write the code and the units to the HDF5 plan file ``path`` (the layout of a results
    file). The data's spec is stored in the plan, so that every later step reloads the same
    data; ``clusters:K`` units are seeded with ``options.seed``; the plan also stores why the
    design fits the units (``design_reason``)."""
    dataset = options.dataset()
    sources = dataset if isinstance(dataset, dict) else {}
    check_output(path, "--out", options.overwrite,
                 inputs={"--data": sources.get("path"), "--metadata": sources.get("metadata")})
    data = load_data(dataset)
    units = units_for(data, options.units, seed=options.seed)  # the seed also seeds content clusters
    code, used = codes.plan(units, options.members, seed=options.seed, design=options.design,
                            excluders_per_group=options.excluders)
    reason = codes.design_reason(units, code, used, asked=options.design)
    stats = codes.statistics(code)
    with writing(path, "plan file"), atomic_output(path) as tmp, ResultsWriter(tmp, "w") as writer:
        writer.write_code(code, units.unit_of, units.names)
        writer.set_attrs(plan=dict(dataset=dataset, units=options.units, members=options.members, design=used,
                                   design_reason=reason, excluders=options.excluders, seed=options.seed),
                         code_statistics=dataclasses.asdict(stats), versions=versions())
    return Plan(stats, used, reason)


def design_reason(path: os.PathLike) -> str:
    """The sentence a plan file stores on its design: which one, and why."""
    with read_hdf5(path, "plan file") as f:
        return parse_json(f.attrs["plan"]).get("design_reason", "")
