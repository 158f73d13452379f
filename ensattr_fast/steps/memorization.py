"""``memorization``: the near-copies of training units that a generator draws, each
proven by an exact counterfactual (the same seed without the copied unit) against a phantom
floor (:mod:`ensattr_fast.evaluation.memorization`)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ..errors import CheckpointError, DataError
from ..evaluation.memorization import REASONS, CopyTest, Model, find_and_prove, parse_generator
from ..runtime.files import atomic_output, check_output, check_space, writing
from ..store import write_memorization
from ..training.checkpoint import Checkpoint
from .options import MemorizationOptions
from .sample import seed_conditions
from .session import Session

__all__ = ["Copies", "memorization", "summary"]


@dataclasses.dataclass
class Copies:
    """What ``memorization`` found: the arrays of ``/memorization`` (one row per seed: the
    sample, its nearest training unit and distance, ``is_copy``, the proof's counterfactual,
    distance, ``moved``, p- and q-value, ``proven``; see docs/results-format.md)."""

    arrays: Dict[str, np.ndarray]
    threshold: float

    @property
    def copies(self) -> int:
        """How many samples are near-copies of a training unit."""
        return int(self.arrays["is_copy"].sum())

    @property
    def proven(self) -> int:
        """How many copies an exact counterfactual proves."""
        return int(self.arrays["proven"].sum())

    def summary(self) -> str:
        """The one line ``ensattr memorization`` prints."""
        return summary(self.arrays, self.threshold)


def memorization(session: Session, out: os.PathLike, options: MemorizationOptions = MemorizationOptions(),
                 max_trajectories: int = 4096) -> Copies:
    """Sample ``options.seeds`` from ``options.generator`` (members of the session's ensemble,
    or of ``generator_checkpoint``, a model on the same data and units), find near-copies
    (nearest training image within ``threshold``), prove each by exact ablation against the
    floor's phantoms (random sub-ensembles; false discovery rate ``floor.alpha`` over the
    copies), and write the new file ``out`` (``/memorization``; replaced only with
    ``overwrite``)."""
    spec = parse_generator(options.generator)
    inputs = session.inputs(**{"--generator-checkpoint": options.generator_checkpoint})
    check_output(out, "--out", options.overwrite, inputs=inputs)
    if not options.seeds:
        raise DataError("--seeds names no seed: nothing to sample")
    checkpoint = session.checkpoint
    other = Checkpoint.load(options.generator_checkpoint) if options.generator_checkpoint is not None else checkpoint
    _check_same_data(checkpoint, other, options.generator_checkpoint)
    spec.weights(other.code.shape[1])  # refuses members the generator does not have, before any work
    S, D = len(options.seeds), math.prod(checkpoint.spec["data_shape"])
    check_space(Path(out).absolute().parent, S * (2 * D + options.floor.phantoms + 16) * 4 + (1 << 20), f"--out {out}")
    data = session.data()
    if data.fingerprint() != checkpoint.data_fingerprint:
        raise DataError(f"the training data of {session.checkpoint_path} has changed since it was trained")
    device, floor, sampler = options.device, options.floor, options.sampler
    ens = Model(session.ensemble(device), checkpoint.code)
    gen = ens if other is checkpoint else Model(other.build().to(device), other.code)
    labels, conditions = seed_conditions(gen.ensemble, options.labels, options.condition_file, S, sampler.guidance)
    if conditions is not None:  # the proofs replay each seed under its embedding on the ensemble
        ens.ensemble.set_conditions(samples=conditions)
    test = CopyTest(data, checkpoint.unit_of, options.threshold, load_embedding(options.embed))
    arrays = find_and_prove(ens, gen, spec, test, checkpoint.schedule, sampler, list(options.seeds),
                            floor.phantoms, floor.alpha, floor.seed, max_trajectories, options.statistic,
                            options.null_check, options.null_target, labels)
    if conditions is not None:
        arrays["condition"] = conditions.numpy()
    described = dict(spec=spec.name, members=None if spec.members is None else list(spec.members),
                     checkpoint=str(options.generator_checkpoint or session.checkpoint_path))
    with writing(out, "memorization file"), atomic_output(out) as tmp:
        write_memorization(tmp, arrays, described, threshold=options.threshold, embed=options.embed,
                           statistic=options.statistic, null_check=options.null_check,
                           null_target=options.null_target if options.null_check else None,
                           reasons=list(REASONS), phantoms=floor.phantoms,
                           alpha=floor.alpha, seed=floor.seed,
                           sampler=dict(kind=sampler.kind, steps=sampler.steps, eta=sampler.eta,
                                        clip=list(sampler.clip) if sampler.clip else None, guidance=sampler.guidance),
                           ensemble=str(session.checkpoint_path), unit_names=[str(n) for n in checkpoint.unit_names])
    return Copies(arrays, options.threshold)


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
    """The one line ``ensattr memorization`` prints: copies, proofs, and why the others are not."""
    S, copies, proven = len(arrays["seed"]), int(arrays["is_copy"].sum()), int(arrays["proven"].sum())
    moved = arrays["moved"][arrays["is_copy"] == 1]
    median = ""
    if np.isfinite(moved).any():
        median = f"; median move away from the copied units {np.nanmedian(moved):.2f}"
    why = np.bincount(arrays["reason"][arrays["is_copy"] == 1], minlength=len(REASONS))
    unproven = ", ".join(f"{count} {REASONS[r]}" for r, count in enumerate(why) if r > 1 and count)
    unproven = f"; not proven: {unproven}" if unproven else ""
    null = ""
    checked = (arrays["is_copy"] == 0) & np.isfinite(arrays["pvalue"])
    if checked.any():
        planted = "null_units" in arrays and not np.array_equal(arrays["null_units"][checked],
                                                                 arrays["nearest_unit"][checked])
        against = "a planted near-copy's units" if planted else "their nearest unit"
        null = (f"; null check: {int(arrays['false_flag'].sum())} of {int(checked.sum())} non-copies pass as copies "
                f"of {against} (false flags)")
    return (f"{copies} of {S} samples are near-copies (< {threshold:g}) of training units; {proven} proven by "
            f"exact ablation (the counterfactual without every copied unit leaves them, beyond the phantom "
            f"replays){median}{unproven}{null}")


def load_embedding(name: Optional[str]) -> Optional[Callable]:
    """The function ``module:function`` names (images [B, C, H, W] -> embeddings [B, k]), or None."""
    if name is None:
        return None
    module, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataError(f"--embed {name}: cannot import it ({e}); give module:function, importable here") from None
    if not callable(found):
        raise DataError(f"--embed {name}: is not a function")
    return found
