"""Checks of what an ensemble draws: a digit classifier and the share of confident samples.

A simple classifier trained on part of the real digits judges samples: the share of samples it
labels with confidence >= 0.9, against the share of held-out real digits it labels so, says
whether samples look like digits; the share of each class says whether they are balanced.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset

__all__ = ["DigitJudge", "train_judge"]


@dataclasses.dataclass
class DigitJudge:
    model: nn.Module
    held_out_confident: float  # share of held-out real digits labelled with confidence >= threshold
    held_out_accuracy: float
    threshold: float = 0.9

    @torch.no_grad()
    def judge(self, images: Tensor) -> Dict[str, object]:
        """``confident``: share labelled with confidence >= threshold; ``class_shares``: share
        of samples per predicted class; ``confident_of_class``: share confidently of each class."""
        probs = F.softmax(self.model(images.flatten(1).float()), -1)
        conf, label = probs.max(-1)
        confident = conf >= self.threshold
        n_classes = probs.shape[-1]
        return dict(
            confident=confident.float().mean().item(),
            relative_confident=confident.float().mean().item() / self.held_out_confident,
            class_shares=torch.bincount(label, minlength=n_classes).float().div(len(label)).tolist(),
            confident_of_class=torch.bincount(label[confident], minlength=n_classes).float().div(len(label)).tolist(),
        )


def train_judge(data: Dataset, train_fraction: float = 0.7, seed: int = 0, steps: int = 600) -> DigitJudge:
    """A small MLP classifier on a random ``train_fraction`` of ``data`` (which has labels)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    cut = int(train_fraction * len(data))
    x, y = data.images.flatten(1), data.labels
    train, test = order[:cut], order[cut:]
    n_classes = int(y.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, n_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        batch = train[torch.randint(len(train), (128,), generator=g)]
        # light pixel noise: samples are never exactly on the data grid
        inputs = x[batch] + 0.05 * torch.randn(x[batch].shape, generator=g)
        loss = F.cross_entropy(model(inputs), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        probs = F.softmax(model(x[test]), -1)
    conf, label = probs.max(-1)
    return DigitJudge(model, (conf >= 0.9).float().mean().item(), (label == y[test]).float().mean().item())
