"""Property-based tests (hypothesis) of every compiled op against its plain-torch twin.

Hypothesis draws the shapes (size 1 and 0 included where the op allows them) and the options;
tensor values come from a drawn seed through ``torch.Generator``, which keeps the examples
cheap. Every property compares the op with ``ensattr_fast._reference``; the examples are
derandomized, so a CI run is reproducible.

A unit that no member trained on (code row all 0) scores exactly 0 by first order: its own
property at the end of the file (the kernels once returned sqrt(rounding) there).
"""

import math

import torch
from conftest import tolerances
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ensattr_fast import _reference
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.ops import code_scores, ensemble_step, masked_member_mse

PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def materialized_grads(outputs_loss, inputs):
    return torch.autograd.grad(outputs_loss, inputs, allow_unused=True, materialize_grads=True)


# --------------------------------------------------------------------------- masked_member_mse


@st.composite
def mse_inputs(draw):
    """(pred [M,B,D], target [M,B,D] or [B,D], mask [M,B] or None, seed); some mask rows all zero."""
    M, B, D = draw(st.integers(0, 5)), draw(st.integers(0, 6)), draw(st.integers(0, 40))
    dtype, broadcast = draw(DTYPES), draw(st.booleans())
    mask_kind = draw(st.sampled_from(["weights", "binary", "bool", "none"]))
    zero_rows = torch.tensor(draw(st.lists(st.booleans(), min_size=M, max_size=M)), dtype=torch.bool)
    seed = draw(SEEDS)
    g = generator(seed)
    pred = torch.randn(M, B, D, generator=g, dtype=torch.float64)
    target = torch.randn(*((B, D) if broadcast else (M, B, D)), generator=g, dtype=torch.float64)
    keep = torch.rand(M, B, generator=g) > 0.3
    keep[zero_rows] = False
    weights = 2 * torch.rand(M, B, generator=g, dtype=torch.float64) if mask_kind == "weights" else 1.0
    mask = {"bool": keep, "none": None}.get(mask_kind, (keep * weights).to(dtype))
    return pred.to(dtype), target.to(dtype), mask, seed


def full_mask(pred, mask):
    return pred.new_ones(pred.shape[:2]) if mask is None else mask


@PROPERTY
@given(mse_inputs())
def test_masked_member_mse_forward_matches_reference(inputs):
    pred, target, mask, _ = inputs
    got = masked_member_mse(pred, target, mask)
    want = _reference.masked_member_mse(pred, target, full_mask(pred, mask))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tolerances(pred.dtype))
    assert not got[1].isnan().any()  # an all-zero mask row gives 0, not NaN


@PROPERTY
@given(mse_inputs(), st.sampled_from(["both", "per_example", "per_member"]))
def test_masked_member_mse_gradients_match_reference_autograd(inputs, used):
    """Gradients w.r.t. pred, target and a float mask through the op's autograd equal autograd
    through the reference, for any weighting of the two outputs (one of them unused included)."""
    pred, target, mask, seed = inputs
    mask = full_mask(pred, mask)
    differentiable = [pred, target] + ([mask] if mask.is_floating_point() else [])
    g = generator(seed + 1)
    w_example = torch.randn(pred.shape[:2], generator=g, dtype=torch.float64)
    w_member = torch.randn(pred.shape[:1], generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in differentiable]
        per_example, per_member = fn(*leaves, *([mask] if len(leaves) == 2 else []))
        loss = per_example.sum() * 0  # keeps the graph connected when an output is unused
        if used in ("both", "per_example"):
            loss = loss + (per_example * w_example.to(per_example.dtype)).sum()
        if used in ("both", "per_member"):
            loss = loss + (per_member * w_member.to(per_member.dtype)).sum()
        return materialized_grads(loss, leaves)

    for got, want in zip(grads(masked_member_mse), grads(_reference.masked_member_mse)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tolerances(pred.dtype))


# ------------------------------------------------------------------------------- ensemble_step

_SCHEDULE = NoiseSchedule.linear()  # the seed's schedule: linear 1e-4..0.02, T = 1000
SAMPLER_STEPS = {
    "ddpm": Sampler("ddpm", steps=None).plan(_SCHEDULE),
    "ddim eta=0": Sampler("ddim", steps=10, eta=0.0).plan(_SCHEDULE),
    "ddim eta=0.5": Sampler("ddim", steps=10, eta=0.5).plan(_SCHEDULE),
    "ddim eta=1": Sampler("ddim", steps=25, eta=1.0).plan(_SCHEDULE),
}


@st.composite
def coefficients(draw):
    """(a, b, c, d, s) of a real DDPM or DDIM step (any timestep), or generic values."""
    kind = draw(st.sampled_from([*SAMPLER_STEPS, "generic"]))
    if kind == "generic":
        return tuple(draw(st.floats(-2.0, 2.0, allow_nan=False)) for _ in range(5))
    plan = SAMPLER_STEPS[kind]
    return plan[draw(st.integers(0, len(plan) - 1))].coefficients


@st.composite
def step_inputs(draw):
    """Keyword arguments of ``ensemble_step``: a CSR list with empty trajectories allowed,
    arbitrary (signed) weights, noise absent / one row per trajectory / shared via sample_of."""
    dtype = draw(DTYPES)
    T, D = draw(st.integers(0, 6)), draw(st.integers(0, 20))
    write_packed = draw(st.booleans())
    counts = torch.tensor(draw(st.lists(st.integers(0, 4), min_size=T, max_size=T)), dtype=torch.long)
    R = int(counts.sum())
    # write_packed needs every packed row listed exactly once; otherwise rows may repeat.
    P = R if write_packed else draw(st.integers(1 if R else 0, 8))
    noise_mode = draw(st.sampled_from(["none", "per_trajectory", "shared"]))
    S = draw(st.integers(1, 3))
    clip = draw(st.one_of(st.none(), st.tuples(st.floats(-2.0, 1.0), st.floats(0.0, 3.0))))
    clip = None if clip is None else (clip[0], clip[0] + clip[1])
    coeffs = draw(coefficients())
    g = generator(draw(SEEDS))
    acc = _reference.accumulate_dtype(dtype)
    rows = torch.randperm(P, generator=g) if write_packed else torch.randint(max(P, 1), (R,), generator=g)
    kwargs = dict(
        member_eps=torch.randn(P, D, generator=g, dtype=torch.float64).to(dtype),
        x=torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype),
        row_ptr=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        rows=rows,
        weights=torch.randn(R, generator=g, dtype=torch.float64).to(acc),
        coefficients=coeffs, clip=clip, write_packed=write_packed,
        noise=None, sample_of=None,
    )
    if noise_mode == "per_trajectory":
        kwargs["noise"] = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    elif noise_mode == "shared":
        kwargs["noise"] = torch.randn(S, D, generator=g, dtype=torch.float64).to(dtype)
        kwargs["sample_of"] = torch.randint(S, (T,), generator=g)
    return kwargs


def reference_step(member_eps, x, row_ptr, rows, weights, *, coefficients, noise, sample_of,
                   clip, write_packed):
    lo, hi = (-math.inf, math.inf) if clip is None else clip
    return _reference.ensemble_step(
        member_eps, x, noise, sample_of, row_ptr, rows, weights, *coefficients, lo, hi, write_packed
    )


def largest(t):
    return t.max().item() if t.numel() else 0.0


def step_scales(kw):
    """Magnitudes of the terms the step sums, (eps_bar, x_next): rounding error is relative to
    them, not to the result (DDPM's early steps have |a|, |b| ~ 150 and cancel)."""
    a, b, c, d, s = (abs(v) for v in kw["coefficients"])
    traj = _reference.trajectory_of_entries(kw["row_ptr"])
    terms = kw["weights"].double().abs()[:, None] * kw["member_eps"][kw["rows"]].double().abs()
    eps_mag = torch.zeros(kw["x"].shape, dtype=torch.float64).index_add_(0, traj, terms)
    x_mag = kw["x"].double().abs()
    z_mag = 0.0 if kw["noise"] is None else largest(kw["noise"].double().abs())
    x_next_mag = c * (a * x_mag + b * eps_mag) + d * x_mag + s * z_mag
    return max(1.0, largest(eps_mag)), max(1.0, largest(x_next_mag))


@PROPERTY
@given(step_inputs())
def test_ensemble_step_matches_reference(kw):
    got = ensemble_step(**kw)
    want = reference_step(**kw)
    base = tolerances(kw["x"].dtype)
    eps_scale, x_scale = step_scales(kw)
    for name, g, w, scale in zip(("x_next", "eps_bar", "packed_next"), got, want, (x_scale, eps_scale, x_scale)):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=base["rtol"], atol=base["atol"] * scale, msg=name)


@PROPERTY
@given(step_inputs(), SEEDS)
def test_ensemble_step_gradients_match_reference_autograd(kw, seed):
    """Gradients w.r.t. member_eps, x, noise and weights of a random linear function of all
    three outputs equal autograd through the reference."""
    names = [n for n in ("member_eps", "x", "noise", "weights") if kw[n] is not None]
    g = generator(seed)
    cotangents = None

    def grads(fn):
        nonlocal cotangents
        leaves = {n: kw[n].detach().clone().requires_grad_() for n in names}
        outputs = fn(**{**kw, **leaves})
        if cotangents is None:
            cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
        loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
        return materialized_grads(loss, list(leaves.values()))

    base = tolerances(kw["x"].dtype)
    _, x_scale = step_scales(kw)
    for name, got, want in zip(names, grads(ensemble_step), grads(reference_step)):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=base["rtol"], atol=base["atol"] * x_scale, msg=name)


# --------------------------------------------------------------------------------- code_scores


@st.composite
def score_inputs(draw, min_members=1):
    """(kind, code [N,M], stats, k, unit_offset). Code rows are drawn from a pool of patterns,
    so that small pools give duplicate rows (tied scores); the pool may hold the all-ones row
    (no excluder: NaN) and the all-zeros row. M = 0 is left out (no member, no score)."""
    kind = draw(st.sampled_from(["first_order", "loss"]))
    dtype = draw(DTYPES)
    N, M, rows = draw(st.integers(0, 40)), draw(st.integers(min_members, 40)), draw(st.integers(0, 3))
    pool_size, density = draw(st.integers(1, 12)), draw(st.sampled_from([0.2, 0.5, 0.8]))
    special = draw(st.sampled_from(["none", "all_included", "all_excluded", "both"]))  # pool rows
    k, unit_offset = draw(st.integers(0, N + 3)), draw(st.integers(0, 10**6))
    g = generator(draw(SEEDS))
    pool = (torch.rand(pool_size, M, generator=g) < density).to(torch.uint8)
    if special in ("all_included", "both"):
        pool[0] = 1
    if special in ("all_excluded", "both"):
        pool[-1] = 0
    if kind == "first_order":
        # A unit excluded by every member scores ~sqrt(rounding) instead of 0 (see
        # test_first_order_unit_excluded_by_every_member_scores_zero); keep one includer.
        empty = pool.sum(1) == 0
        pool[empty, torch.randint(M, (int(empty.sum()),), generator=g)] = 1
    code = pool[torch.randint(pool_size, (N,), generator=g)]
    common = draw(st.sampled_from([0.0, 50.0]))  # member statistics share a large common part
    if kind == "first_order":
        J = torch.randn(rows, 2 * M + 1, M, generator=g, dtype=torch.float64)
        stats = J.transpose(1, 2) @ J + common
    else:
        stats = common + torch.rand(rows, M, generator=g, dtype=torch.float64)
    return kind, code, stats.to(dtype), k, unit_offset


def call(kind, code, stats, **kwargs):
    return code_scores(code, **{"gram" if kind == "first_order" else "losses": stats}, **kwargs)


def reference_scores(kind, code, stats, k, unit_offset, previous=(None, None)):
    """The reference computed in float64 (the kernels must be at least as accurate), returned
    in the op's accumulate dtype."""
    fn = _reference.code_first_order if kind == "first_order" else _reference.code_loss_contrast
    out = fn(code, stats.double(), k, unit_offset, *previous)
    acc = _reference.accumulate_dtype(stats.dtype)
    return [t.to(acc) if t.is_floating_point() else t for t in out]


def score_tolerance(dtype):
    return tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def assert_topk_consistent(got, k, unit_offset, previous=(None, None)):
    """The op's running top-k is exactly the reference merge of its own scores: the same values
    in decreasing order, ties to the lower unit, NaN skipped, -inf / -1 padding."""
    want_values, want_indices = _reference.merge_topk(got.scores, k, unit_offset, *previous)
    assert got.top_values.shape == want_values.shape and got.top_values.dtype == want_values.dtype
    assert torch.equal(got.top_values, want_values)
    assert torch.equal(got.top_indices, want_indices)


@PROPERTY
@given(score_inputs())
def test_code_scores_match_reference(inputs):
    kind, code, stats, k, unit_offset = inputs
    got = call(kind, code, stats, k=k, unit_offset=unit_offset)
    want = reference_scores(kind, code, stats, k, unit_offset)
    tol = score_tolerance(stats.dtype)
    assert got.scores.dtype == want[0].dtype and got.scores.shape == want[0].shape
    torch.testing.assert_close(got.scores, want[0], equal_nan=True, **tol)
    # Top-k values are robust to near-ties; indices are checked through the scores they point to.
    torch.testing.assert_close(got.top_values, want[1], **tol)
    assert_topk_consistent(got, k, unit_offset)
    filled = got.top_indices >= 0
    rows = torch.arange(got.top_indices.shape[0])[:, None].expand_as(got.top_indices)
    pointed = want[0][rows[filled], got.top_indices[filled] - unit_offset]
    torch.testing.assert_close(pointed, got.top_values[filled], **tol)
    assert torch.equal(filled, want[2] >= 0)  # same number of non-NaN candidates per row


@PROPERTY
@given(score_inputs(), st.data())
def test_code_scores_two_chunks_equal_one_call(inputs, data):
    """Scoring the code in two chunks, the second with ``previous`` = the first's top-k, gives the
    top-k of one call over the whole code, and the reference merge of the chunk's scores."""
    kind, code, stats, k, unit_offset = inputs
    cut = data.draw(st.integers(0, code.shape[0]), label="cut")
    whole = call(kind, code, stats, k=k, unit_offset=unit_offset)
    first = call(kind, code[:cut], stats, k=k, unit_offset=unit_offset)
    previous = (first.top_values, first.top_indices)
    second = call(kind, code[cut:], stats, k=k, unit_offset=unit_offset + cut, previous=previous)
    assert_topk_consistent(second, k, unit_offset + cut, previous)
    assert torch.equal(second.top_values, whole.top_values)
    assert torch.equal(second.top_indices, whole.top_indices)
    # and the merged top-k agrees with the reference over the whole code
    want = reference_scores(kind, code, stats, k, unit_offset)
    torch.testing.assert_close(second.top_values, want[1], **score_tolerance(stats.dtype))


@PROPERTY
@given(score_inputs(min_members=2), SEEDS)
def test_code_scores_gradients_match_reference_autograd(inputs, seed):
    """d scores / d gram (or losses) through the op's autograd equals autograd through the
    reference, for units with an excluder and an includer (elsewhere the score is NaN or a
    constant 0 and the reference gradient is not defined)."""
    kind, code, stats, _, _ = inputs
    code = code.clone()
    code[:, 0], code[:, 1] = 0, 1
    cotangent = torch.randn(stats.shape[0], code.shape[0], generator=generator(seed), dtype=torch.float64)
    fn = _reference.code_first_order if kind == "first_order" else _reference.code_loss_contrast

    def grad(scores_of):
        leaf = stats.detach().clone().requires_grad_()
        scores = scores_of(leaf)
        return materialized_grads((scores * cotangent.to(scores.dtype)).sum(), [leaf])[0]

    got = grad(lambda s: call(kind, code, s).scores)
    want = grad(lambda s: fn(code, s, 0, 0, None, None)[0])
    torch.testing.assert_close(got, want, **score_tolerance(stats.dtype))


@settings(PROPERTY, max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(DTYPES, st.integers(2, 40), st.sampled_from([0.0, 50.0]), SEEDS)
def test_first_order_unit_excluded_by_every_member_scores_zero(dtype, M, common, seed):
    """Ablating a unit that every member excluded leaves the weights at 1/M: v_u = 0, score 0."""
    J = torch.randn(1, 2 * M + 1, M, generator=generator(seed), dtype=torch.float64)
    gram = (J.transpose(1, 2) @ J + common).to(dtype)
    code = torch.zeros(1, M, dtype=torch.uint8)
    got = code_scores(code, gram=gram).scores
    want = reference_scores("first_order", code, gram, 0, 0)[0]
    torch.testing.assert_close(got, want, **score_tolerance(dtype))
