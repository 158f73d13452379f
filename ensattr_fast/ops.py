"""Typed wrappers over the compiled ops ``torch.ops.ensattr_fast.*``.

Each op has a fake kernel (so it traces under ``torch.compile(fullgraph=True)``), autograd
where it is differentiable, and a plain-torch twin of the same name in
:mod:`ensattr_fast._reference`. Shapes use the method's letters: M members, B examples per
member, D features, T trajectories, P packed member evaluations, S samples, Q queries, N units.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.ensattr_fast.*)
except ImportError as error:
    raise ImportError(
        f"ensattr_fast's compiled library (ensattr_fast._C) could not be loaded: {error}. "
        "Build it from the repository root with `pip install --no-build-isolation -e .` "
        "after installing torch (see README.md, 'Building')."
    ) from error

_ops = torch.ops.ensattr_fast

__all__ = [
    "build_info", "masked_member_mse", "ensemble_step", "check_step_indices", "code_scores",
    "CodeScores",
]


def build_info() -> dict:
    """What the compiled library was built with (``cuda``, ``cuda_arch_list``, ``openmp``,
    ``torch``, ``compiler``), and whether a GPU is usable now (``cuda_available``)."""
    info = json.loads(_ops.build_info())
    info["cuda_available"] = bool(info["cuda"]) and torch.cuda.is_available()
    return info


# --------------------------------------------------------------------------- masked_member_mse


def masked_member_mse(
    pred: Tensor, target: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    r"""Squared error of every member on its own batch, and each member's masked mean.

    .. math::
        \ell_{m,b} = \frac{1}{D}\sum_d (\text{pred}_{m,b,d} - \text{target}_{m,b,d})^2, \qquad
        L_m = \frac{\sum_b w_{m,b}\,\ell_{m,b}}{\sum_b w_{m,b}} \quad (0 \text{ if } \sum_b w_{m,b} = 0)

    Args:
        pred: member predictions, shape [M, B, D].
        target: shape [M, B, D], or [B, D] shared by every member.
        mask: weights [M, B] (padding, per-example weights; bool is allowed); all ones if None.
            It is passed on in the accumulation dtype (float32 for half inputs): a weight of
            1/3 in bfloat16 would keep three digits.

    Returns:
        ``(per_example [M, B], per_member [M])`` in float32 (float64 for float64 inputs). The
        backward is one fused pass over pred and target.

    Example:
        >>> eps_pred = ensemble(x_t, t)                   # [M, B, D]
        >>> per_example, per_member = masked_member_mse(eps_pred, eps, mask)
        >>> per_member.sum().backward()                  # every member gets its own gradient
    """
    acc = _reference.accumulate_dtype(pred.dtype)
    if mask is None:
        mask = pred.new_ones(pred.shape[:2], dtype=acc)
    elif mask.dtype != acc:
        mask = mask.to(acc)
    return _ops.masked_member_mse.default(pred, target, mask)


@torch.library.register_fake("ensattr_fast::masked_member_mse")
def _(pred, target, mask):
    torch._check(pred.dim() == 3, lambda: f"pred must have rank 3, got {pred.dim()}")
    torch._check(mask.shape == pred.shape[:2], lambda: "mask must have shape [M,B]")
    acc = _reference.accumulate_dtype(pred.dtype)
    torch._check(mask.dtype == acc, lambda: f"mask must have dtype {acc}, got {mask.dtype}")
    return pred.new_empty(pred.shape[:2], dtype=acc), pred.new_empty(pred.shape[:1], dtype=acc)


@torch.library.register_fake("ensattr_fast::masked_member_mse_backward")
def _(grad_per_example, grad_per_member, pred, target, mask):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _mse_setup_context(ctx, inputs, output):
    pred, target, mask = inputs
    ctx.save_for_backward(pred, target, mask, *output)


def _mse_backward(ctx, grad_per_example, grad_per_member):
    pred, target, mask, per_example, per_member = ctx.saved_tensors
    if grad_per_example is None:
        grad_per_example = torch.zeros_like(per_example)
    if grad_per_member is None:
        grad_per_member = torch.zeros_like(per_member)
    grad_pred = grad_target = grad_mask = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_pred = _ops.masked_member_mse_backward.default(
            grad_per_example, grad_per_member, pred, target, mask
        )
        if ctx.needs_input_grad[1]:
            grad_target = -grad_pred if target.dim() == 3 else -grad_pred.sum(0)
    if ctx.needs_input_grad[2]:
        # dL_m/dw_{m,b} = (l_{m,b} - L_m) / sum_b w_{m,b}
        total = mask.to(per_member.dtype).sum(1, keepdim=True)
        safe = torch.where(total != 0, total, torch.ones_like(total))
        grad_mask = grad_per_member[:, None] * (per_example - per_member[:, None]) / safe
        grad_mask = torch.where(total != 0, grad_mask, 0.0).to(mask.dtype)
    return grad_pred, grad_target, grad_mask


torch.library.register_autograd(
    "ensattr_fast::masked_member_mse", _mse_backward, setup_context=_mse_setup_context
)


# ------------------------------------------------------------------------------- ensemble_step


def ensemble_step(
    member_eps: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    rows: Tensor,
    weights: Tensor,
    *,
    coefficients: Tuple[float, float, float, float, float],
    noise: Optional[Tensor] = None,
    sample_of: Optional[Tensor] = None,
    clip: Optional[Tuple[float, float]] = None,
    write_packed: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""One sampler step for T trajectories that share member evaluations through a CSR list.

    Trajectory t combines the packed member outputs ``rows[j]`` for ``j`` in
    ``row_ptr[t]:row_ptr[t+1]`` with weights ``weights[j]`` (for an ablation, 1/|E| on its
    excluders), then applies the sampler update with coefficients ``(a, b, c, d, s)``:

    .. math::
        \bar\epsilon_t = \sum_j w_j\,\epsilon_{\text{rows}_j}, \quad
        \hat x_0 = \text{clip}(a\,x_t + b\,\bar\epsilon_t), \quad
        x_{t-1} = c\,\hat x_0 + d\,x_t + s\,z_{\text{sample\_of}(t)}

    DDPM ancestral steps and DDIM steps (any eta) both have this form.

    Args:
        member_eps: packed member outputs [P, D].
        x: current trajectories [T, D].
        row_ptr: int64 [T+1]; rows: int64 [R] (packed row of each entry); weights: [R] (float32,
            or float64 for float64 x).
        coefficients: ``(a, b, c, d, s)`` of this step.
        noise: shared noise [S, D] (None when s = 0); sample_of: int64 [T], the noise row of
            each trajectory (None: row t). Trajectories of one sample share its noise.
        clip: ``(lo, hi)`` range for x0-hat, or None.
        write_packed: also return ``x_next`` scattered into the packed layout (every packed row
            must then be listed exactly once in ``rows``), the next step's member input.

    Returns:
        ``(x_next [T, D], eps_bar [T, D], packed_next [P, D] or [0, D])``.

    The CSR list's indices are checked as :func:`check_step_indices` does: on the CPU by the
    kernel at every call; on CUDA here, once per list (see ``_check_indices_once``).
    """
    a, b, c, d, s = (float(v) for v in coefficients)
    lo, hi = (float("-inf"), float("inf")) if clip is None else (float(clip[0]), float(clip[1]))
    if x.is_cuda and not torch.compiler.is_compiling():
        _check_indices_once(member_eps, x, noise, sample_of, row_ptr, rows, write_packed)
    return _ops.ensemble_step.default(
        member_eps, x, noise, sample_of, row_ptr, rows, weights, a, b, c, d, s, lo, hi,
        write_packed,
    )


def check_step_indices(
    row_ptr: Tensor,
    rows: Tensor,
    *,
    n_packed: int,
    write_packed: bool = False,
    sample_of: Optional[Tensor] = None,
    noise_rows: int = 0,
) -> None:
    """Check the CSR list of :func:`ensemble_step` on the host; raise a RuntimeError naming the
    first problem: ``row_ptr[0] != 0``, a decreasing ``row_ptr``, ``row_ptr[T] != len(rows)``, a
    row outside ``[0, n_packed)``, a packed row listed twice when ``write_packed`` (some other
    row would then be left unwritten), a ``sample_of`` outside ``[0, noise_rows)``.

    Tensors on a GPU are copied to the host first (a sync): call it where the list is built.
    """
    _ops.ensemble_step_check_indices.default(
        row_ptr.cpu(), rows.cpu(), None if sample_of is None else sample_of.cpu(), int(n_packed),
        int(noise_rows), bool(write_packed),
    )


# The CUDA kernel cannot report a bad index without a sync (a device assert would poison the
# process's CUDA context), so it only keeps its accesses in range (an out-of-range entry gives
# NaN) and the wrapper checks each CSR list on the host once. A sampling run passes the same
# row_ptr, rows and sample_of tensors to every step: they are remembered by identity and version
# (an in-place change bumps the version), so only the first step pays the copy.
_checked_indices: "OrderedDict[tuple, tuple]" = OrderedDict()
_CHECKED_KEEP = 16


def _check_indices_once(member_eps, x, noise, sample_of, row_ptr, rows, write_packed) -> None:
    sample_of = sample_of if noise is not None else None
    index = [t for t in (row_ptr, rows, sample_of) if t is not None]
    if not (
        all(t.dim() == 1 and t.dtype == torch.int64 and t.device == x.device for t in index)
        and x.dim() == 2 and member_eps.dim() == 2 and row_ptr.shape[0] == x.shape[0] + 1
        and (sample_of is None or sample_of.shape[0] == x.shape[0])
    ):
        return  # the op's own checks name the shape, dtype or device that is wrong
    n_packed, noise_rows = member_eps.shape[0], noise.shape[0] if noise is not None else 0
    tensors = (row_ptr, rows, sample_of)
    key = tuple(None if t is None else (id(t), t._version) for t in tensors)
    key += (n_packed, noise_rows if sample_of is not None else 0, write_packed)
    refs = _checked_indices.get(key)
    if refs is not None and all(
        (r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors)
    ):
        _checked_indices.move_to_end(key)
        return
    check_step_indices(row_ptr, rows, n_packed=n_packed, write_packed=write_packed,
                       sample_of=sample_of, noise_rows=noise_rows)
    _checked_indices[key] = tuple(None if t is None else weakref.ref(t) for t in tensors)
    while len(_checked_indices) > _CHECKED_KEEP:
        _checked_indices.popitem(last=False)


@torch.library.register_fake("ensattr_fast::ensemble_step")
def _(member_eps, x, noise, sample_of, row_ptr, rows, weights, a, b, c, d, s, lo, hi, packed):
    torch._check(x.dim() == 2, lambda: f"x must have rank 2, got {x.dim()}")
    torch._check(member_eps.shape[1] == x.shape[1], lambda: "member_eps and x differ in D")
    n_packed = member_eps.shape[0] if packed else 0
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((n_packed, x.shape[1]))


def _step_setup_context(ctx, inputs, output):
    member_eps, x, noise, sample_of, row_ptr, rows, weights, a, b, c, d, s, lo, hi, _ = inputs
    ctx.coefficients = (a, b, c, d, s, lo, hi)
    ctx.noise_rows = None if noise is None else noise.shape[0]
    ctx.save_for_backward(member_eps, x, sample_of, row_ptr, rows, weights)


def _step_backward(ctx, grad_x_next, grad_eps_bar, grad_packed):
    member_eps, x, sample_of, row_ptr, rows, weights = ctx.saved_tensors
    a, b, c, d, s, lo, hi = ctx.coefficients
    acc = weights.dtype
    traj = _reference.trajectory_of_entries(row_ptr, rows.shape[0])
    # eps_bar in the accumulation dtype, as the forward had it before rounding to x's dtype, so
    # that the clip mask here is the forward's
    eps_bar = torch.zeros(x.shape, dtype=acc, device=x.device).index_add(
        0, traj, weights[:, None] * member_eps[rows].to(acc))
    grad = torch.zeros(x.shape, dtype=acc, device=x.device)
    if grad_x_next is not None:
        grad = grad + grad_x_next.to(acc)
    if grad_packed is not None and grad_packed.shape[0] > 0:
        grad = grad.index_add(0, traj, grad_packed[rows].to(acc))
    u = a * x.to(acc) + b * eps_bar.to(acc)
    grad_u = c * grad * ((u >= lo) & (u <= hi))
    grad_bar = b * grad_u
    if grad_eps_bar is not None:
        grad_bar = grad_bar + grad_eps_bar.to(acc)
    grad_entries = grad_bar[traj]
    grad_member_eps = torch.zeros(member_eps.shape, dtype=acc, device=x.device)
    grad_member_eps = grad_member_eps.index_add(0, rows, weights[:, None] * grad_entries)
    grad_weights = (grad_entries * member_eps[rows].to(acc)).sum(1)
    grad_x = a * grad_u + d * grad
    grad_noise = None
    if ctx.noise_rows is not None:
        grad_noise = s * grad
        if sample_of is not None:
            grad_noise = grad.new_zeros((ctx.noise_rows, x.shape[1])).index_add(0, sample_of, s * grad)
        grad_noise = grad_noise.to(x.dtype)
    return (
        grad_member_eps.to(member_eps.dtype), grad_x.to(x.dtype), grad_noise, None, None, None,
        grad_weights, None, None, None, None, None, None, None, None,
    )


torch.library.register_autograd(
    "ensattr_fast::ensemble_step", _step_backward, setup_context=_step_setup_context
)


# --------------------------------------------------------------------------------- code_scores


class CodeScores(NamedTuple):
    """Scores of a chunk of units [S, N_chunk] and the running top-k per row [S, k]."""

    scores: Tensor
    top_values: Tensor
    top_indices: Tensor


def code_scores(
    code: Tensor,
    *,
    gram: Optional[Tensor] = None,
    losses: Optional[Tensor] = None,
    k: int = 0,
    unit_offset: int = 0,
    previous: Optional[Tuple[Tensor, Tensor]] = None,
) -> CodeScores:
    r"""Influence of a chunk of units from the code alone, O(M^2) or O(M) per unit.

    Ablating unit u moves the member weights by :math:`v_u`; with :math:`E_u` its excluders
    (``code[u] == 0``) and :math:`I_u` its includers:

    - first order (``gram`` = G [S, M, M] = J^T J per sample): :math:`v_u = 1_{E_u}/|E_u| -
      1/M` and the score is the predicted counterfactual distance
      :math:`\|J v_u\| = \sqrt{v_u^\top G v_u}`;
    - loss contrast (``losses`` = L [Q, M], each member's loss on each query):
      :math:`\text{mean}_{m\in E_u} L_{q,m} - \text{mean}_{m\in I_u} L_{q,m}`.

    Rows with no excluder (or, for losses, no includer) score NaN, which top-k skips. A
    statistic that is not finite (a diverged member) scores as the formulas say, term by term:
    an infinite loss gives +inf or -inf, an infinite Gram entry +inf or 0.

    Args:
        code: uint8 [N_chunk, M], ``code[u, m] = 1`` iff member m trained on unit u (a unit set
            has the OR of its units' rows).
        gram / losses: exactly one of them.
        k: size of the running top-k per row (0: none; any size).
        unit_offset: global index of the chunk's first unit (for top-k indices).
        previous: ``(top_values, top_indices)`` [S, k] from the previous chunks.

    Returns:
        :class:`CodeScores` ``(scores [S, N_chunk], top_values [S, k], top_indices [S, k])``,
        top-k sorted by decreasing score; empty slots hold -inf and -1.
    """
    if (gram is None) == (losses is None):
        raise ValueError("code_scores: give exactly one of gram= (first order) or losses=")
    prev_values, prev_indices = previous if previous is not None else (None, None)
    if gram is not None:
        out = _ops.code_first_order.default(code, gram, k, unit_offset, prev_values, prev_indices)
    else:
        out = _ops.code_loss_contrast.default(code, losses, k, unit_offset, prev_values, prev_indices)
    return CodeScores(*out)


def _fake_code_scores(code, stats, k, unit_offset, prev_values, prev_indices):
    torch._check(code.dim() == 2, lambda: f"code must have rank 2, got {code.dim()}")
    acc = _reference.accumulate_dtype(stats.dtype)
    rows = stats.shape[0]
    return (
        stats.new_empty((rows, code.shape[0]), dtype=acc),
        stats.new_empty((rows, k), dtype=acc),
        stats.new_empty((rows, k), dtype=torch.int64),
    )


torch.library.register_fake("ensattr_fast::code_first_order", _fake_code_scores)
torch.library.register_fake("ensattr_fast::code_loss_contrast", _fake_code_scores)


def _scores_setup_context(ctx, inputs, output):
    code, stats = inputs[:2]
    ctx.save_for_backward(code, stats, output[0])
    # a top-k is a selection: gradients flow through the scores, never through it
    ctx.mark_non_differentiable(output[1], output[2])


def _first_order_backward(ctx, grad_scores, *_):
    code, gram, scores = ctx.saved_tensors
    # d sqrt(v^T G v) / dG = v v^T / (2 sqrt(v^T G v)); zero where the score is 0 or NaN.
    v = torch.nan_to_num(_reference.unit_directions(code, "first_order", scores.dtype))
    coef = torch.where(scores > 0, grad_scores / (2 * scores), 0.0)
    grad_gram = torch.einsum("sn,ni,nj->sij", coef, v, v).to(gram.dtype)
    return None, grad_gram, None, None, None, None


def _loss_contrast_backward(ctx, grad_scores, *_):
    code, losses, scores = ctx.saved_tensors
    v = _reference.unit_directions(code, "loss", scores.dtype)
    grad_losses = (grad_scores @ torch.nan_to_num(v)).to(losses.dtype)
    return None, grad_losses, None, None, None, None


torch.library.register_autograd(
    "ensattr_fast::code_first_order", _first_order_backward, setup_context=_scores_setup_context
)
torch.library.register_autograd(
    "ensattr_fast::code_loss_contrast", _loss_contrast_backward, setup_context=_scores_setup_context
)
