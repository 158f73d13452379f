"""Gradient features and TRAK-style attribution for any ensemble: TRAK, D-TRAK and the
ensemble-aware combinations with the code.

A feature of an image under member m is the gradient, with respect to m's parameters, of a
function of m's output at K fixed timesteps with fixed noises, projected to ``dim`` numbers:

- ``dtrak`` (Zheng et al. 2024, D-TRAK): f = mean_k ||eps_m(x_tk, t_k)||^2;
- ``trak`` (Park et al. 2023, TRAK, with the diffusion loss): f = mean_k ||eps_k - eps_m(x_tk, t_k)||^2.

The members' parameters are stacked and independent, so the gradient of the sum over members
holds each member's own gradient. Two ways to project it, both drawn from a seed, neither a
matrix over all parameters:

- the built-in MLP members: a linear layer's per-example gradient is sum_k x_k dy_k^T over the
  example's rows k (its K timesteps), so one ordinary backward pass over a batch gives every
  (x_k, dy_k), and a rank-one Gaussian projection per layer and output coordinate j,
  <u_j v_j^T, sum_k x_k dy_k^T> = sum_k (x_k . u_j)(dy_k . v_j), never forms the gradient
  (the structure LoGra exploits, Choe et al. 2024). Layer-norm gains are left out.
- any other members: per-example gradients from ``vmap(grad(...))`` over examples, projected
  by a CountSketch (coordinate i to bucket h(i) with sign s(i); E <Sx, Sy> = <x, y>).

Member m's scores of query q against training examples are TRAK's regularised kernel,
tau_m(q) = phi_m(q)^T (Phi_m^T Phi_m + lambda I)^-1 Phi_m^T, lambda a fraction of the mean
diagonal of Phi_m^T Phi_m; a unit's score sums its examples'. The members combine as
(``Combination``):

- ``mean``: the average over all members (the classic TRAK ensemble);
- ``includers``: the average over the members that trained on the unit only (a member that
  never saw a unit was not influenced by it);
- ``contrast``: the includers' average minus the excluders' average: the excluders' scores
  measure how similar the unit merely looks to the query under a model that never saw it,
  and the difference keeps what training on it added (our design: the code's exact contrast
  applied to gradient scores).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..data import check_images
from ..errors import ConfigError, MethodError
from ..members import Ensemble
from ..members.mlp import StackedMLP, _StackedLinear
from ..schedules import NoiseSchedule

__all__ = ["FeatureSpec", "CountSketch", "gradient_features", "dataset_features", "member_scores", "combine",
           "COMBINATIONS"]

COMBINATIONS = ("mean", "includers", "contrast")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    kind: str = "dtrak"  # "dtrak": squared norm of the output; "trak": the diffusion loss
    timesteps: int = 10  # evenly spaced over the schedule
    dim: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ("dtrak", "trak"):
            raise ConfigError(f"feature kind must be 'dtrak' or 'trak', got {self.kind!r}")
        if self.timesteps < 1 or self.dim < 1:
            raise ConfigError(f"timesteps and dim must be positive, got {self.timesteps}, {self.dim}")

    def draws(self, schedule: NoiseSchedule, shape) -> tuple:
        """The fixed timesteps [K] and noises [K, *shape], the same for every image."""
        t = torch.linspace(0, schedule.steps - 1, self.timesteps).round().long()
        eps = torch.randn(self.timesteps, *shape, generator=torch.Generator().manual_seed(self.seed))
        return t, eps


class CountSketch:
    """A random projection R^P -> R^dim from a seed, applied without a matrix: for each
    parameter tensor, coordinate i goes to bucket ``index[i]`` with sign ``sign[i]``."""

    def __init__(self, sizes: List[int], dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.index = [torch.randint(dim, (n,), generator=g) for n in sizes]
        self.sign = [torch.randint(2, (n,), generator=g).float() * 2 - 1 for n in sizes]

    def __call__(self, parts: List[Tensor]) -> Tensor:
        """``parts[j]`` [R, sizes[j]] -> [R, dim]."""
        out = parts[0].new_zeros(len(parts[0]), self.dim)
        for part, index, sign in zip(parts, self.index, self.sign):
            out.index_add_(1, index.to(part.device), part * sign.to(part.device, part.dtype))
        return out


def gradient_features(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    images: Tensor,
    spec: FeatureSpec = FeatureSpec(),
    batch: Optional[int] = None,
    progress: bool = False,
) -> Tensor:
    """Projected per-example gradient features [M, n, dim] of ``images`` [n, *data_shape]."""
    check_images(images, "images for gradient features", shape=ensemble.data_shape, allow_empty=True)
    if isinstance(ensemble, StackedMLP):
        return _mlp_features(ensemble, schedule, images, spec, batch or 128, progress)
    return _generic_features(ensemble, schedule, images, spec, batch or 16, progress)


def _value(out: Tensor, eps: Tensor, kind: str) -> Tensor:
    """The function whose gradient is the feature, per member and row: [M, R]."""
    if kind == "dtrak":
        return out.pow(2).flatten(2).sum(-1)
    return (out - eps).pow(2).flatten(2).mean(-1)


def _noised(images: Tensor, spec: FeatureSpec, schedule: NoiseSchedule, device) -> tuple:
    """(x_t [n, K, *shape], t [K], eps [K, *shape]) at the spec's fixed draws."""
    shape = images.shape[1:]
    t, eps = spec.draws(schedule, shape)
    t, eps = t.to(device), eps.to(device)
    abar = schedule.alphas_cumprod.to(device, torch.float32)[t].view(-1, *([1] * len(shape)))
    x = images.to(device, torch.float32)[:, None]
    return abar.sqrt() * x + (1 - abar).sqrt() * eps, t, eps


def _mlp_features(ensemble: StackedMLP, schedule, images, spec, batch, progress) -> Tensor:
    device = next(ensemble.parameters()).device
    M, shape, K = ensemble.n_members, ensemble.data_shape, spec.timesteps
    layers = [m for m in ensemble.modules() if isinstance(m, _StackedLinear)]
    g = torch.Generator().manual_seed(spec.seed + 1)
    # per layer: u [fan_in + 1 (the bias), dim], v [fan_out, dim]
    projections = [(torch.randn(layer.weight.shape[1] + 1, spec.dim, generator=g).to(device),
                    torch.randn(layer.weight.shape[2], spec.dim, generator=g).to(device)) for layer in layers]
    seen: dict = {}

    def remember(layer, inputs, output):
        seen[layer] = [inputs[0].detach(), None]
        output.register_hook(lambda grad_out: seen[layer].__setitem__(1, grad_out.detach()))

    handles = [layer.register_forward_hook(remember) for layer in layers]
    features = torch.zeros(M, len(images), spec.dim)
    try:
        for start in tqdm(range(0, len(images), batch), disable=None if progress else True,
                          desc=f"{spec.kind} features", unit="batch"):
            x_t, t, eps = _noised(images[start : start + batch], spec, schedule, device)
            n = len(x_t)
            rows = x_t.reshape(n * K, *shape)
            with torch.enable_grad():
                out = ensemble(rows.expand(M, *rows.shape), t.repeat(n))
                value = _value(out, eps.repeat(n, *([1] * len(shape))), spec.kind)
                ensemble.zero_grad(set_to_none=True)
                (value.sum() / K).backward()  # each row's share of its example's mean over K
            block = torch.zeros(M, n, spec.dim, device=device)
            for layer, (u, v) in zip(layers, projections):
                x, dy = seen[layer]  # [M, n K, fan_in], [M, n K, fan_out]
                xu = torch.baddbmm(u[-1].expand(M, 1, -1), x, u[:-1].expand(M, *u[:-1].shape))
                block += (xu * (dy @ v)).view(M, n, K, spec.dim).sum(2)
            features[:, start : start + n] = block.cpu()
    finally:
        for handle in handles:
            handle.remove()
        ensemble.zero_grad(set_to_none=True)
    return features


def _generic_features(ensemble, schedule, images, spec, batch, progress) -> Tensor:
    device = next(ensemble.parameters()).device
    M = ensemble.n_members
    params = {k: v.detach() for k, v in ensemble.named_parameters()}
    buffers = {k: v.detach() for k, v in ensemble.named_buffers()}
    names = list(params)
    # every parameter is stacked over members: [M, ...] -> M rows of its per-member size
    sketch = CountSketch([params[k][0].numel() for k in names], spec.dim, spec.seed + 1)

    def f(params, x_t, t, eps):  # x_t [K, *shape] -> the sum over members of each member's f
        out = functional_call(ensemble, (params, buffers), (x_t.expand(M, *x_t.shape), t))
        return _value(out, eps, spec.kind).mean(-1).sum()

    per_example = vmap(grad(f), in_dims=(None, 0, None, None))
    features = torch.zeros(M, len(images), spec.dim)
    for start in tqdm(range(0, len(images), batch), disable=None if progress else True,
                      desc=f"{spec.kind} features", unit="batch"):
        x_t, t, eps = _noised(images[start : start + batch], spec, schedule, device)
        grads = per_example(params, x_t, t, eps)  # name -> [b, M, ...]
        parts = [grads[k].reshape(len(x_t) * M, -1) for k in names]
        features[:, start : start + len(x_t)] = sketch(parts).view(len(x_t), M, -1).transpose(0, 1).cpu()
    return features


def dataset_features(ensemble: Ensemble, schedule: NoiseSchedule, data, spec: FeatureSpec = FeatureSpec(),
                     progress: bool = False) -> Tensor:
    """:func:`gradient_features` [M, n, dim] of every image of a :class:`~ensattr_fast.data.Dataset`,
    read block by block (data on disk is never loaded whole)."""
    blocks = [gradient_features(ensemble, schedule, block, spec, progress=progress) for block in data.blocks()]
    return torch.cat(blocks, 1) if blocks else torch.zeros(ensemble.n_members, 0, spec.dim)


def member_scores(train: Tensor, queries: Tensor, unit_of: Tensor, n_units: int,
                  damping: float = 0.01) -> Tensor:
    """Each member's TRAK scores of the queries against the units, [M, Q, N].

    ``train`` [M, n, d] features of the training examples, ``queries`` [M, Q, d]; lambda is
    ``damping`` times the mean diagonal of each member's Phi^T Phi."""
    M, n, d = train.shape
    out = torch.zeros(M, queries.shape[1], n_units)
    for m in range(M):
        phi = train[m].double()
        kernel = phi.T @ phi
        kernel.diagonal().add_(damping * kernel.diagonal().mean().clamp_min(1e-30))
        weights = torch.linalg.solve(kernel, phi.T)  # [d, n]
        per_example = (queries[m].double() @ weights).float()  # [Q, n]
        out[m].index_add_(1, unit_of, per_example)
    return out


def combine(scores: Tensor, code: Tensor, how: str) -> Tensor:
    """[Q, N] from members' scores [M, Q, N] and the code [N, M] (see the module docstring)."""
    if how == "mean":
        return scores.mean(0)
    seen = code.T.float()[:, None, :]  # [M, 1, N]
    includers = (scores * seen).sum(0) / seen.sum(0).clamp_min(1)
    if how == "includers":
        return includers
    if how == "contrast":
        unseen = 1 - seen
        return includers - (scores * unseen).sum(0) / unseen.sum(0).clamp_min(1)
    raise MethodError(f"combination must be one of {COMBINATIONS}, got {how!r}")
