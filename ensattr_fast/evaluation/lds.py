"""The linear datamodeling score (LDS) of every influence matrix in a results file.

Reference models train on R random halves of the units, each half with several seeds. They
are just another ensemble, with a random code (column r: the units of half r), so the batched
trainer trains all of them together. Each query's diffusion loss under each reference model,
with fixed (t, eps) draws and averaged over a half's seeds, is then compared (Spearman, per
query) with the loss an influence matrix predicts for the half: minus the sum of the scores of
its units. Two pixel nearest-neighbour baselines are scored the same way: minus the distance
from the query to the unit's nearest image (``pixel_similarity``), and 1 for the query's 10
nearest units, 0 elsewhere (``pixel_nearest_10``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from ..attribution import member_losses
from ..attribution.baselines import pixel_similarity
from ..errors import CheckpointError, CodeError, DataError, StoreError
from ..data import Dataset
from ..diffusion.schedules import NoiseSchedule
from ..members import build_ensemble
from ..training import TrainConfig, Trainer
from ..training.checkpoint import Checkpoint, base_of
from .metrics import lds

__all__ = ["PROTOCOLS", "Queries", "reference_subsets", "train_references", "train_full_model", "dtrak_baseline",
           "reference_losses", "lds_table"]

#: the protocols of ``ensattr lds``: R random halves x training seeds per half, the noise seeds of
#: each reference loss, and whether held-out (validation) queries are scored beside the generated
#: ones. ``dtrak`` is D-TRAK's (Zheng et al. 2024, ICLR, section 4.1): 64 half subsets x 3 training
#: seeds x 3 noise seeds, validation and generated queries.
PROTOCOLS = {
    "quick": dict(halves=32, seeds=2, noise_seeds=1, validation=False),
    "dtrak": dict(halves=64, seeds=3, noise_seeds=3, validation=True),
}


@dataclasses.dataclass
class Queries:
    """One set of queries of the LDS: their images [Q, *shape] (with the labels [Q] or condition
    embeddings they were drawn with) and every method's scores of them [Q, N]."""

    name: str  # "generated" or "validation"
    images: Tensor
    scores: Dict[str, np.ndarray]
    labels: Optional[Tensor] = None
    conditions: Optional[Tensor] = None


def reference_subsets(n_units: int, halves: int, seed: int = 0) -> Tensor:
    """bool [R, N]: R independent random halves (N // 2 units each) of the units."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(halves, n_units, generator=g).argsort(1)
    return order < n_units // 2


def train_references(path: os.PathLike, data: Dataset, unit_of: Tensor, subsets: Tensor,
                     seeds: int, config: TrainConfig, spec: dict, device: str = "cpu",
                     progress: bool = True) -> Checkpoint:
    """Train ``seeds`` independent models on each half (members r * seeds + j), or load them
    from ``path`` when a finished run is there."""
    code = subsets.T.repeat_interleave(seeds, dim=1).to(torch.uint8)  # [N, R * seeds]
    return _train_independent(path, data, unit_of, code, config, spec, config.seed, device, progress)


def train_full_model(path: os.PathLike, data: Dataset, unit_of: Tensor, n_units: int, config: TrainConfig,
                     spec: dict, device: str = "cpu", progress: bool = True, models: int = 1) -> Checkpoint:
    """``models`` independent models of the ensemble's architecture, each trained on every unit
    (one: what D-TRAK attributes with, the baseline of the LDS table; M: the TRAK ensemble of the
    same compute as the encoded ensemble), or loaded from ``path`` when a finished run is there."""
    code = torch.ones(n_units, models, dtype=torch.uint8)
    return _train_independent(path, data, unit_of, code, config, spec, config.seed + 7, device, progress)


def _train_independent(path: os.PathLike, data: Dataset, unit_of: Tensor, code: Tensor, config: TrainConfig,
                       spec: dict, init_seed: int, device: str, progress: bool) -> Checkpoint:
    """Independent models of the ensemble's architecture (``spec``, a checkpoint's), model m
    on the units of ``code[:, m]``, trained in ``path`` (or loaded from it when that run is
    finished)."""
    path = Path(path)
    ensemble = build_ensemble(dict(spec, n_members=code.shape[1], shared_init=False, seed=init_seed), base_of(spec))
    config = TrainConfig(**{**config.__dict__, "mode": "independent"})
    trainer = Trainer(ensemble, data, code, unit_of, [str(i) for i in range(len(code))],
                      NoiseSchedule.linear(), config, device, require_exact_ablation=False)
    if path.exists():  # finish (or load) our own run there; never train another run's models further
        try:
            trainer.restore(Checkpoint.load(path))
        except (CodeError, CheckpointError, DataError) as error:
            detail = " ".join(str(error).split()).split(": resume")[0]
            raise StoreError(f"{path} holds models of another run ({detail}); give another file, or remove it to "
                             "train them anew") from None
    if trainer.step < config.steps:
        trainer.train(checkpoint=path, checkpoint_every=250, progress=progress)
    return trainer.checkpoint()


def dtrak_baseline(model: Checkpoint, data: Dataset, queries: Tensor, unit_of: Tensor, n_units: int,
                   device: str = "cpu", labels: Optional[Tensor] = None,
                   conditions: Optional[Tensor] = None) -> Tensor:
    """D-TRAK scores [Q, N] of a model trained on all units (10 timesteps, 1,024 dims,
    lambda 1% of the mean diagonal); of several, their mean (the TRAK ensemble). ``labels``:
    the queries' (conditional models); ``conditions``: the embeddings their condition indices
    point to (text-conditioned models)."""
    return _dtrak_baselines(model, data, [Queries("", queries, {}, labels, conditions)], unit_of, n_units, device)[0]


def _dtrak_baselines(model: Checkpoint, data: Dataset, query_sets: List[Queries], unit_of: Tensor, n_units: int,
                     device: str = "cpu") -> List[Tensor]:
    """:func:`dtrak_baseline` of each query set, the training features computed once."""
    from ..attribution.gradients import FeatureSpec, dataset_features, gradient_features, member_scores

    ensemble, schedule, spec = model.build().to(device), model.schedule, FeatureSpec(kind="dtrak")
    if query_sets:  # text-conditioned members: the condition table is built when the first queries' is set
        _with_conditions(ensemble, query_sets[0].conditions)
    train = dataset_features(ensemble, schedule, data, spec)
    found = []
    for queries in query_sets:
        query = gradient_features(_with_conditions(ensemble, queries.conditions), schedule, queries.images, spec,
                                  labels=queries.labels)
        found.append(member_scores(train, query, unit_of, n_units).mean(0))
    return found


def _with_conditions(ensemble, conditions: Optional[Tensor]):
    """``ensemble``, its sample table the queries' embeddings (text-conditioned members)."""
    if conditions is not None and ensemble.condition_shape is not None:
        ensemble.set_conditions(samples=conditions)
    return ensemble


def reference_losses(refs: Checkpoint, queries: Queries, halves: int, seeds: int, draws: int = 256,
                     noise_seeds: int = 1, device: str = "cpu") -> np.ndarray:
    """Each query's diffusion loss under each half's models [Q, R]: over ``draws`` fixed (t, eps)
    draws from each of ``noise_seeds`` seeds (the first, 12345, the quick form's), and over
    the half's ``seeds`` models."""
    ensemble = _with_conditions(refs.build().to(device), queries.conditions)
    total = 0
    for noise in range(noise_seeds):
        total = total + member_losses(ensemble, refs.schedule, queries.images, draws=draws, seed=12345 + noise,
                                      labels=queries.labels)
    return (total / noise_seeds).view(len(queries.images), halves, seeds).mean(-1).numpy()


def lds_table(checkpoint: Checkpoint, data: Dataset, references: os.PathLike, query_sets: List[Queries],
              unit_of: Tensor, halves: int = 32, seeds: int = 2, noise_seeds: int = 1, steps: Optional[int] = None,
              draws: int = 256, device: str = "cpu", progress: bool = True,
              full_model: Optional[os.PathLike] = None) -> Dict[str, Dict[str, dict]]:
    """LDS of every method's scores of each query set, and of the baselines: query set -> method
    -> mean over queries, its 95% interval, the number of queries and the per-query values.
    Reference models: ``seeds`` per random half, ``halves`` halves, trained in ``references``
    (or loaded from it). Baselines: pixel similarity, the pixel 10 nearest, D-TRAK on one model
    trained on all units (``full_model``, by default beside ``references``; trained there when
    missing), and D-TRAK averaged over M models each trained on all units
    (``dtrak_<M>_full_models``: the TRAK ensemble of the encoded ensemble's compute, beside
    ``full_model`` as ``<stem>.x<M>.pt``)."""
    n_units = len(checkpoint.code)
    subsets = reference_subsets(n_units, halves, seed=checkpoint.config["train"]["seed"] + 1)
    config = TrainConfig(**checkpoint.config["train"])
    if steps is not None:
        config.steps = steps
    refs = train_references(references, data, unit_of, subsets, seeds, config, checkpoint.spec, device, progress)
    table = {}
    for queries in query_sets:
        losses = reference_losses(refs, queries, halves, seeds, draws, noise_seeds, device)
        rows = {m: lds(v, subsets.numpy(), losses) for m, v in queries.scores.items()}
        for name, nearest in (("pixel_similarity", None), ("pixel_nearest_10", 10)):
            baseline = pixel_similarity(queries.images, data, unit_of, n_units, nearest).numpy()
            rows[name] = lds(baseline, subsets.numpy(), losses)
        table[queries.name] = (losses, rows)
    full_model = full_model or Path(references).with_name(Path(references).stem + ".full.pt")
    M = len(checkpoint.code[0])  # the equal-compute alternative to the encoded ensemble: M models on all units
    many = Path(full_model).with_name(Path(full_model).stem + f".x{M}.pt")
    for name, path, models in (("dtrak_one_model", full_model, 1), (f"dtrak_{M}_full_models", many, M)):
        model = train_full_model(path, data, unit_of, n_units, config, checkpoint.spec, device, progress, models)
        for queries, scores in zip(query_sets, _dtrak_baselines(model, data, query_sets, unit_of, n_units, device)):
            losses, rows = table[queries.name]
            rows[name] = lds(scores.numpy(), subsets.numpy(), losses)
    return {name: rows for name, (_, rows) in table.items()}
