"""What every reader and writer of the package's HDF5 files shares: opening a file to read (in
SWMR mode when a writer holds it), one :class:`StoreError` for a file that is missing or
damaged, the code hash that ties a file to its ensemble, file hashes and versions.

Attributes are JSON, parsed with ``json.loads``, never evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Iterator

import h5py
import numpy as np
import torch
from torch import Tensor

from .._version import __version__
from ..errors import StoreError
from ..runtime.files import quiet_hdf5_teardown, system_fault
from .recovery import unreadable

__all__ = ["code_hash", "file_hash", "versions", "read_hdf5", "open_for_reading", "check_code", "check_results",
           "parse_json", "dump_json", "damaged", "writable", "finish", "abandon", "exit_after_faults"]

#: files HDF5 could not write, held open until the process ends (see :func:`abandon`)
_ABANDONED: list = []
#: whether :func:`abandon` closes the files it gives up (see :func:`exit_after_faults`)
_CLOSE_ABANDONED = [True]


def exit_after_faults() -> None:
    """Declare that this process ends, without the interpreter's teardown, right after a fault
    of the system (the command line's own process does): :func:`abandon` then leaves the files
    it gives up open instead of closing them. HDF5 can crash in that close, its state broken by
    the refused write (1 in 20 disks filled at random moments while sampling), and nothing after
    the fault needs it."""
    _CLOSE_ABANDONED[0] = False

#: the longest attribute text a file may hold: hand-edited or hostile files stop here, not in memory
MAX_ATTRIBUTE = 16 << 20


def dump_json(value, **kwargs) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null, which every parser reads (``NaN``
    is Python's extension, and strict parsers refuse it)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def damaged(path, detail: str, what: str = "results file") -> StoreError:
    """The one error for a file that is damaged or was edited: what is wrong with it."""
    again = {"plan file": "plan again", "results file": "sample again"}.get(what, "write it again")
    return StoreError(f"{what} {path} is damaged: {detail}; {again} (or restore it from a copy) and rerun")


def parse_json(text, where: str = "an attribute"):
    """JSON from a file's attribute, refused in one line when it is too long or too deep to be
    one this package wrote."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or len(text) > MAX_ATTRIBUTE:
        raise StoreError(f"{where} is not JSON of a size this package writes ({type(text).__name__}, "
                         f"{len(text) if isinstance(text, str) else '?'} characters)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise StoreError(f"{where} is not JSON this package can read ({type(error).__name__})") from None


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
    except (KeyError, OSError, RuntimeError, ValueError, TypeError, RecursionError) as error:
        if isinstance(error, StoreError):
            raise
        detail = error.args[0] if isinstance(error, KeyError) and error.args else " ".join(str(error).split())[:300]
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
            raise StoreError(f"{file.filename} records no code hash: it is damaged, or not the file `ensattr sample` "
                             "wrote")
        return
    stored = parse_json(stored, f"{file.filename}: the code_hash attribute")
    if stored != code_hash(code):
        raise StoreError(f"{file.filename} holds results of another ensemble than {against} (code hash "
                         f"{str(stored)[:12]}, {against} {code_hash(code)[:12]}); write to a new file")


def check_results(file: h5py.File, what: str = "results file", hash_required: bool = True) -> None:
    """Refuse a results (or plan) file whose own contents do not agree: ``/code`` uint8 [N, M]
    of 0 and 1 matching the file's code hash, ``/units/of_example`` in [0, N), one name per
    unit, and as many sample images [S, C, H, W] as seeds. A file damaged by a fault or edited
    by hand is one :class:`StoreError` saying what is wrong, before a step trusts it. Without
    ``hash_required`` (steps that only show a file), a file that records no code hash passes."""
    path = file.filename
    code = file.get("code")
    if not isinstance(code, h5py.Dataset) or code.ndim != 2 or code.dtype != np.uint8:
        raise damaged(path, "/code is missing or not uint8 [N, M]", what)
    values = code[()]
    if values.size and values.max() > 1:
        raise damaged(path, "/code holds values other than 0 and 1", what)
    stored = file.attrs.get("code_hash")
    if stored is None and hash_required:
        raise damaged(path, "it records no code hash", what)
    ours = code_hash(torch.from_numpy(values))
    if stored is not None and parse_json(stored, f"{what} {path}: the code_hash attribute") != ours:
        raise damaged(path, "/code does not match its hash", what)
    unit_of = file.get("units/of_example")
    if not isinstance(unit_of, h5py.Dataset) or unit_of.ndim != 1 or unit_of.dtype.kind not in "iu":
        raise damaged(path, "/units/of_example is missing or not integers [n_examples]", what)
    units = unit_of[()]
    if units.size and (units.min() < 0 or units.max() >= len(values)):
        raise damaged(path, f"/units/of_example names units outside [0, {len(values)})", what)
    names = file.get("units/name")
    if names is not None and (not isinstance(names, h5py.Dataset) or names.shape != (len(values),)):
        raise damaged(path, f"/units/name does not hold one name for each of the {len(values)} units", what)
    seeds, images = file.get("samples/seed"), file.get("samples/images")
    if seeds is not None and (not isinstance(seeds, h5py.Dataset) or seeds.ndim != 1 or seeds.dtype.kind not in "iu"):
        raise damaged(path, "/samples/seed is not integers [S]", what)
    if images is not None and (not isinstance(images, h5py.Dataset) or images.ndim != 4 or seeds is None
                               or len(images) != len(seeds)):
        raise damaged(path, "/samples/images is not one image [C, H, W] for each seed", what)


def abandon(file: h5py.File) -> None:
    """Give up ``file`` after the system refused one of its writes (a full disk, a read-only
    remount), leaving on disk what a killed writer leaves, which the next writer recovers or
    refuses.

    Closed as it is, HDF5 would flush, fail half-way and leave handles h5py takes for valid;
    freeing any of them then, or HDF5's own teardown at exit, crashes the process (h5py issues
    #914 and #2160; HDF5 2.0 still does). So the file's descriptor is first pointed at an
    anonymous in-memory file of its size (``memfd_create``, Linux): the close writes there, the
    disk is left alone, and the process goes on. Where that cannot be done the file stays open,
    held here; either way its handles fail in silence as they are freed (see
    :func:`~ensattr_fast.runtime.files.quiet_hdf5_teardown`)."""
    quiet_hdf5_teardown()
    if any(held is file for held in _ABANDONED) or not file.id.valid:
        return
    try:
        descriptor = file.id.get_vfd_handle()
        blank = os.memfd_create("ensattr-given-up")
        try:
            os.ftruncate(blank, os.fstat(descriptor).st_size)  # sparse: no memory until written
            os.dup2(blank, descriptor)  # also drops HDF5's lock on the real file
        finally:
            os.close(blank)
    except (AttributeError, OSError, RuntimeError, ValueError):
        _ABANDONED.append(file)
        return
    if not _CLOSE_ABANDONED[0]:
        _ABANDONED.append(file)
        return
    with contextlib.suppress(Exception):  # HDF5 may still refuse, in memory now: nothing to add
        file.close()


def finish(file: h5py.File) -> None:
    """Close ``file``, flushed first, so that a write the system refuses shows while the file
    can still be given up whole (see :func:`abandon`); that fault is raised."""
    try:
        file.flush()
    except BaseException as error:
        if system_fault(error):
            abandon(file)
        raise
    file.close()


@contextlib.contextmanager
def writable(path: os.PathLike, mode: str = "a", **kwargs) -> Iterator[h5py.File]:
    """``with writable(path) as f:`` an HDF5 file to write, closed by :func:`finish` when the
    block ends, given up by :func:`abandon` when the system refused a write inside it (a
    :func:`~ensattr_fast.runtime.files.system_fault`)."""
    file = h5py.File(path, mode, **kwargs)
    try:
        yield file
    except BaseException as error:
        if system_fault(error):
            abandon(file)
        else:
            file.close()
        raise
    finish(file)
