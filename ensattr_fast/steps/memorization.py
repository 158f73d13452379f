"""``ensattr memorization``: the near-copies of training units that a generator draws, each
proven by an exact counterfactual (the same seed without the copied unit) against a phantom
floor (:mod:`ensattr_fast.evaluation.memorization`)."""

from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Sequence

import numpy as np

from ..checkpoint import Checkpoint
from ..data import load_data
from ..errors import CheckpointError, CodeError, DataError
from ..evaluation.memorization import Model, find_and_prove, parse_generator
from ..files import atomic_output, check_output, writing
from ..schedules import Sampler
from ..store import write_memorization

__all__ = ["memorization_step", "generator_option", "summary"]


def generator_option(text: str) -> str:
    """The ``--generator`` type: ``full``, ``member:M`` or ``members:a,b,c``, written back in
    its normal form (whether the members exist is the checkpoint's to say)."""
    try:
        return parse_generator(text).name
    except CodeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def memorization_step(checkpoint_path: os.PathLike, out: os.PathLike, generator: str = "full",
                      seeds: Sequence[int] = range(512), sampler: Sampler = Sampler(), threshold: float = 1.0,
                      generator_checkpoint: Optional[os.PathLike] = None, phantoms: int = 64, alpha: float = 0.05,
                      seed: int = 0, device: str = "cpu", max_trajectories: int = 4096,
                      overwrite: bool = False) -> Dict[str, np.ndarray]:
    """Sample ``seeds`` from ``generator`` (members of ``checkpoint_path``'s ensemble, or of
    ``generator_checkpoint``, a model on the same data and units), find near-copies (nearest
    training image within ``threshold``), prove each by exact ablation against ``phantoms``
    random sub-ensembles (false discovery rate ``alpha`` over the copies), and write the new
    file ``out`` (``/memorization``; replaced only with ``overwrite``). Returns its arrays."""
    spec = parse_generator(generator)
    inputs = {"--checkpoint": checkpoint_path, "--generator-checkpoint": generator_checkpoint}
    check_output(out, "--out", overwrite, inputs=inputs)
    if not seeds:
        raise DataError("--seeds names no seed: nothing to sample")
    checkpoint = Checkpoint.load(checkpoint_path)
    other = Checkpoint.load(generator_checkpoint) if generator_checkpoint is not None else checkpoint
    _check_same_data(checkpoint, other, generator_checkpoint)
    spec.weights(other.code.shape[1])  # refuses members the generator does not have, before any work
    data = load_data(checkpoint.data_source)
    if data.fingerprint() != checkpoint.data_fingerprint:
        raise DataError(f"the training data of {checkpoint_path} has changed since it was trained")
    ens = Model(checkpoint.build().to(device), checkpoint.code)
    gen = ens if other is checkpoint else Model(other.build().to(device), other.code)
    arrays = find_and_prove(ens, gen, spec, data, checkpoint.unit_of, checkpoint.schedule, sampler, list(seeds),
                            threshold, phantoms, alpha, seed, max_trajectories)
    described = dict(spec=spec.name, members=None if spec.members is None else list(spec.members),
                     checkpoint=str(generator_checkpoint or checkpoint_path))
    with writing(out, "memorization file"), atomic_output(out) as tmp:
        write_memorization(tmp, arrays, described, threshold=threshold, phantoms=phantoms, alpha=alpha, seed=seed,
                           sampler=dict(kind=sampler.kind, steps=sampler.steps, eta=sampler.eta,
                                        clip=list(sampler.clip) if sampler.clip else None),
                           ensemble=str(checkpoint_path), unit_names=[str(n) for n in checkpoint.unit_names])
    return arrays


def _check_same_data(checkpoint: Checkpoint, other: Checkpoint, where) -> None:
    """A generator checkpoint must share the ensemble's data, units and noise schedule."""
    if other is checkpoint:
        return
    if other.data_fingerprint != checkpoint.data_fingerprint:
        raise CheckpointError(f"--generator-checkpoint {where} was trained on other data than the ensemble")
    if len(other.code) != len(checkpoint.code) or not other.unit_of.equal(checkpoint.unit_of):
        raise CheckpointError(f"--generator-checkpoint {where} has {len(other.code)} units, the ensemble "
                              f"{len(checkpoint.code)}: both must be trained on the same units")
    if other.schedule != checkpoint.schedule:
        raise CheckpointError(f"--generator-checkpoint {where} was trained under another noise schedule")
    if other.spec["data_shape"] != checkpoint.spec["data_shape"]:
        raise CheckpointError(f"--generator-checkpoint {where} draws images of another shape")


def summary(arrays: Dict[str, np.ndarray], threshold: float) -> str:
    """The one line ``ensattr memorization`` prints."""
    S, copies, proven = len(arrays["seed"]), int(arrays["is_copy"].sum()), int(arrays["proven"].sum())
    moved = arrays["moved"][arrays["is_copy"] == 1]
    median = ""
    if np.isfinite(moved).any():
        median = f"; median move away from the copied unit {np.nanmedian(moved):.2f}"
    return (f"{copies} of {S} samples are near-copies (< {threshold:g}) of a training unit; {proven} proven by "
            f"exact ablation (the counterfactual leaves the unit, beyond the phantom floor){median}")
