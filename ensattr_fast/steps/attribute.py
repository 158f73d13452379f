"""``attribute``: the influence of every unit on the first samples of a results file, by every
method asked for, streamed to the file; then the exact check of each sample's top units."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import codes
from ..attribution import FeatureSpec
from ..attribution.curvature import check_members
from ..attribution.full_kernel import gradient_size
from ..attribution.methods import CURVATURE, Method, Rows, get_method, parse_methods
from ..data import check_images
from ..errors import ConfigError
from ..evaluation.counterfactuals import Counterfactuals, exact_counterfactuals
from ..evaluation.floors import NoiseFloor, certify, score_floors
from ..evaluation.metrics import agreement
from ..members.passes import Passes
from ..members.sharded import place_members
from ..runtime import distributed
from ..runtime.files import check_space
from ..runtime.progress import note
from ..store import (ResultsWriter, cached_statistic, code_hash, count_samples, open_results, part_path,
                     stitch_parts, write_scores)
from ._rules import existing, on_writer, recovered, writer_lock
from .ablate import ablate
from .kinds import read_groups
from .options import AblateOptions, AttributeOptions
from .features import curvature, keep_features, training_features
from .scoring import stream_influence
from .session import Session

__all__ = ["Attribution", "attribute", "exact_check"]


@dataclasses.dataclass
class Attribution:
    """What ``attribute`` computed for its ``rows`` first samples: the methods, each one's top
    units per row (``topk[method]`` = (index int64 [S, k], score float32 [S, k])), the agreement
    of the distance-predicting methods with exact ablation, and the exact check (None: no
    check). The full matrices stay in the results file (``Results.influence``)."""

    rows: int
    methods: List[str]
    topk: Dict[str, tuple]
    agreement: dict
    counterfactuals: Optional[Counterfactuals]


def attribute(session: Session, options: AttributeOptions = AttributeOptions(), progress: bool = True) -> Attribution:
    """Influence of every unit on the first ``options.samples`` samples of the session's results
    file, streamed to it; then the exact check of each sample's top ``options.check`` units by
    ``options.checked_by``.

    ``options.groups`` (name -> units) adds ``/influence/<method>_groups`` [rows, G]: the
    influence of removing each whole group, its members the intersection of its units'
    excluders.

    Distributed (torchrun): rank r scores its share of the rows, in whole row blocks, into its
    part file ``<results>.parts/rank<r>-of-<W>.h5``; rank 0 then stitches the parts into the
    results file with virtual datasets, so that readers see one matrix per method.

    A run killed at any moment is resumed by the same call: blocks on disk are kept. The exact
    check replaces the counterfactuals of an earlier check, those of ``ensattr ablate`` only with
    ``overwrite``. Every first-order and loss score is judged against the scores of phantom code
    rows (``/significance/<method>``), every exact counterfactual against its floor's phantom
    ablations at false discovery rate ``floor.alpha`` over all units; each checked sample gets a
    copy certificate (``/certificate``).
    """
    results = session.results
    existing(results)
    with writer_lock(results, "results file"):
        on_writer(lambda: recovered(results))
        return _attribute(session, options, progress)


def fit_to_data(session: Session, options: AttributeOptions) -> AttributeOptions:
    """``options`` checked against the ensemble before any work: the top-k at most the units
    (clamped, with a note), the exact check within the top-k and by a method computed, a
    projection no larger than a member's gradient."""
    n_units = len(session.checkpoint.code)
    if options.topk > n_units:
        note(f"--topk {options.topk} is more than the {n_units} units: each row keeps all {n_units}")
        options = dataclasses.replace(options, topk=n_units)
    if options.check > options.topk:
        raise ConfigError(f"--check {options.check} is more than --topk {options.topk}: the exact check ablates each "
                          f"sample's top units by {options.checked_by}; raise --topk or lower --check")
    if options.check and options.checked_by not in options.methods:
        raise ConfigError(f"--check-by {options.checked_by} is not among the methods computed "
                          f"({','.join(options.methods)}): add it to --method")
    chosen = parse_methods(options.methods)
    if any(m.scorer is CURVATURE for m in chosen):
        check_members(session.ensemble(options.device))
    gradient = [m for m in chosen if m.feature_kind]
    if gradient and not options.exact_kernel:
        size = gradient_size(session.ensemble(options.device))
        if options.projection_dim > size:
            raise ConfigError(f"--projection-dim {options.projection_dim} is more than the {size:,} numbers of a "
                              f"member's gradient: a projection cannot add to them; use at most {size}, or "
                              "--exact-kernel for the unprojected kernel")
    return options


def _attribute(session: Session, options: AttributeOptions, progress: bool) -> Attribution:
    checkpoint, results = session.checkpoint, session.results
    options = fit_to_data(session, options)
    chosen = parse_methods(options.methods)
    groups = read_groups(options.groups) if options.groups is not None else None
    rows = min(options.samples, count_samples(results))
    size = _expected_bytes(session, options, chosen, rows, groups)
    on_writer(lambda: check_space(Path(results).absolute().parent, size, f"--results {results}"))
    mine = distributed.shard(rows, align=options.block_rows)
    seeds, samples = session.samples(mine.stop, mine.start)
    labels = session.labels(mine.stop, mine.start)
    session.sampler()  # read now with the samples and labels, kept: rank 0 writes the results file from here on
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
    distributed.barrier()  # no rank still reads the results file: an HDF5 writer's lock would refuse its open
    if groups and world.main:
        with ResultsWriter(results, "a") as writer:
            writer.write_groups(list(groups), list(groups.values()))
    train = training_features(session, options.device, progress, options.feature_rows)
    for kind in dict.fromkeys(m.feature_kind for m in chosen if m.feature_kind and not options.exact_kernel):
        spec = FeatureSpec(kind=kind, dim=options.projection_dim)
        found = train(spec)  # every rank: the main one fills the features file, the others wait
        if options.keep_features and world.main:
            keep_features(found, results, spec)  # the results file itself, not a rank's part
    features = FeatureSpec(dim=options.projection_dim, exact=options.exact_kernel)
    fits = dict.fromkeys(CURVATURE.spec(m, features) for m in chosen if m.scorer is CURVATURE)
    factors = curvature(session, fits, options.device, progress) if fits else None  # every rank: its members
    if len(mine):
        _score_rows(session, options, chosen, seeds, samples, target, groups, progress and world.main, train, labels,
                    factors)
    if world.distributed:
        distributed.barrier()  # every part is complete
        if world.main:
            stitch_parts(results, [part_path(results, r, world.size) for r in range(world.size)])
        distributed.barrier()
    if world.main:
        score_floors(results, checkpoint.code, chosen, alpha=options.floor.alpha)
    distributed.barrier()
    found = exact_check(session, options, rows) if options.check else None
    with open_results(results) as r:
        topk = {m.name: tuple(np.asarray(a[:rows]) for a in r.topk(m.name)) for m in chosen}
    return Attribution(rows, [m.name for m in chosen], topk, found[0] if found else {}, found[1] if found else None)


def _expected_bytes(session: Session, options: AttributeOptions, methods: List[Method], rows: int,
                    groups: Optional[dict]) -> int:
    """About what attributing ``rows`` rows adds to the results file: every matrix [rows, N] and
    its top-k, the statistics kept for resumes, the gradient features of the rows (and, with
    ``--keep-features``, of the training data; otherwise those go to the features file)."""
    code = session.checkpoint.code
    N, M = code.shape
    matrices = len(methods) + (sum(m.scorer.by_code for m in methods) if groups else 0)
    size = matrices * rows * (N + 3 * options.topk) * 4 + rows * M * (2 * M + 1) * 4
    kinds = {m.feature_kind for m in methods if m.feature_kind}
    if kinds and not options.exact_kernel:
        examples = len(session.checkpoint.unit_of) if options.keep_features else 0
        size += len(kinds) * M * (examples + rows) * options.projection_dim * 4
    return size + (1 << 20)


def _score_rows(session: Session, options: AttributeOptions, methods: List[Method], seeds: List[int],
                samples: torch.Tensor, target: Path, groups: Optional[dict], progress: bool, train,
                labels: Optional[torch.Tensor] = None, factors=None) -> None:
    """The statistics of the rows (kept in ``target`` for resumes) and every method's matrix."""
    checkpoint = session.checkpoint
    rows = Rows(session.ensemble(options.device), checkpoint.schedule, session.sampler(), seeds, samples,
                checkpoint.code, checkpoint.unit_of, session.data, draws=options.draws,
                # chunks end on row-block ends, so ranks batch rows as one process does
                chunk=math.gcd(options.block_rows, 16),
                features=FeatureSpec(dim=options.projection_dim, exact=options.exact_kernel),
                keep=lambda name, compute: cached_statistic(target, name, compute), train_features=train,
                progress=progress, labels=labels, factors=factors)
    by_code = {m.name: (m.scorer.name, m.scorer.statistic(m, rows)) for m in methods if m.scorer.by_code}
    spec = dict(rows="samples", sampler=dataclasses.asdict(rows.sampler), draws=options.draws,
                checkpoint_hash=checkpoint.file_hash)
    stream_influence(target, checkpoint.code, by_code, k=options.topk, block_rows=options.block_rows,
                     block_units=options.block_units, spec=spec, progress=progress, device=options.device)
    for method in (m for m in methods if not m.scorer.by_code):
        write_scores(target, method.name, method.scorer.scores(method, rows), options.topk, options.block_rows,
                     options.block_units, dict(spec, **method.scorer.record(method, rows),
                                               combination=method.combination))
    if groups:
        group_rows = codes.group_code(checkpoint.code, list(groups.values()))
        stream_influence(target, group_rows, {f"{name}_groups": v for name, v in by_code.items()},
                         k=min(options.topk, len(groups)), block_rows=options.block_rows,
                         block_units=options.block_units, spec=dict(spec, rows="samples", columns="groups"),
                         progress=progress, device=options.device)


#: ``--certify auto`` ablates every distinct code row where there are at most this many
EXHAUSTIVE_ROWS = 256


def _exhaustive(session: Session, options: AttributeOptions) -> bool:
    if options.certify != "auto":
        return options.certify == "exhaustive"
    return len(torch.unique(session.checkpoint.code, dim=0)) <= EXHAUSTIVE_ROWS


def _every_row(session: Session, options: AttributeOptions, rows: int):
    """The exact distance of each of the first ``rows`` samples without each distinct code row
    [rows, D] (units of one row are one ablation: replayed once), and a unit of each row [D]."""
    code = session.checkpoint.code
    distinct, inverse = torch.unique(code, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), len(code), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(code)), "amin")
    seeds, images = session.samples(rows)
    ensemble, passes = place_members(session.ensemble(options.device), Passes(), options.device)
    found = exact_counterfactuals(ensemble, session.checkpoint.schedule, session.sampler(), code, seeds, images,
                                  first.expand(len(seeds), -1).clone(), NoiseFloor(phantoms=0), passes,
                                  label="certify", labels=session.labels(rows))
    return found.distances.numpy(), first.numpy()


def exact_check(session: Session, options: AttributeOptions, rows: int):
    """Ablate each sample's top ``options.check`` units by ``options.checked_by`` exactly; store
    the true distances beside every method's scores of those units and the agreement metrics of
    the methods whose scores predict distances. Returns (agreement, counterfactuals)."""
    check_method, methods = options.checked_by, [get_method(m).name for m in options.methods]
    with open_results(session.results) as r:
        n_units = r.code.shape[0]  # the checked units were chosen among all of them
        units = torch.from_numpy(r.topk(check_method)[0][:rows, : options.check])
        predicted = {}
        for method in methods:
            block = r.influence(method)[:rows, :]
            taken = np.take_along_axis(block, units.clamp_min(0).numpy(), 1)
            predicted[method] = torch.from_numpy(np.where(units.numpy() >= 0, taken, np.nan))  # -1: no unit
    ablation = AblateOptions(floor=dataclasses.replace(options.floor, tests=n_units), overwrite=options.overwrite,
                             device=options.device)
    found = ablate(session, ablation, units, written_by="attribute", predicted=predicted)
    metrics = {m: agreement(predicted[m].numpy(), found.distances.numpy())
               for m in methods if get_method(m).predicts_distance}
    every = _every_row(session, options, rows) if _exhaustive(session, options) else None
    distributed.barrier()  # no rank still reads what the certificate is written into
    if distributed.world().main:
        certify(session.results, get_method(check_method), rows, every)
        with ResultsWriter(session.results, "a") as writer:
            writer.set_attrs(agreement=metrics, checked_by=check_method)
    distributed.barrier()
    return metrics, found
