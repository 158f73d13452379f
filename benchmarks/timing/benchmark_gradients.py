"""Gradient features for TRAK / D-TRAK on the demo's ensemble: every training unit's features
under all 16 members at 10 timesteps, projected to 1,024 dimensions, with the rank-one layer
projections, side by side with per-example gradients from vmap + a CountSketch (the generic
path, on a subset); then scoring 32 queries once the features exist."""

from __future__ import annotations

import resource
import time

import torch

from ensattr_fast import codes
from ensattr_fast.attribution.gradients import FeatureSpec, _generic_features, combine, gradient_features, member_scores
from ensattr_fast.data import load_digits
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import StackedMLP

from .._common import Record, Suite

M = 16


def run(quick: bool, device: str) -> Suite:
    suite = Suite("gradient features", quick)
    data = load_digits()
    n = 256 if quick else len(data)
    images = data.images[:n].to(device)
    ensemble = StackedMLP(M, data.data_shape, shared_init=True).to(device)
    schedule, spec = NoiseSchedule.linear(), FeatureSpec("dtrak", timesteps=10, dim=1024)

    start = time.perf_counter()
    train = gradient_features(ensemble, schedule, images, spec)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    subset = 32
    start = time.perf_counter()
    _generic_features(ensemble, schedule, images[:subset], spec, 16, False)
    generic = (time.perf_counter() - start) * n / subset
    case = f"{device} {n} units x 10 timesteps x {M} members -> 1024 dims"
    suite.record(Record(name=f"D-TRAK features, {case}", value=seconds, unit="s", baseline=generic,
                        ratio=generic / seconds, target="< 180 s" if n == len(data) else None,
                        met=seconds < 180 if n == len(data) else None))
    suite.record(Record(name=f"peak RSS of the process after the features, {case}", value=rss, unit="GiB",
                        target="< 4 GiB", met=rss < 4))

    queries = data.images[-32:].to(device)
    code = codes.balanced_constant_weight(n, M, seed=0)
    unit_of = torch.arange(n)

    def score():
        q = gradient_features(ensemble, schedule, queries, spec)
        return combine(member_scores(train, q, unit_of, n), code, "mean")

    start = time.perf_counter()
    score()
    seconds = time.perf_counter() - start
    suite.record(Record(name=f"scoring 32 queries against {n} units (query features, kernel, mean over {M} members)",
                        value=seconds, unit="s", target="< 5 s", met=seconds < 5))
    return suite
