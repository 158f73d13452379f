"""The features file beside a checkpoint: the training examples' gradient features and their
Grams, computed once per ensemble and feature spec and read by every later attribution.

``<checkpoint>.features.h5`` holds one group per feature spec (named by its kind, tag and a
hash of the whole spec): ``features`` float32 [M, n, d], written block by block as the blocks
are computed (never whole in memory), ``done`` uint8 [blocks] (a block's flag is set after its
data is flushed, so a killed run resumes at the first block not done), and, once every block is
there, ``gram`` float64 [M, d, d] (Phi_m^T Phi_m per member; only where d <= n: with fewer
examples than dimensions the kernel is solved in its n x n dual form, from the features) and the
attribute ``complete``.
The root's ``checkpoint_hash`` ties the file to the checkpoint: features of another checkpoint
(the ensemble retrained) are replaced, with a note. Results files stay small: they keep the
queries' features only (``--keep-features`` copies the training ones in as well).

Sharded (:func:`stored_features` with ``rank``/``ranks``): each rank computes a contiguous
range of whole blocks into its part, ``<checkpoint>.features.parts/<group>-rank<r>-of-<W>.h5``
(resumable the same way), the Grams are summed over the ranks, and rank 0 writes the group with
``features`` a virtual dataset over the parts (named relative to the file) and the summed Gram.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import h5py
import numpy as np
import torch
from torch import Tensor

from ..attribution.kernels import TrainFeatures, add_gram
from ..runtime.files import check_space, writing
from ..runtime.progress import Progress, note
from .hdf5 import damaged, dump_json, read_hdf5, versions, writable

__all__ = ["features_path", "stored_features", "copy_features", "FEATURES_SUFFIX"]

FEATURES_SUFFIX = ".features.h5"


def features_path(checkpoint: os.PathLike) -> Path:
    """Where the features of the ensemble in ``checkpoint`` are kept."""
    return Path(str(checkpoint) + FEATURES_SUFFIX)


def group_name(spec: dict) -> str:
    """A spec's group: its kind and tag, and a hash of all of it (timesteps, seed, ...)."""
    digest = hashlib.sha256(dump_json(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec['kind']}{spec.get('tag', '')}-{digest}"


def stored_features(checkpoint: os.PathLike, checkpoint_hash: str, spec: dict, shape: tuple,
                    compute: Callable[[Tensor, int], Tensor], images: Callable[[int], Iterator[Tensor]],
                    block_rows: int, progress: bool = False, rank: int = 0, ranks: int = 1,
                    sum_over_ranks: Callable[[Tensor], Tensor] = lambda gram: gram,
                    barrier: Callable[[], None] = lambda: None) -> TrainFeatures:
    """The training features of ``spec`` (``shape`` = (M, n, d)) from the features file, the
    blocks not yet there computed first: ``images(block_rows)`` yields the training images in
    order, ``block_rows`` at a time, and ``compute(block, start)`` maps a block and the index of
    its first example to its features [M, b, d].
    With ``ranks`` > 1 every rank calls this, computes its share of the blocks into its part
    (``sum_over_ranks`` and ``barrier`` are the run's collectives), and rank 0 joins them."""
    path, name = features_path(checkpoint), group_name(spec)
    if not _complete(path, name, checkpoint_hash):
        if ranks == 1:
            with writing(path, "features file"):
                _replace_if_stale(path, checkpoint_hash)
                _fill(path, name, checkpoint_hash, spec, shape, compute, images, block_rows, progress,
                      shape[2] <= shape[1])
        else:
            _sharded(path, name, checkpoint_hash, spec, shape, compute, images, block_rows, progress, rank, ranks,
                     sum_over_ranks, barrier)
    return _reader(path, name, shape[1], block_rows)


def _sharded(path: Path, name: str, checkpoint_hash: str, spec: dict, shape: tuple, compute, images,
             block_rows: int, progress: bool, rank: int, ranks: int, sum_over_ranks, barrier) -> None:
    M, n, d = shape
    with_gram = d <= n
    blocks = -(-n // block_rows)
    first, last = blocks * rank // ranks, blocks * (rank + 1) // ranks
    rows = range(min(n, first * block_rows), min(n, last * block_rows))
    parts = [_part(path, name, r, ranks) for r in range(ranks)]
    parts[rank].parent.mkdir(parents=True, exist_ok=True)
    with writing(parts[rank], "features part"):
        _replace_if_stale(parts[rank], checkpoint_hash)
        gram = _fill(parts[rank], name, checkpoint_hash, spec, (M, len(rows), d),
                     lambda block, start: compute(block, start + rows.start),
                     lambda size: _share(images(size), first, last), block_rows, progress, with_gram)
    if with_gram:
        if gram is None:  # the part was whole: its Gram is there
            with read_hdf5(parts[rank], "features part") as f:
                gram = torch.from_numpy(f[name]["gram"][()])
        sum_over_ranks(gram)
    barrier()  # every part is whole
    if rank == 0:
        with writing(path, "features file"):
            _replace_if_stale(path, checkpoint_hash)
            with writable(path) as f:
                f.attrs["checkpoint_hash"] = checkpoint_hash
                if name in f:
                    del f[name]
                layout = h5py.VirtualLayout(shape, np.float32)
                at = 0
                for part in parts:
                    with h5py.File(part, "r") as p:
                        size = p[name]["features"].shape[1]
                    if not size:  # a rank with no block
                        continue
                    source = h5py.VirtualSource(os.path.relpath(part, path.parent), f"{name}/features",
                                                (M, size, d))
                    layout[:, at:at + size] = source
                    at += size
                group = f.create_group(name)
                group.attrs.update(spec=dump_json(spec), block_rows=block_rows, complete=False, ranks=ranks)
                group.create_virtual_dataset("features", layout)
            _finish(path, name, gram if with_gram else None)
    barrier()  # the file is whole


def _part(path: Path, name: str, rank: int, ranks: int) -> Path:
    return path.parent / (path.name.removesuffix(".h5") + ".parts") / f"{name}-rank{rank}-of-{ranks}.h5"


def _share(blocks: Iterator[Tensor], first: int, last: int) -> Iterator[Tensor]:
    """The blocks ``first`` to ``last`` - 1 of an iteration over every block."""
    for b, block in enumerate(blocks):
        if b >= last:
            return
        if b >= first:
            yield block


def _complete(path: Path, name: str, checkpoint_hash: str) -> bool:
    """Whether the file holds the spec's features whole (read only: other readers may be open)."""
    try:
        with h5py.File(path, "r") as f:
            group = f.get(name)
            return (f.attrs.get("checkpoint_hash") == checkpoint_hash and group is not None
                    and bool(group.attrs.get("complete", False)))
    except OSError:  # no file, or one to replace: under the lock
        return False


def _fill(path: Path, name: str, checkpoint_hash: str, spec: dict, shape: tuple, compute, images,
          block_rows: int, progress: bool, with_gram: bool) -> Optional[Tensor]:
    """The features ``shape`` of the blocks ``images`` yields into group ``name`` of ``path``
    (those a killed run left done are read back); their Gram (``with_gram``), or None when the
    group was complete already or without it."""
    M, n, d = shape
    with writable(path) as f:
        f.attrs["checkpoint_hash"] = checkpoint_hash
        f.attrs["versions"] = dump_json(versions())
        group = f.get(name)
        if group is not None and bool(group.attrs.get("complete", False)):
            return None
        if group is not None and ("done" not in group or int(group.attrs["block_rows"]) != block_rows
                                  or group["features"].shape != shape):
            del f[name]  # a resume under other blocks: start the spec over
            group = None
        if group is None:
            gram_bytes = M * d * d * 8 if with_gram else 0
            check_space(path.absolute().parent, M * n * d * 4 + gram_bytes + (1 << 20), f"features file {path}")
            group = f.create_group(name)
            group.attrs.update(spec=dump_json(spec), block_rows=block_rows, complete=False)
            group.create_dataset("features", shape, np.float32, chunks=(1, min(n, 256), d) if n else None)
            group.create_dataset("done", (-(-n // block_rows),), np.uint8, fillvalue=0)
        features, done = group["features"], group["done"]
        gram = torch.zeros(M, d, d, dtype=torch.float64) if with_gram else None
        with Progress(n, f"{spec['kind']} features of the training data", "examples", enabled=progress) as bar:
            for b, block in enumerate(images(block_rows)):
                start = b * block_rows
                if done[b]:
                    phi = torch.from_numpy(features[:, start:start + len(block)])
                else:
                    phi = compute(block, start).float()
                    features[:, start:start + len(block)] = phi.numpy()
                    f.flush()
                    done[b] = 1
                    f.flush()
                if gram is not None:
                    add_gram(gram, phi)
                bar.update(len(block))
        if not np.all(done[()]):
            raise RuntimeError(f"features file {path}: the training images ended before block "
                               f"{int(np.argmin(done[()]))} of {len(done)}")
    _finish(path, name, gram)
    return gram


def _finish(path: Path, name: str, gram: Optional[Tensor]) -> None:
    """The Gram written (where there is one), then the group marked whole."""
    with writable(path) as f:
        group = f[name]
        if "gram" in group:
            del group["gram"]
        if gram is not None:
            group.create_dataset("gram", data=gram.numpy())
        f.flush()
        group.attrs["complete"] = True


def _replace_if_stale(path: Path, checkpoint_hash: str) -> None:
    """A features file of another checkpoint, or one a fault left unreadable, is a cache gone
    bad: it is replaced (with a note), never read."""
    if not path.exists():
        return
    try:
        with h5py.File(path, "r") as f:
            held = f.attrs.get("checkpoint_hash")
    except OSError as error:
        note(f"features file {path} is unreadable ({error}): computing the features again")
        path.unlink()
        return
    if held is not None and held != checkpoint_hash:
        note(f"features file {path} holds the features of another checkpoint: replacing them")
        path.unlink()


def _reader(path: Path, name: str, n: int, block_rows: int) -> TrainFeatures:
    with read_hdf5(path, "features file") as f:
        gram = torch.from_numpy(f[name]["gram"][()]) if "gram" in f[name] else None
        if f[name]["features"].is_virtual:  # a sharded run's: a part taken away would read as zeros
            missing = [s.file_name for s in f[name]["features"].virtual_sources()
                       if not (path.parent / s.file_name).is_file()]
            if missing:
                raise damaged(path, f"the parts {missing} of its features are missing: delete it (and "
                                    f"{path.name.removesuffix('.h5')}.parts) to compute them again",
                              "features file")

    def blocks():
        with read_hdf5(path, "features file") as f:
            features = f[name]["features"]
            for start in range(0, n, block_rows):
                yield start, torch.from_numpy(features[:, start:start + block_rows])

    return TrainFeatures(n, gram, blocks)


def copy_features(features: TrainFeatures, results: os.PathLike, name: str) -> None:
    """``--keep-features``: the training features into ``/statistics/<name>`` of a results
    file, block by block."""
    from .writer import ResultsWriter

    first = next(features.blocks())[1]
    with ResultsWriter(results, "a") as writer:
        writer.write_statistic_blocks(name, (first.shape[0], features.n, first.shape[2]),
                                      ((start, block.numpy()) for start, block in features.blocks()))
