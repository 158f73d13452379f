"""``ensattr train``: every member of a planned ensemble, in one process (or sharded over the
ranks of a distributed run), into one checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .. import distributed
from ..checkpoint import Checkpoint
from ..data import load_data
from ..errors import CodeError, DataError
from ..execution import Passes
from ..files import check_output
from ..members import MemberOptions, build_members
from ..schedules import NoiseSchedule
from ..store import read_plan
from ..training import TrainConfig, Trainer
from ._rules import on_writer, writer_lock

__all__ = ["train"]


def train(plan_path: os.PathLike, out: os.PathLike, config: TrainConfig,
          members: MemberOptions = MemberOptions(), device: str = "cpu", checkpoint_every: int = 0,
          resume: bool = False, progress: bool = True, options: Optional[dict] = None,
          overwrite: bool = False, passes: Passes = Passes()) -> None:
    """Train the planned ensemble into the checkpoint ``out``; resume from it when asked and
    it exists, replace it only when told to ``overwrite``. ``options``: the command's options,
    kept in the checkpoint. Distributed, each rank trains its share of the members. ``passes``:
    how the members are evaluated (K members per pass, activation checkpointing, compile)."""
    on_writer(lambda: check_output(out, "--out", overwrite, inputs={"--plan": plan_path}, resume=resume))
    dataset, code, units = read_plan(plan_path)
    data = load_data(dataset)
    if len(units.unit_of) != len(data):
        raise DataError(f"the plan maps {len(units.unit_of)} examples but {data.name} has {len(data)}")
    ensemble = build_members(members, code.shape[1], data.data_shape, config.mode != "independent", config.seed)
    if distributed.world().size > code.shape[1]:
        raise CodeError(f"{distributed.world().size} ranks for {code.shape[1]} members: "
                        "launch at most one rank per member")
    shard = distributed.shard(code.shape[1])  # all of them in one process
    trainer = Trainer(ensemble.select(shard), data, code, units.unit_of, units.names,
                      NoiseSchedule.linear(), config, device, members=shard, data_spec=dataset, passes=passes)
    trainer.options = options
    with writer_lock(out, "checkpoint"):
        if resume and Path(out).exists():
            trainer.restore(Checkpoint.load(out))
        trainer.train(checkpoint=Path(out), checkpoint_every=checkpoint_every, progress=progress)
