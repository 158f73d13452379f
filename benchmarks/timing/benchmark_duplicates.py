"""Duplicates at plan time (issue 19, item 1): the exact range search of ``plan`` over n images,
with faiss's flat index (the ``index`` extra) and with the torch blocks it falls back to, side by
side on the same images; both must find the planted sets. Target: 10^5 images in minutes."""

from __future__ import annotations

import time

import torch

from ensattr_fast.codes import duplicates as dup

from .._common import Record, Suite


def _images(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """n random images [n, dim] in [-1, 1] with 1% of them near-copies of 100 others (sets of
    up to ~11: exact copies and copies jittered by ~0.3 pixel L2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g) * 2 - 1
    copies = n // 100
    sources = torch.randint(0, 100, (copies,), generator=g)
    jitter = 0.3 * torch.randn(copies, dim, generator=g) / dim**0.5
    jitter[::2] = 0  # half of them exact
    x[n - copies:] = x[sources] + jitter
    return x, len(sources.unique())


def run(quick: bool, device: str) -> Suite:
    suite = Suite("duplicates at plan time", quick)
    if device != "cpu":
        return suite
    faiss = dup._faiss_index(torch.zeros(1, 2)) is not None
    cases = [(10_000, 64), (10_000, 3072)] if quick else [(10_000, 64), (100_000, 64), (100_000, 3072)]
    for n, dim in cases:
        x, planted = _images(n, dim)
        seconds, found = {}, {}
        searches = ["torch"] + (["faiss"] if faiss else [])
        original = dup._faiss_index
        for search in searches:
            dup._faiss_index = original if search == "faiss" else (lambda y: None)
            try:
                start = time.perf_counter()
                found[search] = dup.find_duplicates(x, 1.0)
                seconds[search] = time.perf_counter() - start
            finally:
                dup._faiss_index = original
        sets = found["torch"]
        assert sets.n_sets == planted, (sets.n_sets, planted)
        assert all(f.set_of.equal(sets.set_of) for f in found.values())
        case = f"{n:,} images of {dim} pixels, {sets.n_images:,} in {sets.n_sets} planted sets"
        ours = seconds.get("faiss", seconds["torch"])
        suite.record(Record(name=f"find every duplicate set, {case} ({'faiss' if faiss else 'torch'} filter)",
                            value=ours, unit="s", baseline=seconds["torch"], ratio=seconds["torch"] / ours,
                            target="<= 300 s at 10^5 images" if n >= 100_000 else None,
                            met=ours <= 300 if n >= 100_000 else None))
    return suite
