"""Writing results and plan files (:class:`ResultsWriter`), and the statistics a run keeps in
them for its resumes (:func:`cached_statistic`). The layout these files follow is the contract
in docs/results-format.md; attributes are JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import DiskError
from ..runtime.files import fault_line, system_fault, writing
from .hdf5 import abandon, check_code, code_hash, dump_json, finish, parse_json, read_hdf5
from .recovery import open_for_appending

__all__ = ["ResultsWriter", "cached_statistic", "complete"]


def cached_statistic(path: os.PathLike, name: str, compute) -> Tensor:
    """``/statistics/<name>`` of ``path``: read when a run before this one stored it whole
    (its ``complete`` mark), else computed by ``compute()`` and stored as float32, so that a
    resumed run scores the very numbers an uninterrupted one does. A statistic a fault left
    half written (no mark) is computed again, never reused."""
    with read_hdf5(path) as f:
        kept = f.get(f"statistics/{name}")
        if kept is not None and complete(kept):
            return torch.from_numpy(kept[()])
    value = compute().float().numpy()
    with ResultsWriter(path, "a") as writer:
        writer.write_statistic(name, value)
    return torch.from_numpy(value)


def complete(obj) -> bool:
    """Whether a dataset or group was written whole: the mark set after its data was flushed
    (files from before the marks hold only whole ones)."""
    mark = obj.attrs.get(_COMPLETE)
    if mark is None:
        return _UNMARKED_BEFORE not in obj.file.attrs
    return parse_json(mark) is True


#: the attribute a dataset or group gets once it is on disk whole (written last, after a flush)
_COMPLETE = "complete"
#: a root attribute: this file marks what it writes whole, so an unmarked object is half written
_UNMARKED_BEFORE = "marks_complete"


def _replace(group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=data, **kwargs)


class ResultsWriter:
    """Writes one run's results file. Opening an existing file (``a``) keeps what it holds; a
    new file (``w``) is written under a temporary name and takes its name whole when the writer
    closes without an error (readers of an old file of that name keep reading it), so a fault
    never leaves a half-made file."""

    def __init__(self, path: os.PathLike, mode: str = "a"):
        self.path = Path(path)
        self._tmp: Optional[Path] = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writing(self.path, "results file"))
        try:
            if mode == "w":
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
                os.close(fd)
                self._tmp = Path(tmp)
                self.file = h5py.File(self._tmp, "w", libver="latest")
                self.file.attrs[_UNMARKED_BEFORE] = json.dumps(True)
            else:
                self.file = open_for_appending(self.path)
        except OSError as error:
            self._discard()
            raise DiskError(f"results file {self.path} cannot be opened: {fault_line(error)}") from None
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        self._discard(given_up=system_fault(error))
        if isinstance(error, (OSError, RuntimeError)):  # HDF5 could not write: a full disk, a held file
            raise DiskError(f"results file {self.path} could not be written: {fault_line(error, self.path)}") from None

    def close(self) -> None:
        """Close the file (and give a new file its name); a fault is one :class:`StoreError`."""
        try:
            if self.file.id.valid:
                finish(self.file)
            if self._tmp is not None:
                with open(self._tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self._tmp, self.path)
                self._tmp = None
        except (OSError, RuntimeError) as error:
            self._discard(given_up=system_fault(error))
            raise DiskError(f"results file {self.path} could not be written: {fault_line(error, self.path)}") from None
        self._lock.close()

    def _discard(self, given_up: bool = False) -> None:
        """After an error: close what is open (or, where the system refused a write, give the file
        up unclosed: see :func:`~ensattr_fast.store.hdf5.abandon`), remove a new file's
        temporary, release the lock."""
        file = getattr(self, "file", None)
        if file is not None and file.id.valid:
            if given_up:
                abandon(file)
            else:
                with contextlib.suppress(Exception):
                    file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._lock.close()

    def _mark(self, obj) -> None:
        """Flush, then mark ``obj`` whole: the mark is on disk only after its data."""
        self.file.flush()
        obj.attrs[_COMPLETE] = json.dumps(True)
        self.file.flush()

    def set_attrs(self, **attrs) -> None:
        """Root attributes, each stored as a JSON string."""
        for key, value in attrs.items():
            self.file.attrs[key] = dump_json(value)

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

    def write_seeds(self, seeds: Sequence[int], labels: Optional[Tensor] = None,
                    conditions: Optional[Tensor] = None) -> None:
        """``/samples/seed`` int64 [S]: the seed that replays each sample; ``/samples/label``
        int64 [S], conditional members: its label (-1: none), or its condition index (text
        conditions), which every replay keeps; ``/samples/condition`` float32 [S, L, D],
        text-conditioned members: the embedding each sample was drawn under."""
        group = self.file.require_group("samples")
        group.create_dataset("seed", data=np.asarray(seeds, np.int64))
        if labels is not None:
            group.create_dataset("label", data=np.asarray(labels, np.int64))
        if conditions is not None:
            group.create_dataset("condition", data=conditions.numpy().astype(np.float32))

    def write_statistic(self, name: str, value: np.ndarray) -> None:
        """``/statistics/<name>``: what a method's scores were computed from, kept for resumes;
        marked complete once on disk (a half-written one is replaced)."""
        group = self.file.require_group("statistics")
        if name in group:
            del group[name]
        self._mark(group.create_dataset(name, data=value))

    def write_statistic_blocks(self, name: str, shape: Sequence[int], blocks) -> None:
        """``/statistics/<name>`` float32 ``shape`` [A, n, ...], written block by block from
        ``blocks`` ((first index along n, array [A, b, ...]) pairs: never whole in memory),
        marked complete once every block is on disk."""
        group = self.file.require_group("statistics")
        if name in group:
            del group[name]
        target = group.create_dataset(name, tuple(shape), np.float32)
        for start, block in blocks:
            target[:, start:start + block.shape[1]] = np.asarray(block, np.float32)
        self._mark(target)

    def write_group(self, name: str, arrays: dict, attrs: dict) -> None:
        """``/<name>`` (e.g. ``certificate``, ``significance/first_order``, ``audit``): numpy
        arrays stored as they are, and root-level JSON attributes of the group; replaces an
        earlier group of that name whole (written aside, marked complete, then moved in its
        place), so a fault leaves the earlier group or none, never a part."""
        aside = f"{name}.new"
        if aside in self.file:  # left by a run a fault stopped
            del self.file[aside]
        group = self.file.create_group(aside)
        for key, value in arrays.items():
            group.create_dataset(key, data=value)
        for key, value in attrs.items():
            group.attrs[key] = dump_json(value)
        self._mark(group)
        if name in self.file:
            del self.file[name]
        self.file.move(aside, name)

    def write_groups(self, names: Sequence[str], units: Sequence[Sequence[int]]) -> None:
        """Unit sets as CSR: ``/groups/name`` [G], ``/groups/ptr`` [G+1], ``/groups/units``."""
        group = self.file.require_group("groups")
        _replace(group, "name", np.array([str(n) for n in names], dtype=object), dtype=h5py.string_dtype())
        _replace(group, "ptr", np.cumsum([0] + [len(u) for u in units]).astype(np.int64))
        _replace(group, "units",
                 np.concatenate([np.asarray(u, np.int64) for u in units]) if units else np.zeros(0, np.int64))

    def write_counterfactuals(self, units: Tensor, images: Tensor, distance: Tensor, written_by: str = "ablate",
                              floor: Optional[dict] = None, request: Optional[dict] = None, **extra: Tensor) -> None:
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
            fresh.attrs["floor"] = dump_json(floor.pop("attrs"))
            for name, value in floor.items():
                fresh.create_dataset(name, data=value)
        fresh.attrs["written_by"] = json.dumps(written_by)
        if request is not None:
            fresh.attrs["request"] = dump_json(request, sort_keys=True)
        self._mark(fresh)
        if "counterfactuals" in self.file:
            del self.file["counterfactuals"]
        self.file.move("counterfactuals.new", "counterfactuals")
