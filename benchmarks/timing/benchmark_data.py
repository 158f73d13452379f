"""Training from an HDF5 data set larger than the memory budget: the trainer reads each step's
examples from disk a step ahead, so loading hides behind the step. The demo-sized ensemble
trains side by side on the same images in memory and on disk; the loading share is the extra
step time on disk."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import torch

from ensattr_fast import codes
from ensattr_fast.data import Dataset, load_digits, load_hdf5
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import StackedMLP
from ensattr_fast.training import TrainConfig, Trainer

from .._common import Record, Suite

M, B = 16, 128  # the demo's ensemble and batch


def run(quick: bool, device: str) -> Suite:
    suite = Suite("training from disk", quick)
    if device != "cpu":
        return suite
    digits = load_digits()
    copies = 40 if quick else 120  # 72k or 216k images, 18 or 55 MB as float32
    images = digits.images.repeat(copies, 1, 1, 1)
    images = images + 0.01 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    unit_of = torch.arange(len(images)) % len(digits)  # the copies of a digit form one unit
    units = codes.Units(unit_of, tuple(str(u) for u in range(len(digits))))
    code = codes.balanced_constant_weight(len(digits), M, seed=0)
    budget = 8 << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=images.numpy(), chunks=(256, 1, 8, 8))
        on_disk = load_hdf5(path, memory_budget=budget)
        assert not on_disk.in_memory
        in_memory = Dataset(images, name="images")
        trainers = {}
        for name, data in (("memory", in_memory), ("disk", on_disk)):
            ensemble = StackedMLP(M, data.data_shape, shared_init=True)
            trainers[name] = Trainer(ensemble, data, code, units.unit_of, units.names, NoiseSchedule.linear(),
                                     TrainConfig(steps=10**9, batch_size=B))
        steps = 10 if quick else 40

        def run_steps(trainer):
            return lambda: [trainer.train_step() for _ in range(steps)]

        case = (f"M={M} B={B}, {len(images):,} images "
                f"({images.numel() * 4 / 2**20:.0f} MB > budget {budget >> 20} MB), {steps} steps")
        t_disk = suite.time(run_steps(trainers["disk"]), case, "HDF5 on disk, read a step ahead")
        t_memory = suite.time(run_steps(trainers["memory"]), case, "in memory")
        share = max(0.0, 1 - t_memory / t_disk)
        suite.record(Record(name=f"data loading share of the step, {case}", value=100 * share, unit="%",
                            baseline=t_memory / steps * 1e3, ratio=t_disk / t_memory, target="<= 10%",
                            met=share <= 0.10))
        index = trainers["disk"]._draw()["index"].flatten()
        start = time.perf_counter()
        for _ in range(5):
            on_disk.read(index)
        read = (time.perf_counter() - start) / 5
        suite.record(Record(name=f"one step's {len(index)} random rows read from HDF5 (not overlapped)",
                            value=read * 1e3, unit="ms", baseline=t_disk / steps * 1e3,
                            ratio=read / (t_disk / steps)))
    return suite
