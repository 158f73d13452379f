"""ensattr_fast's benchmark suite: ``python -m benchmarks [--quick] [--json PATH]``."""
