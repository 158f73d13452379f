"""Writing results and plan files (:class:`ResultsWriter`), and the statistics a run keeps in
them for its resumes (:func:`cached_statistic`). The layout these files follow is the contract
in docs/results-format.md; attributes are JSON."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError
from ..runtime.files import writing
from .hdf5 import check_code, code_hash, open_for_reading
from .recovery import open_for_appending

__all__ = ["ResultsWriter", "cached_statistic"]


def cached_statistic(path: os.PathLike, name: str, compute) -> Tensor:
    """``/statistics/<name>`` of ``path``: read when a run before this one stored it, else
    computed by ``compute()`` and stored as float32, so that a resumed run scores the very
    numbers an uninterrupted one does."""
    with open_for_reading(path) as f:
        if f"statistics/{name}" in f:
            return torch.from_numpy(f[f"statistics/{name}"][()])
    value = compute().float().numpy()
    with ResultsWriter(path, "a") as writer:
        writer.write_statistic(name, value)
    return torch.from_numpy(value)


def _replace(group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=data, **kwargs)


class ResultsWriter:
    """Writes one run's results file. Opening an existing file keeps what it holds."""

    def __init__(self, path: os.PathLike, mode: str = "a"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writing(self.path, "results file"))
        try:
            if mode == "w" and self.path.exists():
                self.path.unlink()  # readers of the old file keep reading it; a new file takes the name
            self.file = open_for_appending(self.path) if mode == "a" else h5py.File(self.path, mode, libver="latest")
        except OSError as error:
            self._lock.close()
            raise StoreError(f"results file {self.path} cannot be opened: {error}") from None
        except BaseException:
            self._lock.close()
            raise

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self._lock.close()

    def set_attrs(self, **attrs) -> None:
        """Root attributes, each stored as a JSON string."""
        for key, value in attrs.items():
            self.file.attrs[key] = json.dumps(value)

    def check_code(self, code: Tensor) -> None:
        """Refuse to mix results of two ensembles in one file."""
        check_code(self.file, code)

    def write_code(self, code: Tensor, unit_of: Tensor, unit_names: Optional[Sequence[str]] = None) -> None:
        self.check_code(code)
        _replace(self.file, "code", code.numpy().astype(np.uint8))
        units = self.file.require_group("units")
        _replace(units, "of_example", unit_of.numpy().astype(np.int64))
        if unit_names is not None:
            _replace(units, "name", np.array(list(unit_names), dtype=object), dtype=h5py.string_dtype())
        self.set_attrs(code_hash=code_hash(code))

    def write_seeds(self, seeds: Sequence[int]) -> None:
        """``/samples/seed`` int64 [S]: the seed that replays each sample."""
        self.file.require_group("samples").create_dataset("seed", data=np.asarray(seeds, np.int64))

    def write_statistic(self, name: str, value: np.ndarray) -> None:
        """``/statistics/<name>``: what a method's scores were computed from, kept for resumes."""
        self.file.require_group("statistics").create_dataset(name, data=value)

    def write_group(self, name: str, arrays: dict, attrs: dict) -> None:
        """``/<name>`` (e.g. ``certificate``, ``significance/first_order``, ``audit``): numpy
        arrays stored as they are, and root-level JSON attributes of the group; replaces an
        earlier group of that name whole."""
        if name in self.file:
            del self.file[name]
        group = self.file.create_group(name)
        for key, value in arrays.items():
            group.create_dataset(key, data=value)
        for key, value in attrs.items():
            group.attrs[key] = json.dumps(value)

    def write_groups(self, names: Sequence[str], units: Sequence[Sequence[int]]) -> None:
        """Unit sets as CSR: ``/groups/name`` [G], ``/groups/ptr`` [G+1], ``/groups/units``."""
        group = self.file.require_group("groups")
        _replace(group, "name", np.array([str(n) for n in names], dtype=object), dtype=h5py.string_dtype())
        _replace(group, "ptr", np.cumsum([0] + [len(u) for u in units]).astype(np.int64))
        _replace(group, "units",
                 np.concatenate([np.asarray(u, np.int64) for u in units]) if units else np.zeros(0, np.int64))

    def write_counterfactuals(self, units: Tensor, images: Tensor, distance: Tensor, written_by: str = "ablate",
                              floor: Optional[dict] = None, **extra: Tensor) -> None:
        """``units`` [S, K], ``images`` [S, K, C, H, W], ``distance`` [S, K]; ``extra``: more
        [S, K] arrays to store beside them (for example predicted distances); ``floor``: the
        noise floor and significance, numpy arrays stored as they are (``floor_distance``
        [S, P], ``floor_code`` [P, M], ``pvalue``, ``zscore``, ``qvalue``, ``significant``
        [S, K]) and ``attrs`` (the group's ``floor`` attribute). The group replaces any earlier
        one as a whole (written aside, then moved in its place), so no array of an earlier run
        survives beside these."""
        if "counterfactuals.new" in self.file:  # left by a run killed before the move
            del self.file["counterfactuals.new"]
        fresh = self.file.create_group("counterfactuals.new")
        fresh.create_dataset("units", data=units.numpy().astype(np.int64))
        fresh.create_dataset("images", data=images.float().numpy())
        fresh.create_dataset("distance", data=distance.float().numpy())
        for name, value in extra.items():
            fresh.create_dataset(name, data=value.float().numpy())
        if floor is not None:
            floor = dict(floor)
            fresh.attrs["floor"] = json.dumps(floor.pop("attrs"))
            for name, value in floor.items():
                fresh.create_dataset(name, data=value)
        fresh.attrs["written_by"] = json.dumps(written_by)
        if "counterfactuals" in self.file:
            del self.file["counterfactuals"]
        self.file.move("counterfactuals.new", "counterfactuals")
