"""``sample``: full-ensemble samples into a new results file, chunk by chunk."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data import load_conditions
from ..diffusion import sampling
from ..diffusion.schedules import Sampler
from ..errors import DataError, StoreError
from ..members import Ensemble
from ..members.sharded import ShardedEnsemble, place_members
from ..members.text import sample_index
from ..runtime import distributed
from ..runtime.files import check_output, check_space
from ..runtime.progress import Progress
from ..store import ResultsWriter, SampleStream, versions
from ._rules import on_writer, writer_lock
from .options import SampleOptions
from .session import Session

__all__ = ["Samples", "sample", "seed_conditions"]


@dataclasses.dataclass(frozen=True)
class Samples:
    """Full-ensemble samples: the seed that replays each, and the images [S, C, H, W]."""

    seeds: List[int]
    images: Tensor
    sampler: Sampler


def sample(session: Session, out: os.PathLike, options: SampleOptions = SampleOptions(),
           progress: bool = True) -> Samples:
    """Full-ensemble samples of ``options.seeds`` into the new results file ``out`` (code,
    units, provenance), from the session's checkpoint.

    Samples are written ``options.chunk`` at a time with done flags: ``resume`` continues a run
    that was killed. Distributed, every rank holds all members and runs its share of each chunk;
    with ``passes.shard_members`` every rank holds its share of the members and runs every
    sample. A sampler without a precision samples in the members' training precision; the file
    records the one used (every replay of the samples takes it).
    """
    seeds, sampler = [int(s) for s in options.seeds], options.sampler
    if not seeds:
        raise DataError("no seeds to sample: give --seeds N (N >= 1), A:B or a,b,c")
    on_writer(lambda: check_output(out, "--out", options.overwrite, inputs=session.inputs(reading=("checkpoint",)),
                                   resume=options.resume))
    checkpoint = session.checkpoint
    sampler.plan(checkpoint.schedule)  # a sampler the schedule cannot run is refused before any file
    labels, conditions = seed_conditions(session.ensemble(options.device), options.labels, options.condition_file,
                                         len(seeds), sampler.guidance)
    size = len(seeds) * math.prod(checkpoint.spec["data_shape"]) * 4 + (1 << 20)
    on_writer(lambda: check_space(Path(out).absolute().parent, size, f"--out {out}"))
    ensemble, passes = place_members(session.ensemble(options.device), options.passes, options.device)
    sharded = isinstance(ensemble, ShardedEnsemble)  # each rank its members, every trajectory
    if sampler.precision is None:
        sampler = dataclasses.replace(sampler, precision=checkpoint.config["train"].get("precision", "fp32"))
    spec = dict(checkpoint_hash=checkpoint.file_hash, seeds=seeds, chunk=options.chunk,
                sampler=dataclasses.asdict(sampler))  # compared in canonical JSON by SampleStream
    if labels is not None:
        spec["labels"] = labels.tolist()
    if conditions is not None:
        spec["conditions"] = hashlib.sha256(conditions.numpy().tobytes()).hexdigest()
    with writer_lock(out, "results file"):
        _sample_into(out, checkpoint, ensemble, seeds, (labels, conditions), sampler, options.resume, options.chunk,
                     spec, passes, progress, sharded)
    session.results_path = Path(out)
    session.forget_samples()
    return Samples(*session.samples(), sampler)


def seed_conditions(ensemble: Ensemble, labels: Optional[Sequence[int]], condition_file: Optional[os.PathLike],
                    count: int, guidance: float) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """What ``count`` seeds are conditioned on: (each one's label, or condition index for
    text-conditioned members, or None; the embeddings [count, L, D] of ``condition_file``, now
    the ensemble's sample table, or None). A condition the members cannot take is refused here."""
    if ensemble.condition_shape is None:
        if condition_file is not None:
            raise DataError(f"--condition-file {condition_file}: these members take no text conditions (those of "
                            "train --arch diffusers-text do)")
        return sampling.check_labels(ensemble.classes, sampling.per_seed_labels(labels, count), count, guidance), None
    if labels is not None:
        raise DataError("--labels: these members are text-conditioned; give each seed's embedding with "
                        "--condition-file")
    if condition_file is None:
        return sampling.check_conditions(ensemble, None, count, guidance), None
    conditions = load_conditions(condition_file, count)
    ensemble.set_conditions(samples=conditions)
    return sample_index(torch.arange(count)), conditions


def _sample_into(results, checkpoint, ensemble, seeds, conditioned, sampler, resume, chunk, spec, passes, progress,
                 sharded) -> None:
    (labels, conditions), stream, pending = conditioned, None, None
    if distributed.world().main:
        try:
            fresh = not (resume and Path(results).exists())
            if fresh:
                with ResultsWriter(results, "w") as writer:
                    writer.write_code(checkpoint.code, checkpoint.unit_of, checkpoint.unit_names)
                    writer.write_seeds(seeds, labels, conditions)
                    writer.set_attrs(config=checkpoint.config, sampler=dataclasses.asdict(sampler),
                                     versions=versions(), checkpoint_hash=spec["checkpoint_hash"],
                                     data_fingerprint=checkpoint.data_fingerprint,
                                     plan=dict(dataset=checkpoint.data_source))
            stream = SampleStream(results, len(seeds), ensemble.data_shape, chunk, spec)
            pending = [(r.start, r.stop) for r in stream.pending()]
        except StoreError as error:
            pending = str(error)
    pending = distributed.broadcast_object(pending)
    if isinstance(pending, str):  # rank 0 refused the file: every rank stops with its reason
        raise StoreError(pending)
    left = sum(stop - start for start, stop in pending)
    bar = Progress(len(seeds), "sample", "samples", initial=len(seeds) - left, enabled=progress and stream is not None)
    try:
        for start, stop in pending:
            # every rank its share of the samples; or, members sharded, every sample (the same images)
            mine = range(stop - start) if sharded else distributed.shard(stop - start)
            share = (stop - start) / max(len(mine), 1)  # rank 0 counts every rank's samples by its own
            first, last = start + mine.start, start + mine.stop
            images = sampling.sample(ensemble, checkpoint.schedule, sampler, seeds[first:last], passes,
                                     lambda done: bar.update(done * share),
                                     None if labels is None else labels[first:last])
            images = (images if sharded else distributed.gather_rows(images)).cpu()
            if stream is not None:
                stream.write(range(start, stop), images.float().numpy())
    finally:
        bar.close()
        if stream is not None:
            stream.close()
    distributed.barrier()
