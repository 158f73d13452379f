"""ensemble_step (fused combine + sampler update) against the eager reference."""

import torch

from ensattr_fast import _reference
from ensattr_fast.ops import ensemble_step

from .._common import Record, Suite, check_close

COEFFS = (1.02, -0.2, 0.97, 0.02, 0.1)


def make_case(T, D, per_trajectory, members, samples, device, seed=0):
    """T trajectories, each keeping ``per_trajectory`` of ``members`` members, packed
    member-major as batched ablated sampling lays them out."""
    g = torch.Generator().manual_seed(seed)
    keeps = torch.rand(T, members, generator=g).argsort(1)[:, :per_trajectory]
    keep_mask = torch.zeros(T, members, dtype=torch.bool).scatter_(1, keeps, True)
    order = keep_mask.t().nonzero()
    packed_row = torch.empty(T, members, dtype=torch.long)
    packed_row[order[:, 1], order[:, 0]] = torch.arange(len(order))
    return dict(
        member_eps=torch.randn(len(order), D, generator=g).to(device),
        x=torch.randn(T, D, generator=g).to(device),
        row_ptr=torch.arange(0, T * per_trajectory + 1, per_trajectory).to(device),
        rows=packed_row[keep_mask].to(device),
        weights=torch.full((T * per_trajectory,), 1.0 / per_trajectory).to(device),
        noise=torch.randn(samples, D, generator=g).to(device),
        sample_of=(torch.arange(T) % samples).to(device),
    )


def run(quick: bool, device: str) -> Suite:
    suite = Suite("ensemble_step", quick)
    cases = [(512, 3072, 8)] if quick else [(512, 3072, 8), (512, 64, 8), (4096, 3072, 16)]
    for T, D, per in cases:
        c = make_case(T, D, per, members=16, samples=8, device=device)

        def ours():
            return ensemble_step(c["member_eps"], c["x"], c["row_ptr"], c["rows"], c["weights"],
                                 coefficients=COEFFS, noise=c["noise"], sample_of=c["sample_of"],
                                 clip=(-1.0, 1.0), write_packed=True)

        def reference():
            return _reference.ensemble_step(c["member_eps"], c["x"], c["noise"], c["sample_of"],
                                            c["row_ptr"], c["rows"], c["weights"], *COEFFS,
                                            -1.0, 1.0, True)

        check_close(ours(), reference(), "ensemble_step", rtol=1e-5, atol=1e-6)
        main_case = (T, D, per) == (512, 3072, 8)
        timing = suite.compare_times(f"{device} T={T} D={D} members/trajectory={per}", ours,
                                     reference, "eager reference",
                                     min_ratio=3.0 if main_case and device == "cpu" else None)
        if device == "cuda":
            # reads packed outputs, x and noise; writes x_next, eps_bar and the packed input
            nbytes = 4 * (2 * c["member_eps"].numel() + 3 * c["x"].numel())
            t_copy = suite.time(lambda: c["member_eps"].clone(), timing.name, "torch.clone")
            clone_gbs = 2 * 4 * c["member_eps"].numel() / t_copy / 1e9
            gbs = nbytes / (timing.value * 1e-3) / 1e9
            suite.record(Record(name=f"ensemble_step bandwidth vs clone: {timing.name}",
                                value=gbs, unit="GB/s", baseline=clone_gbs, ratio=gbs / clone_gbs,
                                target="ratio >= 0.6", met=gbs / clone_gbs >= 0.6))
    return suite
