"""Loaders: the embedded 8x8 digits, folders of images, array files, HDF5 files, and the
group of each example from a metadata file.

Every loader returns a :class:`~ensattr_fast.data.Dataset` of images float32 [n, C, H, W] in
data scale [-1, 1] (or, for latents loaded with ``scale=False``, whatever values they hold).
Data sets too large for memory stay on disk as :class:`~ensattr_fast.data.DiskImages`.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .dataset import Dataset
from .conditions import conditions_from
from .disk import DiskImages
from .layout import RANGE_LIMIT, _check_dtype, _check_range, _default_names, _nchw_layout, _range_error, _to_float_nchw

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    """Images from a ``.npy`` file (the images) or a ``.npz`` archive (``key``, the integer
    labels ``labels_key`` when present, and the embedding conditions ``conditions`` [n, L, D] of
    text-conditioned members when present).

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
    labels = conditions = None
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
            if "conditions" in loaded.files:
                conditions = loaded["conditions"]
    images = _images_from_array(array, scale, what)
    n = len(images)
    return Dataset(images, _labels_from(labels, n, f"{path}:{labels_key}"), name=path.stem,
                   example_names=_default_names(n), conditions=conditions_from(conditions, n, f"{path}:conditions"))


def load_hdf5(path: PathLike, dataset: str = "images", labels: Optional[str] = "labels",
              memory_budget: int = 2 << 30, scale: bool = True) -> Dataset:
    """Images from the HDF5 dataset ``dataset`` (layouts and scaling as :func:`load_arrays`),
    with the integer labels of dataset ``labels`` and the embedding conditions of dataset
    ``conditions`` [n, L, D] when present (held in memory).

    Loaded into memory when the images take at most ``memory_budget`` bytes as float32;
    otherwise ``images`` is a :class:`DiskImages` read on demand, checked for NaN and Inf block
    by block here. ``scale=False`` takes the values as they are (latents)."""
    path = Path(path)
    disk = DiskImages(path, dataset, scale=scale)  # checks file, dataset, layout and dtype
    what = f"{path}:{dataset}"
    label_array = None
    if labels:
        label_array = disk.read_labels(labels)
        if label_array is None and labels != "labels":
            raise DataError(f"{path} has no labels dataset '{labels}'")
    n = len(disk)
    label_tensor = _labels_from(label_array, n, f"{path}:{labels}")
    conditions = conditions_from(disk.read_labels("conditions"), n, f"{path}:conditions")
    if disk.nbytes <= memory_budget:
        raw = disk.read_all()
        disk.close()
        images = _images_from_array(raw, scale, what)
        return Dataset(images, label_tensor, name=path.stem, example_names=_default_names(n), conditions=conditions)
    if n and scale and np.issubdtype(disk.stored_dtype, np.floating):
        first_bad, max_abs = disk.summary()
        if max_abs > RANGE_LIMIT:
            raise _range_error(what, max_abs)
    return Dataset(disk, label_tensor, name=path.stem, example_names=_default_names(n), conditions=conditions)


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

