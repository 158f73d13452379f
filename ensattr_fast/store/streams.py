"""Datasets written block by block with a done flag per block, so that a killed writer leaves
a sound file that a resumed run, or a reader, trusts exactly where flagged: the influence
matrices (:class:`InfluenceStream`) and the samples (:class:`SampleStream`), and the recovery
of a file whose writer was killed (:mod:`.recovery`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError
from ..runtime.files import writing
from .hdf5 import parse_json
from .recovery import open_for_appending

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
            stored = parse_json(file[name].attrs["spec"])
            if stored != canonical(spec):
                raise StoreError(
                    f"{file.filename} already holds /{name} from another run ({_differences(stored, spec)}); "
                    "write to a new file or delete that dataset"
                )
        else:
            chunks = (min(rows, block_rows, 64), min(units, block_units, 8192))
            dataset = _create_early(file.require_group("influence"), method, (rows, units), chunks, "f4", _FILL)
            dataset.attrs["spec"] = json.dumps(canonical(spec))
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


@contextlib.contextmanager
def influence_streams(path: os.PathLike, matrices: Dict[str, Tuple[int, dict]], units: int, block_rows: int,
                      block_units: int, k: int) -> Iterator[Dict[str, InfluenceStream]]:
    """``with influence_streams(path, {name: (rows, spec)}, ...) as streams:`` the influence
    matrices [rows, units] of ``path`` to write block by block (each created, or resumed where
    its flags say), under the file's write lock; readers may open the file (SWMR) meanwhile."""
    with writing(path, "results file"), open_for_appending(path) as f:
        streams = {name: InfluenceStream(f, name, rows, units, block_rows, block_units, k, spec)
                   for name, (rows, spec) in matrices.items()}
        f.swmr_mode = True  # readers may open the file from now on
        yield streams


def write_scores(path: os.PathLike, name: str, scores: Tensor, k: int = 10, block_rows: int = 64,
                  block_units: int = 16384, spec: Optional[dict] = None) -> InfluenceStream:
    """Write a matrix computed elsewhere (gradient methods: [K, N]) as ``/influence/<name>``
    and ``/topk/<name>``, in the blocks and with the done flags of every other method."""
    with writing(path, "results file"), open_for_appending(path) as f:
        stream = InfluenceStream(f, name, len(scores), scores.shape[1], block_rows, block_units, k,
                                 dict(spec or {}, kind="precomputed"))
        f.swmr_mode = True
        for rb in range(stream.n_row_blocks):
            rows = stream.row_range(rb)
            block = scores[rows.start : rows.stop].float()
            for ub in range(stream.n_unit_blocks):
                if not stream.is_done(rb, ub):
                    units = stream.unit_range(ub)
                    stream.write_block(rb, ub, block[:, units.start : units.stop].numpy())
            if not stream.topk_done[rb]:
                top = block.nan_to_num(nan=-float("inf")).topk(min(k, block.shape[1]), dim=1)
                values = top.values.numpy().copy()
                indices = top.indices.numpy().copy()
                empty = ~torch.isfinite(top.values).numpy()
                values[empty], indices[empty] = np.nan, -1
                pad = k - values.shape[1]
                if pad > 0:  # fewer units than k
                    values = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan)
                    indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
                stream.write_topk(rb, values, indices)
    return stream


def canonical(spec: dict) -> dict:
    """A spec as JSON stores it (tuples as lists, keys in order): what two specs are compared as."""
    return json.loads(json.dumps(spec, sort_keys=True))


def _differences(stored: dict, wanted: dict) -> str:
    wanted = canonical(wanted)
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys[:4])


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
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writing(self.path, "results file"))
        try:
            self.file = open_for_appending(self.path)
        except BaseException:
            self._lock.close()
            raise
        try:
            if "progress/samples" in self.file:
                stored = parse_json(self.file["progress/samples"].attrs["spec"])
                if stored != canonical(spec):
                    raise StoreError(f"{self.path} holds samples of another run ({_differences(stored, spec)}); "
                                     "write to a new file or pass --overwrite")
            elif "samples/seed" not in self.file or "samples/images" in self.file:
                # the seeds are written first (steps.sample): anything else is not a sampling run
                raise StoreError(f"{self.path} holds no interrupted sampling to resume; pass --overwrite "
                                 "to replace it, or write elsewhere")
            else:
                group = self.file.require_group("samples")
                _create_early(group, "images", (n, *shape), (min(n, self.chunk), *shape), "f4", _FILL)
                flags = self.file.require_group("progress").create_dataset("samples",
                                                                           data=np.zeros(self.n_chunks, np.uint8))
                flags.attrs["spec"] = json.dumps(canonical(spec))
            self.images, self.flags = self.file["samples/images"], self.file["progress/samples"]
            self.file.swmr_mode = True
        except BaseException:
            self.close()
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
        self._lock.close()
