"""First-order influence of every unit: the Jacobian of the sample with respect to the member
weights, exact (through the whole sampler) and direct.

**First order.** The final sample x_0(w) is a function of the member weights w. Its Jacobian
J = dx_0/dw [D, M] at w = 1/M is taken by forward-mode AD through the whole sampler (the path
through x_t included), one tangent per member, with the same steps, noise and clipping as the
exact ablations. Ablating U moves w by v_U = w^(-U) - 1/M, so x^(-U) ~ x_0 + J v_U and the
predicted counterfactual distance is ||J v_U|| = sqrt(v_U^T G v_U) with G = J^T J [M, M]. Once
G is known each unit costs O(M^2) (``code_scores``). The *direct* variant drops the terms
through d eps_m / dx and keeps only each member's output along the trajectory.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ..diffusion.sampling import seeded_normal
from ..diffusion.schedules import NoiseSchedule, Sampler
from ..members import Ensemble

__all__ = ["FirstOrderGrams", "first_order_grams"]


@dataclasses.dataclass
class FirstOrderGrams:
    """Per-sample Gram matrices of the sampler's Jacobian with respect to member weights."""

    exact: Tensor  # [S, M, M], J^T J with J through the whole sampler
    direct: Tensor  # [S, M, M], the direct variant
    samples: Tensor  # [S, *data_shape], the full-ensemble samples the Jacobians belong to


def _step_tangents(step, sampler: Sampler, x: Tensor, eps_bar: Tensor, tangent: Tensor, d_eps_bar: Tensor) -> Tensor:
    """Tangent of x_prev = c clip(a x + b eps_bar) + d x + s z along (tangent, d_eps_bar)."""
    inside = 1.0
    if sampler.clip is not None:
        u = step.a * x + step.b * eps_bar
        inside = ((u >= sampler.clip[0]) & (u <= sampler.clip[1])).to(x.dtype)
    return step.c * inside * (step.a * tangent + step.b * d_eps_bar) + step.d * tangent


@torch.no_grad()
def first_order_grams(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    sampler: Sampler,
    seeds: Sequence[int],
    chunk: int = 16,
    labels: Optional[Tensor] = None,
) -> FirstOrderGrams:
    """Exact-Jacobian and direct Gram matrices [S, M, M] for the full-ensemble sample of each
    seed (with its label, class-conditional members: each member's output is then its guided
    one, (1 + w) eps_m(x, label) - w eps_m(x), whose mean the sampler took), ``chunk`` samples
    at a time (memory grows with chunk * M * M * D)."""
    exact, direct, samples = [], [], []
    for start in range(0, len(seeds), chunk):
        e, d, x = _grams_of_chunk(ensemble, schedule, sampler, list(seeds[start : start + chunk]),
                                  None if labels is None else labels[start : start + chunk])
        exact.append(e)
        direct.append(d)
        samples.append(x)
    shape = ensemble.data_shape
    M = ensemble.n_members
    if not samples:
        empty = torch.zeros(0, M, M)
        return FirstOrderGrams(empty, empty.clone(), torch.zeros(0, *shape))
    return FirstOrderGrams(torch.cat(exact), torch.cat(direct), torch.cat(samples))


def _grams_of_chunk(ensemble, schedule, sampler, seeds, labels=None):
    device = next(ensemble.parameters()).device
    dtype = next(ensemble.parameters()).dtype
    M, shape, S = ensemble.n_members, ensemble.data_shape, len(seeds)
    x = seeded_normal(seeds, 0, shape).to(device, dtype).flatten(1)  # [S, D]
    tangent = torch.zeros(M, *x.shape, device=device, dtype=dtype)  # d x / d w_j, exact
    tangent_direct = torch.zeros_like(tangent)
    for k, step in enumerate(sampler.plan(schedule)):
        steps = torch.full((M, S), step.t, device=device)

        def members(x_flat):  # every member's output at x: [M, S, D]
            x_in = x_flat.view(1, S, *shape).expand(M, S, *shape)
            if labels is None:
                return ensemble(x_in, steps).flatten(2)
            out = ensemble(x_in, steps, labels.to(device))
            if sampler.guidance:
                unlabelled = ensemble(x_in, steps, torch.full_like(labels, -1).to(device))
                out = (1 + sampler.guidance) * out - sampler.guidance * unlabelled
            return out.flatten(2)

        eps, d_eps = vmap(lambda v: jvp(members, (x,), (v,)), out_dims=(None, 0))(tangent)
        eps_bar = eps.mean(0)
        # d eps_bar / d w_j = eps_j (direct) + mean_m J_m(x) tangent_j (through x)
        grad_exact = eps + d_eps.mean(1)
        tangent = _step_tangents(step, sampler, x, eps_bar, tangent, grad_exact)
        tangent_direct = _step_tangents(step, sampler, x, eps_bar, tangent_direct, eps)
        x0 = step.a * x + step.b * eps_bar
        if sampler.clip is not None:
            x0 = x0.clamp(*sampler.clip)
        x = step.c * x0 + step.d * x
        if step.s:
            x = x + step.s * seeded_normal(seeds, k + 1, shape).to(device, dtype).flatten(1)
    gram = lambda t: torch.einsum("isd,jsd->sij", t, t).cpu()  # noqa: E731
    return gram(tangent), gram(tangent_direct), x.view(S, *shape).cpu()
