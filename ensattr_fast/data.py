"""Training data: the embedded 8x8 digits, users' own images (folders, arrays, HDF5), and
checks on any image tensor.

Every loader returns a :class:`Dataset` of images float32 [n, C, H, W] in data scale [-1, 1]
(or, for latents loaded with ``scale=False``, whatever values they hold). Data sets too large
for memory stay on disk as :class:`DiskImages` and are read on demand with
:meth:`Dataset.read`. What a plan stores to reload the data is a small JSON spec, read back by
:func:`load_dataset`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "DataError", "DiskImages", "check_images", "load_arrays", "load_dataset",
           "load_digits", "load_hdf5", "load_image_folder", "read_unit_metadata", "DATASET_KINDS"]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: values of a floating array taken as images in [-1, 1] may not exceed this in absolute value
RANGE_LIMIT = 1.5
#: bytes of float32 read per block when data on disk is checked or fingerprinted
CHUNK_BYTES = 64 << 20
#: a read of rows from disk takes the whole slab between the first and the last row when the slab
#: is at most twice the rows asked for or at most this many bytes (else it reads the rows alone)
SLAB_BYTES = 8 << 20


class DataError(ValueError):
    """Training or query images that cannot be used."""


# ------------------------------------------------------------------------------ layouts, scaling


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


# ------------------------------------------------------------------------------------ DiskImages


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
        import h5py

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
        import h5py

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


# ------------------------------------------------------------------------------------- Dataset


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images float32 [n, C, H, W] in data scale [-1, 1] (a tensor, or :class:`DiskImages` read
    on demand), optional integer labels [n], the group of each example (artist, person, folder)
    and a name for each example (a path relative to the folder root, or its index)."""

    images: Union[Tensor, DiskImages]
    labels: Optional[Tensor] = None
    name: str = "images"
    groups: Optional[Tuple[str, ...]] = None
    example_names: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        check_images(self.images, self.name)
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        for field in ("groups", "example_names"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, (str, bytes)):
                raise DataError(f"{self.name}: {field} must be a sequence of strings, one per image")
            value = tuple(str(v) for v in value)
            if len(value) != n:
                raise DataError(f"{self.name}: {len(value)} {field.replace('_', ' ')} for {n} images")
            object.__setattr__(self, field, value)
        if self.example_names is not None and len(set(self.example_names)) != n:
            seen: set = set()
            dup = next(e for e in self.example_names if e in seen or seen.add(e))
            raise DataError(f"{self.name}: example name '{dup}' appears twice")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, Tensor)

    @property
    def data_shape(self) -> Tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def read(self, index: Union[Tensor, Sequence[int], np.ndarray]) -> Tensor:
        """float32 [k, C, H, W] of the images ``index`` (int [k], any order, repeats allowed),
        from memory or from disk."""
        if self.in_memory:
            idx = torch.from_numpy(_as_index(index, len(self), self.name))
            return self.images[idx].to(torch.float32)
        return self.images.read(index)

    def blocks(self, rows: int = 4096) -> Iterator[Tensor]:
        """Every image in order, ``rows`` at a time (float32 [<=rows, C, H, W]): a pass over
        the data that never holds data on disk whole."""
        if not self.in_memory:
            yield from self.images.chunks(rows)
            return
        for start in range(0, len(self), rows):
            yield self.images[start : start + rows].to(torch.float32)

    def pixel_distances(self, queries: Tensor) -> Tensor:
        """L2 distances [Q, n] of flattened ``queries`` [Q, C, H, W] to every image."""
        q = queries.flatten(1).float()
        return torch.cat([torch.cdist(q, block.flatten(1)) for block in self.blocks()], 1)

    def fingerprint(self) -> str:
        """SHA-256 of the images: ties checkpoints and results to the data they came from.
        Data on disk is hashed block by block and gives the same digest as the same values in
        memory."""
        if self.in_memory:
            array = np.ascontiguousarray(self.images.numpy())
            return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
        digest = hashlib.sha256()
        for block in self.images.chunks(self.images.chunk_rows()):
            digest.update(np.ascontiguousarray(block.numpy()).tobytes())
        digest.update(str(tuple(int(s) for s in self.images.shape)).encode())
        return digest.hexdigest()


def check_images(images: Union[Tensor, DiskImages], what: str = "images", shape: Optional[Sequence[int]] = None,
                 allow_empty: bool = False) -> None:
    """Raise :class:`DataError` for anything but a non-empty finite float tensor [n, C, H, W],
    of images of ``shape`` [C, H, W] when given (empty only with ``allow_empty``). Images on
    disk (:class:`DiskImages`) are checked block by block, once."""
    disk = isinstance(images, DiskImages)
    if not disk and (not isinstance(images, Tensor) or images.dim() != 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{what} must be a tensor [n, C, H, W], got {got}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{what} have shape [C, H, W] = {list(images.shape[1:])}, expected "
                        f"{list(shape)}: images of another data set or model")
    if len(images) == 0 and not allow_empty:
        raise DataError(f"{what} is empty")
    if disk:
        first, _ = images.summary()
        if first is not None:
            raise DataError(f"{what} holds NaN or Inf values (first in image {first})")
        return
    if not images.is_floating_point():
        raise DataError(f"{what} must be floating point, got {images.dtype}")
    bad = ~torch.isfinite(images)
    if bad.any():
        first = bad.flatten(1).any(1).nonzero()[0].item()
        raise DataError(f"{what} holds NaN or Inf values (first in image {first})")


# ------------------------------------------------------------------------------------- loaders


def load_digits() -> Dataset:
    """The 1,797 UCI handwritten digits of 8x8 pixels shipped with the package, scaled from
    0..16 to [-1, 1], with their labels 0..9. See ``ensattr_fast/data/README.md``."""
    with resources.files("ensattr_fast").joinpath("data/digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    pixels = torch.from_numpy(images.astype(np.float32))[:, None] / 8.0 - 1.0
    return Dataset(pixels, torch.from_numpy(labels.astype(np.int64)), name="digits")


def load_image_folder(root: PathLike, resolution: int, channels: int = 3, fit: str = "crop") -> Dataset:
    """PNG and JPEG images of any size under ``root`` (recursively, sorted by relative path;
    hidden files skipped) as [n, channels, resolution, resolution] in [-1, 1].

    ``fit="crop"`` resizes the short side to ``resolution`` then crops the centre;
    ``fit="resize"`` resizes to resolution x resolution (changing the aspect ratio).
    ``channels`` is 3 (RGB) or 1 (grayscale). When the images sit in subfolders of ``root``,
    the first path component is each image's group (``root/vangogh/1.png`` -> ``vangogh``);
    images directly in ``root`` have no groups (the two may not be mixed). ``example_names``
    are the paths relative to ``root``."""
    root_path = Path(root)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if fit not in ("crop", "resize"):
        raise DataError(f"fit must be 'crop' or 'resize', got {fit!r}")
    if not root_path.is_dir():
        raise DataError(f"no image folder at {root_path}")
    relative: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(IMAGE_SUFFIXES):
                relative.append((Path(dirpath) / filename).relative_to(root_path).as_posix())
    relative.sort()
    if not relative:
        raise DataError(f"no images (.png, .jpg, .jpeg) found under {root_path}")
    nested = ["/" in r for r in relative]
    if any(nested) and not all(nested):
        flat = relative[nested.index(False)]
        raise DataError(f"{root_path} mixes images directly in the folder ({flat}) with images in "
                        f"group subfolders: put every image in a group folder, or none")
    groups = tuple(r.split("/", 1)[0] for r in relative) if all(nested) else None

    from PIL import Image, ImageOps

    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(relative), channels, resolution, resolution), dtype=np.uint8)
    for i, rel in enumerate(relative):
        try:
            with Image.open(root_path / rel) as opened:
                opened.load()
                picture = ImageOps.exif_transpose(opened).convert(mode)
        except Exception as e:  # PIL raises many kinds for damaged files
            raise DataError(f"cannot read image {rel} under {root_path}: {e}") from None
        picture = _fit(picture, resolution, fit, Image)
        pixels = np.asarray(picture, dtype=np.uint8)
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    tensor = torch.from_numpy(_to_float_nchw(images, "nchw", scale=True))
    return Dataset(tensor, name=root_path.name or "images", groups=groups, example_names=tuple(relative))


def _fit(picture, resolution: int, fit: str, Image):
    w, h = picture.size
    if (w, h) == (resolution, resolution):
        return picture
    resample = Image.Resampling.BICUBIC
    if fit == "resize":
        return picture.resize((resolution, resolution), resample, reducing_gap=3.0)
    ratio = resolution / min(w, h)
    nw, nh = max(resolution, round(w * ratio)), max(resolution, round(h * ratio))
    if (nw, nh) != (w, h):
        picture = picture.resize((nw, nh), resample, reducing_gap=3.0)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return picture.crop((left, top, left + resolution, top + resolution))


def _labels_from(array: Optional[np.ndarray], n: int, what: str) -> Optional[Tensor]:
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)):
        raise DataError(f"{what} must be integers [n], got {array.dtype} of shape {list(array.shape)}")
    if len(array) != n:
        raise DataError(f"{what}: {len(array)} labels for {n} images")
    return torch.from_numpy(array.astype(np.int64))


def _images_from_array(array: np.ndarray, scale: bool, what: str) -> Tensor:
    layout = _nchw_layout(array.shape, what)
    _check_dtype(array.dtype, scale, what)
    images = torch.from_numpy(_to_float_nchw(array, layout, scale))
    if scale and np.issubdtype(array.dtype, np.floating):
        _check_range(images, what)
    return images


def load_arrays(path: PathLike, key: str = "images", labels_key: str = "labels", scale: bool = True) -> Dataset:
    """Images from a ``.npy`` file (the images) or a ``.npz`` archive (``key``, and the integer
    labels ``labels_key`` when present).

    Accepted layouts: [n, H, W] (grayscale), [n, C, H, W], and channels-last [n, H, W, C] with
    C in (1, 3, 4) when dim 1 is not 1, 3 or 4. With ``scale=True`` uint8 is mapped to
    [-1, 1] (x / 127.5 - 1) and floating arrays must already be in [-1, 1] (values beyond
    |x| > 1.5 are refused). With ``scale=False`` the values are taken as they are, without any
    range check: use it for latents (e.g. [n, 4, 8, 8] VAE latents). ``example_names`` are the
    indices as strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no array file at {path}")
    what = str(path)
    labels = None
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path} is not a readable .npy or .npz file ({e})") from None
    if isinstance(loaded, np.ndarray):
        array = loaded
    else:
        with loaded:
            if key not in loaded.files:
                raise DataError(f"{path} has no array '{key}' (arrays: {', '.join(loaded.files) or 'none'})")
            array = loaded[key]
            what = f"{path}:{key}"
            if labels_key and labels_key in loaded.files:
                labels = loaded[labels_key]
            elif labels_key and labels_key != "labels":
                raise DataError(f"{path} has no labels array '{labels_key}' (arrays: {', '.join(loaded.files)})")
    images = _images_from_array(array, scale, what)
    n = len(images)
    return Dataset(images, _labels_from(labels, n, f"{path}:{labels_key}"), name=path.stem,
                   example_names=_default_names(n))


def load_hdf5(path: PathLike, dataset: str = "images", labels: Optional[str] = "labels",
              memory_budget: int = 2 << 30, scale: bool = True) -> Dataset:
    """Images from the HDF5 dataset ``dataset`` (layouts and scaling as :func:`load_arrays`),
    with the integer labels of dataset ``labels`` when present.

    Loaded into memory when the images take at most ``memory_budget`` bytes as float32;
    otherwise ``images`` is a :class:`DiskImages` read on demand, checked for NaN and Inf block
    by block here. ``scale=False`` takes the values as they are (latents)."""
    path = Path(path)
    disk = DiskImages(path, dataset, scale=scale)  # checks file, dataset, layout and dtype
    what = f"{path}:{dataset}"
    label_array = None
    if labels:
        with disk._lock:
            handle = disk._dataset().file
            if labels in handle:
                label_array = handle[labels][()]
            elif labels != "labels":
                raise DataError(f"{path} has no labels dataset '{labels}'")
    n = len(disk)
    label_tensor = _labels_from(label_array, n, f"{path}:{labels}")
    if disk.nbytes <= memory_budget:
        with disk._lock:
            raw = disk._dataset()[()]
        disk.close()
        images = _images_from_array(raw, scale, what)
        return Dataset(images, label_tensor, name=path.stem, example_names=_default_names(n))
    if n and scale and np.issubdtype(disk.stored_dtype, np.floating):
        first_bad, max_abs = disk.summary()
        if max_abs > RANGE_LIMIT:
            raise _range_error(what, max_abs)
    return Dataset(disk, label_tensor, name=path.stem, example_names=_default_names(n))


# ------------------------------------------------------------------------------------ metadata


def read_unit_metadata(path: PathLike, data: Dataset) -> Tuple[str, ...]:
    """The group of each example of ``data`` from a CSV or JSON file.

    CSV: a header with columns ``example`` and ``group``; ``example`` is an example name
    (``data.example_names``, e.g. ``vangogh/1.png``) or an integer index. JSON: an object
    ``{example: group}`` (same keys) or a list of groups, one per example in order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no metadata file at {path}")
    names = data.example_names if data.example_names is not None else _default_names(len(data))
    by_name = {name: i for i, name in enumerate(names)}
    n = len(data)
    groups: List[Optional[str]] = [None] * n
    pairs: List[Tuple[str, Any]] = []
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
            if isinstance(content, list):
                if len(content) != n:
                    raise DataError(f"{path} lists {len(content)} groups for the {n} examples of {data.name}")
                pairs = [(names[i], g) for i, g in enumerate(content)]
            elif isinstance(content, dict):
                pairs = list(content.items())
            else:
                raise DataError(f"{path} must hold an object {{example: group}} or a list of groups")
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = [c.strip() for c in (reader.fieldnames or [])]
                if "example" not in fields or "group" not in fields:
                    raise DataError(f"{path} needs a header with columns 'example' and 'group', got {fields}")
                reader.fieldnames = fields
                pairs = [((row.get("example") or "").strip(), row.get("group")) for row in reader]
        else:
            raise DataError(f"{path}: metadata must be a .csv or .json file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"cannot read metadata {path}: {e}") from None

    unknown: List[str] = []
    for example, group in pairs:
        example = str(example)
        index = by_name.get(example)
        if index is None:
            try:
                candidate = int(example)
            except ValueError:
                candidate = -1
            index = candidate if 0 <= candidate < n and str(candidate) == example.strip() else None
        if index is None:
            unknown.append(example)
            continue
        if isinstance(group, (dict, list)) or group is None:
            continue
        group = str(group).strip()
        if not group:
            continue
        if groups[index] is not None and groups[index] != group:
            raise DataError(f"{path} gives example {names[index]} two groups: {groups[index]} and {group}")
        groups[index] = group
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DataError(f"{path} names {len(unknown)} examples not in {data.name}: {shown}")
    missing = [i for i, g in enumerate(groups) if g is None]
    if missing:
        raise DataError(f"{path} gives no group for example {names[missing[0]]} "
                        f"({len(missing)} of {n} examples without a group)")
    return tuple(groups)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- specs


#: the keys each kind of spec takes: (required, optional with defaults)
DATASET_KINDS: Dict[str, Tuple[Tuple[str, ...], Dict[str, Any]]] = {
    "digits": ((), {}),
    "folder": (("path", "resolution"), {"channels": 3, "fit": "crop"}),
    "arrays": (("path",), {"key": "images", "labels_key": "labels", "scale": True}),
    "hdf5": (("path",), {"dataset": "images", "labels": "labels", "memory_budget": 2 << 30, "scale": True}),
}


def load_dataset(spec: Mapping[str, Any]) -> Dataset:
    """The data set a plan describes with a JSON spec:

    ``{"kind": "digits"}``, ``{"kind": "folder", "path", "resolution", "channels", "fit"}``,
    ``{"kind": "arrays", "path", "key", "scale"}`` or ``{"kind": "hdf5", "path", "dataset",
    "memory_budget", "scale"}`` (missing optional keys take the loaders' defaults), plus an
    optional ``"metadata"``: a CSV or JSON file giving the group of each example. Relative
    paths are used as given (relative to the working directory)."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise DataError(f"a data spec must be an object with a 'kind' ({', '.join(DATASET_KINDS)}), got {spec!r}")
    kind = spec["kind"]
    if kind not in DATASET_KINDS:
        raise DataError(f"unknown data kind {kind!r}: one of {', '.join(DATASET_KINDS)}")
    required, optional = DATASET_KINDS[kind]
    allowed = {"kind", "metadata", *required, *optional}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise DataError(f"data spec of kind {kind!r} has unknown keys {extra} (allowed: {sorted(allowed)})")
    missing = [k for k in required if spec.get(k) is None]
    if missing:
        raise DataError(f"data spec of kind {kind!r} needs {missing}")
    args = {**optional, **{k: spec[k] for k in (*required, *optional) if k in spec}}
    if kind == "digits":
        data = load_digits()
    elif kind == "folder":
        data = load_image_folder(args["path"], args["resolution"], args["channels"], args["fit"])
    elif kind == "arrays":
        data = load_arrays(args["path"], args["key"], args["labels_key"], scale=args["scale"])
    else:
        data = load_hdf5(args["path"], args["dataset"], args["labels"], int(args["memory_budget"]), scale=args["scale"])
    if spec.get("metadata"):
        data = dataclasses.replace(data, groups=read_unit_metadata(spec["metadata"], data))
    return data
