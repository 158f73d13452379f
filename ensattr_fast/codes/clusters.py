"""Content clusters: units for data without metadata, by seeded k-means on pixels.

k-means splits n points x_i in R^D into k clusters minimising sum_i ||x_i - c_{a(i)}||^2, where
a(i) is point i's cluster and c_j the mean of cluster j. Lloyd's algorithm alternates the two
halves of that minimum: assign each point to its nearest centre, move each centre to the mean
of its points; the sum never grows, so the assignments settle.

Two implementations of the same algorithm (k-means++ start, Lloyd iterations, every point then
given its nearest centre):

* **faiss** (``faiss.Kmeans``, the ``ensattr_fast[index]`` extra): float32, distances by BLAS
  matrix products. k = 1024 clusters of 10^5 images of 64 pixels take seconds, where the loop
  below takes over an hour; k-means at scale is a library's job, not ours. How its threads
  split the matrix products is not promised to leave the rounding alone, so for a result that
  does not depend on the machine's thread count the call runs on one OpenMP thread
  (``_FAISS_THREADS``), restored afterwards: still well under a minute at that size
  (``benchmarks/timing/benchmark_clusters.py``).
* **fallback** when faiss is not installed: a hand-written loop in float64 with one reduction
  order per value whatever the thread count (distances summed point by point, never through a
  BLAS product whose blocking follows the threads), exact but slow.

Either way the result must replay (a plan's units are part of its identity): random draws
follow the plan's seed, every tie is broken by a fixed rule (the fallback: to the lowest
index), and the same points and seed give the same clusters on any number of threads. The two
implementations need not agree with each other (float32 against float64 rounding), and faiss's
clusters are those of one faiss build and CPU family (its SIMD kernels round differently).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import CodeError
from ..runtime import memory

__all__ = ["kmeans"]

#: OpenMP threads of a faiss k-means: fixed, so that the same seed gives the same clusters on
#: any machine setting (1 thread: 10^5 x 64 points into 1024 clusters in about 12 s)
_FAISS_THREADS = 1

#: the memory budget's share of one block of the distance computation (float64; 64 MiB at
#: 2 GiB), so that distances to the centres never hold a copy of the data per centre
_BLOCK_SHARE = 1 / 32


def kmeans(points: Tensor, k: int, seed: int, iterations: int = 100) -> Tensor:
    """Cluster of each point, int64 [n], from seeded k-means on ``points`` [n, D].

    Centres start from k-means++ (the first a uniform draw; each next one drawn with
    probability proportional to D(x)^2, the squared distance of x to its nearest centre so
    far), seeded with ``seed``; Lloyd iterations then move them, at most ``iterations`` times
    (faiss runs all of them, the fallback stops once the assignments stop changing), and every
    point goes to its nearest centre. A cluster left empty takes the point farthest from its
    own centre. Clusters are renumbered by first appearance: cluster 0 holds point 0, cluster 1
    the first point not in cluster 0, and so on, so that names do not depend on the draws. The
    same points and seed give the same clusters on any number of threads.

    With faiss installed (``pip install ensattr_fast[index]``) this is ``faiss.Kmeans`` on all
    n points (no subsampling) in float32, on a fixed number of threads; without it, an exact
    float64 loop that gives the same guarantees but is slow (hours for 10^5 points and 1024
    clusters, against seconds).
    """
    x = _check(points, k, iterations)
    faiss = _faiss()
    if faiss is None:
        labels = _lloyd(x, k, seed, iterations)
    else:
        labels = _faiss_kmeans(faiss, x, k, seed, iterations)
    return _renumber(labels, k)


def _faiss():
    """The faiss module, or None when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@contextlib.contextmanager
def _faiss_threads(faiss, threads: int) -> Iterator[None]:
    """faiss (and its OpenMP BLAS) on ``threads`` threads inside the block, as before after it."""
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


def _faiss_kmeans(faiss, x: Tensor, k: int, seed: int, iterations: int) -> Tensor:
    """Clusters [n] (not renumbered) by ``faiss.Kmeans`` on ``x`` [n, D] as float32.

    faiss trains on at most ``max_points_per_centroid`` x k points, drawn at random past that:
    it is set to ceil(n / k) so that every point counts, as in the fallback (10^5 points cost
    seconds; a seeded subsample would bound the cost at larger n but change the clusters).
    ``min_points_per_centroid = 1`` only silences faiss's warning about few points per centre;
    faiss takes a 31-bit seed, ``seed mod 2^31``.
    """
    n, dim = x.shape
    y = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    with _faiss_threads(faiss, _FAISS_THREADS):
        model = faiss.Kmeans(
            dim, k, niter=iterations, nredo=1, seed=int(seed) % 2**31, verbose=False,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            max_points_per_centroid=-(-n // k), min_points_per_centroid=1,
        )
        model.train(y)
        own, labels = model.assign(y)  # nearest centre of every point
    # ||x||^2 + ||c||^2 - 2 x.c can round below 0, the mark of a point already moved
    own = torch.from_numpy(own.astype(np.float64)).clamp_min(0.0)
    return _fill_empty(torch.from_numpy(labels.astype(np.int64)), own, k)


def _lloyd(x: Tensor, k: int, seed: int, iterations: int) -> Tensor:
    """Clusters [n] (not renumbered) by the hand-written float64 loop, the same on any thread count:
    k-means++ from ``torch.Generator().manual_seed(seed)``, Lloyd until the assignments settle."""
    generator = torch.Generator().manual_seed(int(seed))
    centres = _plus_plus(x, k, generator)
    labels = None
    for _ in range(iterations):
        distances = _squared_distances(x, centres)  # [n, k]
        new = distances.argmin(1)  # first minimum: ties to the lowest cluster
        new = _fill_empty(new, distances.gather(1, new[:, None]).squeeze(1), k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = _means(x, labels, k)
    return labels


def _check(points: Tensor, k: int, iterations: int) -> Tensor:
    """``points`` as float64 [n, D], once k and the data are known to allow k clusters."""
    if not isinstance(points, Tensor) or points.dim() != 2:
        got = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise CodeError(f"k-means needs points [n, D], got {got}")
    n = len(points)
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n:
        raise CodeError(f"k-means needs 2 <= k <= n = {n} clusters, got k = {k!r}")
    if iterations < 1:
        raise CodeError(f"k-means needs at least one iteration, got {iterations}")
    x = points.detach().to("cpu", torch.float64).contiguous()
    if not torch.isfinite(x).all():
        raise CodeError("k-means points hold NaN or Inf values")
    distinct = len(torch.unique(x, dim=0))
    if distinct < k:  # k-means++ could not place k distinct centres
        raise CodeError(f"{k} clusters asked of {n} points with only {distinct} distinct values")
    return x


def _squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """||x_i - c_j||^2, float64 [n, k], summed over D for each pair alone (thread-proof)."""
    rows = max(1, memory.share(_BLOCK_SHARE, 8) // max(1, x.shape[1]))
    out = torch.empty(len(x), len(centres), dtype=torch.float64)
    for start in range(0, len(x), rows):
        block = x[start : start + rows]
        for j, centre in enumerate(centres):
            out[start : start + rows, j] = (block - centre).square().sum(1)
    return out


def _plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ centres [k, D]: chosen points have D^2 = 0, so they are never drawn twice."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = _squared_distances(x, x[chosen])[:, 0]  # D(x)^2 [n]
    for _ in range(1, k):
        total = torch.cumsum(nearest, 0)
        draw = torch.rand((), generator=generator, dtype=torch.float64) * total[-1]
        index = int(torch.searchsorted(total, draw, right=True))
        # a draw rounded up to the total falls past the end: take the last point still free
        index = min(index, int(nearest.nonzero()[-1]))
        chosen.append(index)
        nearest = torch.minimum(nearest, _squared_distances(x, x[index : index + 1])[:, 0])
    return x[chosen].clone()


def _fill_empty(labels: Tensor, own: Tensor, k: int) -> Tensor:
    """Give each empty cluster (lowest first) the point farthest from its own centre (``own``:
    squared distances [n]); a point moves at most once, and a cluster a move empties is filled
    in turn."""
    labels, own = labels.clone(), own.clone()
    while True:
        empty = (torch.bincount(labels, minlength=k) == 0).nonzero()
        if not len(empty):
            return labels
        far = int(own.argmax())  # first maximum: ties to the lowest index
        if own[far] < 0:  # every point has moved once: give up rather than cycle
            raise CodeError(f"k-means could not fill its {len(empty)} empty clusters")
        labels[far] = int(empty[0])
        own[far] = -1.0  # moved: not taken again


def _means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Centres [k, D]: the mean of each cluster's points, summed in point order."""
    return torch.stack([x[labels == j].mean(0) for j in range(k)])


def _renumber(labels: Tensor, k: int) -> Tensor:
    """Cluster ids by first appearance in point order."""
    first = torch.full((k,), len(labels), dtype=torch.long)
    first.scatter_reduce_(0, labels, torch.arange(len(labels)), "amin")
    new_id = torch.empty(k, dtype=torch.long)
    new_id[first.argsort()] = torch.arange(k)
    return new_id[labels]
