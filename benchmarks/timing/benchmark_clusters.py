"""Content clusters at plan time (issue 20, audits at scale): ``kmeans`` of n images of 64 pixels
into k = 1024 clusters, as ``plan --units clusters:1024`` runs it, through faiss (the ``index``
extra, on a fixed number of threads); and the hand-written fallback beside faiss on the same small
set of points, for the ratio. Target: 10^5 images in under 2 minutes."""

from __future__ import annotations

import time

import torch

from ensattr_fast.codes import clusters

from .._common import Record, Suite

DIM, K = 64, 1024


def _images(n: int, dim: int = DIM, modes: int = 4096, seed: int = 0) -> torch.Tensor:
    """n images [n, dim] in [-1, 1]: noisy copies of ``modes`` random images, so that the data
    has clusters to find but not exactly ``K`` of them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(modes, dim, generator=g) * 2 - 1
    mode = torch.randint(0, modes, (n,), generator=g)
    return (centres[mode] + 0.3 * torch.randn(n, dim, generator=g)).clamp(-1, 1)


def _check(labels: torch.Tensor, n: int, k: int) -> None:
    """Benchmarks time only results that are right: k non-empty clusters numbered by first appearance."""
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert bool((labels.bincount(minlength=k) > 0).all()), "a cluster is empty"
    first = torch.full((k,), n).scatter_reduce(0, labels, torch.arange(n), "amin")
    assert torch.equal(first.argsort(), torch.arange(k)), "clusters not numbered by first appearance"


def _inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Sum of squared distances of the points to their cluster's mean (float64)."""
    x = x.double()
    means = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means /= labels.bincount(minlength=k)[:, None]
    return float(((x - means[labels]) ** 2).sum())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _fallback(x: torch.Tensor, k: int) -> torch.Tensor:
    """``kmeans(x, k, seed=0)`` as it runs without faiss."""
    return clusters._renumber(clusters._lloyd(clusters._check(x, k, 100), k, 0, 100), k)


def run(quick: bool, device: str) -> Suite:
    suite = Suite("content clusters (k-means)", quick)
    if device != "cpu":
        return suite
    faiss = clusters._faiss() is not None
    engine = f"faiss, {clusters._FAISS_THREADS} thread{'s' * (clusters._FAISS_THREADS > 1)}" if faiss else "fallback"
    if faiss:  # the fallback would take hours here
        for n in [10_000] if quick else [10_000, 100_000]:
            x = _images(n)
            labels, seconds = _timed(lambda: clusters.kmeans(x, K, seed=0))
            _check(labels, n, K)
            if n <= 10_000:
                assert torch.equal(labels, clusters.kmeans(x, K, seed=0)), "the same seed gave other clusters"
            big = n >= 100_000
            suite.record(Record(name=f"kmeans of {n:,} x {DIM} points into {K} clusters ({engine})",
                                value=seconds, unit="s", target="< 120 s at 10^5 points" if big else None,
                                met=seconds < 120 if big else None))

    n, k = 2_000, 64
    x = _images(n)
    impls = {"fallback": lambda: _fallback(x, k)}
    if faiss:
        impls["faiss"] = lambda: clusters.kmeans(x, k, seed=0)
    results = {name: _timed(fn) for name, fn in impls.items()}
    for labels, _ in results.values():
        _check(labels, n, k)
    base_labels, base = results["fallback"]
    ours_labels, ours = results.get("faiss", results["fallback"])
    suite.record(Record(name=f"kmeans of {n:,} x {DIM} points into {k} clusters ({engine}) vs fallback",
                        value=ours, unit="s", baseline=base, ratio=base / ours))
    if faiss:  # the objective both minimise: ratio > 1 when faiss's clusters are tighter
        ours_ss, base_ss = _inertia(x, ours_labels, k), _inertia(x, base_labels, k)
        suite.record(Record(name=f"within-cluster sum of squares there ({engine}) vs fallback",
                            value=ours_ss, unit="pixel^2", baseline=base_ss, ratio=base_ss / ours_ss))
    return suite
