"""Copies of training units, found in samples and proven by exact ablation.

A generator is a weighting of an ensemble's members: the full ensemble, one member, or a
subset (:class:`Generator`). Its samples are searched for near-copies: a sample whose nearest
training image (pixel L2) lies within ``threshold`` copies that image's unit u. Each copy is
then proven by an exact counterfactual: the same seed replayed (the same x_T and every z_t)
without u, by the generator's members that never saw u (renormalised), or, when every one of
them saw u, by the ensemble's excluders E_u. The proof holds when the counterfactual is no
longer within ``threshold`` of u's images and moved away from them by more than the noise floor:
the same replay under ``phantoms`` random sub-ensembles of the same size from the same members.

The effect of a proof is how much farther from u the counterfactual lies than the copy
(``moved`` = proof distance - copy distance); the floor holds the same quantity for each
phantom. p-values are empirical against the floor (:func:`empirical_pvalues`), q-values
Benjamini-Hochberg over the copies of a run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import Dataset
from ..diffusion.sampling import replay
from ..diffusion.schedules import NoiseSchedule, Sampler
from ..errors import CodeError
from ..members import Ensemble
from .significance import benjamini_hochberg, empirical_pvalues

__all__ = ["Generator", "parse_generator", "Model", "nearest_copies", "distance_to_units", "proof_pool",
           "random_subsets", "find_and_prove"]


@dataclasses.dataclass(frozen=True)
class Generator:
    """Which members of a model sample: all of them (``members`` None) or the listed ones,
    equally weighted. ``name`` is the form it was given in (``full``, ``member:3``,
    ``members:0,2,5``)."""

    name: str
    members: Optional[Tuple[int, ...]] = None

    def weights(self, n_members: int) -> Tensor:
        """Member weights float64 [M]: 1/|G| on the generator's members."""
        chosen = range(n_members) if self.members is None else self.members
        bad = [m for m in chosen if not 0 <= m < n_members]
        if bad:
            raise CodeError(f"generator {self.name}: member {bad[0]} is out of range: the model has {n_members}")
        keep = torch.zeros(n_members, dtype=torch.float64)
        keep[list(chosen)] = 1.0
        return keep / keep.sum()


def parse_generator(text: str) -> Generator:
    """``full``, ``member:M`` or ``members:a,b,c`` (distinct member ids >= 0); anything else
    raises :class:`CodeError`."""
    text = str(text).strip()
    if text == "full":
        return Generator("full")
    kind, colon, rest = text.partition(":")
    if colon and kind in ("member", "members"):
        parts = [p.strip() for p in rest.split(",")]
        if all(p.isdigit() for p in parts) and (kind == "members" or len(parts) == 1):
            ids = tuple(int(p) for p in parts)
            if len(set(ids)) == len(ids) and all(m < 2**31 for m in ids):
                return Generator(f"{kind}:{','.join(map(str, ids))}", ids)
    raise CodeError(f"generator must be full, member:M or members:a,b,c (distinct member ids), got {text!r}")


@dataclasses.dataclass
class Model:
    """An ensemble with the code it was trained under (uint8 [N, M])."""

    ensemble: Ensemble
    code: Tensor


def nearest_copies(images: Tensor, data: Dataset, unit_of: Tensor, threshold: float):
    """Each image's nearest training image: its unit int64 [S], its distance float [S], and
    whether it is a near-copy (distance < ``threshold``) bool [S]."""
    distances = data.pixel_distances(images)
    nearest = distances.min(1)
    return unit_of[nearest.indices], nearest.values, nearest.values < threshold


def distance_to_units(images: Tensor, data: Dataset, unit_of: Tensor, units: Tensor) -> Tensor:
    """Distance [S, K] of images [S, K, C, H, W] to the nearest training image of ``units[s]``."""
    out = torch.empty(images.shape[:2])
    for s, unit in enumerate(units.tolist()):
        members = data.read(torch.nonzero(unit_of == unit).flatten())
        out[s] = torch.cdist(images[s].flatten(1).float(), members.flatten(1)).min(1).values
    return out


def proof_pool(generator: Tensor, gen_code: Tensor, code: Tensor, unit: int) -> Tuple[str, List[int], List[int]]:
    """Where the counterfactual of a copy of ``unit`` is drawn: (``"generator"``, its members,
    those that never saw the unit) or, when all of them saw it, (``"ensemble"``, every member,
    the ensemble's excluders E_u)."""
    chosen = torch.nonzero(generator > 0).flatten().tolist()
    never = [m for m in chosen if gen_code[unit, m] == 0]
    if never:
        return "generator", chosen, never
    excluders = torch.nonzero(code[unit] == 0).flatten().tolist()
    if not excluders:
        raise CodeError(f"unit {unit} has no excluder: no member can prove a copy of it")
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


def _proof_weights(copies: Tensor, units: Tensor, generator: Tensor, gen: Model, ens: Model, phantoms: int,
                   seed: int) -> Dict[str, Tuple[List[int], Tensor]]:
    """Per place (``generator`` or ``ensemble``): the copies proven there and their weights
    [S_c, 1 + P, M]: the counterfactual, then up to P phantoms (rows of NaN where a pool has
    fewer; P shrinks to the most any copy has)."""
    places: Dict[str, Tuple[List[int], List[List[Tensor]]]] = {}
    drawn: Dict[tuple, List[Tuple[int, ...]]] = {}
    for s in copies.tolist():
        place, pool, proof = proof_pool(generator, gen.code, ens.code, int(units[s]))
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
    return {place: (rows, torch.stack([torch.stack(r + [nan[place]] * (width - len(r))) for r in lists]))
            for place, (rows, lists) in places.items()}


def _replay(model: Model, schedule: NoiseSchedule, sampler: Sampler, seeds: Sequence[int], weights: Tensor,
            max_trajectories: int) -> Tensor:
    """Images [S, K, C, H, W] of each seed under its K weightings; NaN rows (no phantom) give NaN."""
    missing = torch.isnan(weights).any(-1)
    filled = torch.where(missing[..., None], weights[:, :1].expand_as(weights), weights)
    images = replay(model.ensemble, schedule, sampler, seeds, filled, max_trajectories).images.cpu()
    images[missing] = math.nan
    return images


def find_and_prove(ens: Model, gen: Model, generator: Generator, data: Dataset, unit_of: Tensor,
                   schedule: NoiseSchedule, sampler: Sampler, seeds: Sequence[int], threshold: float = 1.0,
                   phantoms: int = 64, alpha: float = 0.05, seed: int = 0,
                   max_trajectories: int = 4096) -> Dict[str, np.ndarray]:
    """Sample ``seeds`` from ``generator`` (members of ``gen``), find near-copies of training
    units and prove each by an exact counterfactual against its phantom floor (module doc).

    Returns the arrays of ``/memorization`` (docs: :func:`ensattr_fast.store.write_memorization`):
    seed [S], images [S, C, H, W], nearest_unit [S], nearest_distance [S], is_copy [S],
    proof_images [S, C, H, W] (NaN for non-copies), proof_distance [S], moved [S], shift [S]
    (pixel distance between copy and counterfactual), floor [S, P], pvalue [S], qvalue [S],
    proven [S].
    """
    seeds = [int(s) for s in seeds]
    S = len(seeds)
    weights = generator.weights(gen.code.shape[1])
    images = _replay(gen, schedule, sampler, seeds, weights[None, None].expand(S, 1, -1), max_trajectories)[:, 0]
    units, distance, is_copy = nearest_copies(images, data, unit_of, threshold)
    proof_images = torch.full_like(images, math.nan)
    proof_distance, moved, shift = (torch.full((S,), math.nan) for _ in range(3))
    proofs = _proof_weights(torch.nonzero(is_copy).flatten(), units, weights, gen, ens, phantoms, seed)
    P = max((w.shape[1] - 1 for _, w in proofs.values()), default=0)
    floor = torch.full((S, P), math.nan)
    for place, (rows, w) in proofs.items():
        model = gen if place == "generator" else ens
        replayed = _replay(model, schedule, sampler, [seeds[s] for s in rows], w, max_trajectories)
        rows_t = torch.tensor(rows, dtype=torch.long)
        away = distance_to_units(replayed.nan_to_num(0.0), data, unit_of, units[rows_t])  # [S_c, 1 + P]
        away[torch.isnan(replayed.flatten(2)).any(-1)] = math.nan
        proof_images[rows_t] = replayed[:, 0]
        proof_distance[rows_t] = away[:, 0]
        moved[rows_t] = away[:, 0] - distance[rows_t]
        floor[rows_t] = away[:, 1:] - distance[rows_t, None]
        shift[rows_t] = (replayed[:, 0] - images[rows_t]).flatten(1).norm(dim=1)
    pvalue, qvalue = np.full(S, np.nan), np.full(S, np.nan)
    tested = np.isfinite(moved.numpy()) & np.isfinite(floor.numpy()).any(1)
    if tested.any():
        pvalue[tested] = empirical_pvalues(moved.numpy()[tested, None], floor.numpy()[tested])[0][:, 0]
        qvalue[tested] = benjamini_hochberg(pvalue[tested])
    proven = is_copy.numpy() & (proof_distance.numpy() >= threshold) & (np.nan_to_num(qvalue, nan=1.0) <= alpha)
    return dict(seed=np.asarray(seeds, np.int64), images=images.numpy().astype(np.float32),
                nearest_unit=units.numpy().astype(np.int64), nearest_distance=distance.numpy().astype(np.float32),
                is_copy=is_copy.numpy().astype(np.uint8), proof_images=proof_images.numpy().astype(np.float32),
                proof_distance=proof_distance.numpy().astype(np.float32), moved=moved.numpy().astype(np.float32),
                shift=shift.numpy().astype(np.float32), floor=floor.numpy().astype(np.float32),
                pvalue=pvalue.astype(np.float32), qvalue=qvalue.astype(np.float32), proven=proven.astype(np.uint8))
