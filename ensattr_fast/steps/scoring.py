"""Influence matrices streamed to a results file: the store's block streams
(:func:`~ensattr_fast.store.influence_streams`) filled by the scoring kernel
(:func:`~ensattr_fast.attribution.blocks.score_blocks`)."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from torch import Tensor

from ..attribution.blocks import score_blocks
from ..attribution.methods import SCORERS, CodeScorer
from ..errors import MethodError
from ..store import code_hash, influence_streams

__all__ = ["stream_influence"]


def stream_influence(path: os.PathLike, code: Tensor, methods: Dict[str, Tuple[str, Tensor]], k: int = 10,
                     block_rows: int = 64, block_units: int = 16384, spec: Optional[dict] = None,
                     progress: bool = True, device: str = "cpu") -> None:
    """Write ``/influence/<name>`` [K, N] and ``/topk/<name>`` [K, k] for each method, block by
    block; blocks a killed run left flagged are kept.

    Args:
        code: uint8 [N, M] (units, or unit sets as OR-ed rows).
        methods: name -> (scorer, statistics): ``("first_order", G [K, M, M])`` or
            ``("loss", L [K, M])``; row i of every matrix is row i of its statistics.
        spec: provenance stored with each matrix; a file holding a matrix of the same name
            with another spec is refused rather than mixed.
    """
    scorers = {}
    for name, (kind, _) in methods.items():
        scorer = SCORERS.get(kind)
        if not isinstance(scorer, CodeScorer):
            raise MethodError(f"method {name!r}: scores by the code come from "
                              f"{[s for s in SCORERS if isinstance(SCORERS[s], CodeScorer)]}, not {kind!r}")
        scorers[name] = scorer
    spec = dict(spec or {}, code_hash=code_hash(code))
    matrices = {name: (len(stats), dict(spec, kind=kind)) for name, (kind, stats) in methods.items()}
    with influence_streams(path, matrices, len(code), block_rows, block_units, k) as streams:
        score_blocks(streams, code, {name: (scorers[name].argument, stats) for name, (_, stats) in methods.items()},
                     k, device, progress)
