"""masked_member_mse forward + backward against the eager reference and torch.clone."""

import torch

from ensattr_fast import _reference
from ensattr_fast.ops import masked_member_mse

from .._common import Record, Suite, check_close


def _fwd_bwd(fn, pred, target, mask):
    grad_member = torch.ones(pred.shape[0], device=pred.device)

    def call():
        _, per_member = fn(pred, target, mask)
        return torch.autograd.grad(per_member, pred, grad_member)

    return call


def run(quick: bool, device: str) -> Suite:
    suite = Suite("masked_member_mse fwd+bwd", quick)
    shapes = [(16, 128, 3072)] if quick else [(16, 128, 3072), (16, 128, 64), (64, 256, 3072)]
    for M, B, D in shapes:
        pred = torch.randn(M, B, D, device=device, requires_grad=True)
        target = torch.randn(M, B, D, device=device)
        mask = (torch.rand(M, B, device=device) < 0.9).float()
        ours = _fwd_bwd(masked_member_mse, pred, target, mask)
        reference = _fwd_bwd(_reference.masked_member_mse, pred, target, mask)
        check_close(ours(), reference(), "masked_member_mse grad", rtol=1e-4, atol=1e-6)
        case = f"{device} M={M} B={B} D={D}"
        main_case = (M, B, D) == (16, 128, 3072)
        timing = suite.compare_times(case, ours, reference, "eager reference",
                                     min_ratio=3.0 if main_case and device == "cpu" else None)

        # Bytes moved: forward reads pred and target; backward reads both again and writes
        # grad_pred. torch.clone of pred reads and writes it once.
        nbytes = pred.numel() * pred.element_size()
        t_clone = suite.time(lambda: pred.detach().clone(), case, "torch.clone")
        ours_gbs = 5 * nbytes / (timing.value * 1e-3) / 1e9
        clone_gbs = 2 * nbytes / t_clone / 1e9
        fraction = ours_gbs / clone_gbs
        target_fraction = 0.5 if device == "cpu" else 0.6
        suite.record(Record(
            name=f"masked_member_mse fwd+bwd bandwidth vs clone: {case}", value=ours_gbs,
            unit="GB/s", baseline=clone_gbs, ratio=fraction,
            target=f"ratio >= {target_fraction}" if main_case else None,
            met=fraction >= target_fraction if main_case else None,
        ))
    return suite
