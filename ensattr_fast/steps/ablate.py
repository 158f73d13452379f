"""``ensattr ablate``: exact counterfactuals, each sample re-drawn from its own noise without a
unit (the sub-ensemble that never saw it)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import codes, distributed
from ..attribution.baselines import nearest_units
from ..checkpoint import Checkpoint
from ..data import check_images, load_data
from ..sampling import ablate
from ..errors import StoreError
from ..store import (ResultsWriter, count_samples, counterfactuals_written_by, read_sampler, read_samples,
                     read_unit_of, recover_after_kill)
from ._rules import existing, on_writer, writer_lock

__all__ = ["ablate_step"]


def ablate_step(checkpoint_path: os.PathLike, results: os.PathLike,
                units: Union[Tensor, Sequence[int], None] = None, device: str = "cpu",
                max_trajectories: int = 4096, *, nearest: int = 4, samples: Optional[int] = None,
                overwrite: bool = False, written_by: str = "ablate", **extra: Tensor):
    """Exact counterfactuals: sample i re-run without unit ``units[i, k]`` for each k.

    ``units``: int [S, K] (-1: none) for the first S samples; or a list of units ablated from
    each of the first ``samples`` samples (default all); or None for each sample's ``nearest``
    training units in pixels. Uses the sampler recorded in ``results`` (the same noise and
    steps as the samples); ``extra``: more [S, K] arrays stored beside the counterfactuals.
    Counterfactuals already in the file are replaced (as a whole) only with ``overwrite``.
    Returns (images [S, K, ...], distances [S, K], member evaluations).
    """
    existing(results)
    with writer_lock(results, "results file"):
        on_writer(lambda: _check_replace(results, overwrite, written_by))
        return _ablate(checkpoint_path, results, units, device, max_trajectories, nearest, samples, written_by,
                       extra)


def _check_replace(results: os.PathLike, overwrite: bool, written_by: str) -> None:
    recover_after_kill(results)
    before = counterfactuals_written_by(results)
    own_check = before == written_by == "attribute"  # the exact check may replace an earlier check's
    if before is not None and not overwrite and not own_check:
        raise StoreError(f"{results} already holds counterfactuals (of `ensattr {before}`); pass --overwrite "
                         "to replace them, or work on a copy")


def _ablate(checkpoint_path, results, units, device, max_trajectories, nearest, samples, written_by, extra):
    checkpoint = Checkpoint.load(checkpoint_path)
    if not isinstance(units, Tensor) or units.dim() != 2:
        n = count_samples(results) if samples is None else min(samples, count_samples(results))
        units = _units_per_sample(checkpoint, checkpoint_path, results, n, units, nearest)
    seeds, images = read_samples(results, len(units), code=checkpoint.code, against=str(checkpoint_path))
    check_images(images, f"samples in {results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    codes.check_unit_ids(units, len(checkpoint.code), "units to ablate", allow_none=True)
    ensemble = checkpoint.build().to(device)
    unit_sets = [[[u] if u >= 0 else [] for u in row] for row in units.tolist()]
    mine = distributed.shard(len(unit_sets))  # every rank holds all members, runs its samples
    result = ablate(ensemble, checkpoint.schedule, read_sampler(results), checkpoint.code,
                    seeds[mine.start : mine.stop], unit_sets[mine.start : mine.stop], per_sample=True,
                    max_trajectories=max_trajectories)
    counterfactuals = distributed.gather_rows(result.images).cpu()
    evaluations = int(distributed.gather_rows(torch.tensor([result.member_evaluations])).sum())
    distances = (counterfactuals - images[:, None]).flatten(2).norm(dim=-1)
    if distributed.world().main:
        with ResultsWriter(results, "a") as writer:
            writer.check_code(checkpoint.code)
            writer.write_counterfactuals(units, counterfactuals, distances, written_by, **extra)
    distributed.barrier()
    return counterfactuals, distances, evaluations


def _units_per_sample(checkpoint: Checkpoint, checkpoint_path, results, n: int, units, nearest: int) -> Tensor:
    if units is not None:
        return torch.as_tensor(list(units), dtype=torch.long).expand(n, -1).clone()
    _, images = read_samples(results, n, code=checkpoint.code, against=str(checkpoint_path))
    return nearest_units(images, load_data(checkpoint.data_source), read_unit_of(results), nearest)
