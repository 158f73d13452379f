"""Reading a results file lazily, also while it is being written.

>>> results = open_results("demo/results.h5")
>>> results.code.shape                      # (N, M), read on access
>>> scores = results.influence("loss")      # a lazy [K, N] view; nothing read yet
>>> row = scores[3]                         # one row: NaN where a block is not written yet
>>> index, score = results.topk("first_order")
>>> results.counterfactuals["distance"][:5]

Files written by a running ``ensattr attribute`` are opened in SWMR mode: each access refreshes
the datasets and shows only blocks whose done flag is set.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import h5py
import numpy as np

from ..errors import StoreError
from .hdf5 import check_code, open_for_reading, parse_json
from .recovery import unreadable

__all__ = ["open_results", "Results", "InfluenceView"]

_WRITTEN_BY = {"code": "ensattr plan or sample", "units": "ensattr plan or sample",
               "counterfactuals": "ensattr ablate or attribute", "topk": "ensattr attribute",
               "statistics": "ensattr attribute"}


def open_results(path: os.PathLike) -> "Results":
    """Open a results file for reading without loading it.

    A file that a writer holds open (a running ``ensattr attribute``) is opened in SWMR mode.
    Only then: an SWMR reader does not check a file's length, and on a truncated file it
    retries its reads for ever.
    """
    try:
        file = open_for_reading(path)
    except OSError as error:
        raise unreadable(path, error) from None
    return Results(file)


class InfluenceView:
    """A lazy [K, N] influence matrix: index it like an array; unwritten blocks read as NaN."""

    def __init__(self, file: h5py.File, method: str):
        self._data = file[f"influence/{method}"]
        self._done = file[f"progress/{method}"]
        self.spec = parse_json(self._data.attrs["spec"])
        self.shape: Tuple[int, int] = self._data.shape

    def _refresh(self) -> None:
        if self._data.file.swmr_mode:
            self._done.refresh()
            self._data.refresh()

    @property
    def done(self) -> np.ndarray:
        """Done flags per block [row blocks, unit blocks]."""
        self._refresh()
        return self._done[()].astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def __getitem__(self, index) -> np.ndarray:
        self._refresh()
        done = self._done[()].astype(bool)
        values = np.asarray(self._data[index])
        if done.all():
            return values
        # mask what is not flagged done: read the block mask at full resolution for the slice
        rows = np.arange(self.shape[0])[index[0] if isinstance(index, tuple) else index]
        cols = np.arange(self.shape[1])[index[1] if isinstance(index, tuple) and len(index) > 1 else slice(None)]
        mask = done[np.atleast_1d(rows)[:, None] // self.spec["block_rows"],
                    np.atleast_1d(cols)[None, :] // self.spec["block_units"]]
        return np.where(mask.reshape(values.shape), values, np.nan)

    def __array__(self, dtype=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


class Results:
    """Lazy views of one results file (the layout: docs/results-format.md)."""

    def __init__(self, file: h5py.File):
        self.file = file

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (``with open_results(path) as r:`` does)."""
        self.file.close()

    @property
    def attrs(self) -> Dict[str, object]:
        """Root attributes, parsed as JSON."""
        return {k: parse_json(v) for k, v in self.file.attrs.items()}

    def _get(self, name: str):
        """``/name``, or a StoreError saying which step writes it."""
        if name not in self.file:
            step = next((s for prefix, s in _WRITTEN_BY.items() if name.startswith(prefix)), "ensattr sample")
            raise StoreError(f"results file {self.file.filename} has no /{name} (written by `{step}`)")
        return self.file[name]

    @property
    def code(self) -> h5py.Dataset:
        """``/code`` uint8 [N, M]: 1 where member m trained on unit u."""
        return self._get("code")

    @property
    def unit_of(self) -> h5py.Dataset:
        """``/units/of_example`` int64 [n_examples]: the unit of each training example."""
        return self._get("units/of_example")

    @property
    def unit_names(self):
        """The name of each unit (a class, a group, a file), or None."""
        names = self.file["units/name"] if "units/name" in self.file else None
        return None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names[()]]

    @property
    def samples(self) -> h5py.Dataset:
        """``/samples/images`` float32 [S, C, H, W]: the full-ensemble samples."""
        return self._get("samples/images")

    @property
    def seeds(self) -> h5py.Dataset:
        """``/samples/seed`` int64 [S]: the seed that replays each sample."""
        return self._get("samples/seed")

    @property
    def counterfactuals(self) -> h5py.Group:
        """``/counterfactuals``: the exact counterfactuals and their floor."""
        return self._get("counterfactuals")

    def check_code(self, code, against: str) -> None:
        """Refuse this file when it holds results of another ensemble than ``code`` (that of
        the checkpoint ``against``)."""
        check_code(self.file, code, against, required=True)

    @property
    def has_counterfactuals(self) -> bool:
        """Whether an ablation, exact check or audit wrote counterfactuals."""
        return "counterfactuals" in self.file

    def counterfactual_arrays(self, rows: Optional[int] = None, images: bool = True) -> Dict[str, np.ndarray]:
        """The arrays under /counterfactuals for the first ``rows`` samples: ``units``,
        ``distance``, ``predicted_<method>`` and, with ``images``, ``images``."""
        group = self.counterfactuals
        arrays = {name: group[name][:rows] for name in group if images or name != "images"}
        _check_units(arrays.get("units"), self._n_units(), f"{self.file.filename}: /counterfactuals/units")
        return arrays

    def _n_units(self) -> Optional[int]:
        """N, from the code where the file holds one (a file of scores alone may not)."""
        code = self.file.get("code")
        return None if code is None else len(code)

    @property
    def methods(self):
        """The names of the influence matrices in the file."""
        return sorted(self.file["influence"]) if "influence" in self.file else []

    def influence(self, method: str) -> InfluenceView:
        """``/influence/<method>`` [K, N], lazily: blocks not yet written read as NaN."""
        if f"influence/{method}" not in self.file:
            raise StoreError(f"{self.file.filename} has no influence matrix {method!r} (has: {self.methods})")
        return InfluenceView(self.file, method)

    def statistic(self, name: str) -> np.ndarray:
        """``/statistics/<name>``: what a method's scores were computed from (``gram_exact``
        [K, M, M], ``losses`` [K, M], ...)."""
        return self._get(f"statistics/{name}")[()]

    def significance(self, method: str) -> Optional[Dict[str, np.ndarray]]:
        """The noise floor of a method's rows and the significance of its top units, or None:
        ``floor`` [K, P] (the scores of P phantom rows), ``pvalue``, ``zscore``, ``qvalue``,
        ``significant`` [K, k] aligned with :meth:`topk`, ``n_significant`` [K]; ``meta``."""
        if f"significance/{method}" not in self.file:
            return None
        group = self.file[f"significance/{method}"]
        return {name: group[name][()] for name in group} | {"meta": parse_json(group.attrs["floor"])}

    def topk(self, method: str) -> Tuple[h5py.Dataset, h5py.Dataset]:
        """(unit index [K, k], score [K, k]) of the highest-scoring units per row."""
        group = self._get(f"topk/{method}")
        _check_units(group["index"][()], self._n_units(), f"{self.file.filename}: /topk/{method}/index")
        return group["index"], group["score"]

    def certificate(self) -> Optional[Dict[str, np.ndarray]]:
        """The arrays under /certificate (``radius``, ``bound``, ``floor_p95``, ``checked``, [S])
        and its parsed ``certificate`` attribute under ``meta``; None for a file without one."""
        if "certificate" not in self.file:
            return None
        group = self.file["certificate"]
        out = {name: group[name][()] for name in group if isinstance(group[name], h5py.Dataset)}
        out["meta"] = parse_json(group.attrs.get("certificate", "{}"))
        return out


def _check_units(units: Optional[np.ndarray], n_units: Optional[int], where: str) -> None:
    """Unit indices a reader will look up: each in [0, n_units), or -1 (none). Raw data carries
    no checksum in HDF5, so a damaged file shows here, as one error, not as an index error later
    (unchecked where the file holds no code to count the units)."""
    if n_units is not None and units is not None and units.size and (units.min() < -1 or units.max() >= n_units):
        raise StoreError(f"{where} names units outside [0, {n_units}): the file is damaged; restore it from a copy")
