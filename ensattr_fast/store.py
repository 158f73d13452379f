"""The HDF5 result store: one file per run, readable with nothing but h5py.

Layout (DESIGN.md section 3; a contract for the notebooks and pipelines that load these files):

| path | dtype, shape | meaning |
| --- | --- | --- |
| /code | uint8 [N, M] | C[u, m] = 1 iff member m trained on unit u |
| /units/of_example | int64 [n_examples] | the unit of each training example |
| /units/name | str [N] | a name per unit |
| /samples/images | float32 [S, C, H, W] | full-ensemble samples in [-1, 1] |
| /samples/seed | int64 [S] | the seed that replays each sample |
| /counterfactuals/units | int64 [S, K] | the unit ablated for each counterfactual (-1: none) |
| /counterfactuals/images | float32 [S, K, C, H, W] | exact counterfactual samples |
| /counterfactuals/distance | float32 [S, K] | L2 distance of each to its sample |
| /influence/<method>, /topk/<method> | float32 [K, N]; [K, k] | see InfluenceStream |
| /groups/name, /ptr, /units | str [G], int64 [G+1], int64 | unit sets (CSR), for <method>_groups |
| root attributes | JSON strings | config, versions, code_hash, checkpoint_hash, ... |

Attributes are JSON, parsed with ``json.loads``, never evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

__all__ = ["ResultsWriter", "StoreError", "code_hash", "file_hash", "read_hdf5", "versions"]


class StoreError(ValueError):
    """A results file that is unreadable, incomplete, or from another ensemble."""


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
    from . import __version__

    return {"ensattr_fast": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
            "numpy": np.__version__}


@contextlib.contextmanager
def read_hdf5(path: os.PathLike, what: str = "results file") -> Iterator[h5py.File]:
    """``with read_hdf5(path) as f:`` reads a results (or plan) file. A file that is missing,
    truncated or not HDF5, or that lacks a dataset or attribute the block reads, raises one
    :class:`StoreError` naming the file, not an OSError or a KeyError."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{what} {path} cannot be read ({error}); it is missing, truncated or not HDF5") from None
    try:
        with file:
            yield file
    except (KeyError, OSError, json.JSONDecodeError) as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise StoreError(f"{what} {path} is incomplete or damaged ({detail}); is it the file "
                         "`ensattr sample` wrote?") from None


def _replace(group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=data, **kwargs)


class ResultsWriter:
    """Writes one run's results file. Opening an existing file keeps what it holds."""

    def __init__(self, path: os.PathLike, mode: str = "a"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.path, mode, libver="latest")
        except OSError as error:
            raise StoreError(f"results file {self.path} cannot be opened: {error}") from None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def set_attrs(self, **attrs) -> None:
        """Root attributes, each stored as a JSON string."""
        for key, value in attrs.items():
            self.file.attrs[key] = json.dumps(value)

    def check_code(self, code: Tensor) -> None:
        """Refuse to mix results of two ensembles in one file."""
        stored = self.file.attrs.get("code_hash")
        if stored is not None and json.loads(stored) != code_hash(code):
            raise StoreError(
                f"{self.path} holds results of another ensemble (code hash {json.loads(stored)[:12]}, "
                f"this one {code_hash(code)[:12]}); write to a new file"
            )

    def write_code(self, code: Tensor, unit_of: Tensor, unit_names: Optional[Sequence[str]] = None) -> None:
        self.check_code(code)
        _replace(self.file, "code", code.numpy().astype(np.uint8))
        units = self.file.require_group("units")
        _replace(units, "of_example", unit_of.numpy().astype(np.int64))
        if unit_names is not None:
            _replace(units, "name", np.array(list(unit_names), dtype=object), dtype=h5py.string_dtype())
        self.set_attrs(code_hash=code_hash(code))

    def write_groups(self, names: Sequence[str], units: Sequence[Sequence[int]]) -> None:
        """Unit sets as CSR: ``/groups/name`` [G], ``/groups/ptr`` [G+1], ``/groups/units``."""
        group = self.file.require_group("groups")
        _replace(group, "name", np.array([str(n) for n in names], dtype=object), dtype=h5py.string_dtype())
        _replace(group, "ptr", np.cumsum([0] + [len(u) for u in units]).astype(np.int64))
        _replace(group, "units", np.concatenate([np.asarray(u, np.int64) for u in units]) if units else np.zeros(0, np.int64))

    def write_counterfactuals(self, units: Tensor, images: Tensor, distance: Tensor, **extra: Tensor) -> None:
        """``units`` [S, K], ``images`` [S, K, C, H, W], ``distance`` [S, K]; ``extra``: more
        [S, K] arrays to store beside them (for example predicted distances)."""
        group = self.file.require_group("counterfactuals")
        _replace(group, "units", units.numpy().astype(np.int64))
        _replace(group, "images", images.float().numpy())
        _replace(group, "distance", distance.float().numpy())
        for name, value in extra.items():
            _replace(group, name, value.float().numpy())


# ---------------------------------------------------------------------- streamed influence

_FILL = np.float32(np.nan)


def _create_early(group: h5py.Group, name: str, shape, chunks, dtype, fill) -> h5py.Dataset:
    """A chunked dataset whose chunks are all allocated (and filled) now, so that writing a
    block later changes no metadata: a writer killed mid-run leaves a consistent file."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(tuple(max(1, c) for c in chunks))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    space = h5py.h5s.create_simple(tuple(shape))
    h5type = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    return h5py.Dataset(h5py.h5d.create(group.id, name.encode(), h5type, space, dcpl=dcpl))


class InfluenceStream:
    """One influence matrix [rows, units] written block by block.

    ``/influence/<method>`` float32 [K, N] (NaN until written), chunked along both axes;
    ``/progress/<method>`` uint8 [row blocks, unit blocks], 1 once a block is on disk;
    ``/topk/<method>/index`` int64 and ``/score`` float32 [K, k], written when a row block is
    complete (``/progress/<method>_topk`` uint8 [row blocks]). A block's flag is set only after
    its data has been flushed, so a reader, or a resumed run, trusts exactly the flagged blocks.
    """

    def __init__(self, file: h5py.File, method: str, rows: int, units: int, block_rows: int,
                 block_units: int, k: int, spec: dict):
        self.method, self.rows, self.units, self.k = method, rows, units, k
        self.block_rows, self.block_units = block_rows, block_units
        self.n_row_blocks = max(1, -(-rows // block_rows))
        self.n_unit_blocks = max(1, -(-units // block_units))
        spec = dict(spec, method=method, rows=rows, units=units, block_rows=block_rows,
                    block_units=block_units, k=k)
        name = f"influence/{method}"
        if name in file:
            stored = json.loads(file[name].attrs["spec"])
            if stored != spec:
                raise StoreError(
                    f"{file.filename} already holds /{name} from another run ({_differences(stored, spec)}); "
                    "write to a new file or delete that dataset"
                )
        else:
            chunks = (min(rows, block_rows, 64), min(units, block_units, 8192))
            dataset = _create_early(file.require_group("influence"), method, (rows, units), chunks, "f4", _FILL)
            dataset.attrs["spec"] = json.dumps(spec)
            progress = file.require_group("progress")
            progress.create_dataset(method, data=np.zeros((self.n_row_blocks, self.n_unit_blocks), np.uint8))
            progress.create_dataset(method + "_topk", data=np.zeros(self.n_row_blocks, np.uint8))
            top = file.require_group(f"topk/{method}")
            top.create_dataset("index", data=np.full((rows, k), -1, np.int64))
            top.create_dataset("score", data=np.full((rows, k), np.nan, np.float32))
        self.data = file[name]
        self.done = file[f"progress/{method}"]
        self.topk_done = file[f"progress/{method}_topk"]
        self.top_index, self.top_score = file[f"topk/{method}/index"], file[f"topk/{method}/score"]
        self._done = self.done[()].astype(bool)

    def row_range(self, rb: int) -> range:
        return range(rb * self.block_rows, min(self.rows, (rb + 1) * self.block_rows))

    def unit_range(self, ub: int) -> range:
        return range(ub * self.block_units, min(self.units, (ub + 1) * self.block_units))

    def is_done(self, rb: int, ub: int) -> bool:
        return bool(self._done[rb, ub])

    def complete(self) -> bool:
        return bool(self._done.all()) and bool(self.topk_done[()].all())

    def write_block(self, rb: int, ub: int, scores: np.ndarray) -> None:
        r, u = self.row_range(rb), self.unit_range(ub)
        self.data[r.start : r.stop, u.start : u.stop] = scores
        self.data.flush()
        self.done[rb, ub] = 1
        self.done.flush()
        self._done[rb, ub] = True

    def write_topk(self, rb: int, values: np.ndarray, indices: np.ndarray) -> None:
        r = self.row_range(rb)
        self.top_score[r.start : r.stop] = values
        self.top_index[r.start : r.stop] = indices
        self.top_score.flush()
        self.top_index.flush()
        self.topk_done[rb] = 1
        self.topk_done.flush()


def _differences(stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys[:4])


def recover_after_kill(path: os.PathLike) -> bool:
    """Make a file left by a killed writer writable again; True if it had to.

    HDF5 marks a file open for writing in its superblock and refuses to open it again until
    the mark is cleared. Every block on disk is either flagged done or not, so the contents are
    sound: they are copied (object by object, inside HDF5, not through memory) into a fresh
    file that replaces the old one.
    """
    path = Path(path)
    try:
        h5py.File(path, "a", libver="latest").close()
        return False
    except OSError as error:
        if "already open for write" not in str(error):
            raise StoreError(f"results file {path} cannot be opened: {error}") from None
    tmp = path.with_name(path.name + ".recover")
    with h5py.File(path, "r", swmr=True) as source, h5py.File(tmp, "w", libver="latest") as target:
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for name in source:
            source.copy(source[name], target, name=name)
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------------ streamed samples


class SampleStream:
    """``/samples/images`` [S, ...] written chunk by chunk, ``/progress/samples`` uint8
    [chunks] flagging the chunks on disk, so that a long sampling killed midway resumes.

    Like the influence matrices: the dataset is allocated whole before the first write and the
    file is in SWMR mode while chunks are written, so a kill leaves a sound file whose flagged
    chunks are exactly the complete ones.
    """

    def __init__(self, path: os.PathLike, n: int, shape: Sequence[int], chunk: int, spec: dict):
        self.path, self.n, self.chunk = Path(path), n, max(1, chunk)
        self.n_chunks = -(-n // self.chunk)
        if self.path.exists():
            recover_after_kill(self.path)
        self.file = h5py.File(self.path, "a", libver="latest")
        try:
            if "progress/samples" in self.file:
                stored = json.loads(self.file["progress/samples"].attrs["spec"])
                if stored != spec:
                    raise StoreError(f"{self.path} holds samples of another run ({_differences(stored, spec)}); "
                                     "write to a new file or pass --overwrite")
            elif "samples/seed" not in self.file or "samples/images" in self.file:
                # the seeds are written first (sample_step): anything else is not a sampling run
                raise StoreError(f"{self.path} holds no interrupted sampling to resume; pass --overwrite "
                                 "to replace it, or write elsewhere")
            else:
                group = self.file.require_group("samples")
                _create_early(group, "images", (n, *shape), (min(n, self.chunk), *shape), "f4", _FILL)
                flags = self.file.require_group("progress").create_dataset("samples", data=np.zeros(self.n_chunks, np.uint8))
                flags.attrs["spec"] = json.dumps(spec)
            self.images, self.flags = self.file["samples/images"], self.file["progress/samples"]
            self.file.swmr_mode = True
        except BaseException:
            self.file.close()
            raise

    def pending(self) -> list:
        """The chunks not yet on disk, as ranges of sample indices."""
        done = self.flags[()]
        return [range(c * self.chunk, min(self.n, (c + 1) * self.chunk)) for c in range(self.n_chunks) if not done[c]]

    def write(self, rows: range, images: np.ndarray) -> None:
        self.images[rows.start : rows.stop] = images
        self.images.flush()
        self.flags[rows.start // self.chunk] = 1
        self.flags.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
