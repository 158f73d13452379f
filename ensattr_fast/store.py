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
| root attributes | JSON strings | config, versions, code_hash, checkpoint_hash, ... |

Attributes are JSON, parsed with ``json.loads``, never evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

__all__ = ["ResultsWriter", "StoreError", "code_hash", "file_hash", "versions"]


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

    def write_samples(self, images: Tensor, seeds: Sequence[int]) -> None:
        group = self.file.require_group("samples")
        _replace(group, "images", images.float().numpy())
        _replace(group, "seed", np.asarray(seeds, dtype=np.int64))

    def write_counterfactuals(self, units: Tensor, images: Tensor, distance: Tensor, **extra: Tensor) -> None:
        """``units`` [S, K], ``images`` [S, K, C, H, W], ``distance`` [S, K]; ``extra``: more
        [S, K] arrays to store beside them (for example predicted distances)."""
        group = self.file.require_group("counterfactuals")
        _replace(group, "units", units.numpy().astype(np.int64))
        _replace(group, "images", images.float().numpy())
        _replace(group, "distance", distance.float().numpy())
        for name, value in extra.items():
            _replace(group, name, value.float().numpy())
