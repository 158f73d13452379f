"""``ensattr audit``: the hierarchical audit of samples over group units, in one command.

1. Every sample is re-drawn exactly without each group (the members that never saw it), from
   its own noise, beside phantom ablations: the groups are ranked by how far their removal moves
   the sample, each with its empirical p-value, z-score and Benjamini-Hochberg q-value.
2. Inside each sample's top groups, the training examples are ranked by the default gradient
   method (D-TRAK over the members), which ranks single examples where ensemble contrasts
   cannot (docs/method.md, "Noise floor").

Results land in the results file: the counterfactuals (every group), ``/audit/groups`` [S, G']
(each sample's top groups, largest effect first), ``/audit/examples`` [S, G', E] (their top
examples, -1 where a group has fewer) with ``/audit/example_scores``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from ..attribution import FeatureSpec, combine, dataset_features, gradient_features, member_scores
from ..attribution.methods import get_method
from ..checkpoint import Checkpoint
from ..data import load_data
from ..errors import CodeError, MethodError
from ..store import ResultsWriter, cached_statistic, count_samples, open_results, read_samples
from .ablate import Floor, ablate_step

__all__ = ["audit_step", "AUDIT_MAX_GROUPS"]

#: every sample is re-drawn once per group: past this many groups, audit a subset of samples
AUDIT_MAX_GROUPS = 4096


def audit_step(checkpoint_path: os.PathLike, results: os.PathLike, samples: int = 32, top_groups: int = 3,
               examples: int = 10, method: str = "dtrak", device: str = "cpu", floor: Floor = Floor(),
               overwrite: bool = False) -> dict:
    """Rank each of the first ``samples`` samples' groups by exact ablation (with significance)
    and, inside its ``top_groups`` groups, the ``examples`` training examples that ``method``
    (a gradient method) scores highest. Returns the audit's arrays."""
    chosen = get_method(method)
    if chosen.scorer != "gradient":
        raise MethodError(f"--method {method}: the audit ranks examples inside groups with a gradient method "
                          "(dtrak, trak, ...)")
    checkpoint = Checkpoint.load(checkpoint_path)
    n_groups = len(checkpoint.code)
    if n_groups > AUDIT_MAX_GROUPS:
        raise CodeError(f"the audit re-draws every sample once per group; {n_groups} groups is more than "
                        f"{AUDIT_MAX_GROUPS}: plan fewer, larger groups (--units group or clusters:K)")
    rows = min(samples, count_samples(results))
    every = torch.arange(n_groups).expand(rows, -1).clone()
    _, distances, _ = ablate_step(checkpoint_path, results, every, device, overwrite=overwrite, written_by="audit",
                                  floor=dataclasses.replace(floor, tests=n_groups))
    top = torch.argsort(-distances.nan_to_num(-1.0), dim=1, stable=True)[:, : min(top_groups, n_groups)]
    scores = _example_scores(checkpoint, results, rows, chosen, device)  # [S, n]
    index, value = _top_examples(scores, checkpoint.unit_of, top, examples)
    arrays = dict(groups=top.numpy(), examples=index, example_scores=value)
    with ResultsWriter(results, "a") as writer:
        writer.write_group("audit", arrays, {"audit": dict(method=method, top_groups=top.shape[1], examples=examples)})
    return arrays


def _example_scores(checkpoint: Checkpoint, results: os.PathLike, rows: int, method, device: str) -> torch.Tensor:
    """Every training example's score [S, n] by a gradient method, examples as their own units;
    the features are those ``ensattr attribute`` keeps (shared through ``/statistics``)."""
    ensemble, schedule = checkpoint.build().to(device), checkpoint.schedule
    _, queries = read_samples(results, rows)
    spec = FeatureSpec(kind=method.feature_kind)
    data = load_data(checkpoint.data_source)
    train = cached_statistic(results, f"features_{spec.kind}_train",
                             lambda: dataset_features(ensemble, schedule, data, spec, False))
    query = gradient_features(ensemble, schedule, queries, spec)
    n = train.shape[1]
    per_example = member_scores(train, query, torch.arange(n), n)  # [M, S, n]
    return combine(per_example, checkpoint.code[checkpoint.unit_of], method.combination)


def _top_examples(scores: torch.Tensor, unit_of: torch.Tensor, groups: torch.Tensor, k: int):
    """The ``k`` best examples of each sample's groups: index int64 and score float32 [S, G', k]."""
    S, G = groups.shape
    index = np.full((S, G, k), -1, np.int64)
    value = np.full((S, G, k), np.nan, np.float32)
    for s in range(S):
        for j, group in enumerate(groups[s].tolist()):
            members = torch.nonzero(unit_of == group).flatten()
            order = members[torch.argsort(-scores[s, members], stable=True)][:k]
            index[s, j, : len(order)] = order.numpy()
            value[s, j, : len(order)] = scores[s, order].numpy()
    return index, value


def describe(arrays: dict, results: os.PathLike, rows: Optional[int] = None) -> str:
    """The audit as lines of text: each sample's top groups with effect and significance, and
    their top examples."""
    with open_results(results) as r:
        cf = r.counterfactual_arrays(rows, images=False)
        names = r.unit_names
    lines = []
    for s, groups in enumerate(arrays["groups"][:rows]):
        parts = []
        for j, g in enumerate(groups.tolist()):
            mark = "significant" if cf["significant"][s, g] else "within noise"
            name = names[g] if names else str(g)
            top = [int(e) for e in arrays["examples"][s, j] if e >= 0][:5]
            parts.append(f"{name} (d {cf['distance'][s, g]:.3f}, q {cf['qvalue'][s, g]:.3g}, {mark}; "
                         f"examples {top})")
        lines.append(f"sample {s}: " + "; ".join(parts))
    return "\n".join(lines)
