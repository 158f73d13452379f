"""Member-sharded sampling and ablation (torchrun, gloo): each rank holds its share of the
members and every step gathers their outputs; the files equal one process's bit for bit."""

import os

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import ensattr

from ensattr_fast import codes
from ensattr_fast.diffusion.sampling import ablate
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedMLP
from ensattr_fast.members.sharded import shard_members

TRAIN = ["--steps", "6", "--batch-size", "32", "--hidden", "64", "--blocks", "1"]
SAMPLE = ["--seeds", "6", "--sampling-steps", "8", "--chunk", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("member_sharding")
    # 6 members over 2 ranks (3 + 3); the 10 classes as units, each excluded by one member
    ensattr(1, "plan", "--out", str(d / "plan.h5"), "--members", "6", "--units", "class", "--excluders", "1")
    ensattr(1, "train", "--plan", str(d / "plan.h5"), "--out", str(d / "ensemble.pt"), *TRAIN)
    for ranks, flags in ((1, []), (2, ["--shard-members"])):
        results = str(d / f"results{ranks}.h5")
        ensattr(ranks, "sample", "--checkpoint", str(d / "ensemble.pt"), "--out", results, *SAMPLE, *flags)
        ensattr(ranks, "ablate", "--checkpoint", str(d / "ensemble.pt"), "--results", results, "--nearest", "2",
                "--phantoms", "4", *flags)
    return d


def test_sharded_members_sample_and_ablate_like_one_process(runs):
    with h5py.File(runs / "results1.h5", "r") as one, h5py.File(runs / "results2.h5", "r") as two:
        for name in ("samples/images", "counterfactuals/units", "counterfactuals/images",
                     "counterfactuals/floor_distance", "counterfactuals/pvalue"):
            assert np.array_equal(one[name][()], two[name][()], equal_nan=True), name
        assert one["samples/images"].shape[0] == 6 and np.isfinite(one["counterfactuals/images"][()]).all()


def _ablate_in_shards(rank: int, world: int, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ensemble = StackedMLP(6, (1, 8, 8), hidden=32, blocks=1, seed=3)
        sharded = shard_members(ensemble)
        held = sharded.shard.n_members
        code = codes.balanced_constant_weight(12, 6, seed=0)
        result = ablate(sharded, NoiseSchedule.linear(), Sampler("ddpm", 6, 1.0), code, [0, 1, 2], [[], [1], [4, 7]])
        torch.save(dict(held=held, images=result.images), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_each_rank_holds_its_members_and_ablates_like_one_process(tmp_path):
    out = str(tmp_path / "images")
    mp.spawn(_ablate_in_shards, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2)
    ensemble = StackedMLP(6, (1, 8, 8), hidden=32, blocks=1, seed=3)
    code = codes.balanced_constant_weight(12, 6, seed=0)
    whole = ablate(ensemble, NoiseSchedule.linear(), Sampler("ddpm", 6, 1.0), code, [0, 1, 2], [[], [1], [4, 7]]).images
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [p["held"] for p in parts] == [3, 3]  # each rank holds half of the 6 members
    for part in parts:  # DDPM: the shared noise too; every rank ends with every image
        assert torch.equal(part["images"], whole)
