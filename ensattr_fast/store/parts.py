"""The parts of a distributed attribution: each rank writes its rows to a part file beside the
results file, and rank 0 stitches them into the results file as virtual datasets, so that
readers see one matrix per method with h5py alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from ..runtime.files import writing
from .hdf5 import parse_json
from .recovery import open_for_appending

__all__ = ["part_path", "stitch_parts"]


def part_path(results: os.PathLike, rank: int, size: int) -> Path:
    """Where rank ``rank`` of ``size`` writes its part of a distributed attribution."""
    results = Path(results)
    return results.with_name(results.name + ".parts") / f"rank{rank}-of-{size}.h5"


STITCHED = ("influence", "progress", "topk", "statistics")
#: whole on every rank in the parts of runs before the features file (now: beside the checkpoint)
PER_RANK = ("statistics/features_dtrak_train", "statistics/features_trak_train")


def stitch_parts(path: os.PathLike, parts) -> None:
    """Make ``path`` show the part files of a distributed attribution as one file.

    Every dataset under /influence, /progress, /topk and /statistics of the parts (each part
    holds a contiguous range of rows, in whole row blocks, in rank order) becomes a virtual
    dataset of ``path`` that concatenates them along the rows. Readers need nothing but h5py
    and the parts folder beside the file (sources are named relative to it). A dataset that
    ``path`` holds as real data (from a one-process run) is never replaced.
    """
    path = Path(path)
    opened = [h5py.File(p, "r") for p in parts]
    try:
        filled = [f for f in opened if np.diff(parse_json(f.attrs["rows"]))[0] > 0]
        if not filled:
            return
        names: list = []
        filled[0].visititems(lambda name, obj: names.append(name)
                             if isinstance(obj, h5py.Dataset) and name.split("/")[0] in STITCHED
                             and name not in PER_RANK else None)
        with writing(path, "results file"), open_for_appending(path) as out:
            real = [name for name in names if name in out and not out[name].is_virtual]
            if real:
                raise StoreError(f"{path} already holds /{real[0]} from a one-process run; resume it on one "
                                 "process or write to a new results file")
            for name in names:
                sources = [f[name] for f in filled]
                layout = h5py.VirtualLayout((sum(len(s) for s in sources), *sources[0].shape[1:]), sources[0].dtype)
                at = 0
                for source in sources:
                    relative = os.path.relpath(source.file.filename, path.parent)
                    layout[at : at + len(source)] = h5py.VirtualSource(relative, name, source.shape)
                    at += len(source)
                if name in out:
                    del out[name]
                stitched = out.create_virtual_dataset(name, layout, fillvalue=sources[0].fillvalue)
                for key, value in sources[0].attrs.items():
                    stitched.attrs[key] = value
                if "spec" in stitched.attrs:
                    spec = parse_json(stitched.attrs["spec"])
                    stitched.attrs["spec"] = json.dumps(dict(spec, rows=stitched.shape[0]))
    finally:
        for f in opened:
            f.close()
