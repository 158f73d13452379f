"""The HDF5 store: streamed influence blocks, resume after SIGKILL, lazy and SWMR reading."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from ensattr_fast import codes
from ensattr_fast.ops import code_scores
from ensattr_fast.steps.scoring import stream_influence
from ensattr_fast.store import ResultsWriter, StoreError, open_results


def make_inputs(N=300, M=12, K=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    code = codes.balanced_constant_weight(N, M, seed=seed)
    J = torch.randn(K, 30, M, generator=g)
    return code, {"first_order": ("first_order", J.transpose(1, 2) @ J),
                  "loss": ("loss", torch.rand(K, M, generator=g))}


def test_streamed_matrices_equal_one_call(tmp_path):
    code, methods = make_inputs()
    path = tmp_path / "r.h5"
    stream_influence(path, code, methods, k=5, block_rows=7, block_units=64, progress=False)
    with open_results(path) as results:
        assert results.methods == ["first_order", "loss"]
        for name, (kind, stats) in methods.items():
            view = results.influence(name)
            assert view.complete and view.shape == (20, 300)
            whole = code_scores(code, k=5, **{"gram" if kind == "first_order" else "losses": stats})
            np.testing.assert_allclose(np.asarray(view), whole.scores.numpy(), rtol=1e-6)
            index, score = results.topk(name)
            np.testing.assert_array_equal(index[()], whole.top_indices.numpy())
            np.testing.assert_allclose(score[()], whole.top_values.numpy(), rtol=1e-6)
        assert results.influence("loss")[3, 10:20].shape == (10,)


def test_a_file_of_another_run_is_refused(tmp_path):
    code, methods = make_inputs()
    path = tmp_path / "r.h5"
    stream_influence(path, code, {"loss": methods["loss"]}, k=3, block_rows=8, block_units=100, progress=False)
    with pytest.raises(StoreError, match="already holds /influence/loss from another run"):
        stream_influence(path, code, {"loss": methods["loss"]}, k=4, block_rows=8, block_units=100, progress=False)
    other = codes.balanced_constant_weight(300, 12, seed=5)
    with ResultsWriter(path) as writer:
        writer.set_attrs(code_hash="0" * 64)
        with pytest.raises(StoreError, match="holds results of another ensemble"):
            writer.check_code(other)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_store import make_inputs
    from ensattr_fast.steps.scoring import stream_influence
    code, methods = make_inputs(N=4000, M=16, K=512)
    stream_influence({path!r}, code, methods, k=6, block_rows=8, block_units=512, progress=False)
    """
)


def _run(path, tests_dir):
    return subprocess.Popen([sys.executable, "-c", SCRIPT.format(path=str(path), tests=tests_dir)])


def test_killed_run_resumes_to_the_same_file(tmp_path):
    tests_dir = os.path.dirname(__file__)
    whole = tmp_path / "whole.h5"
    assert _run(whole, tests_dir).wait() == 0

    killed = tmp_path / "killed.h5"
    process = _run(killed, tests_dir)
    seen = 0
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if killed.exists():
            try:
                with open_results(killed) as reader:  # SWMR: read while it is written
                    view = reader.influence("first_order")
                    seen = int(view.done.sum())
                    if seen >= 20:
                        partial = view[:, :]
                        with h5py.File(whole, "r") as f:
                            block = f["influence/first_order"][:8, :512]
                        np.testing.assert_allclose(partial[:8, :512], block)  # done blocks are complete
                        break
            except (OSError, KeyError, StoreError):
                pass
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert seen >= 20, "the run ended before it could be killed mid-way"
    with open_results(killed) as reader:
        assert not reader.influence("first_order").complete

    assert _run(killed, tests_dir).wait() == 0
    with h5py.File(whole, "r") as a, h5py.File(killed, "r") as b:
        for name in ("influence/first_order", "influence/loss", "topk/first_order/index",
                     "topk/first_order/score", "topk/loss/index", "topk/loss/score",
                     "progress/first_order", "progress/loss"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
