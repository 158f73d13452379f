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


def hdf5_items(path, skip_root=()) -> dict:
    """Every dataset's value and every attribute of an HDF5 file, by path (``name@attr`` for
    attributes, ``@attr`` at the root, root attributes in ``skip_root`` left out)."""
    import h5py

    items = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                items[name] = obj[()]
            items.update({f"{name}@{k}": v for k, v in obj.attrs.items()})
        f.visititems(visit)
        items.update({f"@{k}": v for k, v in f.attrs.items() if k not in skip_root})
    return items


def same_value(a, b) -> bool:
    """Equal dtype, shape and bytes (NaN equal to NaN); variable-length strings by their text."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "O":
        return b.dtype.kind == "O" and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and (
        a.tobytes() == b.tobytes() or (a.dtype.kind == "f" and np.array_equal(a, b, equal_nan=True)))


def assert_close_to_scale(got, want, rel=1e-5, scale=None):
    """float32 sums in another order (another batch, another kernel the CPU picks): equal to
    rel times the size of the values (or ``scale``), not each value's own size, since sums
    that cancel to near zero keep the rounding of their terms."""
    scale = want.abs().max().item() if scale is None else scale
    torch.testing.assert_close(got, want, rtol=0, atol=rel * max(scale, 1e-6))

