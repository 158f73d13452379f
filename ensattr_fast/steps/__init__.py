"""The steps of an audit, one module per command, each a function of a :class:`Session` (the
audit's files and what was read from them, once) and its typed options
(:mod:`.options`), returning typed results; files are read and written only through
:mod:`ensattr_fast.store`. :class:`ensattr_fast.Audit` and the command line call them.

plan -> train -> sample -> attribute / ablate / audit -> metrics, lds, report; memorization
beside them; ``export`` hands members on; ``demo`` chains them.
"""

from .ablate import ablate
from .attribute import Attribution, attribute, exact_check
from .demo import demo
from .export import export
from .groups import GroupAudit, audit_groups
from .lds import lds
from .memorization import Copies, memorization
from .metrics import metrics
from .kinds import read_groups
from .options import (STEP_OPTIONS, AblateOptions, AttributeOptions, DemoOptions, ExportOptions, GroupAuditOptions,
                      LdsOptions, MemorizationOptions, MetricsOptions, PlanOptions, ReportOptions, SampleOptions,
                      TrainOptions)
from .plan import Plan, plan
from .report import report
from .sample import Samples, sample
from .session import Session
from .train import train

__all__ = ["Session", "plan", "train", "sample", "ablate", "attribute", "exact_check", "audit_groups", "memorization",
           "metrics", "lds", "report", "export", "demo", "Plan", "Samples", "Attribution", "GroupAudit", "Copies",
           "STEP_OPTIONS", "PlanOptions", "TrainOptions", "SampleOptions", "AblateOptions", "AttributeOptions",
           "GroupAuditOptions", "MemorizationOptions", "MetricsOptions", "LdsOptions", "ReportOptions", "ExportOptions",
           "DemoOptions", "read_groups"]
