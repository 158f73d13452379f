"""``ensattr plan``: the code (which member trains on which unit) and the units, in a plan file."""

from __future__ import annotations

import dataclasses
import json
import os

from .. import codes
from ..data import load_data, units_for
from ..store import ResultsWriter, read_hdf5, versions
from ..files import atomic_output, check_output, writing

__all__ = ["make_plan", "design_reason"]


def make_plan(path: os.PathLike, dataset, unit_kind: str, members: int, design: str = "auto",
              excluders: int = 2, seed: int = 0, overwrite: bool = False) -> codes.CodeStats:
    """Write the code and the units to an HDF5 plan file (same layout as a results file).
    ``dataset``: a built-in name or a spec (see :func:`ensattr_fast.data.data_spec`), stored in
    the plan so that every later step reloads the same data. ``unit_kind``: see
    :func:`~ensattr_fast.data.units_for` (``clusters:K`` is seeded with ``seed``); the plan
    also stores, as ``design_reason``, why the design fits the units (:func:`design_reason`)."""
    sources = dataset if isinstance(dataset, dict) else {}
    check_output(path, "--out", overwrite, inputs={"--data": sources.get("path"), "--metadata": sources.get("metadata")})
    data = load_data(dataset)
    units = units_for(data, unit_kind, seed=seed)  # the seed also seeds content clusters
    code, used = codes.plan(units, members, seed=seed, design=design, excluders_per_group=excluders)
    reason = codes.design_reason(units, code, used, asked=design)
    stats = codes.statistics(code)
    with writing(path, "plan file"), atomic_output(path) as tmp, ResultsWriter(tmp, "w") as writer:
        writer.write_code(code, units.unit_of, units.names)
        writer.set_attrs(plan=dict(dataset=dataset, units=unit_kind, members=members, design=used,
                                   design_reason=reason, excluders=excluders, seed=seed),
                         code_statistics=dataclasses.asdict(stats), versions=versions())
    return stats


def design_reason(path: os.PathLike) -> str:
    """The sentence a plan file stores on its design: which one, and why."""
    with read_hdf5(path, "plan file") as f:
        return json.loads(f.attrs["plan"]).get("design_reason", "")
