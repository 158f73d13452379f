"""Loss-based influence of every unit.

l_m(q) = mean over K shared draws (t_k, eps_k) of the member's
epsilon-prediction error on query q, the same draws for every member and query (common random
numbers); infl(u, q) = mean_{m in E_u} l_m(q) - mean_{m in I_u} l_m(q): positive when removing
u makes q harder to denoise, i.e. u supports q.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..data import check_images
from ..diffusion.schedules import NoiseSchedule
from ..members import Ensemble
from ..ops import masked_member_mse

__all__ = ["member_losses"]


@torch.no_grad()
def member_losses(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    images: Tensor,
    draws: int = 64,
    seed: int = 0,
    chunk: int = 64,
    labels: Optional[Tensor] = None,
) -> Tensor:
    """Each member's diffusion loss on each query image, L [Q, M] (conditioned on its label
    [Q], class-conditional members).

    The same ``draws`` (t, eps) pairs serve every member and every query (common random
    numbers), so member differences are differences of their data, not of the draws.
    """
    device, dtype = next(ensemble.parameters()).device, next(ensemble.parameters()).dtype
    M, shape = ensemble.n_members, ensemble.data_shape
    check_images(images, "query images", shape=shape, allow_empty=True)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(schedule.steps, (draws,), generator=g)
    eps = torch.randn(draws, *shape, generator=g).to(dtype)
    abar = schedule.alphas_cumprod.to(dtype)[t].view(draws, *([1] * len(shape)))
    out = []
    for start in range(0, len(images), chunk):
        q = images[start : start + chunk].to(dtype)
        x_t = abar.sqrt() * q[:, None] + (1 - abar).sqrt() * eps  # [Qc, K, ...]
        batch = x_t.reshape(-1, *shape).to(device)
        steps = t.repeat(len(q)).to(device)
        conditions = [steps]
        if labels is not None:
            conditions.append(labels[start : start + chunk].repeat_interleave(draws).to(device))
        pred = ensemble(batch[None].expand(M, *batch.shape), *conditions)
        target = eps.repeat(len(q), *([1] * len(shape))).flatten(1).to(device)
        per_example, _ = masked_member_mse(pred.flatten(2), target)
        out.append(per_example.view(M, len(q), draws).mean(-1).T.cpu())
    return torch.cat(out) if out else torch.zeros(0, M)
