"""The GPU machine's check: ``benchmarks/device_check.sh [FOLDER] [--dry-run]`` builds the
extension, then runs :mod:`.device_check` (``python -m benchmarks.device.device_check --out
DIR``): the op tests, the fused ops' timing benchmarks and the hardware figures of
:mod:`.hardware` (UNet-ensemble training, seed-cifar10, sampling and ablation throughput), each
stage on its own, into one JSON. ``--dry-run`` runs every stage on the CPU at the smallest sizes
(CI does, so that the script cannot rot); its figures mean nothing."""
