"""Group audits against retraining truth (issue 12, item 4a).

Units are groups of the digits: the 10 classes (sparse exclusion, 20 members, each class
excluded by 2) and 64 content clusters (k-means on pixels, balanced constant weight, 16
members). Truth: for every group, a model retrained on all data but that group, and a model
retrained on everything, for 2 seeds; within a seed the G + 1 models share initial weights and
every (t, eps) draw (common random numbers), so they differ by their data alone. For each query (a sample of the
encoded ensemble) the true change of its diffusion loss when a group is removed is
L_without_g(q) - L_all(q), both averaged over seeds, every loss over the same 256 (t, eps)
draws. Predictors of that change, per query over the groups:

- exact ablation: the members that never saw g against all members, mean loss of each;
- D-TRAK group sums: per-example D-TRAK scores (1,024 dims, 10 timesteps) summed over the
  group, over the ensemble's members (the default method) and on one model trained on all;
- pixel baselines: similarity to the group's nearest image, and the group's share of the
  query's 10 nearest images.

Figures: mean Spearman over queries, and the share of queries whose most important group
(largest true change) is the predictor's top group. Trained models are kept under
``$ENSATTR_TRUST_DIR`` (default ``out/trust``) for reruns.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ensattr_fast import codes
from ensattr_fast.attribution import member_losses
from ensattr_fast.attribution.gradients import FeatureSpec, dataset_features, gradient_features, member_scores
from ensattr_fast.data import load_digits
from ensattr_fast.diffusion.sampling import sample
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import MemberOptions, build_members
from ensattr_fast.training import TrainConfig, Trainer
from ensattr_fast.training.checkpoint import Checkpoint

from .._common import Record, Suite

SEEDS = 2
DRAWS = 256


def _work() -> Path:
    return Path(os.environ.get("ENSATTR_TRUST_DIR", "out/trust"))


def _train(path: Path, data, code, unit_of, config: TrainConfig, shared: bool, device: str) -> Checkpoint:
    """Members of the demo's architecture, member m on the units of ``code[:, m]``; resumed from
    ``path`` when a run is there."""
    ensemble = build_members(MemberOptions(), code.shape[1], data.data_shape, shared_init=shared, seed=config.seed)
    names = [str(u) for u in range(len(code))]
    trainer = Trainer(ensemble, data, code, unit_of, names, NoiseSchedule.linear(), config, device,
                      require_exact_ablation=False)
    if path.exists():
        trainer.restore(Checkpoint.load(path))
    if trainer.step < config.steps:
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.train(checkpoint=path, checkpoint_every=500, progress=False)
    return trainer.checkpoint()


def _truth_code(n_groups: int) -> torch.Tensor:
    """uint8 [G, G + 1]: model g trains on every group but g; the last model on all."""
    return torch.cat([1 - torch.eye(n_groups, dtype=torch.uint8), torch.ones(n_groups, 1, dtype=torch.uint8)], 1)


def _loss_change(truth: Checkpoint, schedule, queries, n_groups: int, device: str) -> np.ndarray:
    """[Q, G]: each query's loss under the model retrained without group g minus under the
    model trained on all (the same draws for every model)."""
    losses = member_losses(truth.build().to(device), schedule, queries, draws=DRAWS, seed=12345).numpy()
    return losses[:, :n_groups] - losses[:, n_groups:]


def _per_query_spearman(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([stats.spearmanr(p, t).statistic if np.ptp(p) > 0 else np.nan for p, t in zip(predicted, truth)])


def _group_sums(per_example: torch.Tensor, group_of: torch.Tensor, n_groups: int) -> np.ndarray:
    return torch.zeros(per_example.shape[0], n_groups).index_add_(1, group_of, per_example.float()).numpy()


def _pixel(queries, data, group_of, n_groups):
    """Pixel baselines [Q, G]: minus the distance to the group's nearest image, and the
    group's count among the query's 10 nearest images."""
    distances = torch.cdist(queries.flatten(1).double(), data.images.flatten(1).double())  # [Q, n]
    nearest = torch.full((len(queries), n_groups), float("inf"), dtype=torch.float64)
    nearest = nearest.scatter_reduce(1, group_of.expand(len(queries), -1), distances, "amin")
    top10 = distances.topk(10, largest=False).indices
    counts = torch.stack([torch.bincount(group_of[row], minlength=n_groups) for row in top10]).float()
    return -nearest.numpy(), counts.numpy()


def _case(suite: Suite, kind: str, quick: bool, device: str) -> None:
    data = load_digits()
    steps = 300 if quick else 1500
    if kind == "classes":
        units = codes.Units.from_labels(data.labels.tolist())
        members, design = 20, "sparse"
    else:
        units = codes.Units.from_clusters(data.images.flatten(1), 16 if quick else 64, seed=0)
        members, design = 16, "balanced"
    G, group_of = units.n_units, units.unit_of
    code, _ = codes.plan(units, members, seed=0, design=design, excluders_per_group=2)
    work = _work() / f"{kind}-{G}-{steps}"
    print(f"[trust groups] {kind}: training the ensemble and {(G + 1) * SEEDS + 1} reference models in {work}",
          flush=True)
    config = TrainConfig(steps=steps, batch_size=128, lr=3e-3, mode="shared_noise", seed=0)
    ensemble_ckpt = _train(work / "ensemble.pt", data, code, group_of, config, True, device)
    # each seed's G + 1 retrained models share initial weights and (t, eps) draws (common random
    # numbers), so that within a seed two of them differ by their data alone
    truths = [_train(work / f"truth{s}.pt", data, _truth_code(G), group_of,
                     TrainConfig(**{**config.__dict__, "seed": 1 + s}), True, device) for s in range(SEEDS)]
    full_ckpt = _train(work / "full.pt", data, torch.ones(G, 1, dtype=torch.uint8), group_of,
                       TrainConfig(**{**config.__dict__, "mode": "independent", "seed": 2}), False, device)

    print(f"[trust groups] {kind}: trained; samples, losses and D-TRAK", flush=True)
    schedule = NoiseSchedule.linear()
    ensemble = ensemble_ckpt.build().to(device)
    Q = 16 if quick else 64
    queries = sample(ensemble, schedule, Sampler("ddim", 50, 0.0), range(Q)).cpu()
    losses = member_losses(ensemble, schedule, queries, draws=DRAWS, seed=12345).numpy()  # [Q, M]
    true_change = np.mean([_loss_change(t, schedule, queries, G, device) for t in truths], 0)  # [Q, G]

    excluders = (code == 0).numpy().astype(np.float64)  # [G, M]
    exact = losses @ (excluders / excluders.sum(1, keepdims=True)).T - losses.mean(1, keepdims=True)
    spec = FeatureSpec(kind="dtrak")
    dtrak_members = member_scores(dataset_features(ensemble, schedule, data, spec, False),
                                  gradient_features(ensemble, schedule, queries, spec),
                                  torch.arange(len(data)), len(data)).mean(0)
    full = full_ckpt.build().to(device)
    dtrak_one = member_scores(dataset_features(full, schedule, data, spec, False),
                              gradient_features(full, schedule, queries, spec), torch.arange(len(data)), len(data))[0]
    similarity, nearest10 = _pixel(queries, data, group_of, G)
    predictors = {"exact ablation (excluders' loss - ensemble's)": exact,
                  "D-TRAK group sums, mean over members": _group_sums(dtrak_members, group_of, G),
                  "D-TRAK group sums, one model on all": _group_sums(dtrak_one, group_of, G),
                  "pixel similarity (nearest image of the group)": similarity,
                  "pixel 10 nearest (the group's count)": nearest10}
    label = f"{kind} ({G} groups, {members} members, {steps} steps, {Q} queries, truth {SEEDS} seeds)"
    spearman = {}
    for name, predicted in predictors.items():
        rho = _per_query_spearman(predicted, true_change)
        spearman[name] = float(np.nanmean(rho))
        top = float(np.mean(predicted.argmax(1) == true_change.argmax(1)))
        suite.record(Record(name=f"{label}: {name}, Spearman with retraining", value=spearman[name], unit="rho"))
        target = "top group agrees >= 80%" if kind == "classes" and name.startswith("exact") else None
        suite.record(Record(name=f"{label}: {name}, top group agrees", value=top, unit="share", target=target,
                            met=None if target is None else bool(top >= 0.8)))
    best_gradient = max(v for k, v in spearman.items() if k.startswith("D-TRAK"))
    ratio = (spearman["exact ablation (excluders' loss - ensemble's)"] / best_gradient if best_gradient > 0
             else float("inf"))
    suite.record(Record(name=f"{label}: exact ablation / best gradient method, Spearman", value=ratio, unit="x",
                        baseline=best_gradient, ratio=ratio, target=">= 1.5x", met=bool(ratio >= 1.5)))


def run(quick: bool, device: str) -> Suite:
    suite = Suite("trust: groups against retraining", quick)
    for kind in ("classes", "clusters"):
        _case(suite, kind, quick, device)
    return suite
