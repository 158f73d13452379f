"""What the steps of one audit share: its files, and what has been read from them, each once.

A command used to load its checkpoint in every step it called (``attribute`` loaded it, then
its exact check loaded it again, and hashed it a third time); a :class:`Session` loads and
hashes it in one read (:meth:`Checkpoint.load`), builds the ensemble once per device, loads the
training data once, and keeps the samples it read, until a step writes new ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from ..data import Dataset, load_data
from ..diffusion.schedules import Sampler
from ..errors import StoreError
from ..members import Ensemble
from ..store import check_results, read_conditions, read_hdf5, read_labels, read_plan, read_sampler, read_samples
from ..training.checkpoint import Checkpoint

__all__ = ["Session", "data_files"]


def data_files(source) -> Dict[str, str]:
    """The files a data spec reads (the images and the metadata), by what they are."""
    if not isinstance(source, dict):
        return {}
    return {name: source[key] for name, key in (("the training data", "path"), ("the data's metadata", "metadata"))
            if source.get(key)}


def _path(path: Optional[os.PathLike]) -> Optional[Path]:
    return None if path is None else Path(path)


class Session:
    """The plan, checkpoint and results files of an audit (any may be None where no step
    needs it) and what has been read from them."""

    def __init__(self, plan: Optional[os.PathLike] = None, checkpoint: Optional[os.PathLike] = None,
                 results: Optional[os.PathLike] = None):
        self.plan_path, self.checkpoint_path, self.results_path = _path(plan), _path(checkpoint), _path(results)
        self._checkpoint: Optional[Checkpoint] = None
        self._ensembles: Dict[str, Ensemble] = {}
        self._data: Optional[Dataset] = None
        self._samples: Optional[Tuple[int, List[int], Tensor, bool]] = None  # (start, seeds, images, to the end)
        self._sampler: Optional[Sampler] = None
        self._results_checked = False

    def _need(self, path: Optional[Path], what: str) -> Path:
        if path is None:
            raise StoreError(f"this step needs {what}, and none was given")
        return path

    @property
    def plan(self) -> Path:
        return self._need(self.plan_path, "a plan file")

    @property
    def results(self) -> Path:
        return self._need(self.results_path, "a results file")

    def check_results(self, hash_required: bool = True) -> Path:
        """The results file, its contents checked against themselves (code against its hash,
        units, samples; :func:`~ensattr_fast.store.check_results`) the first time."""
        if not self._results_checked:
            with read_hdf5(self.results) as f:
                check_results(f, hash_required=hash_required)
            self._results_checked = True
        return self.results

    @property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint, loaded (CRC-checked and hashed in the same read) the first time."""
        if self._checkpoint is None:
            self._checkpoint = Checkpoint.load(self._need(self.checkpoint_path, "a checkpoint"))
        return self._checkpoint

    def forget_checkpoint(self) -> None:
        """After a step wrote the checkpoint anew (training)."""
        self._checkpoint, self._ensembles, self._data = None, {}, None

    def ensemble(self, device: str = "cpu") -> Ensemble:
        """The trained ensemble (EMA weights where there are some) on ``device``, built once.
        Steps that move or shard members (sampling, ablation) get their own copy."""
        if device not in self._ensembles:
            ensemble = self.checkpoint.build().to(device)
            if ensemble.condition_shape is not None and self.results_path is not None and self.results_path.is_file():
                conditions = read_conditions(self.results_path)  # text conditions: what the samples were drawn under
                if conditions is not None:
                    ensemble.set_conditions(samples=conditions)
            self._ensembles[device] = ensemble
        return self._ensembles[device]

    def data(self) -> Dataset:
        """The training data the checkpoint was trained on, loaded once."""
        if self._data is None:
            self._data = load_data(self.checkpoint.data_source)
        return self._data

    def sampler(self) -> Sampler:
        """The sampler the samples were drawn with (every replay of them uses it)."""
        if self._sampler is None:
            self._sampler = read_sampler(self.results)
        return self._sampler

    def samples(self, stop: Optional[int] = None, start: int = 0) -> Tuple[List[int], Tensor]:
        """(seeds, images [S, C, H, W]) of samples ``start:stop``, read once: a later call for
        rows inside those read is answered from memory. The results file must belong to the
        checkpoint's ensemble."""
        if self._samples is not None:
            first, seeds, images, to_the_end = self._samples
            last = first + len(seeds)
            if first <= start and ((stop is not None and stop <= last) or to_the_end):
                end = len(seeds) if stop is None else min(stop - first, len(seeds))
                return seeds[start - first : end], images[start - first : end]
        seeds, images = read_samples(self.check_results(), stop, start, code=self.checkpoint.code,
                                     against=str(self.checkpoint_path))
        self._samples = (start, seeds, images, stop is None or len(seeds) < stop - start)
        return seeds, images

    def labels(self, stop: Optional[int] = None, start: int = 0) -> Optional[Tensor]:
        """The labels [S] of samples ``start:stop`` (class-conditional members), which every
        replay of them keeps; None where the samples have none."""
        return read_labels(self.check_results(), stop, start)

    def inputs(self, reading: Tuple[str, ...] = ("plan", "checkpoint", "results"),
               **extra: Optional[os.PathLike]) -> Dict[str, Path]:
        """Every file this session's steps read, by what it is: the plan, checkpoint and results
        files (those of them in ``reading``), the training data and metadata that the checkpoint
        (or else the plan) records, and ``extra`` (the references, another generator, a groups
        file ...). No output may be one of them (:func:`~ensattr_fast.runtime.files.check_output`),
        whatever ``--overwrite`` says."""
        files = {"plan": self.plan_path, "checkpoint": self.checkpoint_path, "results": self.results_path}
        found = {f"--{name}": path for name, path in files.items() if name in reading}
        found.update({name.replace("_", "-") if name.startswith("--") else name: value
                      for name, value in extra.items()})
        source = None
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            source = self.checkpoint.data_source
        elif self.plan_path is not None and self.plan_path.is_file():
            source = read_plan(self.plan_path)[0]
        found.update(data_files(source))
        return {name: Path(path) for name, path in found.items() if path is not None}

    def forget_samples(self) -> None:
        """After a step wrote new samples."""
        self._samples, self._sampler, self._results_checked = None, None, False
