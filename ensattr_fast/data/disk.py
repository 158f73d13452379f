"""Images in an HDF5 file read on demand: :class:`DiskImages`, with a memory-mapped fast path
for rows stored whole. With the store, the only module of the package that opens HDF5 files."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .layout import _as_index, _check_dtype, _logical_shape, _nchw_layout, _to_float_nchw

PathLike = Union[str, "os.PathLike[str]"]

#: bytes of float32 read per block when data on disk is checked or fingerprinted
CHUNK_BYTES = 64 << 20
#: a read of rows from disk takes the whole slab between the first and the last row when the slab
#: is at most twice the rows asked for or at most this many bytes (else it reads the rows alone)
SLAB_BYTES = 8 << 20


class DiskImages:
    """An HDF5 dataset [n, C, H, W] read on demand (never loaded whole).

    ``[n, H, W]`` and channels-last ``[n, H, W, C]`` datasets are accepted with the same rule as
    :func:`load_arrays` and read as [k, C, H, W]. uint8 values are scaled to [-1, 1] (unless
    ``scale=False``); any other values are returned as float32 as they are. The file is opened
    lazily, once per process, and every read holds a lock, so one object may be shared by
    threads (a background prefetcher) and survives a fork (the child reopens the file).
    """

    def __init__(self, path: PathLike, dataset: str = "images", scale: bool = True):
        self.path = Path(path)
        self.dataset = dataset
        self.scale = bool(scale)
        self._lock = threading.RLock()
        self._file = None
        self._pid: Optional[int] = None
        self._summary: Optional[Tuple[Optional[int], float]] = None
        self._map = None  # (file bytes, byte offset of each row, bytes per row), or False
        self._map_pid: Optional[int] = None
        what = f"{self.path}:{dataset}"
        with self._lock:
            ds = self._dataset()
            raw_shape, stored = tuple(int(s) for s in ds.shape), np.dtype(ds.dtype)
        self.layout = _nchw_layout(raw_shape, what)
        self.raw_shape = raw_shape  # as stored: [n, H, W], [n, C, H, W] or [n, H, W, C]
        _check_dtype(stored, self.scale, what)
        self.stored_dtype = stored
        self.shape: Tuple[int, int, int, int] = _logical_shape(raw_shape, self.layout)

    # -- file handling
    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            if not self.path.is_file():
                raise DataError(f"no HDF5 file at {self.path}")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise DataError(f"{self.path} is not a readable HDF5 file ({e})") from None
            self._pid = os.getpid()
        if self.dataset not in self._file or not isinstance(self._file[self.dataset], h5py.Dataset):
            names: List[str] = []
            self._file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            raise DataError(f"{self.path} has no dataset '{self.dataset}' (datasets: {', '.join(names) or 'none'})")
        return self._file[self.dataset]

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.close()
            self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"], state["_lock"] = None, None, None
        state["_map"], state["_map_pid"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"DiskImages({str(self.path)!r}, dataset={self.dataset!r}, shape={list(self.shape)}, scale={self.scale})"

    # -- tensor-like
    @property
    def dtype(self) -> torch.dtype:
        """What :meth:`read` returns: torch.float32 (``stored_dtype`` is the dtype on disk)."""
        return torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes of the whole data set as float32."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, selection) -> np.ndarray:
        with self._lock:
            raw = self._dataset()[selection]
        return _to_float_nchw(raw, self.layout, self.scale)

    def _byte_map(self):
        """(the file's bytes, the byte offset of each row, bytes per row) when every row lies
        whole and unfiltered in the file (a contiguous dataset, or chunks of whole rows without
        compression), else None. Rows are then gathered straight from the mapped file: h5py's
        reads of scattered rows cost ~30 ns per byte more, and hold the GIL while they run."""
        if self._map_pid == os.getpid():
            return self._map or None
        self._map, self._map_pid = False, os.getpid()
        with self._lock:
            ds = self._dataset()
            dcpl = ds.id.get_create_plist()
            n, row_bytes = len(ds), int(ds.dtype.itemsize * np.prod(ds.shape[1:], dtype=np.int64))
            offsets = None
            if dcpl.get_nfilters() == 0 and dcpl.get_external_count() == 0 and n and row_bytes:
                if dcpl.get_layout() == h5py.h5d.CONTIGUOUS and ds.id.get_offset() is not None:
                    offsets = ds.id.get_offset() + np.arange(n, dtype=np.int64) * row_bytes
                elif dcpl.get_layout() == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
                    per_chunk = ds.chunks[0]
                    starts = np.full(-(-n // per_chunk), -1, dtype=np.int64)
                    for i in range(ds.id.get_num_chunks()):
                        info = ds.id.get_chunk_info(i)
                        starts[info.chunk_offset[0] // per_chunk] = info.byte_offset
                    if (starts >= 0).all():  # every chunk written (else some rows are fill values)
                        rows = np.arange(n, dtype=np.int64)
                        offsets = starts[rows // per_chunk] + (rows % per_chunk) * row_bytes
            if offsets is not None:
                self._map = (np.memmap(self.path, dtype=np.uint8, mode="r"), offsets, row_bytes, np.dtype(ds.dtype))
        return self._map or None

    def read(self, index: Union[Tensor, Sequence[int], np.ndarray]) -> Tensor:
        """float32 [k, C, H, W] of the rows ``index`` (int [k], any order, repeats allowed).

        Reads each distinct row once, in increasing order (h5py needs increasing indices), as
        one contiguous slab when the rows are dense enough, then reorders and repeats."""
        idx = _as_index(index, len(self), str(self.path))
        if len(idx) == 0:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.float32)
        unique, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        row_bytes = max(1, self.nbytes // max(1, len(self)))
        mapped = self._byte_map()
        if mapped is not None:
            data, offsets, size, stored = mapped
            raw = data[offsets[unique][:, None] + np.arange(size)].view(stored)
            rows = _to_float_nchw(raw.reshape(len(unique), *self.raw_shape[1:]), self.layout, self.scale)
        elif (hi - lo) <= 2 * len(unique) or (hi - lo) * row_bytes <= SLAB_BYTES:
            rows = self._rows(slice(lo, hi))[unique - lo]
        else:
            rows = self._rows(unique)
        out = rows if len(unique) == len(idx) and np.all(inverse == np.arange(len(idx))) else rows[inverse.reshape(-1)]
        return torch.from_numpy(np.ascontiguousarray(out))

    def read_all(self) -> np.ndarray:
        """The whole dataset as stored (for data small enough to load)."""
        with self._lock:
            return self._dataset()[()]

    def read_labels(self, name: str) -> Optional[np.ndarray]:
        """The dataset ``name`` of the same file (integer labels, embedding conditions), or None
        when it has none."""
        with self._lock:
            handle = self._dataset().file
            return handle[name][()] if name in handle else None

    def chunks(self, rows: int) -> Iterator[Tensor]:
        """Consecutive blocks of at most ``rows`` images, float32 [<=rows, C, H, W], in order."""
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        for start in range(0, len(self), rows):
            yield torch.from_numpy(self._rows(slice(start, min(start + rows, len(self)))))

    def chunk_rows(self) -> int:
        """Rows per block so that a block holds about CHUNK_BYTES of float32."""
        row_bytes = max(1, self.nbytes // max(1, len(self)))
        return max(1, CHUNK_BYTES // row_bytes)

    def summary(self) -> Tuple[Optional[int], float]:
        """(index of the first image with NaN or Inf or None, largest finite |x|), computed once
        by one pass over the file, block by block."""
        if self._summary is None:
            first_bad: Optional[int] = None
            max_abs = 0.0
            start = 0
            for block in self.chunks(self.chunk_rows()):
                finite = torch.isfinite(block)
                if first_bad is None and not finite.all():
                    first_bad = start + int((~finite).flatten(1).any(1).nonzero()[0].item())
                if block.numel():
                    max_abs = max(max_abs, float(block.abs().masked_fill(~finite, 0).max()))
                start += len(block)
            self._summary = (first_bad, max_abs)
        return self._summary


def read_hdf5_array(path: os.PathLike, name: str) -> Optional[np.ndarray]:
    """The whole dataset ``name`` of the HDF5 file ``path``, or None where it has none."""
    try:
        with h5py.File(path, "r") as f:
            return f[name][()] if name in f else None
    except OSError as error:
        raise DataError(f"{path} is not a readable HDF5 file ({error})") from None
