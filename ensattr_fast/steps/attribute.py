"""``ensattr attribute``: the influence of every unit on the first samples of a results file,
by every method asked for, streamed to the file; then the exact check of each sample's top
units."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import codes, distributed
from ..attribution import (FeatureSpec, combine, dataset_features, first_order_grams, gradient_features,
                           member_losses, member_scores)
from ..attribution.exact import exact_member_scores
from ..attribution.methods import DEFAULT_METHODS, Method, get_method, parse_methods
from ..checkpoint import Checkpoint
from ..data import check_images, load_data
from ..errors import DataError
from ..evaluation.metrics import agreement
from ..schedules import Sampler
from ..store import (ResultsWriter, cached_statistic, code_hash, count_samples, file_hash, open_results,
                     part_path, read_sampler, read_samples, recover_after_kill, stitch_parts, stream_influence,
                     stream_scores)
from ._rules import existing, on_writer, writer_lock
from ._floors import certify, score_floors
from .ablate import Floor, ablate_step

__all__ = ["attribute_step", "exact_check", "read_groups"]


def read_groups(path: os.PathLike) -> Dict[str, List[int]]:
    """Unit sets from a JSON file mapping names to unit lists, e.g. {"artist 7": [3, 18, 40]}.

    Under a constant-weight code the excluders of a set are the members that excluded every
    unit of it, so sets of more than a few units have none (their scores are NaN): plan large
    groups as units with a sparse exclusion design instead.
    """
    try:
        groups = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"groups file {path} cannot be read as JSON {{name: [units]}}: {error}") from None
    try:
        return {str(k): [int(u) for u in v] for k, v in groups.items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"groups file {path} must map names to lists of unit ids, e.g. "
                        '{"artist 7": [3, 18, 40]}') from None


def attribute_step(checkpoint_path: os.PathLike, results: os.PathLike, rows: int,
                   methods: Sequence[str] = DEFAULT_METHODS, k: int = 10,
                   block_rows: int = 64, block_units: int = 16384, draws: int = 64,
                   check: int = 8, check_method: str = "first_order", device: str = "cpu",
                   progress: bool = True, groups: Optional[Dict[str, List[int]]] = None,
                   overwrite: bool = False, projection_dim: int = 1024, exact_kernel: bool = False,
                   floor: Floor = Floor()) -> dict:
    """Influence of every unit on the first ``rows`` samples of ``results``, streamed to it;
    then the exact check of each sample's top-``check`` units by ``check_method``.

    ``groups`` (name -> units) adds ``/influence/<method>_groups`` [rows, G]: the influence
    of removing each whole group, its members the intersection of its units' excluders.
    Returns the agreement metrics of the first-order scores with the exact distances.

    Distributed (torchrun): rank r scores its share of the rows, in whole row blocks, into its
    part file ``<results>.parts/rank<r>-of-<W>.h5``; rank 0 then stitches the parts into
    ``results`` with virtual datasets, so that readers see one matrix per method.

    A run killed at any moment is resumed by the same call: blocks on disk are kept. The exact
    check replaces the counterfactuals of an earlier check, those of ``ensattr ablate`` only
    with ``overwrite``.

    The gradient methods project each member's gradients to ``projection_dim`` numbers (a
    projection per member), or with ``exact_kernel`` use the full gradients' kernel (small
    training sets only, see :mod:`ensattr_fast.attribution.exact`).

    Every first-order and loss score is judged against the scores of phantom code rows
    (``/significance/<method>``), every exact counterfactual against ``floor.phantoms`` phantom
    ablations of its sample, at false discovery rate ``floor.alpha`` over all units; each
    checked sample gets a copy certificate (``/certificate``).
    """
    existing(results)
    with writer_lock(results, "results file"):
        on_writer(lambda: recover_after_kill(results))
        return _attribute(checkpoint_path, results, rows, methods, k, block_rows, block_units, draws, check,
                          check_method, device, progress, groups, overwrite, projection_dim, exact_kernel, floor)


def _attribute(checkpoint_path, results, rows, methods, k, block_rows, block_units, draws, check, check_method,
               device, progress, groups, overwrite, projection_dim=1024, exact_kernel=False,
               floor: Floor = Floor()) -> dict:
    checkpoint = Checkpoint.load(checkpoint_path)
    chosen = parse_methods(methods)
    rows = min(rows, count_samples(results))
    mine = distributed.shard(rows, align=block_rows)
    seeds, samples = read_samples(results, mine.stop, mine.start, code=checkpoint.code, against=str(checkpoint_path))
    check_images(samples, f"samples in {results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    for name, units in (groups or {}).items():  # before anything is written
        codes.check_unit_ids(units, len(checkpoint.code), f"group {name!r}")
    world = distributed.world()
    target = Path(results)
    if world.distributed:
        target = part_path(results, world.rank, world.size)
        with ResultsWriter(target, "a") as writer:  # resumes the part of an interrupted run
            writer.check_code(checkpoint.code)
            writer.set_attrs(code_hash=code_hash(checkpoint.code), rows=[mine.start, mine.stop])
    if groups and world.main:
        with ResultsWriter(results, "a") as writer:
            writer.write_groups(list(groups), list(groups.values()))
    if len(mine):
        _score_rows(checkpoint, checkpoint_path, read_sampler(results), seeds, samples, target, chosen, k,
                    block_rows, block_units, draws, groups, progress and world.main, device,
                    projection_dim, exact_kernel)
    if world.distributed:
        distributed.barrier()  # every part is complete
        if world.main:
            stitch_parts(results, [part_path(results, r, world.size) for r in range(world.size)])
        distributed.barrier()
    if world.main:
        score_floors(results, checkpoint.code, chosen, alpha=floor.alpha)
    distributed.barrier()
    if not check:
        return {}
    return exact_check(checkpoint_path, results, rows, check, check_method, [m.name for m in chosen], device,
                       overwrite, floor)


def _score_rows(checkpoint: Checkpoint, checkpoint_path: os.PathLike, sampler: Sampler, seeds: List[int],
                samples: torch.Tensor, target: Path, methods: List[Method], k: int, block_rows: int,
                block_units: int, draws: int, groups: Optional[dict], progress: bool, device: str,
                projection_dim: int = 1024, exact_kernel: bool = False) -> None:
    """The statistics of the rows (kept in ``target`` for resumes) and every method's matrix."""
    ensemble, schedule = checkpoint.build().to(device), checkpoint.schedule
    statistics = {}
    if any(m.scorer == "first_order" for m in methods):
        grams = None

        def compute(which):
            nonlocal grams
            if grams is None:  # chunks end on row-block ends, so ranks batch rows as one process does
                grams = first_order_grams(ensemble, schedule, sampler, seeds, chunk=math.gcd(block_rows, 16))
            return getattr(grams, which)

        # both Grams come from one pass through the sampler: both are kept, whichever is asked for
        statistics["gram_exact"] = cached_statistic(target, "gram_exact", lambda: compute("exact"))
        statistics["gram_direct"] = cached_statistic(target, "gram_direct", lambda: compute("direct"))
    if any(m.statistic == "losses" for m in methods):
        statistics["losses"] = cached_statistic(target, "losses",
                                                lambda: member_losses(ensemble, schedule, samples, draws))
    by_code = {m.name: (m.scorer, statistics[m.statistic]) for m in methods if m.scorer != "gradient"}
    spec = dict(rows="samples", sampler=dataclasses.asdict(sampler), draws=draws,
                checkpoint_hash=file_hash(checkpoint_path))
    stream_influence(target, checkpoint.code, by_code, k=k, block_rows=block_rows,
                     block_units=block_units, spec=spec, progress=progress, device=device)
    gradient = [m for m in methods if m.scorer == "gradient"]
    data = load_data(checkpoint.data_source) if gradient else None
    for kind in sorted({m.feature_kind for m in gradient}):
        features = FeatureSpec(kind=kind, dim=projection_dim, exact=exact_kernel)
        if exact_kernel:  # no features to keep: the Grams of the full gradients, then the kernel
            per_member = exact_member_scores(ensemble, schedule, data, samples, features, checkpoint.unit_of,
                                             len(checkpoint.code))
        else:  # features of a non-default projection are kept under their own names
            train = cached_statistic(target, f"features_{kind}{features.tag}_train",
                                     lambda: dataset_features(ensemble, schedule, data, features, progress))
            queries = cached_statistic(target, f"features_{kind}{features.tag}",
                                       lambda: gradient_features(ensemble, schedule, samples, features))
            per_member = member_scores(train, queries, checkpoint.unit_of, len(checkpoint.code))
        for method in (m for m in gradient if m.feature_kind == kind):
            stream_scores(target, method.name, combine(per_member, checkpoint.code, method.combination), k,
                          block_rows, block_units,
                          dict(spec, features=dataclasses.asdict(features), combination=method.combination))
    if groups:
        group_rows = codes.group_code(checkpoint.code, list(groups.values()))
        stream_influence(target, group_rows, {f"{name}_groups": v for name, v in by_code.items()},
                         k=min(k, len(groups)), block_rows=block_rows, block_units=block_units,
                         spec=dict(spec, rows="samples", columns="groups"), progress=progress, device=device)


def exact_check(checkpoint_path: os.PathLike, results: os.PathLike, rows: int, check: int,
                check_method: str, methods: Sequence[str], device: str = "cpu", overwrite: bool = False,
                floor: Floor = Floor()) -> dict:
    """Ablate each sample's top-``check`` units by ``check_method`` exactly; store the true
    distances beside every method's scores of those units and the agreement metrics of the
    methods whose scores predict distances."""
    with open_results(results) as r:
        n_units = r.code.shape[0]  # the checked units were chosen among all of them
        units = torch.from_numpy(r.topk(check_method)[0][:rows, :check])
        predicted = {}
        for method in methods:
            block = r.influence(method)[:rows, :]
            taken = np.take_along_axis(block, units.clamp_min(0).numpy(), 1)
            predicted[method] = torch.from_numpy(np.where(units.numpy() >= 0, taken, np.nan))  # -1: no unit
    _, distances, _ = ablate_step(checkpoint_path, results, units, device, overwrite=overwrite,
                                  written_by="attribute", floor=dataclasses.replace(floor, tests=n_units),
                                  **{f"predicted_{m}": v for m, v in predicted.items()})
    metrics = {m: agreement(predicted[m].numpy(), distances.numpy())
               for m in methods if get_method(m).predicts_distance}
    if distributed.world().main:
        certify(results, get_method(check_method), rows)
        with ResultsWriter(results, "a") as writer:
            writer.set_attrs(agreement=metrics, checked_by=check_method)
    distributed.barrier()
    return metrics
