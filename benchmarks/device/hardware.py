"""Convolutional ensembles on the hardware at hand: the device check's main figures.

- training throughput (member-examples per second) of a UNet ensemble trained as one batched
  ensemble against the same members trained one after another, each precision the device
  supports side by side;
- the seed's CIFAR-10 UNet (``seed-cifar10``), a few members per pass, bf16 batched against
  fp32 one by one;
- sampling and batched ablated sampling throughput in images per second.

``dry_run`` shrinks everything to seconds on a CPU (CI keeps the device check working with it).
Not part of ``python -m benchmarks`` (its figures need a GPU to mean anything): run by
``benchmarks/device_check.sh`` through :mod:`benchmarks.device.device_check`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Dict, List, Optional

import torch

from ensattr_fast import codes
from ensattr_fast.data import Dataset
from ensattr_fast.diffusion.sampling import ablate, sample
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import MemberOptions, build_members
from ensattr_fast.members.passes import Passes
from ensattr_fast.training import TrainConfig, Trainer

from .._common import Record, Suite


@dataclasses.dataclass(frozen=True)
class Sizes:
    members: int
    batch: int
    steps: int  # timed training steps
    side: int
    arch: str
    seed_members: int  # seed-cifar10 members
    seed_batch: int
    samples: int
    sampling_steps: int
    ablations: int
    repeats: int  # timed calls after the warm-up, median taken
    seed_config: Optional[dict] = None  # overrides of the seed-cifar10 UNet (the dry run's: tiny)


GPU = Sizes(members=8, batch=128, steps=10, side=32, arch="unet-small", seed_members=4, seed_batch=64,
            samples=256, sampling_steps=50, ablations=16, repeats=3)
DRY = Sizes(members=2, batch=2, steps=1, side=8, arch="unet-small", seed_members=2, seed_batch=1,
            samples=2, sampling_steps=2, ablations=2, repeats=1,
            seed_config=dict(block_out_channels=[8, 16, 16, 16], norm_num_groups=8))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _data(side: int, n: int = 512) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.rand(n, 3, side, side, generator=g) * 2 - 1, name="random images")


def _trainers(options: MemberOptions, data: Dataset, members: int, config: TrainConfig, device: str,
              batched: bool, **trainer_options) -> List[Trainer]:
    """One trainer of all members (batched), or one per member (the seed's way)."""
    units = codes.Units.per_example(len(data))
    code = codes.balanced_constant_weight(len(data), members, seed=0, allow_duplicates=True)
    ensemble = build_members(options, members, data.data_shape, shared_init=True, seed=0)
    parts = [range(members)] if batched else [range(m, m + 1) for m in range(members)]
    return [Trainer(ensemble.select(part) if not batched else ensemble, data, code, units.unit_of, units.names,
                    NoiseSchedule.linear(), config, device, members=None if batched else part, **trainer_options)
            for part in parts]


def _train_steps(trainers: List[Trainer], steps: int) -> None:
    """``steps`` training steps of every trainer, one after another. Its callers ``del`` their
    trainers once timed (device memory back before the next configuration): a closure over that
    name ran right, but reads as undefined to pyflakes (F821), so the trainers are an argument."""
    for _ in range(steps):
        for trainer in trainers:
            trainer.train_step()


def _training(suite: Suite, sizes: Sizes, device: str, precisions: List[str]) -> None:
    data = _data(sizes.side)
    timed = {}
    for precision in precisions:
        config = TrainConfig(steps=10**9, batch_size=sizes.batch, ema_decay=None, precision=precision)
        for batched in (True, False):
            trainers = _trainers(MemberOptions(arch=sizes.arch), data, sizes.members, config, device, batched)
            seconds = _seconds(functools.partial(_train_steps, trainers, sizes.steps), device, sizes.repeats)
            timed[precision, batched] = rate = sizes.members * sizes.batch * sizes.steps / seconds
            how = "batched" if batched else "one by one"
            suite.record(Record(name=f"training {sizes.arch} x{sizes.members} {sizes.side}px B={sizes.batch} "
                                     f"{precision} {how}", value=rate, unit="member-examples/s"))
            del trainers
    for precision in precisions:
        ratio = timed[precision, True] / timed[precision, False]
        suite.record(Record(name=f"training {sizes.arch} x{sizes.members} {precision}: batched / one by one",
                            value=timed[precision, True], unit="member-examples/s",
                            baseline=timed[precision, False], ratio=ratio))


def _seed_cifar10(suite: Suite, sizes: Sizes, device: str, fast: str) -> None:
    """The seed's 35.7M-parameter UNet: ``fast`` precision batched, a few members per pass,
    against fp32 one member after another."""
    data = _data(32 if device == "cuda" else sizes.side)
    rates = {}
    for precision, batched in ((fast, True), ("fp32", False)):
        config = TrainConfig(steps=10**9, batch_size=sizes.seed_batch, ema_decay=None, precision=precision)
        trainers = _trainers(MemberOptions(arch="seed-cifar10", unet_config=sizes.seed_config), data,
                             sizes.seed_members, config, device, batched,
                             passes=Passes(members_per_pass=max(1, sizes.seed_members // 2) if batched else None))
        steps = max(1, sizes.steps // 2)
        seconds = _seconds(functools.partial(_train_steps, trainers, steps), device, sizes.repeats)
        rates[batched] = sizes.seed_members * sizes.seed_batch * steps / seconds
        del trainers
    suite.record(Record(name=f"training seed-cifar10 x{sizes.seed_members} B={sizes.seed_batch}: {fast} batched "
                             f"({max(1, sizes.seed_members // 2)} members per pass) / fp32 one by one",
                        value=rates[True], unit="member-examples/s", baseline=rates[False],
                        ratio=rates[True] / rates[False], target="ratio >= 3" if device == "cuda" else None,
                        met=rates[True] / rates[False] >= 3 if device == "cuda" else None))


@torch.no_grad()
def _sampling(suite: Suite, sizes: Sizes, device: str) -> None:
    members = sizes.members
    ensemble = build_members(MemberOptions(arch=sizes.arch), members, (3, sizes.side, sizes.side),
                             shared_init=False, seed=0).to(device).eval()
    schedule, sampler = NoiseSchedule.linear(), Sampler("ddim", sizes.sampling_steps, 0.0)
    seeds = list(range(sizes.samples))
    seconds = _seconds(lambda: sample(ensemble, schedule, sampler, seeds), device, sizes.repeats)
    suite.record(Record(name=f"sampling {sizes.arch} x{members}, {sizes.sampling_steps} DDIM steps",
                        value=sizes.samples / seconds, unit="images/s"))
    code = codes.balanced_constant_weight(64, members, seed=0, allow_duplicates=True)
    few = seeds[: max(1, sizes.samples // sizes.ablations)]
    unit_sets = [[u] for u in range(sizes.ablations)]
    seconds = _seconds(lambda: ablate(ensemble, schedule, sampler, code, few, unit_sets), device, sizes.repeats)
    suite.record(Record(name=f"ablated sampling {sizes.arch} x{members}: {sizes.ablations} ablations x {len(few)} "
                             f"samples", value=len(few) * sizes.ablations / seconds, unit="counterfactuals/s"))


def stages(device: str, dry_run: bool = False) -> Dict[str, Callable[[], Suite]]:
    """The device check's hardware stages by name, each its own Suite (one failing, for
    example seed-cifar10 where diffusers is missing, loses none of the others' figures)."""
    sizes = DRY if dry_run else GPU
    bf16 = device == "cpu" or torch.cuda.is_bf16_supported()

    def stage(part: Callable[[Suite], None], label: str) -> Callable[[], Suite]:
        def go() -> Suite:
            suite = Suite(label, quick=True)
            part(suite)
            return suite

        return go

    return {
        "training": stage(lambda s: _training(s, sizes, device, ["fp32", "bf16" if bf16 else "fp16"]), "training"),
        "seed-cifar10": stage(lambda s: _seed_cifar10(s, sizes, device, "bf16" if bf16 else "fp16"), "seed-cifar10"),
        "sampling": stage(lambda s: _sampling(s, sizes, device), "sampling"),
    }
