"""What every reader and writer of the package's HDF5 files shares: opening a file to read (in
SWMR mode when a writer holds it), one :class:`StoreError` for a file that is missing or
damaged, the code hash that ties a file to its ensemble, file hashes and versions.

Attributes are JSON, parsed with ``json.loads``, never evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Iterator

import h5py
import numpy as np
import torch
from torch import Tensor

from .._version import __version__
from ..errors import StoreError
from .recovery import unreadable

__all__ = ["code_hash", "file_hash", "versions", "read_hdf5", "open_for_reading", "check_code"]


def code_hash(code: Tensor) -> str:
    array = np.ascontiguousarray(code.numpy().astype(np.uint8))
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


def file_hash(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    return {"ensattr_fast": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
            "numpy": np.__version__}


@contextlib.contextmanager
def read_hdf5(path: os.PathLike, what: str = "results file") -> Iterator[h5py.File]:
    """``with read_hdf5(path) as f:`` reads a results (or plan) file. A file that is missing,
    truncated or not HDF5, or that lacks a dataset or attribute the block reads, raises one
    :class:`StoreError` naming the file, not an OSError or a KeyError."""
    try:
        file = open_for_reading(path)
    except OSError as error:
        raise unreadable(path, error, what) from None
    try:
        with file:
            yield file
    except (KeyError, OSError, json.JSONDecodeError) as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise StoreError(f"{what} {path} is incomplete or damaged ({detail}); is it the file "
                         "`ensattr sample` wrote?") from None


def open_for_reading(path: os.PathLike) -> h5py.File:
    """``path`` open read-only; in SWMR mode when a writer holds it (or was killed holding it).
    Only then: an SWMR reader does not check a file's length, and on a truncated file it
    retries its reads for ever."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if "already open for write" not in str(error):
            raise
        return h5py.File(path, "r", swmr=True)


def check_code(file: h5py.File, code: Tensor, against: str = "this one", required: bool = False) -> None:
    """Refuse a file whose results belong to another ensemble than ``code`` (of ``against``:
    the checkpoint it is used with); with ``required``, also one that names no ensemble."""
    stored = file.attrs.get("code_hash")
    if stored is None:
        if required:
            raise StoreError(f"{file.filename} records no code hash; is it the file `ensattr sample` wrote?")
        return
    if json.loads(stored) != code_hash(code):
        raise StoreError(f"{file.filename} holds results of another ensemble than {against} (code hash "
                         f"{json.loads(stored)[:12]}, {against} {code_hash(code)[:12]}); write to a new file")
