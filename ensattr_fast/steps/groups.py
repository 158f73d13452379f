"""``audit``: the hierarchical audit of samples over group units, in one command.

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

from ..attribution import FeatureSpec, gradient_features
from ..attribution.kernels import combined, unit_sums
from ..attribution.methods import get_method
from ..errors import CodeError, MethodError
from ..evaluation.counterfactuals import Counterfactuals
from ..runtime.progress import note
from ..store import ResultsWriter, count_samples, open_results
from .ablate import ablate
from .options import AblateOptions, GroupAuditOptions
from .features import training_features
from .session import Session

__all__ = ["GroupAudit", "audit_groups", "describe", "AUDIT_MAX_GROUPS"]

#: every sample is re-drawn once per group: past this many groups, audit a subset of samples
AUDIT_MAX_GROUPS = 4096


@dataclasses.dataclass
class GroupAudit:
    """Each sample's ``groups`` int64 [S, G'] (its top groups, largest exact effect first), the
    ``examples`` int64 [S, G', E] ranked inside each (-1 where a group has fewer) with their
    ``example_scores`` float32, and the exact counterfactuals of every group."""

    groups: np.ndarray
    examples: np.ndarray
    example_scores: np.ndarray
    counterfactuals: Counterfactuals

    def arrays(self) -> dict:
        """The arrays of ``/audit``, by name."""
        return dict(groups=self.groups, examples=self.examples, example_scores=self.example_scores)


def audit_groups(session: Session, options: GroupAuditOptions = GroupAuditOptions()) -> GroupAudit:
    """Rank each of the first ``options.samples`` samples' groups by exact ablation (with
    significance) and, inside its ``top_groups`` groups, the ``examples`` training examples that
    ``options.method`` (a gradient method) scores highest."""
    chosen = get_method(options.method)
    if chosen.scorer.by_code:
        raise MethodError(f"--method {options.method}: the audit ranks examples inside groups with a gradient method "
                          "(dtrak, trak, ...)")
    checkpoint = session.checkpoint
    n_groups = len(checkpoint.code)
    if n_groups > AUDIT_MAX_GROUPS:
        raise CodeError(f"the audit re-draws every sample once per group; {n_groups} groups is more than "
                        f"{AUDIT_MAX_GROUPS}: plan fewer, larger groups (--units group or clusters:K)")
    sizes = torch.bincount(checkpoint.unit_of, minlength=n_groups)
    if int(sizes.max()) <= 1:
        raise CodeError("every unit of this ensemble is one example: the audit ranks the examples inside groups; "
                        "plan groups as units (--units class, group or clusters:K), or use `ensattr attribute`")
    if options.examples > int(sizes.max()):
        note(f"--examples {options.examples} is more than the largest group ({int(sizes.max())} examples): each "
             "group's examples are all ranked")
        options = dataclasses.replace(options, examples=int(sizes.max()))
    rows = min(options.samples, count_samples(session.results))
    every = torch.arange(n_groups).expand(rows, -1).clone()
    ablation = AblateOptions(floor=dataclasses.replace(options.floor, tests=n_groups), overwrite=options.overwrite,
                             device=options.device)
    found = ablate(session, ablation, every, written_by="audit")
    top = torch.argsort(-found.distances.nan_to_num(-1.0), dim=1, stable=True)[:, : min(options.top_groups, n_groups)]
    scores = _example_scores(session, rows, chosen, options.device)  # [S, n]
    index, value = _top_examples(scores, checkpoint.unit_of, top, options.examples)
    audit = GroupAudit(top.numpy(), index, value, found)
    with ResultsWriter(session.results, "a") as writer:
        writer.write_group("audit", audit.arrays(), {"audit": dict(method=options.method, top_groups=top.shape[1],
                                                                   examples=options.examples)})
    return audit


def _example_scores(session: Session, rows: int, method, device: str) -> torch.Tensor:
    """Every training example's score [S, n] by a gradient method, examples as their own units;
    the training features are those of the features file beside the checkpoint (shared with
    ``ensattr attribute``), read block by block."""
    checkpoint = session.checkpoint
    ensemble, schedule = session.ensemble(device), checkpoint.schedule
    _, queries = session.samples(rows)
    spec = FeatureSpec(kind=method.feature_kind)
    train = training_features(session, device)(spec)
    query = gradient_features(ensemble, schedule, queries, spec, labels=session.labels(rows))
    n = train.n
    code = checkpoint.code[checkpoint.unit_of]  # each example under its unit's code row
    return combined(*unit_sums(train, query, torch.arange(n), code), code, method.combination)


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
