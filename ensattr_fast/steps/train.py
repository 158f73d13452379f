"""``train``: every member of a planned ensemble, in one process (or sharded over the ranks of a
distributed run), into one checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..data import load_data
from ..diffusion.schedules import NoiseSchedule
from ..errors import CodeError, ConfigError, DataError
from ..members import build_members
from ..runtime import distributed
from ..runtime.files import check_output, check_space
from ..runtime.progress import note
from ..store import read_plan
from ..training import Trainer
from ..training.checkpoint import Checkpoint, load_base
from ._rules import on_writer, writer_lock
from .options import TrainOptions
from .session import data_files

__all__ = ["train"]


def train(plan: os.PathLike, out: os.PathLike, options: TrainOptions = TrainOptions(), progress: bool = True,
          record: Optional[dict] = None) -> Tensor:
    """Train the planned ensemble (or, with ``all_units``, ``models`` models each on every unit of
    the plan: the full-data baseline) into the checkpoint ``out``; resume from it when asked and it
    exists (with the settings it was trained with; ``overwrite`` trains anew in its place),
    replace it only when told to ``overwrite``. ``record``: the options as the run was
    asked for, kept in the checkpoint. Distributed, each rank trains its share of the members.
    Returns each member's loss at the last step [M] (this rank's members)."""
    inputs = {"--plan": plan, **data_files(read_plan(plan)[0] if Path(plan).is_file() else None),
              **({"--base": options.architecture.base} if options.architecture.base else {})}
    on_writer(lambda: check_output(out, "--out", options.overwrite, inputs=inputs, resume=options.resume))
    dataset, code, units = read_plan(plan)
    data = load_data(dataset)
    if len(units.unit_of) != len(data):
        raise DataError(f"the plan maps {len(units.unit_of)} examples but {data.name} has {len(data)}")
    config = options.train
    if options.all_units:  # every model sees every unit: no unit is ever excluded, by design
        code = torch.ones(len(code), options.models, dtype=torch.uint8)
        if options.models > 1 and config.mode != "independent":
            note(f"--all-units --models {options.models}: the models train independently (their own initial "
                 f"weights and draws), not in --mode {config.mode}, or they would be one model {options.models} times")
            config = dataclasses.replace(config, mode="independent")
    elif options.models != 1:
        raise ConfigError("--models counts the models of --all-units; a planned ensemble has the plan's members")
    classes = int(data.labels.max()) + 1 if data.labels is not None and len(data.labels) else 0
    base = load_base(options.architecture.base) if options.architecture.base else (None, None)
    ensemble = build_members(options.architecture, code.shape[1], data.data_shape, config.mode != "independent",
                             config.seed, classes, *base, condition_shape=data.condition_shape)
    if distributed.world().size > code.shape[1]:
        raise CodeError(f"{distributed.world().size} ranks for {code.shape[1]} members: "
                        "launch at most one rank per member")
    shard = distributed.shard(code.shape[1])  # all of them in one process
    # a checkpoint holds weights, EMA and two Adam moments per parameter; the old one stays until the new is whole
    size = 2 * 4 * 4 * sum(p.numel() for p in ensemble.parameters()) + (1 << 20)
    on_writer(lambda: check_space(Path(out).absolute().parent, size, f"--out {out}"))
    trainer = Trainer(ensemble.select(shard), data, code, units.unit_of, units.names, NoiseSchedule.linear(), config,
                      options.device, members=shard, data_spec=dataset, passes=options.passes,
                      require_exact_ablation=not options.all_units)
    trainer.options = record
    with writer_lock(out, "checkpoint"):
        if options.resume and Path(out).exists() and not options.overwrite:
            trainer.restore(Checkpoint.load(out))
        return trainer.train(checkpoint=Path(out), checkpoint_every=options.checkpoint_every, progress=progress)
