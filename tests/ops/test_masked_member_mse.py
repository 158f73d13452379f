"""masked_member_mse against its plain-torch reference."""

from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICES, device_dtype_cases, requires_cuda, tolerances

from ensattr_fast import _reference, ops
from ensattr_fast.ops import _ops, masked_member_mse

# (M, B, D): single member / example / feature, zero-size on each axis, and a ragged size.
# Rows long enough for several threads per row on CUDA (D = 1032, 4104), D a multiple of the
# 16-byte vector (64, 1032, 4104) or not.
SHAPES = [(1, 1, 1), (3, 5, 7), (16, 8, 33), (4, 3, 130), (0, 3, 4), (2, 0, 4), (2, 3, 0),
          (16, 8, 64), (3, 5, 1032), (2, 3, 4104)]


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


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_unaligned_contiguous_inputs(device, dtype):
    """Contiguous tensors that start off a 16-byte boundary (CUDA reads them one element at a time)."""
    inputs = []
    for t in make_inputs((3, 4, 64), dtype, device):
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape)
        inputs.append(shifted.copy_(t).requires_grad_())
    assert inputs[0].data_ptr() % 16 != 0
    assert_matches_reference(*inputs)
    per_example, per_member = masked_member_mse(*inputs)
    got = torch.autograd.grad(per_example.sum() + per_member.sum(), inputs[0])
    per_example, per_member = _reference.masked_member_mse(*inputs)
    want = torch.autograd.grad(per_example.sum() + per_member.sum(), inputs[0])
    torch.testing.assert_close(got, want, **tolerances(dtype))


def _thirds_mask(M, B, device):
    """Weights 1/3 and 1 (1/3 has three digits in bfloat16: 0.333984375)."""
    mask = torch.full((M, B), 1.0 / 3, device=device)
    mask[:, ::2] = 1.0
    return mask


def test_mask_reaches_the_op_in_the_accumulation_dtype(monkeypatch):
    """Half predictions keep a float32 mask: in bfloat16 the weights 1/3 would keep three digits
    and the per-member means would move by ~1e-3. The CPU has no half kernels, so the op is
    replaced here by the reference, fed what the wrapper passes on."""
    seen = []

    def op(pred, target, mask):
        seen.append(mask.dtype)
        return _reference.masked_member_mse(pred, target, mask)

    monkeypatch.setattr(ops, "_ops", SimpleNamespace(masked_member_mse=SimpleNamespace(default=op)))
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 6, 16, generator=g).bfloat16()
    target = torch.randn(3, 6, 16, generator=g).bfloat16()
    mask = _thirds_mask(3, 6, "cpu")
    _, per_member = masked_member_mse(pred, target, mask)
    _, want = _reference.masked_member_mse(pred, target, mask)
    assert seen == [torch.float32]
    torch.testing.assert_close(per_member, want, rtol=1e-6, atol=1e-7)
    _, per_member = masked_member_mse(pred, target, mask.bfloat16())  # a bf16 mask is taken as given
    assert seen[-1] == torch.float32


def test_fake_kernel_takes_the_mask_in_the_accumulation_dtype():
    pred = torch.empty(2, 3, 4, device="meta", dtype=torch.bfloat16)
    per_example, per_member = masked_member_mse(pred, pred, torch.empty(2, 3, device="meta"))
    assert per_example.dtype == per_member.dtype == torch.float32
    with pytest.raises(RuntimeError, match="mask must have dtype torch.float32"):
        _ops.masked_member_mse(pred, pred, torch.empty(2, 3, device="meta", dtype=torch.bfloat16))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mask_weights_keep_float32(dtype):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 10, 24, generator=g).to("cuda", dtype)
    target = torch.randn(4, 10, 24, generator=g).to("cuda", dtype)
    mask = _thirds_mask(4, 10, "cuda")
    per_example, per_member = masked_member_mse(pred, target, mask)
    # the per-member mean of the kernel's own per-example losses, with the float32 weights
    want = (per_example * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(per_member, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="mask must have dtype Float"):
        _ops.masked_member_mse(pred, target, mask.to(dtype))


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
        _ops.masked_member_mse(torch.zeros(2, 3, 4, device="cuda"), torch.zeros(2, 3, 4, device="cuda"),
                               torch.zeros(2, 3))
