"""``ensattr sample``: full-ensemble samples into a new results file, chunk by chunk."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from .. import distributed
from ..checkpoint import Checkpoint
from ..errors import DataError, StoreError
from ..execution import Passes
from ..members.sharded import ShardedEnsemble, place_members
from ..progress import Progress
from ..sampling import sample
from ..schedules import Sampler
from ..store import ResultsWriter, SampleStream, file_hash, versions
from ..files import check_output
from ._rules import on_writer, writer_lock

__all__ = ["sample_step"]


def sample_step(checkpoint_path: os.PathLike, results: os.PathLike, seeds: Sequence[int],
                sampler: Sampler, device: str = "cpu", overwrite: bool = False, resume: bool = False,
                chunk: int = 256, passes: Passes = Passes(), progress: bool = True) -> None:
    """Full-ensemble samples of ``seeds`` into a new results file (code, units, provenance).

    Samples are written ``chunk`` at a time with done flags: ``resume`` continues a run that
    was killed. Distributed, every rank holds all members and runs its share of each chunk; with
    ``passes.shard_members`` every rank holds its share of the members and runs every sample.
    A sampler without a precision samples in the members' training precision; the file
    records the one used (every replay of the samples takes it).
    """
    if not len(seeds):
        raise DataError("no seeds to sample: give --seeds N (N >= 1), A:B or a,b,c")
    on_writer(lambda: check_output(results, "--out", overwrite, inputs={"--checkpoint": checkpoint_path},
                                   resume=resume))
    checkpoint = Checkpoint.load(checkpoint_path)
    sampler.plan(checkpoint.schedule)  # a sampler the schedule cannot run is refused before any file
    ensemble, passes = place_members(checkpoint.build(), passes, device)
    sharded = isinstance(ensemble, ShardedEnsemble)  # each rank its members, every trajectory
    if sampler.precision is None:
        sampler = dataclasses.replace(sampler, precision=checkpoint.config["train"].get("precision", "fp32"))
    seeds = [int(s) for s in seeds]
    spec = dict(checkpoint_hash=file_hash(checkpoint_path), seeds=seeds, chunk=chunk,
                sampler=dataclasses.asdict(sampler))  # compared in canonical JSON by SampleStream
    with writer_lock(results, "results file"):
        _sample_into(results, checkpoint, ensemble, seeds, sampler, resume, chunk, spec, passes, progress, sharded)


def _sample_into(results, checkpoint, ensemble, seeds, sampler, resume, chunk, spec, passes, progress,
                 sharded) -> None:
    stream, pending = None, None
    if distributed.world().main:
        try:
            fresh = not (resume and Path(results).exists())
            if fresh:
                with ResultsWriter(results, "w") as writer:
                    writer.write_code(checkpoint.code, checkpoint.unit_of, checkpoint.unit_names)
                    writer.write_seeds(seeds)
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
            images = sample(ensemble, checkpoint.schedule, sampler, seeds[start + mine.start : start + mine.stop],
                            passes, lambda done: bar.update(done * share))
            images = (images if sharded else distributed.gather_rows(images)).cpu()
            if stream is not None:
                stream.write(range(start, stop), images.float().numpy())
    finally:
        bar.close()
        if stream is not None:
            stream.close()
    distributed.barrier()
