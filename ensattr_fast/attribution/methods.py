"""The attribution methods, by name: the one registry that the command line's help, the
attribute step, the demo and the exact check read.

A method is the statistic of each row (sample) it needs, the scorer that turns the statistic
and the code into a score per unit, and, for gradient methods, how the members combine:

| scorer | statistic of a row | score of unit u |
| --- | --- | --- |
| ``first_order`` | G [M, M], Gram of the sampler's Jacobian in the member weights | sqrt(dw_u^T G dw_u): predicted counterfactual distance |
| ``loss`` | L [M], each member's diffusion loss on the row | excluders' mean loss minus includers' |
| ``gradient`` | projected gradient features of the row under each member | TRAK kernel scores, combined over members |

A new method is one :class:`Method` entry in :data:`METHODS` (and, for a new statistic, its
computation in :mod:`ensattr_fast.steps.attribute`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Union

from ..errors import MethodError
from .gradients import COMBINATIONS

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "get_method", "parse_methods", "describe_methods"]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    statistic: str  # what each row needs: gram_exact, gram_direct, losses, features_dtrak, features_trak
    scorer: str  # first_order, loss (both by the code_scores op) or gradient
    combination: Optional[str] = None  # gradient methods: mean, includers or contrast
    description: str = ""

    @property
    def predicts_distance(self) -> bool:
        """Scores are predicted distances ||x^(-u) - x||, comparable with exact ablation."""
        return self.scorer == "first_order"

    @property
    def feature_kind(self) -> Optional[str]:
        """``dtrak`` or ``trak`` for gradient methods."""
        return self.statistic[len("features_"):] if self.scorer == "gradient" else None


def _gradient_methods() -> List[Method]:
    out = []
    for kind, output in (("dtrak", "squared output norm"), ("trak", "diffusion loss")):
        for how in COMBINATIONS:
            name = kind if how == "mean" else f"{kind}_{how}"
            out.append(Method(name, f"features_{kind}", "gradient", how,
                              f"{kind.upper().replace('DTRAK', 'D-TRAK')} ({output} gradients), {how} over members"))
    return out


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("first_order", "gram_exact", "first_order",
           description="first order: the Jacobian through the whole sampler"),
    Method("direct", "gram_direct", "first_order",
           description="first order, direct: member outputs along the trajectory only"),
    Method("loss", "losses", "loss", description="excluders' minus includers' diffusion loss"),
    *_gradient_methods(),
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
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
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
