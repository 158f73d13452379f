"""What the steps read from plan and results files, one function per question; a file that is
missing, damaged or from another ensemble is one :class:`StoreError` naming it."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import codes
from ..diffusion.schedules import Sampler
from ..errors import StoreError
from .hdf5 import check_code, check_results, open_for_reading, parse_json, read_hdf5

__all__ = ["read_plan", "read_samples", "read_labels", "read_conditions", "read_unit_of", "count_samples",
           "counterfactuals_written_by", "read_sampler", "read_dataset"]


def read_plan(path: os.PathLike):
    """(dataset spec, code, units) from a plan or results file."""
    try:
        with open_for_reading(path) as f:
            check_results(f, "plan file")
            plan = parse_json(f.attrs["plan"])
            code = torch.from_numpy(f["code"][()])
            unit_of = torch.from_numpy(f["units/of_example"][()])
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in f["units/name"][()])
    except StoreError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        raise StoreError(f"{path} is not a readable plan file ({' '.join(str(error).split())[:300]})") from None
    codes.validate(code, unit_of=unit_of)
    return plan["dataset"], code, codes.Units(unit_of, names)


def read_samples(path: os.PathLike, stop: Optional[int] = None, start: int = 0, code: Optional[Tensor] = None,
                 against: str = "this one") -> Tuple[List[int], Tensor]:
    """(seeds, images [S, C, H, W]) of samples ``start:stop`` of a results file; with ``code``,
    refuse the file when it holds results of another ensemble (that of ``against``)."""
    with read_hdf5(path) as f:
        if code is not None:
            check_code(f, code, against, required=True)
        seeds = f["samples/seed"][start:stop].tolist()
        samples = torch.from_numpy(f["samples/images"][start:stop])
    return seeds, samples


def read_labels(path: os.PathLike, stop: Optional[int] = None, start: int = 0) -> Optional[Tensor]:
    """The labels int64 [S] of samples ``start:stop`` of a results file (class-conditional
    members; -1: none), or None where its samples have none."""
    with read_hdf5(path) as f:
        return torch.from_numpy(f["samples/label"][start:stop]) if "samples/label" in f else None


def read_conditions(path: os.PathLike) -> Optional[Tensor]:
    """The embedding float32 [S, L, D] every sample of a results file was drawn under
    (text-conditioned members), or None where its samples have none."""
    with read_hdf5(path) as f:
        return torch.from_numpy(f["samples/condition"][()]) if "samples/condition" in f else None


def read_unit_of(path: os.PathLike) -> Tensor:
    """The unit of each training example [n_examples] of a plan or results file."""
    with read_hdf5(path) as f:
        return torch.from_numpy(f["units/of_example"][()])


def count_samples(path: os.PathLike) -> int:
    with read_hdf5(path) as f:
        return len(f["samples/seed"])


def read_sampler(path: os.PathLike) -> Sampler:
    """The sampler the samples of a results file were drawn with (the one every replay and
    counterfactual of them must use)."""
    with read_hdf5(path) as f:
        spec = parse_json(f.attrs["sampler"])
    spec["clip"] = tuple(spec["clip"]) if spec["clip"] is not None else None
    return Sampler(**spec)


def read_dataset(path: os.PathLike):
    """The training data a results file records (the spec of its plan), for the steps that
    show or search training images; a file that records none is an error naming ``--data``."""
    with read_hdf5(path) as f:
        plan = parse_json(f.attrs["plan"]) if "plan" in f.attrs else {}
    if "dataset" not in plan:
        raise StoreError(f"{path} does not record its training data (no plan attribute): pass --data "
                         "with the data set the ensemble was trained on (digits, or what `ensattr plan "
                         "--data` was given)")
    return plan["dataset"]


def counterfactuals_written_by(path: os.PathLike) -> Optional[str]:
    """The step that wrote the counterfactuals of a results file (``ablate`` or ``attribute``),
    or None when it holds none."""
    with read_hdf5(path) as f:
        if "counterfactuals" not in f:
            return None
        default = "attribute" if "checked_by" in f.attrs else "ablate"  # files from before the attribute
        return parse_json(f["counterfactuals"].attrs.get("written_by", json.dumps(default)))


def counterfactuals_request(path: os.PathLike) -> Optional[dict]:
    """What the counterfactuals of a results file were asked for (``ensattr ablate``'s units and
    floor), or None: the same request again may replace them with the same numbers."""
    with read_hdf5(path) as f:
        if "counterfactuals" not in f or "request" not in f["counterfactuals"].attrs:
            return None
        return parse_json(f["counterfactuals"].attrs["request"])
