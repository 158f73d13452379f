"""ensemble_step against its plain-torch reference."""

import pytest
import torch
from conftest import DEVICES, device_dtype_cases, requires_cuda, tolerances

from ensattr_fast import _reference, ops
from ensattr_fast.ops import _ops, check_step_indices, ensemble_step

COEFFS = (1.3, -0.4, 0.8, 0.25, 0.1)  # (a, b, c, d, s), generic values


def make_step(T, D, members=6, samples=2, dtype=torch.float32, device="cpu", seed=0):
    """A packed layout as batched ablated sampling builds it: every trajectory keeps a random
    subset of the members, each kept member is one packed row, rows grouped by member."""
    g = torch.Generator().manual_seed(seed)
    keeps = torch.rand(T, members, generator=g) < 0.5
    keeps[torch.arange(T), torch.randint(members, (T,), generator=g)] = True
    order = keeps.t().nonzero()  # (member, trajectory) pairs, member-major: the packed rows
    packed_row = torch.empty(T, members, dtype=torch.long)
    packed_row[order[:, 1], order[:, 0]] = torch.arange(len(order))
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), keeps.sum(1).cumsum(0)])
    rows = packed_row[keeps]  # trajectory-major CSR entries
    weights = (1.0 / keeps.sum(1)).repeat_interleave(keeps.sum(1))
    acc = _reference.accumulate_dtype(dtype)
    return dict(
        member_eps=torch.randn(len(order), D, generator=g).to(device, dtype),
        x=torch.randn(T, D, generator=g).to(device, dtype),
        noise=torch.randn(samples, D, generator=g).to(device, dtype),
        sample_of=torch.randint(samples, (T,), generator=g).to(device),
        row_ptr=row_ptr.to(device),
        rows=rows.to(device),
        weights=weights.to(device, acc),
    )


def run(fn, step, coefficients=COEFFS, clip=(-1.0, 1.0), write_packed=True, noise=True):
    lo, hi = clip if clip is not None else (float("-inf"), float("inf"))
    args = (
        step["member_eps"], step["x"], step["noise"] if noise else None,
        step["sample_of"] if noise else None, step["row_ptr"], step["rows"], step["weights"],
        *coefficients, lo, hi, write_packed,
    )
    return fn(*args)


def assert_matches(step, **kwargs):
    got = run(_ops.ensemble_step, step, **kwargs)
    want = run(_reference.ensemble_step, step, **kwargs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tolerances(step["x"].dtype))
    return got


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("T,D", [(1, 1), (7, 5), (33, 70), (0, 4), (5, 0), (9, 64), (3, 1032)])
@pytest.mark.parametrize("clip", [None, (-1.0, 1.0)])
@pytest.mark.parametrize("write_packed", [False, True])
def test_matches_reference(device, dtype, T, D, clip, write_packed):
    assert_matches(make_step(T, D, dtype=dtype, device=device), clip=clip, write_packed=write_packed)


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_many_members_per_trajectory(device, dtype):
    """Up to 13 entries per trajectory: the CUDA gather's groups of four and their remainder."""
    assert_matches(make_step(10, 48, members=13, dtype=dtype, device=device))


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_unaligned_contiguous_inputs(device, dtype):
    """Contiguous tensors that start off a 16-byte boundary (the CUDA kernel then reads one
    element at a time)."""
    step = make_step(6, 32, dtype=dtype, device=device)
    for name in ("member_eps", "x", "noise"):
        t = step[name]
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape)
        step[name] = shifted.copy_(t)
        assert step[name].is_contiguous() and step[name].data_ptr() % 16 != 0
    assert_matches(step)


@pytest.mark.parametrize("device", DEVICES)
def test_without_noise_and_with_noise_per_trajectory(device):
    step = make_step(9, 6, device=device)
    x_next, _, _ = assert_matches(step, noise=False)
    step["noise"], step["sample_of"] = torch.randn(9, 6, device=device), None
    x_noisy = ensemble_step(
        step["member_eps"], step["x"], step["row_ptr"], step["rows"], step["weights"],
        coefficients=COEFFS, noise=step["noise"], clip=(-1.0, 1.0),
    )[0]
    torch.testing.assert_close(x_noisy, x_next + COEFFS[4] * step["noise"])


@pytest.mark.parametrize("device", DEVICES)
def test_shared_noise_and_full_ensemble_replay(device):
    """Two trajectories of one sample with the same member rows and weights give the same step."""
    step = make_step(1, 8, device=device)
    n = len(step["rows"])
    member_eps = step["member_eps"].repeat(2, 1)
    rows = torch.cat([step["rows"], step["rows"] + n])
    row_ptr = torch.tensor([0, n, 2 * n], device=device)
    weights = step["weights"].repeat(2)
    x_next, _, packed = ensemble_step(
        member_eps, step["x"].repeat(2, 1), row_ptr, rows, weights, coefficients=COEFFS,
        noise=step["noise"], sample_of=torch.zeros(2, dtype=torch.long, device=device),
        write_packed=True,
    )
    assert torch.equal(x_next[0], x_next[1])
    assert torch.equal(packed[rows[0]], x_next[0]) and torch.equal(packed[rows[-1]], x_next[1])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    step = make_step(6, 10, device=device)
    step["x"] = step["x"].t().contiguous().t()
    step["member_eps"] = torch.cat([step["member_eps"], step["member_eps"]], 1)[:, ::2]
    assert not step["x"].is_contiguous() or step["x"].shape[0] == 1
    assert not step["member_eps"].is_contiguous()
    assert_matches(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("write_packed", [False, True])
def test_gradcheck(device, write_packed):
    step = make_step(4, 3, dtype=torch.float64, device=device)
    fixed = {k: step[k] for k in ("sample_of", "row_ptr", "rows")}

    def fn(member_eps, x, noise, weights):
        return _ops.ensemble_step(
            member_eps, x, noise, fixed["sample_of"], fixed["row_ptr"], fixed["rows"], weights,
            *COEFFS, -1.5, 1.5, write_packed,
        )

    inputs = [step[k].requires_grad_() for k in ("member_eps", "x", "noise", "weights")]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    step = make_step(5, 4, device=device)
    step["member_eps"].requires_grad_()
    step["x"].requires_grad_()
    args = (
        step["member_eps"], step["x"], step["noise"], step["sample_of"], step["row_ptr"],
        step["rows"], step["weights"], *COEFFS, -1.0, 1.0, True,
    )
    torch.library.opcheck(_ops.ensemble_step.default, args)


def _error(message, **changes):
    step = make_step(4, 3)
    step.update(changes)
    with pytest.raises(RuntimeError, match=message):
        run(_ops.ensemble_step, step)


def test_errors_name_the_problem():
    step = make_step(4, 3)
    n_rows, n_entries = step["member_eps"].shape[0], len(step["rows"])
    _error("x must have rank 2", x=torch.zeros(4, 3, 1))
    _error(r"member_eps.size\(1\) must equal D of x", member_eps=torch.zeros(n_rows, 5))
    _error(r"row_ptr.size\(0\) must equal T \+ 1", row_ptr=torch.zeros(4, dtype=torch.long))
    _error("rows must have dtype Long", rows=step["rows"].int())
    _error("weights must have dtype Float", weights=step["weights"].double())
    _error("x must be float32 or float64", x=step["x"].int())
    bad = step["rows"].clone()
    bad[2] = n_rows
    _error(rf"rows\[2\] = {n_rows} is out of range for member_eps with {n_rows} rows", rows=bad)
    ptr = step["row_ptr"].clone()
    ptr[2] = ptr[1] - 1
    _error("row_ptr must be non-decreasing", row_ptr=ptr)
    ptr = step["row_ptr"].clone()
    ptr[-1] = n_entries - 1
    _error(rf"row_ptr\[T\] must equal len\(rows\) = {n_entries}", row_ptr=ptr)
    _error(r"sample_of\[0\] = 7 is out of range for noise with 2 rows",
           sample_of=torch.tensor([7, 0, 0, 0]))
    dup = step["rows"].clone()
    dup[1] = dup[0]
    _error("appears twice in rows", rows=dup)


@requires_cuda
def test_device_error():
    step = make_step(4, 3, device="cuda")
    step["noise"] = step["noise"].cpu()
    with pytest.raises(RuntimeError, match="noise is on cpu but the other inputs are on cuda"):
        run(_ops.ensemble_step, step)


def test_entries_of_each_trajectory_with_and_without_their_count():
    row_ptr = torch.tensor([0, 2, 2, 5, 6])
    expected = torch.tensor([0, 0, 2, 2, 2, 3])
    assert torch.equal(_reference.trajectory_of_entries(row_ptr), expected)
    assert torch.equal(_reference.trajectory_of_entries(row_ptr, 6), expected)  # no device sync on a GPU


def test_check_step_indices_names_the_problem():
    """The host check of a CSR list, as the CPU kernel runs it and as the wrapper runs it once per
    list before a CUDA step (the CUDA kernel cannot report a bad index without a sync)."""
    row_ptr, rows = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    check_step_indices(row_ptr, rows, n_packed=2, write_packed=True)
    cases = [
        (dict(rows=torch.tensor([0, 0])), "row 0 appears twice in rows"),
        (dict(row_ptr=torch.tensor([1, 1, 2])), r"row_ptr\[0\] must be 0, got 1"),
        (dict(row_ptr=torch.tensor([0, 2, 1])), "row_ptr must be non-decreasing"),
        (dict(row_ptr=torch.tensor([0, 1, 1])), r"row_ptr\[T\] must equal len\(rows\) = 2, got 1"),
        (dict(rows=torch.tensor([0, 2])), r"rows\[1\] = 2 is out of range for member_eps with 2 rows"),
        (dict(rows=torch.tensor([-1, 1])), r"rows\[0\] = -1 is out of range"),
        (dict(sample_of=torch.tensor([0, 3]), noise_rows=3),
         r"sample_of\[1\] = 3 is out of range for noise with 3 rows"),
    ]
    for change, message in cases:
        args = dict(row_ptr=row_ptr, rows=rows, n_packed=2, write_packed=True) | change
        with pytest.raises(RuntimeError, match=message):
            check_step_indices(args.pop("row_ptr"), args.pop("rows"), **args)
    # a packed row listed twice is fine when nothing is written back to the packed layout
    check_step_indices(row_ptr, torch.tensor([0, 0]), n_packed=2, write_packed=False)


def test_the_wrapper_checks_each_list_once(monkeypatch):
    """The check that guards CUDA steps runs once per CSR list (a sampling run passes the same
    tensors to every step) and again after an in-place change."""
    calls = []
    monkeypatch.setattr(ops, "check_step_indices", lambda *a, **k: calls.append(1) or check_step_indices(*a, **k))
    monkeypatch.setattr(ops, "_checked_indices", type(ops._checked_indices)())
    step = make_step(4, 3)
    args = (step["member_eps"], step["x"], step["noise"], step["sample_of"], step["row_ptr"], step["rows"], True)
    ops._check_indices_once(*args)
    ops._check_indices_once(*args)
    assert len(calls) == 1
    step["rows"][1] = step["rows"][0]  # in place: the version changes
    with pytest.raises(RuntimeError, match="appears twice in rows"):
        ops._check_indices_once(*args)
    assert len(calls) == 2


@requires_cuda
def test_cuda_wrapper_refuses_a_bad_list_and_the_context_survives():
    step = make_step(4, 3, device="cuda")
    dup = step["rows"].clone()
    dup[1] = dup[0]
    with pytest.raises(RuntimeError, match="appears twice in rows"):
        ensemble_step(step["member_eps"], step["x"], step["row_ptr"], dup, step["weights"],
                      coefficients=COEFFS, write_packed=True)
    bad = step["rows"].clone()
    bad[0] = len(step["member_eps"])
    with pytest.raises(RuntimeError, match="is out of range for member_eps"):
        ensemble_step(step["member_eps"], step["x"], step["row_ptr"], bad, step["weights"], coefficients=COEFFS)
    # the raw op cannot check without a sync: the trajectory with the bad entry gets NaN, and no
    # device assert poisons the context
    x_next, _, _ = run(_ops.ensemble_step, dict(step, rows=bad), write_packed=False)
    assert x_next[0].isnan().all() and not x_next[1:].isnan().any()
    assert_matches(step)
