"""Exact counterfactuals of samples, each judged against its noise floor, with no file in sight:
the core that ``ablate``, ``attribute``'s exact check and the group ``audit`` share.

Sample i is replayed from its own seed (the same x_T and every z_t) without unit ``units[i, k]``
for each k, and without each of the floor's phantom rows (code rows of the design's kind that
belong to no unit); every counterfactual's distance to its sample is judged against the
phantoms' (:func:`~ensattr_fast.evaluation.floors.floor_arrays`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from .. import codes
from ..diffusion.sampling import ablation_weights, replay
from ..diffusion.schedules import NoiseSchedule, Sampler
from ..members import Ensemble
from ..members.passes import Passes
from ..members.sharded import ShardedEnsemble
from ..runtime import distributed
from ..runtime.progress import Progress
from .floors import NoiseFloor, floor_arrays

__all__ = ["Counterfactuals", "exact_counterfactuals"]


@dataclasses.dataclass
class Counterfactuals:
    """Exact counterfactuals of S samples, K each: the unit ablated ``units`` int64 [S, K] (-1:
    none), the images [S, K, C, H, W], their ``distances`` to the samples [S, K] (NaN where no
    unit), and what the noise floor says of each (``floor``: ``pvalue``, ``zscore``,
    ``qvalue``, ``significant`` [S, K], ``floor_distance`` [S, P], ``floor_code`` [P, M] and
    ``attrs``); ``member_evaluations``: the network evaluations the replays took."""

    units: Tensor
    images: Tensor
    distances: Tensor
    floor: Dict[str, object]
    member_evaluations: int

    @property
    def significant(self) -> np.ndarray:
        """uint8 [S, K]: 1 where the effect stands above the noise floor at the floor's FDR."""
        return self.floor["significant"]

    @property
    def qvalue(self) -> np.ndarray:
        """float [S, K]: Benjamini-Hochberg q-values over the units of each sample."""
        return self.floor["qvalue"]


def exact_counterfactuals(ensemble: Ensemble, schedule: NoiseSchedule, sampler: Sampler, code: Tensor,
                          seeds: List[int], images: Tensor, units: Tensor, floor: NoiseFloor = NoiseFloor(),
                          passes: Passes = Passes(), max_trajectories: int = 4096, label: str = "ablate",
                          progress: bool = True, labels: Optional[Tensor] = None) -> Counterfactuals:
    """Counterfactuals of the samples ``images`` [S, ...] drawn from ``seeds`` (and ``labels``,
    class-conditional members) by ``sampler``, without ``units`` [S, K] each, beside
    ``floor.phantoms`` phantom ablations per sample.

    Distributed, every rank holds all members and replays its share of the samples (gathered
    on every rank); a :class:`ShardedEnsemble` holds this rank's members and replays every
    sample. ``progress``: report on rank 0 under ``label``."""
    phantoms = codes.phantom_rows(code, min(floor.phantoms, codes.free_phantom_rows(code)), floor.seed)
    K, P = units.shape[1], len(phantoms)
    weights = torch.cat([ablation_weights(code, [[u] if u >= 0 else [] for u in units.flatten().tolist()])
                         .view(len(units), K, -1),
                         codes.ablation_weights_of_rows(phantoms)[None].expand(len(units), P, -1)], 1)
    sharded = isinstance(ensemble, ShardedEnsemble)  # each rank its members, every sample
    # every rank holds all members and runs its samples; or, members sharded, every sample
    mine = range(len(units)) if sharded else distributed.shard(len(units))
    share = len(units) / max(len(mine), 1)  # rank 0 counts every rank's samples by its own
    with Progress(len(units), label, "samples", enabled=progress and distributed.world().main) as bar:
        result = replay(ensemble, schedule, sampler, seeds[mine.start : mine.stop], weights[mine.start : mine.stop],
                        max_trajectories, passes, progress=lambda n: bar.update(n * share),
                        labels=None if labels is None else labels[mine.start : mine.stop])
    gather: Callable[[Tensor], Tensor] = (lambda x: x) if sharded else distributed.gather_rows
    replayed = gather(result.images).cpu()
    evaluations = int(gather(torch.tensor([result.member_evaluations])).sum())
    moved = (replayed - images[:, None]).flatten(2).norm(dim=-1)
    counterfactuals, distances = replayed[:, :K], moved[:, :K]
    distances[units < 0] = float("nan")
    return Counterfactuals(units, counterfactuals, distances, floor_arrays(distances, moved[:, K:], phantoms, floor),
                           evaluations)

