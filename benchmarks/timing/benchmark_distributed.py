"""Training across processes: 2 gloo ranks of 1 thread each against 1 rank of 1 thread (the
scaling efficiency), with 1 process of 2 threads beside them, on the demo configuration.

Each configuration runs in fresh processes launched here (``torchrun`` for the 2 ranks); the
processes time the same training steps after a warm-up and rank 0 reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .._common import Record, Suite

M, B, HIDDEN, BLOCKS = 16, 128, 256, 3  # the demo's ensemble and batch
ROOT = Path(__file__).resolve().parents[2]  # the repository root, where ``-m benchmarks...`` resolves


def _worker(steps: int) -> None:
    import torch

    from ensattr_fast import codes
    from ensattr_fast.cli.main import launch
    from ensattr_fast.data import load_digits
    from ensattr_fast.diffusion.schedules import NoiseSchedule
    from ensattr_fast.members import StackedMLP
    from ensattr_fast.runtime import distributed
    from ensattr_fast.training import TrainConfig, Trainer

    launch("cpu")
    data = load_digits()
    units = codes.Units.per_example(len(data))
    code = codes.balanced_constant_weight(len(data), M, seed=0)
    members = distributed.shard(M)
    ensemble = StackedMLP(M, data.data_shape, HIDDEN, BLOCKS, shared_init=True).select(members)
    trainer = Trainer(ensemble, data, code, units.unit_of, units.names, NoiseSchedule.linear(),
                      TrainConfig(steps=10**9, batch_size=B), members=members)
    for _ in range(5):
        trainer.train_step()
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.world().main:
        print(json.dumps(dict(seconds=seconds, threads=torch.get_num_threads())))
    if distributed.world().distributed:
        torch.distributed.destroy_process_group()


def _launch(ranks: int, threads: int, steps: int) -> float:
    """Member-examples per second of one configuration."""
    module = [sys.executable, "-m", "benchmarks.timing.benchmark_distributed", "--worker", str(steps)]
    if ranks > 1:
        module = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                  "-m", "benchmarks.timing.benchmark_distributed", "--worker", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(module, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return steps * M * B / report["seconds"]


def run(quick: bool, device: str) -> Suite:
    suite = Suite("distributed training", quick)
    if device != "cpu":
        return suite  # NCCL scaling needs several GPUs
    steps = 20 if quick else 60
    case = f"M={M} B={B} MLP {HIDDEN}x{BLOCKS}, {steps} steps"
    one = _launch(1, 1, steps)
    two = _launch(2, 1, steps)
    threads = _launch(1, 2, steps)
    suite.record(Record(name=f"training, 2 gloo ranks x 1 thread vs 1 rank x 1 thread: {case}", value=two,
                        unit="member-examples/s", baseline=one, ratio=two / one, target="ratio >= 1.6",
                        met=two / one >= 1.6))
    suite.record(Record(name=f"training, 1 process x 2 threads vs 1 rank x 1 thread: {case}", value=threads,
                        unit="member-examples/s", baseline=one, ratio=threads / one))
    return suite


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
