"""Distributed runs (torchrun, gloo): the demo configuration on 2 ranks gives the 1-rank run's
checkpoint, samples, counterfactuals and influence; and the pieces they are built from."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from ensattr_fast.members import StackedMLP
from ensattr_fast.runtime import distributed
from ensattr_fast.training.checkpoint import Checkpoint

DIGIT_UNITS = 1794  # the 1,797 digits planned one unit per image, their 3 near-duplicate pairs grouped

# the demo's configuration (16 members, one unit per digit image, MLP of width 256 with 3
# blocks, shared_noise, DDIM with eta 0), with fewer steps
TRAIN = ["--steps", "12", "--batch-size", "64", "--checkpoint-every", "5"]
SAMPLE = ["--seeds", "5", "--sampling-steps", "12"]
ATTRIBUTE = ["--samples", "5", "--method", "first_order,loss", "--block-rows", "2", "--draws", "8", "--check", "2"]


def ensattr(ranks: int, *args: str) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launch if ranks > 1 else [sys.executable]) + ["-m", "ensattr_fast", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    ensattr(1, "plan", "--out", str(d / "plan.h5"), "--members", "16")
    for ranks in (1, 2):
        ckpt, results = str(d / f"ensemble{ranks}.pt"), str(d / f"results{ranks}.h5")
        ensattr(ranks, "train", "--plan", str(d / "plan.h5"), "--out", ckpt, *TRAIN)
        ensattr(ranks, "sample", "--checkpoint", ckpt, "--out", results, *SAMPLE)
        ensattr(ranks, "attribute", "--checkpoint", ckpt, "--results", results, *ATTRIBUTE)
    return d


def test_two_ranks_train_the_same_members(runs):
    one, two = Checkpoint.load(runs / "ensemble1.pt"), Checkpoint.load(runs / "ensemble2.pt")
    assert one.spec == two.spec and one.step == two.step == 12
    # bit for bit: members are independent, so sharding them changes no reduction
    for state in ("ensemble", "ema"):
        for key, value in getattr(one, state).items():
            assert torch.equal(getattr(two, state)[key], value), key
    for a, b in zip(one.optimizer["state"].values(), two.optimizer["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(one.generator, two.generator)


def test_two_ranks_sample_and_attribute_like_one(runs):
    with h5py.File(runs / "results1.h5", "r") as one, h5py.File(runs / "results2.h5", "r") as two:
        for name in ("samples/images", "counterfactuals/units", "counterfactuals/images"):
            assert np.array_equal(one[name][()], two[name][()]), name
        for method in ("first_order", "loss"):
            assert two[f"influence/{method}"].is_virtual  # stitched from the ranks' parts
            for name in (f"influence/{method}", f"topk/{method}/index", f"topk/{method}/score", f"progress/{method}"):
                assert np.array_equal(one[name][()], two[name][()], equal_nan=True), name
    parts = sorted(p.name for p in (runs / "results2.h5.parts").iterdir())
    assert parts == ["rank0-of-2.h5", "rank1-of-2.h5"]


def test_results_of_a_distributed_run_read_from_anywhere(runs, tmp_path, monkeypatch):
    """The stitched file names its parts relative to itself: readers in another directory,
    with nothing but h5py, see one matrix."""
    from ensattr_fast.store import open_results

    monkeypatch.chdir(tmp_path)
    with open_results(runs / "results2.h5") as r:
        view = r.influence("first_order")
        assert view.shape == (5, DIGIT_UNITS) and view.complete and np.isfinite(view[:, :]).all()


def test_select_and_gather_members_round_trip():
    ensemble = StackedMLP(5, (1, 8, 8), hidden=16, blocks=1, seed=3)
    x, t = torch.randn(5, 2, 1, 8, 8), torch.randint(1000, (5, 2))
    part = ensemble.select(range(1, 4))
    assert part.n_members == 3 and part.spec()["n_members"] == 3
    torch.testing.assert_close(part(x[1:4], t[1:4]), ensemble(x, t)[1:4], rtol=0, atol=0)
    state = ensemble.state_dict()
    shards = [distributed.select_members(state, r) for r in (range(0, 2), range(2, 5))]
    for key, value in state.items():
        assert torch.equal(torch.cat([s[key] for s in shards]), value)


def _read_then_record(rank: int, world: int, init: str, results: str) -> None:
    import time

    import torch.distributed as dist

    from ensattr_fast import Audit
    from ensattr_fast.steps.options import AttributeOptions
    from ensattr_fast.store import open_results

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with open_results(results):  # as a step ends: rank 1 still reads when rank 0 is done
            time.sleep(5.0 * rank)  # longer than a writer waits for a lock (about 3 s)
        Audit(results=results)._record(results, AttributeOptions(samples=3))
    finally:
        dist.destroy_process_group()


def test_the_options_are_recorded_once_no_rank_reads(tmp_path):
    """Rank 0 keeps a step's options in the results file only when no rank still reads it: a
    reader's lock would refuse the writer's open (the race that failed a 3-rank attribute)."""
    import json

    import torch.multiprocessing as mp

    from ensattr_fast.store import ResultsWriter

    results = str(tmp_path / "results.h5")
    with ResultsWriter(results, "w") as writer:
        writer.set_attrs(code_hash="none")
    mp.spawn(_read_then_record, args=(2, f"file://{tmp_path / 'init'}", results), nprocs=2)
    with h5py.File(results, "r") as f:
        assert json.loads(f.attrs["options_attribute"])["samples"] == 3


@pytest.mark.parametrize("n,align,size", [(10, 1, 3), (10, 4, 2), (3, 4, 2), (0, 1, 2), (17, 2, 4)])
def test_shards_cover_the_rows_once_in_whole_blocks(n, align, size):
    shards = [distributed.shard(n, align, distributed.World(rank, size)) for rank in range(size)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % align == 0 for s in shards if len(s))


def test_sharded_training_features_match_one_process(runs, tmp_path):
    """D-TRAK's training features computed by 2 and 3 ranks, each its share of the examples
    (blocks of 256), the Grams summed: the features file and the scores equal one process's."""
    import shutil

    from ensattr_fast.store.features import features_path

    got = {}
    for ranks in (1, 2, 3):
        d = tmp_path / f"ranks{ranks}"
        d.mkdir()
        shutil.copy(runs / "ensemble1.pt", d / "ensemble.pt")
        ensattr(1, "sample", "--checkpoint", str(d / "ensemble.pt"), "--out", str(d / "results.h5"), "--seeds", "4",
                "--sampling-steps", "4")
        ensattr(ranks, "attribute", "--checkpoint", str(d / "ensemble.pt"), "--results", str(d / "results.h5"),
                "--samples", "4", "--method", "dtrak,dtrak_contrast", "--check", "0", "--feature-rows", "256",
                "--projection-dim", "64", "--block-rows", "2")
        with h5py.File(features_path(d / "ensemble.pt"), "r") as f, h5py.File(d / "results.h5", "r") as r:
            (name,) = list(f)
            assert f[name]["features"].is_virtual == (ranks > 1)
            got[ranks] = (f[name]["features"][()], f[name]["gram"][()], r["influence/dtrak"][()],
                          r["influence/dtrak_contrast"][()])
    assert got[1][0].shape == (16, 1797, 64)
    for ranks in (2, 3):
        assert np.array_equal(got[ranks][0], got[1][0])  # each example's features, bit for bit
        np.testing.assert_allclose(got[ranks][1], got[1][1], rtol=1e-12)  # the Grams: sums in another order
        for a, b in zip(got[ranks][2:], got[1][2:]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    parts = sorted(p.name.split("-rank")[1] for p in (tmp_path / "ranks3" / "ensemble.pt.features.parts").iterdir())
    assert parts == ["0-of-3.h5", "1-of-3.h5", "2-of-3.h5"]
    # a part taken away is refused in one line, never read as zeros
    (tmp_path / "ranks3" / "ensemble.pt.features.parts" / f"{name}-rank1-of-3.h5").unlink()
    d = tmp_path / "ranks3"
    result = subprocess.run([sys.executable, "-m", "ensattr_fast", "attribute", "--checkpoint", str(d / "ensemble.pt"),
                             "--results", str(d / "results.h5"), "--samples", "4", "--method", "dtrak_includers",
                             "--check", "0", "--projection-dim", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"{name}-rank1-of-3.h5" in result.stderr and "are missing" in result.stderr, result.stderr[-2000:]
