"""Timing benchmarks: every ``benchmark_*.py`` here has ``run(quick, device) -> Suite``, checks
its results against the reference (or the baseline) before timing them, and times ours and the
baseline side by side in the same run, so that their ratio holds on a noisy machine. Run them
with ``python -m benchmarks [--quick] [--json PATH] [--only NAME ...]``, which finds every one of
them (``--only training`` selects ``benchmark_training``)."""
