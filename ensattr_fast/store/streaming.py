"""Scoring every unit against every row and streaming the matrices to the results file.

Memory is bounded by one block [block_rows, block_units]: the whole influence matrix is never
in RAM. Blocks already flagged done in the file are not written again, so a killed run resumes
where it stopped and ends with the same file as an uninterrupted one. Disk writes run in a
background thread while the next block is scored.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError
from ..ops import code_scores
from ..files import writing
from ..progress import Progress
from .recovery import open_for_appending
from .streams import InfluenceStream
from .writer import code_hash

__all__ = ["stream_influence", "stream_scores", "stitch_parts", "part_path"]

KINDS = ("first_order", "loss")


def stream_influence(
    path: os.PathLike,
    code: Tensor,
    methods: Dict[str, Tuple[str, Tensor]],
    k: int = 10,
    block_rows: int = 64,
    block_units: int = 16384,
    spec: Optional[dict] = None,
    progress: bool = True,
    device: str = "cpu",
) -> Dict[str, InfluenceStream]:
    """Write ``/influence/<name>`` [K, N] and ``/topk/<name>`` [K, k] for each method.

    Args:
        code: uint8 [N, M] (units, or unit sets as OR-ed rows).
        methods: name -> (kind, statistics): ``("first_order", G [K, M, M])`` or
            ``("loss", L [K, M])``; row i of every matrix is row i of its statistics.
        spec: provenance stored with each matrix; a file holding a matrix of the same name
            with another spec is refused rather than mixed.
    """
    for name, (kind, stats) in methods.items():
        if kind not in KINDS:
            raise ValueError(f"method {name!r}: kind must be one of {KINDS}, got {kind!r}")
    spec = dict(spec or {}, code_hash=code_hash(code))
    code_dev = code.to(device)
    with writing(path, "results file"), open_for_appending(path) as f:
        streams = {
            name: InfluenceStream(f, name, len(stats), len(code), block_rows, block_units, k,
                                  dict(spec, kind=kind))
            for name, (kind, stats) in methods.items()
        }
        f.swmr_mode = True  # readers may open the file from now on
        total = sum(s.n_row_blocks * s.n_unit_blocks for s in streams.values())
        done = sum(int(s._done.sum()) for s in streams.values())
        bar = Progress(total, "influence", "blocks", initial=done, enabled=progress)
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Optional[Future] = None
            for name, (kind, stats) in methods.items():
                pending = _stream_one(streams[name], kind, stats.to(device), code_dev, k, writer, pending, bar)
            if pending is not None:
                pending.result()
        bar.close()
    return streams


def _stream_one(stream: InfluenceStream, kind: str, stats: Tensor, code: Tensor, k: int,
                writer: ThreadPoolExecutor, pending: Optional[Future], bar) -> Optional[Future]:
    """Score and write one method's matrix; at most one block waits for the disk at a time."""
    for rb in range(stream.n_row_blocks):
        if stream.topk_done[rb]:
            continue
        rows = stream.row_range(rb)
        block_stats = stats[rows.start : rows.stop]
        previous = None
        for ub in range(stream.n_unit_blocks):
            units = stream.unit_range(ub)
            # blocks already on disk are re-scored (cheap) only to rebuild the running top-k
            out = code_scores(code[units.start : units.stop], k=k, unit_offset=units.start,
                              previous=previous, **{"gram" if kind == "first_order" else "losses": block_stats})
            previous = (out.top_values, out.top_indices)
            if stream.is_done(rb, ub):
                continue
            block = out.scores.float().cpu().numpy()
            if pending is not None:
                pending.result()
            pending = writer.submit(stream.write_block, rb, ub, block)
            bar.update(1)
        if pending is not None:
            pending.result()
        values = previous[0].float().cpu().numpy()
        values[~np.isfinite(values)] = np.nan  # empty slots: index -1, score NaN
        pending = writer.submit(stream.write_topk, rb, values, previous[1].cpu().numpy())
    return pending


def part_path(results: os.PathLike, rank: int, size: int) -> Path:
    """Where rank ``rank`` of ``size`` writes its part of a distributed attribution."""
    results = Path(results)
    return results.with_name(results.name + ".parts") / f"rank{rank}-of-{size}.h5"


STITCHED = ("influence", "progress", "topk", "statistics")
PER_RANK = ("statistics/features_dtrak_train", "statistics/features_trak_train")  # whole on every rank


def stitch_parts(path: os.PathLike, parts) -> None:
    """Make ``path`` show the part files of a distributed attribution as one file.

    Every dataset under /influence, /progress, /topk and /statistics of the parts (each part
    holds a contiguous range of rows, in whole row blocks, in rank order) becomes a virtual
    dataset of ``path`` that concatenates them along the rows. Readers need nothing but h5py
    and the parts folder beside the file (sources are named relative to it). A dataset that
    ``path`` holds as real data (from a one-process run) is never replaced.
    """
    path = Path(path)
    opened = [h5py.File(p, "r") for p in parts]
    try:
        filled = [f for f in opened if np.diff(json.loads(f.attrs["rows"]))[0] > 0]
        if not filled:
            return
        names: list = []
        filled[0].visititems(lambda name, obj: names.append(name)
                             if isinstance(obj, h5py.Dataset) and name.split("/")[0] in STITCHED
                             and name not in PER_RANK else None)
        with writing(path, "results file"), open_for_appending(path) as out:
            real = [name for name in names if name in out and not out[name].is_virtual]
            if real:
                raise StoreError(f"{path} already holds /{real[0]} from a one-process run; resume it on one "
                                 "process or write to a new results file")
            for name in names:
                sources = [f[name] for f in filled]
                layout = h5py.VirtualLayout((sum(len(s) for s in sources), *sources[0].shape[1:]), sources[0].dtype)
                at = 0
                for source in sources:
                    relative = os.path.relpath(source.file.filename, path.parent)
                    layout[at : at + len(source)] = h5py.VirtualSource(relative, name, source.shape)
                    at += len(source)
                if name in out:
                    del out[name]
                stitched = out.create_virtual_dataset(name, layout, fillvalue=sources[0].fillvalue)
                for key, value in sources[0].attrs.items():
                    stitched.attrs[key] = value
                if "spec" in stitched.attrs:
                    spec = json.loads(stitched.attrs["spec"])
                    stitched.attrs["spec"] = json.dumps(dict(spec, rows=stitched.shape[0]))
    finally:
        for f in opened:
            f.close()


def stream_scores(path: os.PathLike, name: str, scores: Tensor, k: int = 10, block_rows: int = 64,
                  block_units: int = 16384, spec: Optional[dict] = None) -> InfluenceStream:
    """Write a matrix computed elsewhere (gradient methods: [K, N]) as ``/influence/<name>``
    and ``/topk/<name>``, in the blocks and with the done flags of every other method."""
    with writing(path, "results file"), open_for_appending(path) as f:
        stream = InfluenceStream(f, name, len(scores), scores.shape[1], block_rows, block_units, k,
                                 dict(spec or {}, kind="precomputed"))
        f.swmr_mode = True
        for rb in range(stream.n_row_blocks):
            rows = stream.row_range(rb)
            block = scores[rows.start : rows.stop].float()
            for ub in range(stream.n_unit_blocks):
                if not stream.is_done(rb, ub):
                    units = stream.unit_range(ub)
                    stream.write_block(rb, ub, block[:, units.start : units.stop].numpy())
            if not stream.topk_done[rb]:
                top = block.nan_to_num(nan=-float("inf")).topk(min(k, block.shape[1]), dim=1)
                values = top.values.numpy().copy()
                indices = top.indices.numpy().copy()
                empty = ~torch.isfinite(top.values).numpy()
                values[empty], indices[empty] = np.nan, -1
                pad = k - values.shape[1]
                if pad > 0:  # fewer units than k
                    values = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan)
                    indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
                stream.write_topk(rb, values, indices)
    return stream
