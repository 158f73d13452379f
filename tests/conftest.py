import pytest
import torch

import ensattr_fast

_CUDA = ensattr_fast.build_info()["cuda_available"]
_NO_GPU = pytest.mark.skipif(not _CUDA, reason="needs a GPU and a CUDA build of ensattr_fast")

DEVICES = ["cpu", pytest.param("cuda", marks=_NO_GPU)]


def float_dtypes(device: str):
    """float32 and float64 everywhere; half precisions only on CUDA."""
    half = [torch.float16, torch.bfloat16] if device == "cuda" else []
    return [torch.float32, torch.float64, *half]


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    }[dtype]


def device_dtype_cases():
    """(device, dtype) pairs, the CUDA ones skipped without a GPU."""
    cases = [(d, t) for d in ("cpu",) for t in float_dtypes(d)]
    cases += [pytest.param("cuda", t, marks=_NO_GPU) for t in float_dtypes("cuda")]
    return cases


requires_cuda = _NO_GPU
