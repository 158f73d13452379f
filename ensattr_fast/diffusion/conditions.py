"""What each sample is conditioned on, checked before any sampling: class labels per seed, or
condition indices of text-conditioned members (:mod:`ensattr_fast.members.text`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import DataError
from ..members import Ensemble

__all__ = ["per_seed_labels", "check_labels", "check_conditions"]


def per_seed_labels(given: Optional[Sequence[int]], count: int) -> Optional[Tensor]:
    """``--labels`` as int64 [count]: one label for every seed, or one each; None stays None."""
    if given is None:
        return None
    if len(given) not in (1, count):
        raise DataError(f"--labels gives {len(given)} labels for {count} seeds: give one for every seed, or one each")
    return torch.tensor(list(given) * count if len(given) == 1 else list(given), dtype=torch.long)


def check_labels(classes: int, labels, samples: int, guidance: float = 0.0) -> Optional[Tensor]:
    """``labels`` as int64 [samples] (-1: no condition), or a :class:`DataError` naming what does
    not fit members of ``classes`` classes (0: unconditional): labels for unconditional members,
    a wrong count, a label outside 0..classes-1, guidance without labels."""
    if labels is None:
        if guidance:
            raise DataError(f"guidance {guidance} needs a label per sample (--labels): it pushes each sample toward "
                            "its label")
        return None
    if not classes:
        raise DataError("labels were given, but these members are unconditional (trained without --conditional)")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (samples,):
        raise DataError(f"labels must be {samples} integers, one per sample, got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    bad = labels[(labels < -1) | (labels >= classes)]
    if len(bad):
        raise DataError(f"label {int(bad[0])} is not one the members were trained on (0..{classes - 1}, or -1 for "
                        "none)")
    return labels.long()


def check_conditions(ensemble: Ensemble, labels, samples: int, guidance: float = 0.0) -> Optional[Tensor]:
    """:func:`check_labels` for any ensemble: text-conditioned members take condition indices
    (:mod:`ensattr_fast.members.text`), each checked to have its embedding in the ensemble's
    tables; without any, they sample unconditionally."""
    if getattr(ensemble, "condition_shape", None) is None:  # any module with the ensemble's forward will do
        return check_labels(ensemble.classes, labels, samples, guidance)
    if labels is None:
        if guidance:
            raise DataError(f"guidance {guidance} needs a condition per sample (--condition-file)")
        return None
    labels = torch.as_tensor(labels)
    if labels.shape != (samples,):
        raise DataError(f"conditions must be {samples} indices, one per sample, got {tuple(labels.shape)}")
    ensemble.check_indices(labels)
    return labels.long()
