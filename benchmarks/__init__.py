"""ensattr_fast's benchmarks, one sub-package per job:

- :mod:`benchmarks.timing`: ours against a baseline, timed side by side (``python -m benchmarks
  [--quick] [--json PATH] [--only NAME ...]``);
- :mod:`benchmarks.studies`: how good the answers are (LDS per training mode, gradient
  combinations, projection; the trust measurements, ``python -m benchmarks --only trust``);
- :mod:`benchmarks.device`: the GPU machine's check (``benchmarks/device_check.sh``);
- :mod:`benchmarks.regression`: files equal to an older commit's
  (``python -m benchmarks.regression.same_results``).

:mod:`benchmarks._common` holds what they share: the record format, side-by-side timing and
result checks.
"""
