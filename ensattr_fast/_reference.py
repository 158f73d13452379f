"""Plain-torch twins of the compiled ops: the ground truth of the tests and benchmarks.

Each function has the semantics of the op of the same name in :mod:`ensattr_fast.ops`, written
for clarity rather than speed. This module imports nothing from the package, so that it can be
loaded beside any build of the library (the CMake smoke test loads it by path).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the ops accumulate and return statistics of ``dtype`` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_member_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-example loss [M,B] (mean over D; 0 when D = 0) and per-member loss [M]
    (mask-weighted mean over B; 0 for an all-zero mask row)."""
    acc = accumulate_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    per_example = diff.square().sum(-1) / max(pred.shape[-1], 1)
    weight = mask.to(acc)
    total = weight.sum(1)
    safe_total = torch.where(total != 0, total, torch.ones_like(total))
    per_member = torch.where(total != 0, (per_example * weight).sum(1) / safe_total, 0.0)
    return per_example, per_member


def trajectory_of_entries(row_ptr: Tensor, entries: Optional[int] = None) -> Tensor:
    """For CSR ``row_ptr`` [T+1], the trajectory that owns each entry [R]. Give ``entries`` (R)
    when known: without it the output size is read from the device (a GPU sync)."""
    counts = row_ptr.diff()
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts, output_size=entries)


def ensemble_step(
    member_eps: Tensor,
    x: Tensor,
    noise: Optional[Tensor],
    sample_of: Optional[Tensor],
    row_ptr: Tensor,
    rows: Tensor,
    weights: Tensor,
    a: float,
    b: float,
    c: float,
    d: float,
    s: float,
    clip_min: float,
    clip_max: float,
    write_packed: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One sampler step for T trajectories from packed member outputs.

    eps_bar[t] = sum_j weights[j] member_eps[rows[j]] over j in row_ptr[t]:row_ptr[t+1];
    x0 = clamp(a x + b eps_bar, clip_min, clip_max); x_next = c x0 + d x + s noise[sample_of[t]];
    packed_next[rows[j]] = x_next[t] when ``write_packed``.
    """
    acc = accumulate_dtype(x.dtype)
    traj = trajectory_of_entries(row_ptr, rows.shape[0])
    contrib = weights.to(acc)[:, None] * member_eps[rows].to(acc)
    eps_bar = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, traj, contrib)
    xa = x.to(acc)
    x0 = (a * xa + b * eps_bar).clamp(clip_min, clip_max)
    x_next = c * x0 + d * xa
    if noise is not None:
        z = noise if sample_of is None else noise[sample_of]
        x_next = x_next + s * z.to(acc)
    x_next = x_next.to(x.dtype)
    if write_packed:
        packed = torch.empty_like(member_eps)
        packed[rows] = x_next[traj]
    else:
        packed = member_eps.new_empty((0, x.shape[1]))
    return x_next, eps_bar.to(x.dtype), packed


def unit_directions(code: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """The weight change [N,M] that ablating each unit (code row) applies.

    ``first_order``: excluders get 1/|E_u|, the full ensemble had 1/M: v = e/|E_u| - 1/M.
    ``loss``: excluder mean minus includer mean: v = e/|E_u| - i/|I_u|.
    A row with no excluder (or, for ``loss``, no includer) gives NaN.
    """
    excluders = (code == 0).to(dtype)
    n_ex = excluders.sum(1, keepdim=True)
    if kind == "first_order":
        return excluders / n_ex - 1.0 / code.shape[1]
    includers = 1.0 - excluders
    return excluders / n_ex - includers / includers.sum(1, keepdim=True)


def merge_topk(
    scores: Tensor,
    k: int,
    unit_offset: int,
    prev_values: Optional[Tensor],
    prev_indices: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Running top-k per row: the k largest of the previous top-k and this chunk's scores.

    Ties go to the lower unit index. NaN scores are never selected; slots with no candidate
    hold -inf and index -1.
    """
    rows, n = scores.shape
    idx = torch.arange(unit_offset, unit_offset + n, device=scores.device).expand(rows, n)
    vals = scores
    if prev_values is not None:
        vals = torch.cat([prev_values, vals], 1)
        idx = torch.cat([prev_indices, idx], 1)
    empty = vals.isnan() | (idx < 0)  # NaN entries and index -1 are empty slots
    vals, idx = torch.where(empty, float("-inf"), vals), torch.where(empty, -1, idx)
    pad = k - vals.shape[1]
    if pad > 0:
        vals = torch.cat([vals, vals.new_full((rows, pad), float("-inf"))], 1)
        idx = torch.cat([idx, idx.new_full((rows, pad), -1)], 1)
    # order by (value descending, unit ascending, empty slots last)
    by_unit = torch.where(idx < 0, torch.iinfo(idx.dtype).max, idx).argsort(dim=1)
    vals, idx = vals.gather(1, by_unit), idx.gather(1, by_unit)
    order = vals.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def code_first_order(
    code: Tensor,
    gram: Tensor,
    k: int,
    unit_offset: int,
    prev_values: Optional[Tensor],
    prev_indices: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """scores[s,u] = sqrt(v_u^T G_s v_u) for G [S,M,M] and v from ``unit_directions``; 0 for a
    unit that every member excluded (v = 0: its ablation is the full ensemble), whatever G holds."""
    acc = accumulate_dtype(gram.dtype)
    v = unit_directions(code, "first_order", acc)
    quad = torch.einsum("ni,sij,nj->sn", v, gram.to(acc), v)
    scores = quad.clamp_min(0).sqrt()
    if code.shape[1] > 0:
        scores = torch.where((code == 0).all(1), 0.0, scores)
    return (scores, *merge_topk(scores, k, unit_offset, prev_values, prev_indices))


def code_loss_contrast(
    code: Tensor,
    losses: Tensor,
    k: int,
    unit_offset: int,
    prev_values: Optional[Tensor],
    prev_indices: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """scores[q,u] = mean_{m in E_u} L[q,m] - mean_{m in I_u} L[q,m] for L [Q,M]."""
    acc = accumulate_dtype(losses.dtype)
    v = unit_directions(code, "loss", acc)
    scores = losses.to(acc) @ v.T
    return (scores, *merge_topk(scores, k, unit_offset, prev_values, prev_indices))
