"""Gradient features and TRAK-style attribution for any ensemble: TRAK, D-TRAK and the
ensemble-aware combinations with the code.

A feature of an image under member m is the gradient, with respect to m's parameters, of a
function of m's output at K fixed timesteps with fixed noises, projected to ``dim`` numbers:

- ``dtrak`` (Zheng et al. 2024, D-TRAK): f = mean_k ||eps_m(x_tk, t_k)||^2;
- ``trak`` (Park et al. 2023, TRAK, with the diffusion loss): f = mean_k ||eps_k - eps_m(x_tk, t_k)||^2.

The members' parameters are stacked and independent, so the gradient of the sum over members
holds each member's own gradient. Two ways to project it (:mod:`.projection`), both drawn from a
seed, neither a matrix over all parameters; by default each member has its own projection,
member m's drawn from the seed (spec seed, m), so the projection errors average out over the
members instead of repeating (``per_member_projection=False``: one shared projection, as before):

- the built-in MLP members: a linear layer's per-example gradient is sum_k x_k dy_k^T over the
  example's rows k (its K timesteps), so one ordinary backward pass over a batch gives every
  (x_k, dy_k), and a rank-one Gaussian projection per layer and output coordinate j,
  <u_j v_j^T, sum_k x_k dy_k^T> = sum_k (x_k . u_j)(dy_k . v_j), never forms the gradient
  (the structure LoGra exploits, Choe et al. 2024). Layer-norm gains are left out.
- any other members: per-example gradients from ``vmap(grad(...))`` over examples, projected
  by a CountSketch (coordinate i to bucket h(i) with sign s(i); E <Sx, Sy> = <x, y>).

Member m's scores of query q against training examples are TRAK's regularised kernel,
tau_m(q) = phi_m(q)^T (Phi_m^T Phi_m + lambda I)^-1 Phi_m^T, lambda a fraction of the mean
diagonal of Phi_m^T Phi_m; a unit's score sums its examples'. ``FeatureSpec(exact=True)``
skips the projection: :mod:`.exact` computes the same kernel on the full gradients through
the n x n Gram of the training examples, for small n. The members combine as
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

from ..data import check_images
from ..diffusion.schedules import NoiseSchedule
from ..errors import ConfigError, MethodError
from ..members import Ensemble, LoraEnsemble
from ..members.mlp import StackedMLP, _StackedLinear
from ..runtime.progress import Progress
from .projection import CountSketch, RankOneProjection, member_seed

__all__ = ["FeatureSpec", "CountSketch", "gradient_features", "dataset_features", "member_scores", "combine",
           "COMBINATIONS"]

COMBINATIONS = ("mean", "includers", "contrast")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    kind: str = "dtrak"  # "dtrak": squared norm of the output; "trak": the diffusion loss
    timesteps: int = 10  # evenly spaced over the schedule
    dim: int = 1024  # the projection's dimension
    seed: int = 0
    per_member_projection: bool = True  # member m's projection from the seed (seed, m); False: one shared
    exact: bool = False  # no projection: the kernel of the full gradients (:mod:`.exact`)

    def __post_init__(self):
        if self.kind not in ("dtrak", "trak"):
            raise ConfigError(f"feature kind must be 'dtrak' or 'trak', got {self.kind!r}")
        if self.timesteps < 1:
            raise ConfigError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")

    @property
    def tag(self) -> str:
        """The suffix of the names its features are kept under: '' for the default projection."""
        tag = "" if self.dim == FeatureSpec.dim else f"_d{self.dim}"
        return tag + ("" if self.per_member_projection else "_shared") + ("_exact" if self.exact else "")

    def draws(self, schedule: NoiseSchedule, shape) -> tuple:
        """The fixed timesteps [K] and noises [K, *shape], the same for every image."""
        t = torch.linspace(0, schedule.steps - 1, self.timesteps).round().long()
        eps = torch.randn(self.timesteps, *shape, generator=torch.Generator().manual_seed(self.seed))
        return t, eps


def gradient_features(
    ensemble: Ensemble,
    schedule: NoiseSchedule,
    images: Tensor,
    spec: FeatureSpec = FeatureSpec(),
    batch: Optional[int] = None,
    progress: bool = False,
    labels: Optional[Tensor] = None,
) -> Tensor:
    """Projected per-example gradient features [M, n, dim] of ``images`` [n, *data_shape] (with
    their ``labels`` [n], class-conditional members: the gradient of the conditional loss)."""
    check_images(images, "images for gradient features", shape=ensemble.data_shape, allow_empty=True)
    if is_linear(ensemble):
        return _mlp_features(ensemble, schedule, images, spec, batch or 128, progress, labels)
    return _generic_features(ensemble, schedule, images, spec, batch or 16, progress, labels)


def _value(out: Tensor, eps: Tensor, kind: str) -> Tensor:
    """The function whose gradient is the feature, per member and row: [M, R]."""
    if kind == "dtrak":
        return out.pow(2).flatten(2).sum(-1)
    return (out - eps).pow(2).flatten(2).mean(-1)


def _noised(images: Tensor, spec: FeatureSpec, schedule: NoiseSchedule, device, dtype=torch.float32) -> tuple:
    """(x_t [n, K, *shape], t [K], eps [K, *shape]) at the spec's fixed draws."""
    shape = images.shape[1:]
    t, eps = spec.draws(schedule, shape)
    t, eps = t.to(device), eps.to(device, dtype)
    abar = schedule.alphas_cumprod.to(device, dtype)[t].view(-1, *([1] * len(shape)))
    x = images.to(device, dtype)[:, None]
    return abar.sqrt() * x + (1 - abar).sqrt() * eps, t, eps


def is_linear(ensemble: Ensemble) -> bool:
    """Whether the ensemble's features come from its stacked linear layers (the MLP members and
    adapters on an MLP base), projected rank-one, instead of a count sketch of every parameter."""
    return isinstance(ensemble, (StackedMLP, LoraEnsemble))


def linear_layers(ensemble: Ensemble) -> List[_StackedLinear]:
    """The trained layers whose gradients the features hold (layer-norm gains are left out;
    adapters: each low-rank factor and the label embedding, the frozen base not)."""
    return [m for m in ensemble.modules() if isinstance(m, _StackedLinear) and m.weight.requires_grad]


def layer_shapes(ensemble: Ensemble) -> List[tuple]:
    """(fan_in, fan_out, has a bias) of each of :func:`linear_layers`."""
    return [(*layer.weight.shape[1:], layer.bias is not None) for layer in linear_layers(ensemble)]


def layer_rows(ensemble: Ensemble, schedule, images: Tensor, spec: FeatureSpec,
               labels: Optional[Tensor] = None) -> List[tuple]:
    """One forward and backward pass over ``images`` [n, *shape] (and ``labels`` [n]) at the
    spec's K draws; per
    linear layer its inputs and output gradients (x [M, n K, fan_in], dy [M, n K, fan_out]),
    the per-example gradient of the layer being sum_k [x_k, 1] dy_k^T over the example's rows
    (sum_k x_k dy_k^T for a layer without bias)."""
    parameter = next(ensemble.parameters())
    M, shape, K = ensemble.n_members, ensemble.data_shape, spec.timesteps
    layers, seen = linear_layers(ensemble), {}

    def remember(layer, inputs, output):
        seen[layer] = [inputs[0].detach(), None]
        output.register_hook(lambda grad_out: seen[layer].__setitem__(1, grad_out.detach()))

    handles = [layer.register_forward_hook(remember) for layer in layers]
    try:
        x_t, t, eps = _noised(images, spec, schedule, parameter.device, parameter.dtype)
        rows = x_t.reshape(len(x_t) * K, *shape)
        with torch.enable_grad():
            conditions = [t.repeat(len(x_t))]
            if labels is not None:  # each example's rows under its label
                conditions.append(labels.to(rows.device).repeat_interleave(K))
            out = ensemble(rows.expand(M, *rows.shape), *conditions)
            value = _value(out, eps.repeat(len(x_t), *([1] * len(shape))), spec.kind)
            ensemble.zero_grad(set_to_none=True)
            (value.sum() / K).backward()  # each row's share of its example's mean over K
    finally:
        for handle in handles:
            handle.remove()
        ensemble.zero_grad(set_to_none=True)
    return [tuple(seen[layer]) for layer in layers]


def _mlp_features(ensemble: Ensemble, schedule, images, spec, batch, progress, labels=None) -> Tensor:
    device = next(ensemble.parameters()).device
    M, K = ensemble.n_members, spec.timesteps
    shapes = layer_shapes(ensemble)
    project = RankOneProjection(shapes, M, spec.dim, spec.seed, spec.per_member_projection, device)
    features = torch.zeros(M, len(images), spec.dim)
    with Progress(len(images), f"{spec.kind} features", "examples", enabled=progress) as bar:
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            chunk_labels = None if labels is None else labels[start : start + batch]
            features[:, start : start + len(chunk)] = project(layer_rows(ensemble, schedule, chunk, spec, chunk_labels),
                                                              len(chunk), K).cpu()
            bar.update(len(chunk))
    return features


def _generic_features(ensemble, schedule, images, spec, batch, progress, labels=None) -> Tensor:
    device = next(ensemble.parameters()).device
    M = ensemble.n_members
    per_example, names, params = per_example_gradients(ensemble, spec, labelled=labels is not None)
    # every parameter is stacked over members: [M, ...] -> M rows of its per-member size
    sizes = [params[k][0].numel() for k in names]
    seeds = [member_seed(spec.seed, m) for m in range(M)] if spec.per_member_projection else [spec.seed + 1]
    sketches = [CountSketch(sizes, spec.dim, seed) for seed in seeds]
    features = torch.zeros(M, len(images), spec.dim)
    with Progress(len(images), f"{spec.kind} features", "examples", enabled=progress) as bar:
        for start in range(0, len(images), batch):
            x_t, t, eps = _noised(images[start : start + batch], spec, schedule, device)
            conditions = () if labels is None else (labels[start : start + batch].to(device),)
            grads = per_example(params, x_t, t, eps, *conditions)  # name -> [b, M, ...]
            if len(sketches) == 1:
                parts = [grads[k].reshape(len(x_t) * M, -1) for k in names]
                block = sketches[0](parts).view(len(x_t), M, -1).transpose(0, 1)
            else:
                block = torch.stack([sketch([grads[k][:, m].reshape(len(x_t), -1) for k in names])
                                     for m, sketch in enumerate(sketches)])
            features[:, start : start + len(x_t)] = block.cpu()
            bar.update(len(x_t))
    return features


def per_example_gradients(ensemble: Ensemble, spec: FeatureSpec, labelled: bool = False) -> tuple:
    """(f, parameter names, parameters): ``f(params, x_t [b, K, *shape], t, eps)`` gives each
    example's gradient {name: [b, M, ...]} of the sum over members of each member's function
    (``labelled``: ``f(..., labels [b])``, each example's rows under its label)."""
    M = ensemble.n_members
    params = {k: v.detach() for k, v in ensemble.named_parameters()}
    buffers = {k: v.detach() for k, v in ensemble.named_buffers()}

    def f(params, x_t, t, eps, *label):  # x_t [K, *shape] -> the sum over members of each member's f
        conditions = (t, label[0].expand(len(t))) if label else (t,)
        out = functional_call(ensemble, (params, buffers), (x_t.expand(M, *x_t.shape), *conditions))
        return _value(out, eps, spec.kind).mean(-1).sum()

    return vmap(grad(f), in_dims=(None, 0, None, None) + ((0,) if labelled else ())), list(params), params


def dataset_features(ensemble: Ensemble, schedule: NoiseSchedule, data, spec: FeatureSpec = FeatureSpec(),
                     progress: bool = False) -> Tensor:
    """:func:`gradient_features` [M, n, dim] of every image of a :class:`~ensattr_fast.data.Dataset`,
    read block by block (data on disk is never loaded whole); conditional members take each
    image's label (or its embedding: text-conditioned members)."""
    blocks, start = [], 0
    conditions = ensemble.example_conditions(data)
    for block in data.blocks():
        labels = None if conditions is None else conditions[start:start + len(block)]
        blocks.append(gradient_features(ensemble, schedule, block, spec, progress=progress, labels=labels))
        start += len(block)
    return torch.cat(blocks, 1) if blocks else torch.zeros(ensemble.n_members, 0, spec.dim)


def member_scores(train: Tensor, queries: Tensor, unit_of: Tensor, n_units: int,
                  damping: float = 0.01) -> Tensor:
    """Each member's TRAK scores of the queries against the units, [M, Q, N].

    ``train`` [M, n, d] features of the training examples, ``queries`` [M, Q, d]; lambda is
    ``damping`` times the mean diagonal of each member's Phi^T Phi. For d > n the same kernel
    in the dual, phi(q)^T Phi^T (Phi Phi^T + lambda I)^-1: an n x n system instead of d x d."""
    M, n, d = train.shape
    out = torch.zeros(M, queries.shape[1], n_units)
    for m in range(M):
        phi = train[m].double()
        if d > n:
            gram = phi @ phi.T
            gram.diagonal().add_(damping * (gram.diagonal().sum() / d).clamp_min(1e-30))
            per_example = torch.linalg.solve(gram, phi @ queries[m].double().T).T.float()  # [Q, n]
        else:
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
