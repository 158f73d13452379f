"""Image layouts and scaling shared by every loader: [n, H, W], [n, C, H, W] and channels-last
[n, H, W, C] arrays to float32 [n, C, H, W], uint8 to [-1, 1], index checks."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

#: values of a floating array taken as images in [-1, 1] may not exceed this in absolute value
RANGE_LIMIT = 1.5


def _nchw_layout(shape: Sequence[int], what: str) -> str:
    """'nhw', 'nchw' or 'nhwc' for an array of ``shape``: [n, H, W] is grayscale; [n, C, H, W]
    when dim 1 is 1, 3 or 4 (or when neither dim 1 nor dim 3 is); channels-last [n, H, W, C]
    when dim 1 is not 1, 3 or 4 but dim 3 is."""
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) or shape[3] not in (1, 3, 4):
            return "nchw"
        return "nhwc"
    raise DataError(f"{what} must be [n, H, W], [n, C, H, W] or [n, H, W, C], got shape {list(shape)}")


def _logical_shape(shape: Sequence[int], layout: str) -> Tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if layout == "nhw":
        return (shape[0], 1, shape[1], shape[2])
    if layout == "nhwc":
        return (shape[0], shape[3], shape[1], shape[2])
    return shape  # type: ignore[return-value]


def _check_dtype(dtype: np.dtype, scale: bool, what: str) -> None:
    if dtype == np.uint8 or np.issubdtype(dtype, np.floating):
        return
    if not scale and (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        return
    raise DataError(f"{what} has dtype {dtype}: store images as uint8 0..255 or as floats in "
                    f"[-1, 1] (or load with scale=False to take the values as they are)")


def _to_float_nchw(array: np.ndarray, layout: str, scale: bool) -> np.ndarray:
    """float32 [k, C, H, W] from raw rows of ``layout``; uint8 scaled to [-1, 1] when ``scale``."""
    if scale and array.dtype == np.uint8:
        out = array.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    else:
        out = array.astype(np.float32, copy=False)
    if layout == "nhw":
        out = out[:, None]
    elif layout == "nhwc":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out)


def _range_error(what: str, max_abs: float) -> DataError:
    return DataError(f"{what} holds values up to |x| = {max_abs:.4g}, far outside [-1, 1]: scale your "
                     f"data to [-1, 1] (uint8 images are scaled automatically), or load latents "
                     f"with scale=False to take the values as they are")


def _check_range(images: Tensor, what: str) -> None:
    if images.numel() and torch.isfinite(images).all():
        max_abs = images.abs().max().item()
        if max_abs > RANGE_LIMIT:
            raise _range_error(what, max_abs)


def _default_names(n: int) -> Tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def _as_index(index, n: int, what: str) -> np.ndarray:
    if isinstance(index, Tensor):
        if index.is_floating_point() or index.dtype == torch.bool:
            raise DataError(f"indices into {what} must be integers, got {index.dtype}")
        idx = index.detach().cpu().numpy()
    else:
        idx = np.asarray(index)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"indices into {what} must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise DataError(f"index {int(bad)} out of range for {what} of {n} images")
    return idx

