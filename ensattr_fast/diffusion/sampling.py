"""Sampling from the full ensemble and from ablated ensembles, replayable from seeds.

A *trajectory* is one sample (a seed) run under one set of member weights w [M]: the full
ensemble (w = 1/M) or the ablation of a unit set U (w = 1/|E_U| on the members E_U that saw no
unit of U, 0 elsewhere). Every trajectory of a sample shares its starting noise x_T and every
step's noise z, drawn from the sample's seed, so the ablated runs are true counterfactuals of
the full run, and any sample replays bit for bit.

All trajectories advance together. At each step member m is evaluated only on the trajectories
that keep it (w_m > 0), packed member by member; the fused ``ensemble_step`` op combines each
trajectory's member outputs through a CSR list, applies the sampler update with the shared
noise and writes the next packed input.

The members run in the sampler's precision (a sample replays bit for bit only in its own) and
in passes of K members where asked (:class:`~ensattr_fast.members.passes.Passes`: the same numbers
as one pass of all).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import CodeError
from ..members import Ensemble, PackedLayout
from ..members.passes import MemberPasses, Passes, precision_scope
from ..ops import ensemble_step
from .conditions import check_conditions, check_labels, per_seed_labels
from .schedules import NoiseSchedule, Sampler

__all__ = ["ablation_weights", "seeded_normal", "run_trajectories", "sample", "ablate", "replay", "Trajectories",
           "check_labels", "per_seed_labels", "check_conditions"]

_MASK64 = (1 << 64) - 1


def _mix(seed: int, stream: int) -> int:
    """splitmix64 of (seed, stream): independent generator seeds per sample and step."""
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def seeded_normal(seeds: Sequence[int], stream: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise [S, *shape]: row i depends only on (seeds[i], stream).

    Stream 0 is a sample's x_T; stream k + 1 the noise of its k-th sampler step. A sample's noise
    therefore does not depend on which other samples or trajectories share its batch.
    """
    out = torch.empty(len(seeds), *shape)
    generator = torch.Generator()
    for i, seed in enumerate(seeds):
        generator.manual_seed(_mix(int(seed), stream))
        out[i] = torch.randn(tuple(shape), generator=generator)
    return out


def ablation_weights(code: Tensor, unit_sets: Iterable[Sequence[int]]) -> Tensor:
    """Member weights [A, M] (float64) of the ablation of each unit set.

    The empty set gives the full ensemble (1/M each); a set U gives 1/|E_U| on the members
    E_U that trained on no unit of U. An empty E_U (every member trained on some unit of U)
    is an error.
    """
    n_units, n_members = code.shape
    rows = []
    for units in unit_sets:
        units = [int(u) for u in units]
        bad = [u for u in units if not 0 <= u < n_units]
        if bad:
            raise CodeError(f"unit {bad[0]} is out of range: the code has {n_units} units")
        keep = torch.ones(n_members, dtype=torch.bool)
        if units:
            keep = ~code[units].bool().any(0)
        if not keep.any():
            raise CodeError(
                f"ablating units {units[:8]}{'...' if len(units) > 8 else ''} leaves no member: "
                "every member trained on at least one of them"
            )
        rows.append(keep.double() / keep.sum())
    return torch.stack(rows) if rows else torch.zeros(0, n_members, dtype=torch.float64)


@dataclasses.dataclass
class Trajectories:
    """Final states of a batch of trajectories and what computing them cost."""

    images: Tensor  # [T, *data_shape]
    member_evaluations: int  # member forward passes on trajectories, summed over steps
    padded_evaluations: int  # extra rows evaluated to batch members of unequal load


class _Packing:
    """The packed layout of trajectories with member weights w [T, M]: member-major rows.

    With ``labels`` (one per trajectory, -1: none) each packed row carries its label; with
    ``guidance`` w > 0 as well, each (member, trajectory) pair is two packed rows, the labelled
    one weighted (1 + w) w_m and the unlabelled one -w w_m, so that the op's weighted sum is the
    guided mean of the kept members: classifier-free guidance, ablated or not, with no kernel of
    its own (every packed row is still one trajectory's, so the op writes the next input of
    both)."""

    def __init__(self, weights: Tensor, device: torch.device, labels: Optional[Tensor] = None,
                 guidance: float = 0.0):
        keeps = weights > 0
        T, M = weights.shape
        factors = torch.tensor([1.0 + guidance, -guidance] if labels is not None and guidance else [1.0],
                               dtype=torch.float64)
        pairs = keeps.T.nonzero()  # (member, trajectory), member-major
        V = len(factors)
        member, trajectory = pairs[:, 0].repeat(V), pairs[:, 1].repeat(V)
        variant = torch.arange(V).repeat_interleave(len(pairs))
        order = torch.argsort((member * V + variant) * T + trajectory)  # the packed rows: member, variant, trajectory
        member, trajectory, variant = member[order], trajectory[order], variant[order]
        self.layout = PackedLayout(keeps.sum(0) * V)
        self.trajectory = trajectory
        self.labels = None
        if labels is not None:
            self.labels = torch.where(variant == 0, labels[trajectory], -1).to(device)
        by_trajectory = torch.argsort((trajectory * M + member) * V + variant)
        counts = keeps.sum(1) * V
        self.row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
        self.rows = by_trajectory.to(device)
        self.weights = weights[trajectory[by_trajectory], member[by_trajectory]] * factors[variant[by_trajectory]]
        self.device = device


@torch.no_grad()
def run_trajectories(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    sampler: Sampler,
    seeds: Sequence[int],
    weights: Tensor,
    sample_of: Tensor,
    passes: Passes = Passes(),
    progress: Optional[Callable[[float], None]] = None,
    labels: Optional[Tensor] = None,
) -> Trajectories:
    """Run trajectory t from seed ``seeds[sample_of[t]]`` under member weights ``weights[t]``.

    Args:
        seeds: one seed per sample [S]; weights: float [T, M]; sample_of: int64 [T].
        passes: how the members are evaluated; progress: called after each step with the samples
            it advanced (S / steps), e.g. ``Progress.update``.
        labels: class-conditional members: the label of each sample [S] (-1: none), guided by
            ``sampler.guidance``.
    Returns:
        :class:`Trajectories` with the final images [T, *data_shape].
    """
    device = next(ensemble.parameters()).device
    shape, M = ensemble.data_shape, ensemble.n_members
    if weights.shape[1:] != (M,):
        raise CodeError(f"weights must have shape [T, {M}], got {tuple(weights.shape)}")
    labels = check_conditions(ensemble, labels, len(seeds), sampler.guidance)
    packing = _Packing(weights, device, None if labels is None else labels[sample_of], sampler.guidance)
    dtype = next(ensemble.parameters()).dtype
    entry_weights = packing.weights.to(device, torch.promote_types(dtype, torch.float32))  # the op's accumulation dtype
    sample_of = sample_of.to(device)
    x = seeded_normal(seeds, 0, shape).to(device, dtype).flatten(1)[sample_of]
    packed = x[packing.trajectory.to(device)]
    evaluations = padded = 0
    members, plan = MemberPasses(ensemble, passes), sampler.plan(schedule)
    for k, step in enumerate(plan):
        with precision_scope(sampler.precision or "fp32", device):
            eps = members.forward_packed(packed.view(-1, *shape), step.t, packing.layout, packing.labels)
        eps = eps.flatten(1).to(dtype)  # autocast members answer in half precision
        evaluations += packing.layout.n_packed
        padded += M * packing.layout.n_max - packing.layout.n_packed
        noise = seeded_normal(seeds, k + 1, shape).to(device, dtype).flatten(1) if step.s else None
        x, _, packed = ensemble_step(
            eps, x, packing.row_ptr, packing.rows, entry_weights, coefficients=step.coefficients,
            noise=noise, sample_of=sample_of if noise is not None else None, clip=sampler.clip,
            write_packed=True,
        )
        if progress is not None:
            progress(len(seeds) / len(plan))
    return Trajectories(x.view(-1, *shape), evaluations, padded)


def sample(
    ensemble: Ensemble, schedule: NoiseSchedule, sampler: Sampler, seeds: Sequence[int],
    passes: Passes = Passes(), progress: Optional[Callable[[float], None]] = None,
    labels: Optional[Tensor] = None,
) -> Tensor:
    """Full-ensemble samples [S, *data_shape], one per seed (and label: class-conditional
    members, guided by ``sampler.guidance``)."""
    full = torch.full((len(seeds), ensemble.n_members), 1.0 / ensemble.n_members, dtype=torch.float64)
    return run_trajectories(ensemble, schedule, sampler, seeds, full, torch.arange(len(seeds)), passes,
                            progress, labels).images


def ablate(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    sampler: Sampler,
    code: Tensor,
    seeds: Sequence[int],
    unit_sets: Sequence[Sequence[int]],
    per_sample: bool = False,
    max_trajectories: Optional[int] = None,
    passes: Passes = Passes(),
    labels: Optional[Tensor] = None,
) -> Trajectories:
    """Counterfactual samples: each seed (with its label, for class-conditional members) run
    under each unit set's ablation.

    ``per_sample=False``: every seed under every unit set; images [A, S, *data_shape].
    ``per_sample=True``: ``unit_sets[i]`` is the list of unit sets for seed i (K each);
    images [S, K, *data_shape]. Work is split into chunks of at most ``max_trajectories``.
    """
    S = len(seeds)
    if per_sample:
        if len(unit_sets) != S:
            raise CodeError(f"per_sample needs one list of unit sets per seed ({S}), got {len(unit_sets)}")
        K = len(unit_sets[0]) if S else 0
        if any(len(sets) != K for sets in unit_sets):
            raise CodeError("per_sample needs the same number of unit sets for every seed")
        weights = ablation_weights(code, [u for sets in unit_sets for u in sets]).view(S, K, -1)
    else:
        K = len(unit_sets)
        weights = ablation_weights(code, unit_sets)[None].expand(S, K, -1)
    result = replay(ensemble, schedule, sampler, seeds, weights, max_trajectories, passes, labels=labels)
    if not per_sample:
        result.images = result.images.transpose(0, 1)
    return result


def replay(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    sampler: Sampler,
    seeds: Sequence[int],
    weights: Tensor,
    max_trajectories: Optional[int] = None,
    passes: Passes = Passes(),
    progress: Optional[Callable[[float], None]] = None,
    labels: Optional[Tensor] = None,
) -> Trajectories:
    """Seed i (and label i: class-conditional members) replayed under each of its K member
    weightings ``weights[i]`` [S, K, M]: images [S, K, *data_shape]. Work is split into chunks
    of whole samples, at most ``max_trajectories`` trajectories each (at least one sample)."""
    S, K = weights.shape[:2]
    chunk = max(1, (max_trajectories or S * K) // max(K, 1))  # sample-major: a chunk holds whole samples
    images, evaluations, padded = [], 0, 0
    for start in range(0, S, chunk):
        w = weights[start : start + chunk]
        n = len(w)
        result = run_trajectories(
            ensemble, schedule, sampler, seeds[start : start + chunk], w.reshape(n * K, -1),
            torch.arange(n).repeat_interleave(K), passes, progress,
            None if labels is None else torch.as_tensor(labels)[start : start + chunk],
        )
        images.append(result.images.view(n, K, *ensemble.data_shape))
        evaluations += result.member_evaluations
        padded += result.padded_evaluations
    out = torch.cat(images) if images else torch.zeros(0, K, *ensemble.data_shape)
    return Trajectories(out, evaluations, padded)
