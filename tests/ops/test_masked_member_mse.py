"""masked_member_mse against its plain-torch reference."""

import pytest
import torch

from conftest import DEVICES, device_dtype_cases, requires_cuda, tolerances
from ensattr_fast import _reference, masked_member_mse
from ensattr_fast.ops import _ops

# (M, B, D): single member / example / feature, zero-size on each axis, and a ragged size.
SHAPES = [(1, 1, 1), (3, 5, 7), (16, 8, 33), (4, 3, 130), (0, 3, 4), (2, 0, 4), (2, 3, 0)]


def make_inputs(shape, dtype, device, broadcast=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    M, B, D = shape
    pred = torch.randn(M, B, D, generator=g, dtype=torch.float64)
    target = torch.randn(*((B, D) if broadcast else (M, B, D)), generator=g, dtype=torch.float64)
    mask = (torch.rand(M, B, generator=g, dtype=torch.float64) > 0.3).double()
    mask *= torch.rand(M, B, generator=g, dtype=torch.float64) * 2
    if M > 1:
        mask[1] = 0  # an all-zero row must give a loss of 0, not NaN
    return [t.to(device=device, dtype=dtype) for t in (pred, target, mask)]


def assert_matches_reference(pred, target, mask):
    got = masked_member_mse(pred, target, mask)
    want = _reference.masked_member_mse(pred, target, mask)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tolerances(pred.dtype))
    return got


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("broadcast", [False, True])
def test_forward_matches_reference(device, dtype, shape, broadcast):
    per_example, per_member = assert_matches_reference(
        *make_inputs(shape, dtype, device, broadcast)
    )
    assert not per_member.isnan().any()


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("broadcast", [False, True])
def test_backward_matches_reference(device, dtype, broadcast):
    inputs = [t.requires_grad_() for t in make_inputs((5, 6, 37), dtype, device, broadcast)]
    g = torch.Generator().manual_seed(1)
    w_example = torch.randn(5, 6, generator=g).to(device)
    w_member = torch.randn(5, generator=g).to(device)

    def grads(fn):
        per_example, per_member = fn(*inputs)
        loss = (per_example * w_example).sum() + (per_member * w_member).sum()
        return torch.autograd.grad(loss, inputs)

    for got, want in zip(grads(masked_member_mse), grads(_reference.masked_member_mse)):
        torch.testing.assert_close(got, want, **tolerances(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    pred, target, mask = make_inputs((4, 6, 9), torch.float32, device)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    mask_t = mask.t().contiguous().t()
    assert not pred_t.is_contiguous() and not mask_t.is_contiguous()
    assert_matches_reference(pred_t, target[:, :, :], mask_t)
    assert_matches_reference(pred[:, ::2], target[:, ::2], mask[:, ::2])


@pytest.mark.parametrize("device", DEVICES)
def test_default_and_bool_mask(device):
    pred, target, mask = make_inputs((3, 4, 5), torch.float32, device)
    _, full = masked_member_mse(pred, target)
    torch.testing.assert_close(full, ((pred - target) ** 2).mean((1, 2)))
    _, masked = masked_member_mse(pred, target, mask > 0)
    torch.testing.assert_close(masked, _reference.masked_member_mse(pred, target, (mask > 0).float())[1])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    inputs = [t.requires_grad_() for t in make_inputs((3, 4, 5), torch.float64, device)]
    assert torch.autograd.gradcheck(masked_member_mse, inputs)
    pred, target, mask = make_inputs((3, 4, 5), torch.float64, device, broadcast=True)
    assert torch.autograd.gradcheck(masked_member_mse, [t.requires_grad_() for t in (pred, target, mask)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("broadcast", [False, True])
def test_opcheck(device, broadcast):
    pred, target, mask = make_inputs((3, 4, 5), torch.float32, device, broadcast)
    torch.library.opcheck(_ops.masked_member_mse.default, (pred.requires_grad_(), target, mask))
    grad_e, grad_m = torch.randn(3, 4, device=device), torch.randn(3, device=device)
    torch.library.opcheck(_ops.masked_member_mse_backward.default, (grad_e, grad_m, pred.detach(), target, mask))


@pytest.mark.parametrize(
    "pred_shape,target_shape,mask_shape,message",
    [
        ((3, 4), (3, 4), (3, 4), "pred must have rank 3"),
        ((3, 4, 5), (3, 4, 6), (3, 4), "does not match pred shape"),
        ((3, 4, 5), (4,), (3, 4), "target must have shape"),
        ((3, 4, 5), (4, 5), (3, 5), "mask must have shape"),
    ],
)
def test_shape_errors(pred_shape, target_shape, mask_shape, message):
    with pytest.raises(RuntimeError, match=message):
        _ops.masked_member_mse(torch.zeros(pred_shape), torch.zeros(target_shape), torch.zeros(mask_shape))


def test_dtype_errors():
    with pytest.raises(RuntimeError, match="pred must be float32 or float64"):
        _ops.masked_member_mse(torch.zeros(2, 3, 4, dtype=torch.int32), torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="float16/bfloat16 on CUDA only"):
        masked_member_mse(torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="target must have dtype Double"):
        _ops.masked_member_mse(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4), torch.zeros(2, 3))


@requires_cuda
def test_device_error():
    with pytest.raises(RuntimeError, match="mask is on cpu but the other inputs are on cuda"):
        _ops.masked_member_mse(torch.zeros(2, 3, 4, device="cuda"), torch.zeros(2, 3, 4, device="cuda"), torch.zeros(2, 3))
