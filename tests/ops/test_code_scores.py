"""code_scores (first order and loss contrast, with running top-k) against the reference."""

import pytest
import torch
from conftest import DEVICES, device_dtype_cases, requires_cuda, tolerances

from ensattr_fast import _reference
from ensattr_fast.ops import _ops, code_scores

KINDS = ["first_order", "loss"]


def make_code(N, M, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    code = (torch.rand(N, M, generator=g) < 0.5).to(torch.uint8)
    if N > 2 and M > 1:
        code[0, 0], code[0, 1:] = 0, 1  # a single excluder
        code[1] = 1  # no excluder: NaN, never in the top-k
    return code.to(device)


def make_stats(kind, rows, M, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "first_order":
        J = torch.randn(rows, 3 * M + 1, M, generator=g, dtype=torch.float64)
        # a large common part shared by all members, as member outputs have
        stats = J.transpose(1, 2) @ J + 50.0
    else:
        stats = 5.0 + torch.rand(rows, M, generator=g, dtype=torch.float64)
    return stats.to(device, dtype)


def reference(kind):
    return _reference.code_first_order if kind == "first_order" else _reference.code_loss_contrast


def score(kind, code, stats, **kwargs):
    return code_scores(code, **{"gram" if kind == "first_order" else "losses": stats}, **kwargs)


def exact_reference(kind, code, stats, k):
    """The reference computed in float64: the kernels must be at least as accurate."""
    out = reference(kind)(code, stats.double(), k, 0, None, None)
    return [t.to(_reference.accumulate_dtype(stats.dtype)) if t.is_floating_point() else t for t in out]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device,dtype", device_dtype_cases())
# M = 33 and 48: CUDA's shared-memory tables past 48 KB; M = 70: CUDA's tiles of G'.
@pytest.mark.parametrize("N,M,rows", [(1, 1, 1), (40, 8, 3), (300, 16, 5), (0, 4, 2), (20, 6, 0), (150, 33, 2),
                                      (90, 48, 2), (60, 70, 2)])
@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_matches_reference(kind, device, dtype, N, M, rows, k):
    code, stats = make_code(N, M, device=device), make_stats(kind, rows, M, dtype, device)
    got = score(kind, code, stats, k=k)
    want = exact_reference(kind, code, stats, k)
    tol = tolerances(dtype) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.scores, want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got.top_values, want[1], **tol)
    # the top-k of the op's own scores exactly; against the reference only where no near-tie
    # can swap (a long top-k holds mathematically equal scores that round apart)
    values, indices = _reference.merge_topk(got.scores, k, 0, None, None)
    assert torch.equal(got.top_indices, indices) and torch.equal(got.top_values, values)
    if dtype in (torch.float32, torch.float64) and k <= 5:
        assert torch.equal(got.top_indices, want[2])
    if N > 2 and M > 1:
        assert got.scores[:, 1].isnan().all()
        assert not (got.top_indices == 1).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_running_topk_equals_whole(kind, device):
    N, M, k = 1000, 12, 7
    code, stats = make_code(N, M, device=device), make_stats(kind, 4, M, torch.float64, device)
    whole = score(kind, code, stats, k=k)
    previous = None
    for start in range(0, N, 128):
        chunk = score(kind, code[start : start + 128], stats, k=k, unit_offset=start, previous=previous)
        torch.testing.assert_close(chunk.scores, whole.scores[:, start : start + 128], equal_nan=True)
        previous = (chunk.top_values, chunk.top_indices)
    assert torch.equal(previous[1], whole.top_indices)
    torch.testing.assert_close(previous[0], whole.top_values)
    want_values, want_indices = _reference.merge_topk(whole.scores, k, 0, None, None)
    assert torch.equal(whole.top_indices, want_indices)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 32, 33, 100])
def test_long_rows_and_any_k(kind, device, k):
    """Rows of 5000 units (CUDA selects in two passes past 2048), k on both sides of 32 (a
    selection up to 32, sorting beyond); ties from duplicate code rows go to the lower unit."""
    code = make_code(40, 10, device=device).repeat(125, 1)  # every row 125 times: ties
    stats = make_stats(kind, 3, 10, torch.float64, device)
    out = score(kind, code, stats, k=k, unit_offset=10)
    want_values, want_indices = _reference.merge_topk(out.scores, k, 10, None, None)
    assert torch.equal(out.top_indices, want_indices) and torch.equal(out.top_values, want_values)
    previous = (out.top_values, out.top_indices)
    more = score(kind, code[:3000], stats, k=k, unit_offset=5010, previous=previous)
    want_values, want_indices = _reference.merge_topk(more.scores, k, 5010, *previous)
    assert torch.equal(more.top_indices, want_indices) and torch.equal(more.top_values, want_values)


def test_any_k_on_the_fake_path():
    """k = 100 traces (no cap of the top-k in the fake kernel or the CPU and CUDA kernels)."""
    code = make_code(30, 6, device="meta")
    out = code_scores(code, gram=torch.empty(4, 6, 6, device="meta"), k=100)
    assert out.scores.shape == (4, 30) and out.top_values.shape == out.top_indices.shape == (4, 100)
    out = code_scores(code, losses=torch.empty(4, 6, device="meta"), k=100)
    assert out.top_indices.shape == (4, 100)


def non_finite_stats(kind, M, device, dtype):
    """Rows of statistics holding +inf, -inf or NaN (a diverged member), and one finite row."""
    inf, nan = float("inf"), float("nan")
    stats = make_stats(kind, 5, M, torch.float64, "cpu")
    if kind == "first_order":
        stats[0, 2, 2] = inf  # every unit: +inf
        stats[1, 1, 3] = stats[1, 3, 1] = inf  # +inf or (clamped) 0, by the signs of v_1 v_3
        stats[2, 0, 4] = -inf
        stats[3, 5, 5] = nan
    else:
        stats[0, 2] = inf  # +inf where member 2 excludes the unit, -inf where it includes it
        stats[1, 1] = -inf
        stats[2, 0], stats[2, 4] = inf, -inf
        stats[3, 5] = nan
    return stats.to(device, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("M", [6, 70])
def test_non_finite_statistics_score_as_the_reference(kind, device, dtype, M):
    """A row that cannot be centred (inf - inf) is scored term by term: an infinite loss gives
    +inf or -inf, never NaN, and the top-k keeps those units as the reference does."""
    code = make_code(50, M, device=device)
    code[2] = 0  # excluded by every member: first order 0, loss NaN
    stats = non_finite_stats(kind, M, device, dtype)
    got = score(kind, code, stats, k=8)
    want = exact_reference(kind, code, stats, 8)
    tol = tolerances(dtype) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.scores, want[0], equal_nan=True, **tol)
    assert torch.equal(got.scores.isposinf(), want[0].isposinf())
    assert torch.equal(got.scores.isneginf(), want[0].isneginf())
    assert torch.equal(got.scores.isnan(), want[0].isnan())
    n_ex = (code == 0).sum(1)
    ablating = (n_ex > 0) & (n_ex < M)
    if kind == "loss":
        assert got.scores[0, ablating].isinf().all()
        assert got.scores[0].isposinf().any() and got.scores[0].isneginf().any()
    else:
        assert got.scores[0, ablating].isposinf().all() and got.scores[0, 2] == 0
    values, indices = _reference.merge_topk(got.scores, 8, 0, None, None)
    assert torch.equal(got.top_indices, indices) and torch.equal(got.top_values, values)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_pads_when_few_units_and_breaks_ties_by_index(device):
    code = torch.tensor([[0, 1], [0, 1], [1, 1]], dtype=torch.uint8, device=device)
    losses = torch.tensor([[1.0, 0.0]], device=device)
    out = code_scores(code, losses=losses, k=4)
    assert out.top_indices.tolist() == [[0, 1, -1, -1]]  # equal scores: lower unit first; NaN unit 2 skipped
    assert out.top_values[0, 2:].eq(float("-inf")).all()


@pytest.mark.parametrize("device", DEVICES)
def test_first_order_is_the_norm_of_the_predicted_change(device):
    """With G = J^T J the score is ||J v_u||, the first-order counterfactual distance."""
    M, D = 6, 40
    J = torch.randn(1, D, M, dtype=torch.float64, device=device)
    code = make_code(30, M, device=device)
    scores = code_scores(code, gram=J.transpose(1, 2) @ J).scores
    v = _reference.unit_directions(code, "first_order", torch.float64)
    torch.testing.assert_close(scores[0], (J[0] @ v.T).norm(dim=0), equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(kind, device):
    code = make_code(50, 8, device=device)
    stats = make_stats(kind, 3, 8, torch.float64, device)
    code_nc = code.t().contiguous().t()
    stats_nc = stats.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not code_nc.is_contiguous() and not stats_nc.is_contiguous()
    got = score(kind, code_nc, stats_nc, k=3)
    want = score(kind, code, stats, k=3)
    torch.testing.assert_close(got.scores, want.scores, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(kind, device):
    code = make_code(12, 5, device=device)
    code[:, 0], code[:, 1] = 0, 1  # every unit has an excluder and an includer: scores > 0
    stats = make_stats(kind, 2, 5, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: score(kind, code, s).scores, (stats,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kind, device):
    code = make_code(20, 6, device=device)
    code[:, 0], code[:, 1] = 0, 1  # no NaN scores: opcheck compares outputs without equal_nan
    stats = make_stats(kind, 3, 6, torch.float32, device).requires_grad_()
    op = _ops.code_first_order if kind == "first_order" else _ops.code_loss_contrast
    torch.library.opcheck(op.default, (code, stats, 4, 0, None, None))
    prev = score(kind, code, stats.detach(), k=4)
    torch.library.opcheck(op.default, (code, stats, 4, 20, prev.top_values, prev.top_indices))


def test_errors_name_the_problem():
    code, gram = make_code(10, 4), make_stats("first_order", 2, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="code must have dtype Byte"):
        code_scores(code.long(), gram=gram)
    with pytest.raises(RuntimeError, match="gram must have rank 3"):
        code_scores(code, gram=gram[0])
    with pytest.raises(RuntimeError, match=r"gram.size\(1\) must equal M of code = 4"):
        code_scores(code, gram=torch.zeros(2, 5, 5))
    with pytest.raises(RuntimeError, match="losses must be float32 or float64"):
        code_scores(code, losses=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"prev_values must have shape \[2, 3\]"):
        code_scores(code, gram=gram, k=3, previous=(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)))
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        code_scores(code, gram=gram, k=-1)
    with pytest.raises(ValueError, match="exactly one of gram"):
        code_scores(code)


@requires_cuda
def test_device_error():
    with pytest.raises(RuntimeError, match="gram is on cpu but the other inputs are on cuda"):
        code_scores(make_code(10, 4, device="cuda"), gram=torch.zeros(2, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_is_not_differentiable(kind):
    """Gradients flow through the scores; the top-k is a selection and says so, instead of
    passing silently zero gradients."""
    stats = make_stats(kind, 3, 6, torch.float64, "cpu").requires_grad_()
    out = score(kind, make_code(20, 6), stats, k=4)
    assert out.scores.requires_grad
    assert not out.top_values.requires_grad and not out.top_indices.requires_grad
    torch.nan_to_num(out.scores).sum().backward()
    assert stats.grad is not None and stats.grad.abs().sum() > 0
