"""code_scores for a large audit: all units of many samples at once, with top-k."""

import torch

from ensattr_fast import _reference
from ensattr_fast.ops import code_scores

from .._common import Record, Suite, check_close


def run(quick: bool, device: str) -> Suite:
    suite = Suite("code_scores", quick)
    N, S, M, k = 100_000, 64, 32, 10
    g = torch.Generator().manual_seed(0)
    code = (torch.rand(N, M, generator=g).argsort(1) < M // 2).to(torch.uint8).to(device)
    J = torch.randn(S, 256, M, generator=g)
    gram = (J.transpose(1, 2) @ J).to(device)
    losses = (0.05 + 0.01 * torch.rand(S, M, generator=g)).to(device)

    for kind, stats in (("first_order", {"gram": gram}), ("loss", {"losses": losses})):
        reference = _reference.code_first_order if kind == "first_order" else _reference.code_loss_contrast
        ours = lambda: code_scores(code, k=k, **stats)  # noqa: E731
        ref = lambda: reference(code, next(iter(stats.values())), k, 0, None, None)  # noqa: E731
        check_close(ours()[:2], ref()[:2], f"code_scores {kind}", rtol=1e-3, atol=1e-5)
        timing = suite.compare_times(f"{device} {kind} N={N} S={S} M={M} top-{k}", ours, ref,
                                     "eager reference")
        if device == "cuda":
            # reads the code and the statistics, writes the scores [S, N] (the top-k is small)
            scores = ours()[0]
            nbytes = code.numel() + scores.numel() * scores.element_size()
            t_copy = suite.time(lambda: scores.clone(), timing.name, "torch.clone")
            gbs, clone_gbs = nbytes / (timing.value * 1e-3) / 1e9, 2 * scores.numel() * 4 / t_copy / 1e9
            suite.record(Record(name=f"code_scores bandwidth vs clone: {timing.name}", value=gbs, unit="GB/s",
                                baseline=clone_gbs, ratio=gbs / clone_gbs, target="ratio >= 0.6",
                                met=gbs / clone_gbs >= 0.6))
        if kind == "first_order":
            seconds = timing.value / 1e3
            suite.record(Record(name=f"code_scores first order, seconds: {timing.name}",
                                value=seconds, unit="s", target="value < 1.0",
                                met=seconds < 1.0))
    return suite
