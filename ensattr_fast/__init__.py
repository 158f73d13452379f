"""ensattr_fast: training data attribution for diffusion models by encoded ensembles.

M diffusion models (members) each train on a planned half of the training units; the members
that never saw a unit form the ensemble that has exactly forgotten it. Sampling the full and
the ablated ensembles from the same noise gives exact counterfactuals; first-order, loss-based
and gradient scores rank every unit cheaply. The method: docs/method.md; every public name:
docs/api.md; the layout of the package: docs/architecture.md.

>>> import ensattr_fast as ef
>>> audit = ef.Audit.create("digits", members=16, workdir="audit")
>>> audit.train(steps=3500, lr=3e-3)
>>> audit.sample(seeds=range(64))
>>> found = audit.attribute(samples=8)

The public face: the lifecycle object (:class:`Audit`) and what its steps return, the options
of every step, the readers of its files, the errors; the kernels under :mod:`ensattr_fast.ops`.
The building blocks (members, samplers, scores) are reachable in their packages: ``members``,
``diffusion``, ``attribution``, ``codes``, ``data``, ``training``, ``store``, ``evaluation``.
"""

from . import ops
from ._version import __version__
from .audit import Audit, Training
from .data import Dataset, load_dataset, load_digits
from .diffusion import NoiseSchedule, Sampler
from .errors import (ArchitectureError, CheckpointError, CodeError, ConfigError, DataError, DiskError, EnsattrError,
                     MethodError, StoreError)
from .evaluation.counterfactuals import Counterfactuals
from .evaluation.floors import NoiseFloor
from .members import MemberOptions
from .members.passes import Passes
from .ops import build_info
from .steps import (AblateOptions, AttributeOptions, Attribution, Copies, DemoOptions, GroupAudit, GroupAuditOptions,
                    LdsOptions, MemorizationOptions, MetricsOptions, Plan, PlanOptions, ReportOptions, SampleOptions,
                    Samples, TrainOptions)
from .steps.config_file import Config, load_config
from .store import Results, open_results
from .training import Checkpoint, TrainConfig

__all__ = [
    # the lifecycle and what its steps return
    "Audit", "Plan", "Training", "Samples", "Counterfactuals", "Attribution", "GroupAudit", "Copies",
    # the options of every step, and the parts they share
    "PlanOptions", "TrainOptions", "SampleOptions", "AblateOptions", "AttributeOptions", "GroupAuditOptions",
    "MemorizationOptions", "MetricsOptions", "LdsOptions", "ReportOptions", "DemoOptions", "TrainConfig",
    "MemberOptions", "Sampler", "Passes", "NoiseFloor", "NoiseSchedule", "Config", "load_config",
    # the files and data
    "open_results", "Results", "Checkpoint", "Dataset", "load_dataset", "load_digits",
    # errors
    "EnsattrError", "CodeError", "DataError", "ArchitectureError", "CheckpointError", "StoreError", "DiskError",
    "MethodError", "ConfigError",
    # the kernels and the build
    "ops", "build_info", "__version__",
]
