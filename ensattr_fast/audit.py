"""The one object of an audit, from plan to report.

>>> import ensattr_fast as ef
>>> audit = ef.Audit.create("digits", members=16, workdir="audit")     # plan.h5
>>> audit.train(steps=3500, lr=3e-3)                                   # ensemble.pt
>>> samples = audit.sample(seeds=range(64))                            # results.h5
>>> found = audit.attribute(samples=8, check=4)                        # scores, exact check
>>> found.counterfactuals.significant                                  # against the noise floor
>>> audit.report()                                                     # report.png, report.html

Each method runs one step (:mod:`ensattr_fast.steps`) with its typed options: an options
dataclass, keyword overrides by option name (``steps=3500`` is ``--steps 3500``), or both;
a ``config`` file gives the defaults of every step. It writes the very files ``ensattr`` writes
(the command line is a thin shell over this object), under the same rules: progress on
stderr, one writer per file, resume where a step resumes, nothing replaced without
``overwrite``. The checkpoint is read once (and hashed in the same read), the ensemble built
once per device, the samples read once, whatever steps follow each other.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from . import steps
from .errors import StoreError
from .evaluation.counterfactuals import Counterfactuals
from .runtime import distributed
from .runtime.fields import as_record, update
from .runtime.memory import set_budget
from .steps import (AblateOptions, AttributeOptions, Attribution, Copies, ExportOptions, GroupAudit, GroupAuditOptions,
                    LdsOptions,
                    MemorizationOptions, MetricsOptions, Plan, PlanOptions, ReportOptions, SampleOptions, Samples,
                    Session, TrainOptions)
from .steps.config_file import Config, load_config
from .steps.files import STEP_FILES
from .store import Results, ResultsWriter, open_results
from .training.checkpoint import Checkpoint

__all__ = ["Audit", "Training"]


@dataclasses.dataclass(frozen=True)
class Training:
    """What ``train`` did: the steps the checkpoint now holds, and each member's loss at the
    last of them (of this rank's members under torchrun)."""

    steps: int
    losses: Tensor


class Audit:
    """An audit's files (plan, checkpoint, results) and the steps between them.

    ``Audit.create(data, members, workdir)`` plans a new audit in ``workdir``;
    ``Audit.open(workdir)`` takes up one that is there; ``Audit(plan=..., checkpoint=...,
    results=...)`` works on files wherever they are (as the command line does). ``config``: a
    config file (or a loaded :class:`~ensattr_fast.steps.config_file.Config`) whose values are
    every step's defaults here. ``progress``: report long steps on stderr (a bar on a terminal,
    lines in a log). ``memory``: the GiB every step of this process plans its blocks from
    (``--memory``; see :mod:`ensattr_fast.runtime.memory`).
    """

    PLAN, CHECKPOINT, RESULTS = "plan.h5", "ensemble.pt", "results.h5"

    def __init__(self, plan: Optional[os.PathLike] = None, checkpoint: Optional[os.PathLike] = None,
                 results: Optional[os.PathLike] = None, *, workdir: Optional[os.PathLike] = None,
                 config: Union[os.PathLike, Config, None] = None, progress: bool = True,
                 memory: Optional[float] = None):
        if memory is not None:
            set_budget(memory)
        self.session = Session(plan, checkpoint, results)
        self.workdir = Path(workdir) if workdir is not None else None
        self.config = load_config(config) if config is not None and not isinstance(config, Config) else config
        self.progress = progress

    @classmethod
    def open(cls, workdir: os.PathLike, **kwargs) -> "Audit":
        """The audit whose files are (or will be) ``plan.h5``, ``ensemble.pt`` and
        ``results.h5`` in ``workdir``."""
        workdir = Path(workdir)
        return cls(workdir / cls.PLAN, workdir / cls.CHECKPOINT, workdir / cls.RESULTS, workdir=workdir, **kwargs)

    @classmethod
    def create(cls, data: str = "digits", members: int = 16, workdir: os.PathLike = "audit",
               options: Optional[PlanOptions] = None, *, config: Union[os.PathLike, Config, None] = None,
               progress: bool = True, **overrides) -> "Audit":
        """A new audit of ``data`` (``digits``, a folder of images, an array or HDF5 file; see
        :class:`~ensattr_fast.steps.PlanOptions`) by ``members`` members, planned in
        ``workdir`` (made if missing). ``overrides``: more plan options (``units="class"``)."""
        audit = cls.open(workdir, config=config, progress=progress)
        audit.plan(options, data=data, members=members, **overrides)
        return audit

    # ------------------------------------------------------------------ what the audit holds

    @property
    def checkpoint(self) -> Checkpoint:
        """The trained ensemble's checkpoint, read once."""
        return self.session.checkpoint

    def results(self) -> Results:
        """The results file, open for reading (``with audit.results() as r: r.influence("dtrak")``)."""
        return open_results(self.session.results)

    def samples(self, stop: Optional[int] = None) -> Samples:
        """The first ``stop`` samples (all by default) of the results file."""
        seeds, images = self.session.samples(stop)
        return Samples(seeds, images, self.session.sampler())

    # ------------------------------------------------------------------ the steps

    def plan(self, options: Optional[PlanOptions] = None, **overrides) -> Plan:
        """``ensattr plan``: the code for the data's units, into the plan file."""
        options = self._options(PlanOptions, options, overrides)
        found = steps.plan(self.session.plan, options)
        self._record(self.session.plan, options, self.session.plan)
        return found

    def train(self, options: Optional[TrainOptions] = None, **overrides) -> Training:
        """``ensattr train``: every member at once, into the checkpoint."""
        options = self._options(TrainOptions, options, overrides)
        out = self.session.checkpoint_path
        if out is None:
            raise StoreError("this audit has no checkpoint file to train into: give Audit(checkpoint=...)")
        self.session.forget_checkpoint()
        losses = steps.train(self.session.plan, out, options, progress=self.progress,
                             record=self._provenance(options, out))
        return Training(options.train.steps, losses)

    def sample(self, options: Optional[SampleOptions] = None, **overrides) -> Samples:
        """``ensattr sample``: full-ensemble samples of ``seeds``, into a new results file."""
        options = self._options(SampleOptions, options, overrides)
        out = self.session.results_path
        if out is None:
            raise StoreError("this audit has no results file to sample into: give Audit(results=...)")
        found = steps.sample(self.session, out, options, progress=self.progress)
        self._record(out, options, out)
        return found

    def ablate(self, units: Union[Tensor, Sequence[int], None] = None, options: Optional[AblateOptions] = None,
               **overrides) -> Counterfactuals:
        """``ensattr ablate``: exact counterfactuals without ``units`` (a list for every sample,
        or int [S, K]; None: ``options.units``, else each sample's nearest units), each judged
        against its noise floor."""
        if units is not None and not isinstance(units, Tensor):  # a list for every sample is an option
            overrides, units = dict(overrides, units=list(units)), None
        options = self._options(AblateOptions, options, overrides)
        found = steps.ablate(self.session, options, units)
        self._record(self.session.results, options)
        return found

    def attribute(self, options: Optional[AttributeOptions] = None, **overrides) -> Attribution:
        """``ensattr attribute``: every unit's influence on the first samples by each method,
        then the exact check of each sample's top units."""
        options = self._options(AttributeOptions, options, overrides)
        found = steps.attribute(self.session, options, progress=self.progress)
        self._record(self.session.results, options)
        return found

    def audit_groups(self, options: Optional[GroupAuditOptions] = None, **overrides) -> GroupAudit:
        """``ensattr audit``: each sample's groups ranked by exact ablation, then the examples
        inside its top groups."""
        options = self._options(GroupAuditOptions, options, overrides)
        return steps.audit_groups(self.session, options)

    def memorization(self, out: Optional[os.PathLike] = None, options: Optional[MemorizationOptions] = None,
                     **overrides) -> Copies:
        """``ensattr memorization``: near-copies the generator draws, each proven by exact
        ablation, into ``out`` (default ``memorization.h5`` in the work folder)."""
        options = self._options(MemorizationOptions, options, overrides)
        return steps.memorization(self.session, self._output(out, "memorization.h5"), options)

    def metrics(self, options: Optional[MetricsOptions] = None, **overrides) -> dict:
        """``ensattr metrics``: validity metrics of the results (with the checkpoint, when
        there is one, the false attribution rate too)."""
        options = self._options(MetricsOptions, options, overrides)
        found = steps.metrics(self.session, options)
        self._record(self.session.results, options)
        return found

    def lds(self, options: Optional[LdsOptions] = None, **overrides) -> Dict[str, dict]:
        """``ensattr lds``: the linear datamodeling score of every influence matrix (reference
        models kept in ``references``, default ``references.pt`` in the work folder)."""
        options = self._options(LdsOptions, options, overrides)
        if options.references is None:
            options = dataclasses.replace(options, references=self._output(None, "references.pt"))
        found = steps.lds(self.session, options, progress=self.progress)
        self._record(self.session.results, options)
        return found

    def report(self, out: Optional[os.PathLike] = None, options: Optional[ReportOptions] = None, *,
               decode: Optional[Callable[[Tensor], Tensor]] = None, html: Union[bool, os.PathLike] = True,
               **overrides) -> Tuple[Path, Optional[Path]]:
        """``ensattr report``: the picture ``out`` (default ``report.png`` in the work folder)
        and the HTML page beside it; returns both paths."""
        options = self._options(ReportOptions, options, overrides)
        return steps.report(self.session, self._output(out, "report.png"), options, decode=decode, html=html)

    def export(self, out: Optional[os.PathLike] = None, options: Optional[ExportOptions] = None,
               **overrides) -> List[Path]:
        """``ensattr export``: members as folders other tools load (adapters in peft's format,
        diffusers members as ``save_pretrained`` folders) under ``out`` (default ``members`` in
        the work folder); returns the member folders."""
        options = self._options(ExportOptions, options, overrides)
        return steps.export(self.session, self._output(out, "members"), options)

    # ------------------------------------------------------------------ plumbing

    def _options(self, cls: type, options: Any, overrides: Dict[str, Any]) -> Any:
        """The step's options: ``options`` (default: the config file's, else the defaults),
        with ``overrides`` by option name."""
        if options is None:
            options = self.config.options(cls.step) if self.config is not None else cls()
        elif not isinstance(options, cls):
            raise TypeError(f"{cls.step} takes {cls.__name__}, got {type(options).__name__}")
        return update(options, overrides, f"Audit.{cls.step}") if overrides else options

    def _output(self, out: Optional[os.PathLike], name: str) -> Path:
        if out is not None:
            return Path(out)
        if self.workdir is None:
            raise StoreError(f"give the file to write (it is {name} in the work folder of an Audit.open(workdir))")
        return self.workdir / name

    def _provenance(self, options: Any, out: Optional[Path] = None) -> dict:
        """What a step keeps of how it ran: its options, its files (as the command line names
        them) and the config file that gave its defaults."""
        paths = dict(plan=self.session.plan_path, checkpoint=self.session.checkpoint_path,
                     results=self.session.results_path, out=out)
        record = as_record(options)
        record.update({role.name: None if paths[role.name] is None else str(paths[role.name])
                       for role in STEP_FILES[options.step]})
        record["config"] = None if self.config is None else str(self.config.path)
        return record

    def _record(self, path: Path, options: Any, out: Optional[Path] = None) -> None:
        """Keep the step's options in the file it wrote (``options_<step>``, JSON). Under
        torchrun, rank 0 writes once no rank still reads the file: an HDF5 writer's lock would
        refuse a reader's open (and a reader's, the writer's)."""
        distributed.barrier()
        if distributed.world().main:
            with ResultsWriter(path, "a") as writer:
                writer.set_attrs(**{f"options_{options.step}": self._provenance(options, out)})
        distributed.barrier()
