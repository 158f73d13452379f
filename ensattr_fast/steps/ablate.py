"""``ensattr ablate``: exact counterfactuals, each sample re-drawn from its own noise without a
unit (the sub-ensemble that never saw it)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import codes, distributed
from ..attribution.baselines import nearest_units
from ..checkpoint import Checkpoint
from ..data import check_images, load_data
from ..evaluation.significance import significance
from ..execution import Passes
from ..members.sharded import ShardedEnsemble, place_members
from ..progress import Progress
from ..sampling import ablation_weights, replay
from ..errors import StoreError
from ..store import (ResultsWriter, count_samples, counterfactuals_written_by, read_sampler, read_samples,
                     read_unit_of, recover_after_kill)
from ._rules import existing, on_writer, writer_lock

__all__ = ["ablate_step", "Floor"]


@dataclasses.dataclass(frozen=True)
class Floor:
    """The noise floor of exact counterfactuals: ``phantoms`` ablations of phantom rows per
    sample (fewer when the code leaves fewer free), from the same noise as the sample; effects
    judged at false discovery rate ``alpha`` over ``tests`` hypotheses per sample (None: the
    units ablated)."""

    phantoms: int = 32
    alpha: float = 0.05
    tests: Optional[int] = None
    seed: int = 0


def ablate_step(checkpoint_path: os.PathLike, results: os.PathLike,
                units: Union[Tensor, Sequence[int], None] = None, device: str = "cpu",
                max_trajectories: int = 4096, *, nearest: int = 4, samples: Optional[int] = None,
                overwrite: bool = False, written_by: str = "ablate", floor: Floor = Floor(),
                passes: Passes = Passes(), **extra: Tensor):
    """Exact counterfactuals: sample i re-run without unit ``units[i, k]`` for each k, and the
    same sample re-run without each of ``floor.phantoms`` phantom rows (code rows of the
    design's kind that belong to no unit): the noise floor every effect is judged against
    (empirical p-value, z-score, Benjamini-Hochberg q-value over the units of a sample).

    ``units``: int [S, K] (-1: none) for the first S samples; or a list of units ablated from
    each of the first ``samples`` samples (default all); or None for each sample's ``nearest``
    training units in pixels (then each sample's tests are all N units, since the K were chosen
    from them). Uses the sampler recorded in ``results`` (the same noise and steps as the
    samples); ``passes``: how the members run (``shard_members``: each rank its members, every
    sample); ``extra``: more [S, K] arrays stored beside the counterfactuals. Counterfactuals
    already in the file are replaced (as a whole) only with ``overwrite``.
    Returns (images [S, K, ...], distances [S, K], member evaluations).
    """
    existing(results)
    with writer_lock(results, "results file"):
        on_writer(lambda: _check_replace(results, overwrite, written_by))
        return _ablate(checkpoint_path, results, units, device, max_trajectories, nearest, samples, written_by,
                       floor, extra, passes)


def _check_replace(results: os.PathLike, overwrite: bool, written_by: str) -> None:
    recover_after_kill(results)
    before = counterfactuals_written_by(results)
    # the exact check and the audit may replace what an earlier run of themselves wrote
    own_check = before == written_by and written_by in ("attribute", "audit")
    if before is not None and not overwrite and not own_check:
        raise StoreError(f"{results} already holds counterfactuals (of `ensattr {before}`); pass --overwrite "
                         "to replace them, or work on a copy")


def _ablate(checkpoint_path, results, units, device, max_trajectories, nearest, samples, written_by, floor, extra,
            passes):
    checkpoint = Checkpoint.load(checkpoint_path)
    code = checkpoint.code
    if not isinstance(units, Tensor) or units.dim() != 2:
        if units is None:  # chosen among all units
            floor = dataclasses.replace(floor, tests=floor.tests or len(code))
        n = count_samples(results) if samples is None else min(samples, count_samples(results))
        units = _units_per_sample(checkpoint, checkpoint_path, results, n, units, nearest)
    seeds, images = read_samples(results, len(units), code=code, against=str(checkpoint_path))
    check_images(images, f"samples in {results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    codes.check_unit_ids(units, len(code), "units to ablate", allow_none=True)
    ensemble, passes = place_members(checkpoint.build(), passes, device)
    sharded = isinstance(ensemble, ShardedEnsemble)  # each rank its members, every sample
    phantoms = codes.phantom_rows(code, min(floor.phantoms, codes.free_phantom_rows(code)), floor.seed)
    K, P = units.shape[1], len(phantoms)
    weights = torch.cat([ablation_weights(code, [[u] if u >= 0 else [] for u in units.flatten().tolist()])
                         .view(len(units), K, -1),
                         codes.ablation_weights_of_rows(phantoms)[None].expand(len(units), P, -1)], 1)
    # every rank holds all members and runs its samples; or, members sharded, every sample
    mine = range(len(units)) if sharded else distributed.shard(len(units))
    share = len(units) / max(len(mine), 1)  # rank 0 counts every rank's samples by its own
    with Progress(len(units), written_by, "samples", enabled=distributed.world().main) as bar:
        result = replay(ensemble, checkpoint.schedule, read_sampler(results), seeds[mine.start : mine.stop],
                        weights[mine.start : mine.stop], max_trajectories, passes,
                        progress=lambda n: bar.update(n * share))
    gather = (lambda x: x) if sharded else distributed.gather_rows
    replayed = gather(result.images).cpu()
    evaluations = int(gather(torch.tensor([result.member_evaluations])).sum())
    moved = (replayed - images[:, None]).flatten(2).norm(dim=-1)
    counterfactuals, distances = replayed[:, :K], moved[:, :K]
    distances[units < 0] = float("nan")
    if distributed.world().main:
        with ResultsWriter(results, "a") as writer:
            writer.check_code(code)
            writer.write_counterfactuals(units, counterfactuals, distances, written_by,
                                         floor=_floor_arrays(distances, moved[:, K:], phantoms, floor), **extra)
    distributed.barrier()
    return counterfactuals, distances, evaluations


def _floor_arrays(distances: Tensor, floor_distance: Tensor, phantoms: Tensor, floor: Floor) -> dict:
    """What ``/counterfactuals`` stores of the floor: the phantom rows and distances, and each
    counterfactual's significance against its sample's floor."""
    judged = significance(distances.numpy(), floor_distance.numpy(), floor.alpha, floor.tests)
    return dict(judged, floor_distance=floor_distance.float().numpy(), floor_code=phantoms.numpy(),
                attrs=dict(phantoms=len(phantoms), kind="code rows of the design's weights that no unit has",
                           alpha=floor.alpha, tests=floor.tests or distances.shape[1], seed=floor.seed))


def _units_per_sample(checkpoint: Checkpoint, checkpoint_path, results, n: int, units, nearest: int) -> Tensor:
    if units is not None:
        return torch.as_tensor(list(units), dtype=torch.long).expand(n, -1).clone()
    _, images = read_samples(results, n, code=checkpoint.code, against=str(checkpoint_path))
    return nearest_units(images, load_data(checkpoint.data_source), read_unit_of(results), nearest)
