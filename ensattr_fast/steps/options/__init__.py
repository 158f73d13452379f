"""The options of every step, one typed dataclass each: what an audit step does, never where its files
are (those are the :class:`~ensattr_fast.Audit`'s, or the command line's ``--out``/``--results``...).
Each field's metadata holds its flag, help and range (:mod:`ensattr_fast.runtime.fields`); the
command line is generated from them, config files are read into them, and Python passes them (or
keyword overrides) to :class:`~ensattr_fast.Audit`. Parts that lower layers own are nested:
:class:`TrainConfig` (how members train), :class:`MemberOptions` (their architecture),
:class:`Sampler`, :class:`Passes` (how members run), :class:`NoiseFloor` (what exact answers are
judged against).
"""

from .audit import (AblateOptions, AttributeOptions, GroupAuditOptions, MemorizationOptions, PlanOptions, SampleOptions,
                    TrainOptions)
from .outputs import DemoOptions, ExportOptions, LdsOptions, MetricsOptions, ReportOptions

__all__ = ["PlanOptions", "TrainOptions", "SampleOptions", "AblateOptions", "AttributeOptions", "GroupAuditOptions",
           "MemorizationOptions", "MetricsOptions", "LdsOptions", "ReportOptions", "ExportOptions", "DemoOptions",
           "STEP_OPTIONS"]

#: every command's options, by command
STEP_OPTIONS = {cls.step: cls for cls in (DemoOptions, PlanOptions, TrainOptions, SampleOptions, AblateOptions,
                                           GroupAuditOptions, AttributeOptions, MetricsOptions, LdsOptions,
                                           MemorizationOptions, ReportOptions, ExportOptions)}
