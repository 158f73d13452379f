"""Embedding conditions (text-conditioned members): one float [L, D] per image or per seed,
e.g. a text encoder's outputs computed beforehand, read from arrays and checked in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .disk import read_hdf5_array

__all__ = ["conditions_from", "load_conditions"]

PathLike = Union[str, os.PathLike]


def conditions_from(array: Optional[np.ndarray], n: Optional[int], what: str) -> Optional[Tensor]:
    """Embedding conditions float32 [n, L, D] (e.g. a text encoder's outputs, one per image or
    per seed), or a :class:`DataError` naming what does not fit: not floating point, not
    [n, L, D], another count than ``n`` (None: any), a NaN or infinity."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{what} must be float embeddings [n, L, D] (e.g. a text encoder's outputs), got "
                        f"{array.dtype} of shape {list(array.shape)}")
    if n is not None and len(array) != n:
        raise DataError(f"{what}: {len(array)} conditions for {n} images")
    if not np.isfinite(array).all():
        raise DataError(f"{what} holds NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))


def load_conditions(path: PathLike, count: int) -> Tensor:
    """Embedding conditions float32 [count, L, D] from a file: an ``.npy`` array, or the array
    ``conditions`` of an ``.npz`` or HDF5 file, holding one per row or one for all ([1, L, D],
    repeated); a :class:`DataError` names what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no condition file at {path}")
    if path.suffix in (".h5", ".hdf5"):
        array = read_hdf5_array(path, "conditions")
    else:
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path} is not a readable .npy, .npz or HDF5 file ({e})") from None
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            with loaded:
                array = loaded["conditions"] if "conditions" in loaded.files else None
    if array is None:
        raise DataError(f"{path} has no array 'conditions'")
    conditions = conditions_from(array, None, str(path))
    if len(conditions) not in (1, count):
        raise DataError(f"{path}: {len(conditions)} conditions for {count} rows: give one for every row, or one each")
    return conditions.expand(count, -1, -1).clone() if len(conditions) == 1 else conditions
