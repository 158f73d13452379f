"""``plan``: the code (which member trains on which unit) and the units, in a plan file."""

from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import torch

from .. import codes

from ..codes.duplicates import Duplicates
from ..data import duplicates_in, load_data, units_for
from ..errors import DataError
from ..runtime.files import atomic_output, check_output, writing
from ..runtime.progress import note
from ..store import ResultsWriter, parse_json, read_hdf5, versions
from .options import PlanOptions

__all__ = ["Plan", "plan", "design_reason"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a plan holds: the code's statistics, the design used and why it fits the units."""

    stats: codes.CodeStats
    design: str
    reason: str
    duplicates: Duplicates
    merged: int = 0  # units merged away to put each duplicate set in one unit
    scattered: int = 0  # sets left over several units (--duplicates keep)

    def duplicates_line(self) -> str:
        """What the duplicate search found and what the plan did with it (one line)."""
        if not self.duplicates.n_sets:
            return str(self.duplicates)
        if self.scattered:
            sets = f"{self.scattered} set{'s' if self.scattered > 1 else ''}"
            done = f"{sets} kept over several units (no exact ablation removes them)"
        elif self.merged:
            done = f"{self.merged} units merged so that each set is one unit"
        else:
            done = "each set already within one unit"
        return f"{self.duplicates}; {done}"


def plan(path: os.PathLike, options: PlanOptions = PlanOptions()) -> Plan:
    """Write the code and the units to the HDF5 plan file ``path`` (the layout of a results
    file). The data's spec is stored in the plan, so that every later step reloads the same
    data; ``clusters:K`` units are seeded with ``options.seed``; the plan also stores why the
    design fits the units (``design_reason``)."""
    dataset = options.dataset()
    sources = dataset if isinstance(dataset, dict) else {}
    check_output(path, "--out", options.overwrite,
                 inputs={"--data": sources.get("path"), "--metadata": sources.get("metadata"),
                         "--embeddings": options.embeddings})
    data = load_data(dataset)
    units = units_for(data, options.units, seed=options.seed)  # the seed also seeds content clusters
    if options.duplicates == "off":  # the search is quadratic in the images: a user may skip it
        found = Duplicates(torch.full((len(data),), -1, dtype=torch.long), options.duplicate_radius, "none")
    else:
        found = duplicates_in(data, options.duplicate_radius, options.embeddings)
    units, merged, scattered = _place_duplicates(units, found, options.duplicates)
    code, used = codes.plan(units, options.members, seed=options.seed, design=options.design,
                            excluders_per_group=options.excluders)
    reason = codes.design_reason(units, code, used, asked=options.design)
    stats = codes.statistics(code)
    with writing(path, "plan file"), atomic_output(path) as tmp, ResultsWriter(tmp, "w") as writer:
        writer.write_code(code, units.unit_of, units.names)
        writer.set_attrs(plan=dict(dataset=dataset, units=options.units, members=options.members, design=used,
                                   design_reason=reason, excluders=options.excluders, seed=options.seed),
                         code_statistics=dataclasses.asdict(stats), versions=versions())
        writer.write_group("duplicates", dict(set_of=found.set_of.numpy()),
                           dict(mode=options.duplicates, radius=found.radius, space=found.space,
                                embeddings=None if options.embeddings is None else str(options.embeddings),
                                images=found.n_images, sets=found.n_sets, largest=found.largest,
                                units_merged=merged, sets_scattered=scattered))
    return Plan(stats, used, reason, found, merged, scattered)


def _place_duplicates(units: codes.Units, found: Duplicates, mode: str) -> Tuple[codes.Units, int, int]:
    """The units with each duplicate set grouped into one (``group``), as they are (``keep``,
    with a one-line note of what that costs when a set is scattered), or a DataError
    (``refuse``); with how many units were merged away and how many sets are left scattered."""
    scattered = [i for i in range(found.n_sets) if len(units.unit_of[found.members(i)].unique()) > 1]
    if not scattered:
        return units, 0, 0
    example = found.members(scattered[0])[:4].tolist()
    where = f"{len(scattered)} of {found.n_sets} sets span several units, e.g. images {example}"
    if mode == "refuse":
        raise DataError(f"the training data holds duplicates: {found}; {where}. Plan with --duplicates group "
                        "(each set one unit) or keep, or remove them")
    if mode == "keep":
        note(f"--duplicates keep: {found}; {where}: no member excludes every copy of a scattered image, so no "
             "exact ablation removes it, and memorization cannot prove its copies")
        return units, 0, len(scattered)
    return (*units.grouped(found.set_of), 0)


def design_reason(path: os.PathLike) -> str:
    """The sentence a plan file stores on its design: which one, and why."""
    with read_hdf5(path, "plan file") as f:
        return parse_json(f.attrs["plan"]).get("design_reason", "")
