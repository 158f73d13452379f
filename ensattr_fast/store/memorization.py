"""``/memorization``: the near-copies a generator draws of training units, each with the exact
counterfactual that proves it (``ensattr memorization``)."""

from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..errors import StoreError
from .hdf5 import parse_json, read_hdf5, versions
from .writer import ResultsWriter

__all__ = ["write_memorization", "read_memorization", "MEMORIZATION_ARRAYS"]

#: the arrays of ``/memorization``, each with its leading dimension S (samples)
MEMORIZATION_ARRAYS = ("seed", "images", "nearest_unit", "nearest_distance", "is_copy", "copied_units",
                       "proof_images", "proof_distance", "moved", "shift", "floor", "pvalue", "pvalue_floor",
                       "pvalue_trend", "qvalue", "proven", "reason", "false_flag", "null_units")


def write_memorization(path: os.PathLike, arrays: Dict[str, np.ndarray], generator: dict, **attrs) -> None:
    """A new file ``path`` holding ``/memorization``: ``seed`` int64 [S], ``images`` float32
    [S, C, H, W], ``nearest_unit`` int64 [S], ``nearest_distance`` [S], ``is_copy`` uint8 [S],
    ``copied_units`` int64 [S, K] (every unit within the threshold, -1 padded), ``proof_images``
    [S, C, H, W] (NaN where no counterfactual), ``proof_distance`` [S], ``moved`` [S], ``shift``
    [S], ``floor`` [S, P], ``pvalue`` [S] (of the chosen statistic), ``pvalue_floor`` and
    ``pvalue_trend`` [S], ``qvalue`` [S], ``proven`` uint8 [S], ``reason`` uint8 [S] (an index into
    the group's ``reasons`` attribute), ``false_flag`` uint8 [S] (the null check's), ``null_units``
    int64 [S] (the unit each non-copy was tested against, -1 where none), and where the samples
    were drawn under labels (class-conditional members) ``label`` int64 [S], under embeddings
    (text-conditioned members) their condition indices ``label`` and the embeddings
    ``condition`` float32 [S, L, D];
    the group's attributes ``generator`` and ``attrs`` as JSON. Callers write it aside and move
    it in place (:func:`ensattr_fast.runtime.files.atomic_output`)."""
    missing = [name for name in MEMORIZATION_ARRAYS if name not in arrays]
    if missing:
        raise StoreError(f"memorization arrays missing: {missing}")
    with ResultsWriter(path, "w") as writer:
        kept = [*MEMORIZATION_ARRAYS, *(name for name in ("label", "condition") if name in arrays)]
        writer.write_group("memorization", {k: np.asarray(arrays[k]) for k in kept},
                           dict(generator=generator, **attrs))
        writer.set_attrs(versions=versions())


def read_memorization(path: os.PathLike) -> Dict[str, object]:
    """Every array of ``/memorization`` (numpy) and its attributes, decoded, under ``attrs``."""
    with read_hdf5(path, "memorization file") as f:
        group = f["memorization"]
        out: Dict[str, object] = {name: group[name][()] for name in group}
        out["attrs"] = {key: parse_json(value) for key, value in group.attrs.items()}
    return out
