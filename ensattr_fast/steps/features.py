"""The training features of gradient methods, from the features file beside the checkpoint
(:mod:`ensattr_fast.store.features`): computed once per ensemble and spec, block by block; in a
distributed run each rank computes its share of the examples and the Grams are summed. The
curvature of curvature methods, from the factor store beside it
(:mod:`ensattr_fast.attribution.factors`): fitted once per ensemble and spec, each rank its
share of the members."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from ..attribution import FeatureSpec, gradient_features
from ..attribution.curvature import CurvatureSpec, fit_factors
from ..attribution.factors import FactorStore
from ..attribution.kernels import TrainFeatures
from ..runtime import distributed, memory
from ..store.features import copy_features, stored_features
from ._rules import on_writer
from .session import Session

__all__ = ["training_features", "curvature", "factor_store", "block_rows", "FEATURE_SHARE"]

#: the share of the memory budget one block of features ([M, b, d] float32) holds
FEATURE_SHARE = 1 / 8


def block_rows(members: int, dim: int) -> int:
    """Training examples per block of features: as many as an eighth of the memory budget holds
    (:mod:`ensattr_fast.runtime.memory`), 64 to 16,384."""
    return max(64, min(16384, memory.share(FEATURE_SHARE, members * dim * 4)))


def training_features(session: Session, device: str, progress: bool = False,
                      rows: int = 0) -> Callable[[FeatureSpec], TrainFeatures]:
    """The training features of a spec, as :class:`~ensattr_fast.attribution.methods.Rows` asks
    for them. Every rank must call the result for the same specs in the same order (each
    computes its share); each spec's features are opened once. ``rows``: examples per block
    (0: :func:`block_rows`)."""
    opened, every = {}, []  # every: each training example's condition, found at the first block that needs it

    def conditions(ensemble, start: int, count: int):
        """What training examples ``start`` to ``start + count`` are conditioned on, as
        ``ensemble`` takes it (labels, or condition indices into its table; else None)."""
        if not every:
            every.append(ensemble.example_conditions(session.data()))
        return None if every[0] is None else every[0][start:start + count]

    def features(spec: FeatureSpec) -> TrainFeatures:
        if spec in opened:
            return opened[spec]
        checkpoint = session.checkpoint
        ensemble = session.ensemble(device)
        shape = (ensemble.n_members, len(checkpoint.unit_of), spec.dim)

        world = distributed.world()
        opened[spec] = stored_features(
            session.checkpoint_path, checkpoint.file_hash, dict(dataclasses.asdict(spec), tag=spec.tag), shape,
            lambda images, start: gradient_features(ensemble, checkpoint.schedule, images, spec,
                                                    labels=conditions(ensemble, start, len(images))),
            lambda rows: session.data().blocks(rows), rows or block_rows(shape[0], spec.dim), progress and world.main,
            world.rank, world.size, distributed.all_reduce_sum, distributed.barrier)
        return opened[spec]

    return features


def keep_features(features: TrainFeatures, results, spec: FeatureSpec) -> None:
    """``--keep-features``: the training features inside the results file too."""
    copy_features(features, results, f"features_{spec.kind}{spec.tag}_train")


def curvature(session: Session, specs: Iterable[CurvatureSpec], device: str, progress: bool = False) -> FactorStore:
    """The factor store beside the checkpoint (``<checkpoint>.curvature``), every member's
    curvature under each of ``specs`` (:class:`~ensattr_fast.attribution.curvature.CurvatureSpec`)
    fitted into it first: every rank calls this, and each fits its share of the members."""
    store = factor_store(session)
    on_writer(store.prepare)
    world = distributed.world()
    checkpoint = session.checkpoint
    for spec in specs:
        fit_factors(session.ensemble(device), checkpoint.schedule, session.data(), spec, checkpoint.unit_of,
                    checkpoint.code, store, progress and world.main)
    return store


def factor_store(session: Session) -> FactorStore:
    """The store of the members' fitted curvature beside the checkpoint, shared by the ranks."""
    world, path = distributed.world(), session.checkpoint_path
    return FactorStore(path.parent / f"{path.name}.curvature", session.checkpoint.file_hash, world.rank, world.size,
                       distributed.barrier)

