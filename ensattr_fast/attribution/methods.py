"""The attribution methods, by name: the one registry that the command line's help, the
attribute step, the audit, the exact check, the noise floors and ``metrics`` read.

A method is the statistic each row (sample) needs, and the scorer that turns it and the code
into a score per unit; the scorer also owns how its statistics are computed (from a
:class:`Rows`):

| scorer | statistic of a row | score of unit u |
| --- | --- | --- |
| ``first_order`` | G [M, M], Gram of the sampler's Jacobian in the member weights | sqrt(dw_u^T G dw_u) |
| ``loss`` | L [M], each member's diffusion loss on the row | excluders' mean loss minus includers' |
| ``gradient`` | projected gradient features of the row under each member | TRAK kernel scores, combined over members |
| ``curvature`` | (none kept) | each member's EK-FAC or K-FAC influence (kronfluence), combined over members |

``first_order``'s score is the predicted counterfactual distance.

The first two score by the ``code_scores`` kernel (``by_code``): a unit's score depends on it
only through its code row, so phantom rows give their noise floor. A new method over an existing
statistic is one :class:`Method` entry in :data:`METHODS`; a new statistic is one function in
its scorer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor

from ..diffusion.schedules import NoiseSchedule, Sampler
from ..errors import MethodError
from ..members import Ensemble
from .first_order import first_order_grams
from .curvature import STRATEGIES, CurvatureSpec, member_influence
from .factors import FactorStore
from .full_kernel import exact_member_scores
from .gradients import COMBINATIONS, FeatureSpec, combine, dataset_features, gradient_features
from .kernels import TrainFeatures, combined, unit_sums
from .loss import member_losses

__all__ = ["Rows", "Scorer", "CodeScorer", "GradientScorer", "CurvatureScorer", "SCORERS", "Method", "METHODS",
           "DEFAULT_METHODS", "get_method", "parse_methods", "describe_methods"]


@dataclasses.dataclass
class Rows:
    """What the methods score: the members, the rows (samples, with the seeds and sampler that
    drew them) and the code. ``keep(name, compute)`` is where statistics are kept between runs
    (the results file's ``/statistics``, so that a resumed run scores the very same numbers);
    ``data()`` loads the training data when a method needs it."""

    ensemble: Ensemble
    schedule: NoiseSchedule
    sampler: Sampler
    seeds: List[int]
    images: Tensor  # [S, *data_shape]
    code: Tensor  # uint8 [N, M]
    unit_of: Tensor  # int64 [n_examples]
    data: Callable[[], object]
    draws: int = 64  # shared (t, eps) draws per loss
    chunk: int = 16  # samples per pass of the first-order Jacobian
    features: FeatureSpec = FeatureSpec()
    keep: Callable[[str, Callable[[], Tensor]], Tensor] = lambda name, compute: compute()
    #: the training examples' features and Grams under a spec; None: computed here, in memory
    train_features: Optional[Callable[[FeatureSpec], TrainFeatures]] = None
    progress: bool = False
    labels: Optional[Tensor] = None  # [S], class-conditional members: the label each row was drawn with
    #: where the members' fitted curvature is kept (None: fitted for this call, then dropped)
    factors: Optional[FactorStore] = None
    _memo: dict = dataclasses.field(default_factory=dict, repr=False)

    def features_of_training(self, spec: FeatureSpec) -> TrainFeatures:
        """The training examples' features under ``spec`` (the caller's store, else in memory)."""
        if self.train_features is not None:
            return self.train_features(spec)
        return TrainFeatures.in_memory(dataset_features(self.ensemble, self.schedule, self.data(), spec,
                                                        self.progress))

    def once(self, key, compute: Callable[[], object]):
        """``compute()`` the first time ``key`` is asked for, its value after."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


class Scorer:
    """How a method's statistic becomes a score per unit."""

    name: str
    by_code = False  # scores by code_scores from one statistic per row
    predicts_distance = False  # scores are predicted distances ||x^(-u) - x||, comparable with exact ablation


class CodeScorer(Scorer):
    """Scores by the ``code_scores`` kernel: ``argument`` (``gram`` or ``losses``) is the
    statistic every row gives it; ``statistics`` compute the ones it keeps together."""

    by_code = True

    def __init__(self, name: str, argument: str, statistics: Dict[str, Callable[[Rows], Tensor]],
                 predicts_distance: bool = False):
        self.name, self.argument, self.statistics = name, argument, statistics
        self.predicts_distance = predicts_distance

    def statistic(self, method: "Method", rows: Rows) -> Tensor:
        """The statistic of every row that ``method`` scores [S, ...]; all of this scorer's
        statistics are kept (one computation gives them)."""
        kept = {name: rows.keep(name, lambda compute=compute: compute(rows))
                for name, compute in self.statistics.items()}
        return kept[method.statistic]


class GradientScorer(Scorer):
    """TRAK kernel scores of gradient features [S, N], each member's combined over members."""

    name = "gradient"

    @staticmethod
    def record(method: "Method", rows: Rows) -> dict:
        """How ``method``'s matrix was computed, for its attributes in the results file."""
        return dict(features=dataclasses.asdict(dataclasses.replace(rows.features, kind=method.feature_kind)))

    def scores(self, method: "Method", rows: Rows) -> Tensor:
        spec = dataclasses.replace(rows.features, kind=method.feature_kind)
        if spec.exact:  # no features to keep: the Grams of the full gradients, then the kernel
            data, queries = rows.data(), rows.labels
            train = rows.ensemble.example_conditions(data)  # each example under its own condition
            if train is not None and queries is None:  # samples drawn without a condition: the empty one
                queries = torch.full((len(rows.images),), -1, dtype=torch.long)
            labels = None if train is None else (train, queries)
            per_member = rows.once(("exact", spec.kind), lambda: exact_member_scores(
                rows.ensemble, rows.schedule, data, rows.images, spec, rows.unit_of, len(rows.code), labels=labels))
            return combine(per_member, rows.code, method.combination)
        sums = rows.once(("gradient", spec.kind), lambda: self.sums(spec, rows))
        return combined(*sums, rows.code, method.combination)

    @staticmethod
    def sums(spec: FeatureSpec, rows: Rows):
        """Projected features of the rows (kept) against the training features (the caller's
        store): :func:`~.kernels.unit_sums`, over the members that trained on each unit and
        over those that did not."""
        train = rows.features_of_training(spec)
        queries = rows.keep(f"features_{spec.kind}{spec.tag}",
                            lambda: gradient_features(rows.ensemble, rows.schedule, rows.images, spec,
                                                      labels=rows.labels))
        return unit_sums(train, queries, rows.unit_of, rows.code)


class CurvatureScorer(Scorer):
    """Influence-function scores [S, N] of each member under its own curvature (EK-FAC or
    K-FAC, :mod:`.curvature`), combined over members; the draws are the gradient features'."""

    name = "curvature"

    @staticmethod
    def spec(method: "Method", features: FeatureSpec) -> CurvatureSpec:
        """The curvature ``method`` scores with, its draws those of the gradient ``features``."""
        return CurvatureSpec(strategy=method.statistic, timesteps=features.timesteps, seed=features.seed)

    def record(self, method: "Method", rows: Rows) -> dict:
        """How ``method``'s matrix was computed, for its attributes in the results file."""
        return dict(curvature=dataclasses.asdict(self.spec(method, rows.features)))

    def scores(self, method: "Method", rows: Rows) -> Tensor:
        spec = self.spec(method, rows.features)
        per_member = rows.once(("curvature", spec), lambda: member_influence(
            rows.ensemble, rows.schedule, rows.data(), rows.images, spec, rows.unit_of, rows.code,
            labels=rows.labels, progress=rows.progress, store=rows.factors))
        return combine(per_member, rows.code, method.combination)


def _grams(rows: Rows):
    # both Grams come from one pass through the sampler
    return rows.once("grams", lambda: first_order_grams(rows.ensemble, rows.schedule, rows.sampler, rows.seeds,
                                                        chunk=rows.chunk, labels=rows.labels))


FIRST_ORDER = CodeScorer("first_order", "gram", {"gram_exact": lambda rows: _grams(rows).exact,
                                                  "gram_direct": lambda rows: _grams(rows).direct},
                         predicts_distance=True)
LOSS = CodeScorer("loss", "losses", {"losses": lambda rows: member_losses(rows.ensemble, rows.schedule, rows.images,
                                                                          rows.draws, labels=rows.labels)})
GRADIENT = GradientScorer()
CURVATURE = CurvatureScorer()
SCORERS: Dict[str, Scorer] = {s.name: s for s in (FIRST_ORDER, LOSS, GRADIENT, CURVATURE)}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    statistic: str  # what each row needs: gram_exact, gram_direct, losses, features_dtrak, features_trak;
    # curvature methods: the strategy (ekfac, kfac)
    scorer: Scorer
    combination: Optional[str] = None  # gradient methods: mean, includers or contrast
    description: str = ""

    @property
    def predicts_distance(self) -> bool:
        return self.scorer.predicts_distance

    @property
    def feature_kind(self) -> Optional[str]:
        """``dtrak`` or ``trak`` for gradient methods."""
        return self.statistic[len("features_"):] if self.scorer is GRADIENT else None


def _member_methods() -> List[Method]:
    out = []
    for kind, output in (("dtrak", "squared output norm"), ("trak", "diffusion loss")):
        for how in COMBINATIONS:
            name = kind if how == "mean" else f"{kind}_{how}"
            out.append(Method(name, f"features_{kind}", GRADIENT, how,
                              f"{kind.upper().replace('DTRAK', 'D-TRAK')} ({output} gradients), {how} over members"))
    for strategy in STRATEGIES:
        for how in ("mean", "includers"):
            name = strategy if how == "mean" else f"{strategy}_{how}"
            out.append(Method(name, strategy, CURVATURE, how, f"{strategy.upper().replace('FAC', '-FAC')} influence "
                                                                 f"(kronfluence, diffusion loss), {how} over members"))
    return out


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("first_order", "gram_exact", FIRST_ORDER, description="first order: the Jacobian through the whole sampler"),
    Method("direct", "gram_direct", FIRST_ORDER,
           description="first order, direct: member outputs along the trajectory only"),
    Method("loss", "losses", LOSS, description="excluders' minus includers' diffusion loss"),
    *_member_methods(),
]}

#: what ``ensattr attribute`` computes unless told otherwise; dtrak first: it predicts
#: retraining best on the demo (BENCHMARKS.md)
DEFAULT_METHODS = ("dtrak", "first_order", "direct", "loss")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}: use {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(methods: Union[str, Iterable[str]]) -> List[Method]:
    """Methods from a comma-separated list or names; every unknown one named in one error."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = list(dict.fromkeys(n for n in names if n))  # each once, in the order given
    unknown = sorted({n for n in names if n not in METHODS})
    if unknown:
        raise MethodError(f"unknown methods {unknown}: use {', '.join(METHODS)}")
    if not names:
        raise MethodError(f"no method given: use one or more of {', '.join(METHODS)}")
    return [METHODS[n] for n in names]


def describe_methods() -> str:
    """One line listing every method, for help texts."""
    return "; ".join(f"{m.name} ({m.description})" for m in METHODS.values())
