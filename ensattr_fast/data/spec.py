"""What a plan stores to reload its data (a small JSON spec), the built-in data sets, and the
partition of a data set into units."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..codes import Units
from ..codes.duplicates import Duplicates, check_embeddings, find_duplicates
from ..errors import DataError
from .dataset import Dataset
from .loaders import load_arrays, load_digits, load_hdf5, load_image_folder, read_unit_metadata

#: the data sets known by name (``--data digits``); tests and plugins may add their own
DATASETS = {"digits": load_digits}

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


def load_data(dataset: Union[str, Mapping[str, Any]]) -> Dataset:
    """A data set by built-in name (``digits``) or by the spec a plan stores (a dict, see
    :func:`load_dataset` and :func:`data_spec`)."""
    if isinstance(dataset, Mapping):
        return load_dataset(dataset)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; built in: {', '.join(DATASETS)}, or give a path")
    return DATASETS[dataset]()


def data_spec(source: str, resolution: int = 32, channels: int = 3, fit: str = "crop", key: str = "images",
              memory_budget: int = 2 << 30, scale: bool = True, metadata: Optional[str] = None):
    """What a plan stores for ``--data SOURCE``: a built-in name as it is; a folder of images,
    an ``.npy``/``.npz`` array file or an HDF5 file as the spec of its kind, paths absolute."""
    if source in DATASETS and metadata is None:
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"--data {source}: not a built-in data set ({', '.join(DATASETS)}) and no such file or folder")
    where = str(path.resolve())
    if path.is_dir():
        spec = dict(kind="folder", path=where, resolution=resolution, channels=channels, fit=fit)
    elif path.suffix in (".npy", ".npz"):
        spec = dict(kind="arrays", path=where, key=key, scale=scale)
    elif path.suffix in (".h5", ".hdf5"):
        spec = dict(kind="hdf5", path=where, dataset=key, memory_budget=memory_budget, scale=scale)
    else:
        raise DataError(f"--data {source}: give a folder of images, an .npy/.npz file or an .h5/.hdf5 file")
    if metadata is not None:
        spec["metadata"] = str(Path(metadata).resolve())
    return spec


#: the kinds of units; ``clusters:K`` stands for any K >= 2 (``clusters:8``)
UNIT_KINDS = ("example", "class", "group", "clusters:K")


def units_for(data: Dataset, kind: str, seed: int = 0) -> Units:
    """``example``: one unit per image (named by its file where there is one); ``class``: one
    unit per label; ``group``: one unit per group (the folder of each image, or metadata);
    ``clusters:K``: K content clusters of the images, by k-means on pixels seeded with ``seed``
    (for data without labels or metadata; see :func:`~ensattr_fast.codes.kmeans`)."""
    if kind == "example":
        if data.example_names is not None:
            return Units(torch.arange(len(data)), tuple(data.example_names))
        return Units.per_example(len(data))
    if kind == "class":
        if data.labels is None:
            raise DataError(f"{data.name} has no labels to group into class units")
        return Units.from_labels(data.labels)
    if kind == "group":
        if data.groups is None:
            raise DataError(f"{data.name} has no groups: put the images in one folder per group, or "
                            "give --metadata (a CSV or JSON mapping each example to its group)")
        return Units.from_labels(data.groups)
    k = cluster_count(kind)
    if k is None:
        raise DataError(f"unit kind must be one of {UNIT_KINDS}, got {kind!r}")
    return Units.from_clusters(_pixels(data), k, seed)


def cluster_count(kind: str) -> Optional[int]:
    """K of a ``clusters:K`` unit kind (K >= 2), None for any other kind."""
    name, colon, count = str(kind).partition(":")
    if name != "clusters" or not colon:
        return None
    try:
        k = int(count.strip(), 10)
    except ValueError:
        raise DataError(f"unit kind clusters:K needs an integer K >= 2, got {kind!r}") from None
    if k < 2:
        raise DataError(f"unit kind clusters:K needs K >= 2 clusters, got {kind!r}")
    return k


def _pixels(data: Dataset) -> torch.Tensor:
    """Every image flattened, float64 [n, D], read block by block. The points themselves are
    whole in memory (n x D x 8 bytes): k-means on data past memory would need mini-batches."""
    return torch.cat([block.flatten(1).to(torch.float64) for block in data.blocks()])


def duplicates_in(data: Dataset, radius: float, embeddings: Optional[os.PathLike] = None) -> Duplicates:
    """Exact and near duplicate sets among the training images: pixel L2 within ``radius``, or
    L2 between the rows of ``embeddings`` (an .npy file [n, k], one row per image) where given
    (:func:`~ensattr_fast.codes.duplicates.find_duplicates`). Pixels are held as float32, n x D
    x 4 bytes."""
    if embeddings is None:
        points = torch.cat([block.flatten(1) for block in data.blocks()])
        return find_duplicates(points, radius)
    try:
        array = np.load(embeddings, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"--embeddings {embeddings}: not a readable .npy array ({e})") from None
    return find_duplicates(check_embeddings(array, len(data)), radius, space="embeddings")

