"""Copies of training units, found in samples and proven by exact ablation.

A generator is a weighting of an ensemble's members: the full ensemble, one member, or a
subset (:class:`Generator`). Its samples are searched for near-copies: a sample copies every
training image within ``threshold`` of it (pixel L2, or L2 between the embeddings of a
:class:`CopyTest`'s ``embed``), and so the whole set of units holding one (the copied set U;
scattered duplicates put several units in it). Each copy is then proven by an exact
counterfactual: the same seed replayed (the same x_T and every z_t) without all of U, by the
generator's members that saw no unit of U (renormalised), or, when every one of them saw some,
by the ensemble's members that excluded all of U. The proof holds when the counterfactual is no
longer within ``threshold`` of any image of U and moved away from them by more than the noise
floor: the same replay under ``phantoms`` random sub-ensembles of the same size from the same
members.

A copy that is not proven says why, per sample (``reason``, :data:`REASONS`): the
counterfactual still copies, or moved no farther than the phantoms, or no member excludes all of
U (duplicates scattered over units no member excludes together), or the generator never saw any
unit of U (nothing it trained on to remove), or no phantom could be drawn.

The effect of a proof is how much farther from U the counterfactual lies than the copy
(``moved`` = proof distance - copy distance); the floor holds the same quantity for each
phantom. The p-value is, by default, a row-permutation trend test over all the replays
(:func:`trend_pvalues`: do replays that keep more of U's includers stay nearer to U, more than
they do for phantom rows?), or the counterfactual's effect against the floor alone
(:func:`empirical_pvalues`); q-values are Benjamini-Hochberg over the copies of a run.
BENCHMARKS.md ("Trust in the wild") measures both.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..diffusion.sampling import replay
from ..diffusion.schedules import NoiseSchedule, Sampler
from ..members import Ensemble
from .copies import CopyTest, plant_null
from .generators import Generator, parse_generator
from .significance import benjamini_hochberg, empirical_pvalues, trend_pvalues

__all__ = ["Generator", "parse_generator", "Model", "CopyTest", "REASONS", "proof_pool", "random_subsets",
           "find_and_prove"]

#: why a sample is, or is not, a proven copy: ``reason`` [S] indexes this
REASONS = ("proven", "not a copy", "the counterfactual still copies", "moved no farther than the phantom floor",
           "no member excludes every copied unit", "the generator never saw a copied unit", "no phantom to compare")
PROVEN, NOT_A_COPY, STILL_COPIES, WITHIN_FLOOR, NO_EXCLUDER, NEVER_SAW, NO_FLOOR = range(len(REASONS))


@dataclasses.dataclass
class Model:
    """An ensemble with the code it was trained under (uint8 [N, M])."""

    ensemble: Ensemble
    code: Tensor


def proof_pool(generator: Tensor, gen_code: Tensor, code: Tensor, units: Sequence[int]) -> Tuple[str, List[int],
                                                                                                    List[int]]:
    """Where the counterfactual of a copy of the units ``units`` is drawn: (``"generator"``, its
    members, those that saw none of the units), or, when each of them saw one, (``"ensemble"``,
    every member, those that excluded all of the units). ``("never", ..)`` when the generator saw
    none of them (there is nothing of theirs it trained on to remove), ``("none", ..)`` when no
    member excludes them all."""
    chosen = torch.nonzero(generator > 0).flatten().tolist()
    units = list(units)
    never = [m for m in chosen if not gen_code[units, m].any()]
    if never == chosen:
        return "never", chosen, []
    if never:
        return "generator", chosen, never
    excluders = torch.nonzero(~code[units].bool().any(0)).flatten().tolist()
    if not excluders:
        return "none", list(range(code.shape[1])), []
    return "ensemble", list(range(code.shape[1])), excluders


def random_subsets(pool: Sequence[int], size: int, count: int, avoid: Sequence[Sequence[int]],
                   seed: int) -> List[Tuple[int, ...]]:
    """Up to ``count`` distinct random ``size``-subsets of ``pool`` (sorted tuples), none of
    them in ``avoid`` (the proof's own set and the sets units have): the phantoms of a floor."""
    avoid_set = {tuple(sorted(a)) for a in avoid}
    total = math.comb(len(pool), size)
    if total - len(avoid_set) <= count:  # few enough to list them all
        every = [c for c in itertools.combinations(sorted(pool), size) if c not in avoid_set]
        rng = np.random.default_rng([int(seed), size, 0x5E7])
        return [every[i] for i in rng.permutation(len(every))[:count]]
    rng, out = np.random.default_rng([int(seed), size, 0x5E7]), []
    taken = set(avoid_set)
    while len(out) < count:
        subset = tuple(sorted(rng.choice(pool, size, replace=False).tolist()))
        if subset not in taken:
            taken.add(subset)
            out.append(subset)
    return out


def _uniform(members: Sequence[int], n_members: int) -> Tensor:
    w = torch.zeros(n_members, dtype=torch.float64)
    w[list(members)] = 1.0 / len(members)
    return w


def _phantoms(model: Model, pool: List[int], size: int, count: int, seed: int) -> List[Tuple[int, ...]]:
    """``count`` + 1 random ``size``-subsets of ``pool`` (one spare for the proof's own set),
    the same for every copy with this pool and size, as ``ensattr ablate`` uses one set of
    phantom rows for all samples. Sets that some unit has (restricted to the pool) are left out
    while enough others remain: a phantom removes no unit in particular."""
    rows = {tuple(torch.nonzero(r == 0).flatten().tolist()) for r in model.code[:, pool]}
    units = [tuple(pool[i] for i in r) for r in rows if len(r) == size]
    if math.comb(len(pool), size) - len(units) < count + 1:  # small pools: every set is some unit's
        units = []
    return random_subsets(pool, size, count + 1, units, seed)


def _proof_weights(sets: Dict[int, List[int]], generator: Tensor, gen: Model, ens: Model, phantoms: int,
                   seed: int) -> Tuple[Dict[str, Tuple[List[int], Tensor]], Dict[int, int]]:
    """Per place (``generator`` or ``ensemble``): the copies proven there and their weights
    [S_c, 1 + P, M]: the counterfactual, then up to P phantoms (rows of NaN where a pool has
    fewer; P shrinks to the most any copy has). Also the reason of each copy that has no
    counterfactual (:data:`NO_EXCLUDER`, :data:`NEVER_SAW`)."""
    places: Dict[str, Tuple[List[int], List[List[Tensor]]]] = {}
    drawn: Dict[tuple, List[Tuple[int, ...]]] = {}
    unprovable: Dict[int, int] = {}
    for s, units in sets.items():
        place, pool, proof = proof_pool(generator, gen.code, ens.code, units)
        if place in ("never", "none"):
            unprovable[s] = NEVER_SAW if place == "never" else NO_EXCLUDER
            continue
        model = gen if place == "generator" else ens
        key = (place, tuple(pool), len(proof))
        if key not in drawn:
            drawn[key] = _phantoms(model, pool, len(proof), phantoms, seed)
        subsets = [p for p in drawn[key] if p != tuple(proof)][:phantoms]
        M = model.code.shape[1]
        places.setdefault(place, ([], []))
        places[place][0].append(s)
        places[place][1].append([_uniform(proof, M)] + [_uniform(p, M) for p in subsets])
    width = max((len(r) for _, lists in places.values() for r in lists), default=1)
    nan = {place: torch.full((gen if place == "generator" else ens).code.shape[1:], math.nan, dtype=torch.float64)
           for place in places}
    weights = {place: (rows, torch.stack([torch.stack(r + [nan[place]] * (width - len(r))) for r in lists]))
               for place, (rows, lists) in places.items()}
    return weights, unprovable


def _replay(model: Model, schedule: NoiseSchedule, sampler: Sampler, seeds: Sequence[int], weights: Tensor,
            max_trajectories: int, labels: Optional[Tensor] = None) -> Tensor:
    """Images [S, K, C, H, W] of each seed (and label) under its K weightings; NaN rows (no
    phantom) give NaN."""
    missing = torch.isnan(weights).any(-1)
    filled = torch.where(missing[..., None], weights[:, :1].expand_as(weights), weights)
    images = replay(model.ensemble, schedule, sampler, seeds, filled, max_trajectories, labels=labels).images.cpu()
    images[missing] = math.nan
    return images


def find_and_prove(ens: Model, gen: Model, generator: Generator, test: CopyTest, schedule: NoiseSchedule,
                   sampler: Sampler, seeds: Sequence[int], phantoms: int = 64, alpha: float = 0.05, seed: int = 0,
                   max_trajectories: int = 4096, statistic: str = "trend",
                   null_check: bool = False, null_target: str = "nearest",
                   labels: Optional[Tensor] = None) -> Dict[str, np.ndarray]:
    """Sample ``seeds`` from ``generator`` (members of ``gen``), find the units each sample copies
    (``test``) and prove each copy by an exact counterfactual without all of them, against its
    phantom replays (module doc): by the row-permutation trend test over every replay
    (``statistic="trend"``, :func:`trend_pvalues`) or by the counterfactual's effect against the
    phantoms' (``"floor"``, :func:`empirical_pvalues`). With ``null_check`` every sample that is
    not a copy is also proven as if it copied a unit: its nearest (``null_target="nearest"``), or
    the units within the threshold of a planted near-copy of a training image drawn at random
    (``"planted"``: the image plus noise of norm threshold/4, so the unit tested is chosen apart
    from the sample); ``false_flag`` marks those that would pass (Benjamini-Hochberg over them
    alone), the rate of false flags, and ``null_units`` [S] the unit each was tested against.
    ``labels`` [S]: class-conditional members sample each seed under its label (and the
    sampler's guidance), and every proof replays it so (stored as ``label``).

    Returns the arrays of ``/memorization`` (docs: :func:`ensattr_fast.store.write_memorization`):
    seed [S], images [S, C, H, W], nearest_unit [S], nearest_distance [S], is_copy [S],
    copied_units [S, K] (the copied set, -1 padded), proof_images [S, C, H, W] (NaN where no
    counterfactual), proof_distance [S], moved [S], shift [S] (pixel distance between copy and
    counterfactual), floor [S, P], pvalue [S] (of ``statistic``), pvalue_floor, pvalue_trend [S],
    qvalue [S], proven [S], reason [S] (:data:`REASONS`), false_flag [S], null_units [S] (-1: none).
    """
    if statistic not in ("trend", "floor"):
        raise ValueError(f"statistic must be trend or floor, got {statistic!r}")
    if null_target not in ("nearest", "planted"):
        raise ValueError(f"null_target must be nearest or planted, got {null_target!r}")
    seeds = [int(s) for s in seeds]
    S = len(seeds)
    weights = generator.weights(gen.code.shape[1])
    images = _replay(gen, schedule, sampler, seeds, weights[None, None].expand(S, 1, -1), max_trajectories,
                     labels)[:, 0]
    units, distance, copied = test.copied(images)
    is_copy = torch.tensor([bool(c) for c in copied]).numpy()
    targets = [c if c or not null_check else [int(units[s])] for s, c in enumerate(copied)]
    tested_distance = distance.clone()  # from the sample to what its proof is tested against
    if null_check and null_target == "planted":
        plant_null(test, targets, copied, tested_distance, seed)
    proof_images = torch.full_like(images, math.nan)
    proof_distance, moved, shift = (torch.full((S,), math.nan) for _ in range(3))
    proofs, unprovable = _proof_weights({s: t for s, t in enumerate(targets) if t}, weights, gen, ens, phantoms, seed)
    P = max((w.shape[1] - 1 for _, w in proofs.values()), default=0)
    floor = torch.full((S, P), math.nan)
    members = torch.zeros(S, P + 1, max(gen.code.shape[1], ens.code.shape[1]), dtype=torch.bool)
    for place, (rows, w) in proofs.items():
        model = gen if place == "generator" else ens
        replayed = _replay(model, schedule, sampler, [seeds[s] for s in rows], w, max_trajectories,
                           None if labels is None else labels[torch.tensor(rows, dtype=torch.long)])
        rows_t = torch.tensor(rows, dtype=torch.long)
        away = test.distance_to_units(replayed.nan_to_num(0.0), [targets[s] for s in rows])  # [S_c, 1 + P]
        away[torch.isnan(replayed.flatten(2)).any(-1)] = math.nan
        proof_images[rows_t] = replayed[:, 0]
        proof_distance[rows_t] = away[:, 0]
        moved[rows_t] = away[:, 0] - tested_distance[rows_t]
        floor[rows_t] = away[:, 1:] - tested_distance[rows_t, None]
        shift[rows_t] = (replayed[:, 0] - images[rows_t]).flatten(1).norm(dim=1)
        members[rows_t, :w.shape[1], :w.shape[2]] = (w > 0) & ~torch.isnan(w)
    p_floor, p_trend = np.full(S, np.nan), np.full(S, np.nan)
    tested = np.isfinite(moved.numpy()) & np.isfinite(floor.numpy()).any(1)
    if tested.any():
        p_floor[tested] = empirical_pvalues(moved.numpy()[tested, None], floor.numpy()[tested])[0][:, 0]
        effects = torch.cat([moved[:, None], floor], 1).numpy()
        p_trend[tested] = trend_pvalues(members.numpy()[tested], effects[tested])
    pvalue = p_trend if statistic == "trend" else p_floor
    tested &= np.isfinite(pvalue)
    qvalue = np.full(S, np.nan)
    for group in (tested & is_copy, tested & ~is_copy):  # copies, and the null check's non-copies, apart
        if group.any():
            qvalue[group] = benjamini_hochberg(pvalue[group])
    left = proof_distance.numpy() >= test.threshold
    significant = np.nan_to_num(qvalue, nan=1.0) <= alpha
    reason = np.select([~is_copy, np.isfinite(proof_distance.numpy()) & ~left, ~tested, ~significant],
                       [NOT_A_COPY, STILL_COPIES, NO_FLOOR, WITHIN_FLOOR], PROVEN)
    for s, why in unprovable.items():
        reason[s] = why if is_copy[s] else NOT_A_COPY
    width = max(1, max(len(c) for c in copied))
    copied_units = np.full((S, width), -1, dtype=np.int64)
    for s, c in enumerate(copied):
        copied_units[s, :len(c)] = c
    f32 = lambda x: np.asarray(x, dtype=np.float32)
    labelled = {} if labels is None else dict(label=labels.numpy().astype(np.int64))
    return dict(labelled, seed=np.asarray(seeds, np.int64), images=f32(images),
                nearest_unit=units.numpy().astype(np.int64),
                nearest_distance=f32(distance), is_copy=is_copy.astype(np.uint8), copied_units=copied_units,
                proof_images=f32(proof_images), proof_distance=f32(proof_distance), moved=f32(moved),
                shift=f32(shift), floor=f32(floor), pvalue=f32(pvalue), pvalue_floor=f32(p_floor),
                pvalue_trend=f32(p_trend), qvalue=f32(qvalue), proven=(reason == PROVEN).astype(np.uint8),
                reason=reason.astype(np.uint8),
                null_units=np.array([t[0] if t and not c else -1 for t, c in zip(targets, copied)], np.int64),
                false_flag=(~is_copy & null_check & left & significant).astype(np.uint8))
