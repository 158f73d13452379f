"""Every unit scored against every row, block by block, into block sinks.

Memory is bounded by one block [block_rows, block_units]: the whole influence matrix is never
in RAM. A sink (the store's ``InfluenceStream``, or anything with its methods) says which
blocks it already holds; those are not written again, so a killed run resumes where it stopped
and ends with the same numbers as an uninterrupted one. Writes run in a background thread while
the next block is scored, at most one block waiting for the disk at a time. This module knows
no file: the sinks do.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Optional, Protocol, Tuple

import numpy as np
from torch import Tensor

from ..ops import code_scores
from ..runtime.progress import Progress

__all__ = ["BlockSink", "score_blocks"]


class BlockSink(Protocol):
    """Where one matrix [rows, units] goes, block by block (``store.InfluenceStream``)."""

    n_row_blocks: int
    n_unit_blocks: int
    topk_done: object  # [row blocks], truthy where the row block's top-k is written

    def row_range(self, rb: int) -> range: ...
    def unit_range(self, ub: int) -> range: ...
    def is_done(self, rb: int, ub: int) -> bool: ...
    def write_block(self, rb: int, ub: int, scores: np.ndarray) -> None: ...
    def write_topk(self, rb: int, values: np.ndarray, indices: np.ndarray) -> None: ...


def score_blocks(sinks: Dict[str, BlockSink], code: Tensor, statistics: Dict[str, Tuple[str, Tensor]], k: int,
                 device: str = "cpu", progress: bool = True) -> None:
    """Score each matrix of ``statistics`` (name -> (``code_scores`` argument, statistic of
    every row): ``("gram", G [K, M, M])`` or ``("losses", L [K, M])``) against ``code`` uint8
    [N, M], into ``sinks[name]`` with its running top-``k`` per row."""
    total = sum(s.n_row_blocks * s.n_unit_blocks for s in sinks.values())
    done = sum(s.is_done(rb, ub) for s in sinks.values()
               for rb in range(s.n_row_blocks) for ub in range(s.n_unit_blocks))
    code = code.to(device)
    with Progress(total, "influence", "blocks", initial=done, enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as writer:
        pending: Optional[Future] = None
        for name, (argument, stats) in statistics.items():
            pending = _score_one(sinks[name], argument, stats.to(device), code, k, writer, pending, bar)
        if pending is not None:
            pending.result()


def _score_one(sink: BlockSink, argument: str, stats: Tensor, code: Tensor, k: int,
               writer: ThreadPoolExecutor, pending: Optional[Future], bar: Progress) -> Optional[Future]:
    for rb in range(sink.n_row_blocks):
        if sink.topk_done[rb]:
            continue
        rows = sink.row_range(rb)
        block_stats = stats[rows.start : rows.stop]
        previous = None
        for ub in range(sink.n_unit_blocks):
            units = sink.unit_range(ub)
            # blocks already on disk are re-scored (cheap) only to rebuild the running top-k
            out = code_scores(code[units.start : units.stop], k=k, unit_offset=units.start,
                              previous=previous, **{argument: block_stats})
            previous = (out.top_values, out.top_indices)
            if sink.is_done(rb, ub):
                continue
            block = out.scores.float().cpu().numpy()
            if pending is not None:
                pending.result()
            pending = writer.submit(sink.write_block, rb, ub, block)
            bar.update(1)
        if pending is not None:
            pending.result()
        values = previous[0].float().cpu().numpy()
        values[~np.isfinite(values)] = np.nan  # empty slots: index -1, score NaN
        pending = writer.submit(sink.write_topk, rb, values, previous[1].cpu().numpy())
    return pending
