"""``ablate``: exact counterfactuals, each sample re-drawn from its own noise without a unit (the
sub-ensemble that never saw it), judged against its noise floor and stored in the results file."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import codes
from ..attribution.baselines import nearest_units
from ..data import check_images
from ..errors import StoreError
from ..evaluation.counterfactuals import Counterfactuals, exact_counterfactuals
from ..members.sharded import place_members
from ..runtime import distributed
from ..runtime.progress import note
from ..store import (ResultsWriter, count_samples, counterfactuals_request, counterfactuals_written_by, dump_json,
                     read_unit_of)
from ._rules import existing, on_writer, recovered, writer_lock
from .options import AblateOptions
from .session import Session

__all__ = ["ablate", "Counterfactuals"]


def ablate(session: Session, options: AblateOptions = AblateOptions(), units: Union[Tensor, Sequence[int], None] = None,
           written_by: str = "ablate", predicted: Optional[Dict[str, Tensor]] = None,
           max_trajectories: int = 4096) -> Counterfactuals:
    """Exact counterfactuals of the session's samples, stored in its results file.

    ``units``: int [S, K] (-1: none) for the first S samples; or a list of units ablated from
    each of the first ``options.samples`` samples (default all); or None for ``options.units``,
    and where that is None too, each sample's ``options.nearest`` training units in pixels (then
    each sample's tests are all N units, since the K were chosen from them). Uses the sampler
    recorded in the results file (the same noise and steps as the samples). ``predicted``: what
    methods predicted of each counterfactual [S, K], stored beside it (``predicted_<method>``).
    Counterfactuals already in the file are replaced (as a whole) only with ``overwrite``, or
    when this step (``written_by`` the exact check or the audit) wrote them before.
    """
    results = session.results
    existing(results)
    request = _request(options) if units is None and written_by == "ablate" else None
    with writer_lock(results, "results file"):
        on_writer(lambda: _check_replace(results, options.overwrite, written_by, request))
        return _ablate(session, options, options.units if units is None else units, written_by, predicted or {},
                       max_trajectories, request)


def _request(options: AblateOptions) -> dict:
    """What an ``ablate`` command asks for: the same request gives the same counterfactuals."""
    return json.loads(dump_json(dict(units=options.units, nearest=options.nearest, samples=options.samples,
                                     floor=dataclasses.asdict(options.floor)), sort_keys=True))


def _check_replace(results, overwrite: bool, written_by: str, request: Optional[dict]) -> None:
    recovered(results)
    before = counterfactuals_written_by(results)
    # the exact check and the audit may replace what an earlier run of themselves wrote, and an
    # ablation what the same ablation wrote (a run stopped after it wrote them, then run again)
    own_check = before == written_by and (written_by in ("attribute", "audit") or
                                          (request is not None and counterfactuals_request(results) == request))
    if before is not None and not overwrite and not own_check:
        raise StoreError(f"{results} already holds counterfactuals (of `ensattr {before}`); pass --overwrite "
                         "to replace them, or work on a copy")


def _ablate(session: Session, options: AblateOptions, units, written_by: str, predicted: Dict[str, Tensor],
            max_trajectories: int, request: Optional[dict] = None) -> Counterfactuals:
    checkpoint, floor = session.checkpoint, options.floor
    code = checkpoint.code
    if not isinstance(units, Tensor) or units.dim() != 2:
        if units is None:  # chosen among all units
            floor = dataclasses.replace(floor, tests=floor.tests or len(code))
        n = count_samples(session.results)
        n = n if options.samples is None else min(options.samples, n)
        units = _units_per_sample(session, n, units, options.nearest)
    seeds, images = session.samples(len(units))
    check_images(images, f"samples in {session.results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    codes.check_unit_ids(units, len(code), "units to ablate", allow_none=True)
    ensemble, passes = place_members(session.ensemble(options.device), options.passes, options.device)
    found = exact_counterfactuals(ensemble, checkpoint.schedule, session.sampler(), code, seeds, images, units, floor,
                                  passes, max_trajectories, label=written_by, labels=session.labels(len(units)))
    distributed.barrier()  # every rank has read the samples: the writer finds no reader
    if distributed.world().main:
        with ResultsWriter(session.results, "a") as writer:
            writer.check_code(code)
            writer.write_counterfactuals(units, found.images, found.distances, written_by, floor=found.floor,
                                         request=request, **{f"predicted_{m}": v for m, v in predicted.items()})
    distributed.barrier()
    return found


def _units_per_sample(session: Session, n: int, units, nearest: int) -> Tensor:
    if units is not None:
        return torch.as_tensor(list(units), dtype=torch.long).expand(n, -1).clone()
    n_units = len(session.checkpoint.code)
    if nearest > n_units:
        note(f"--nearest {nearest} is more than the {n_units} units: each sample is re-drawn without each of them")
        nearest = n_units
    _, images = session.samples(n)
    return nearest_units(images, session.data(), read_unit_of(session.results), nearest)
