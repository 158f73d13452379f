"""The features file beside a checkpoint: filled block by block, resumed after a fault, reused,
and replaced when the checkpoint changed."""

import h5py
import pytest
import torch

from ensattr_fast.store.features import features_path, stored_features

M, N, D, ROWS = 3, 50, 4, 8
SPEC = dict(kind="dtrak", tag="", dim=D, timesteps=2, seed=0)


def _images():
    return torch.arange(N * 2, dtype=torch.float32).view(N, 2)


def _compute(calls, fail_after=None):
    def compute(block, start=0):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        calls.append(len(block))
        return torch.stack([block.sum(1, keepdim=True).expand(-1, D) * (m + 1) + torch.arange(D)
                            for m in range(M)])
    return compute


def _store(tmp_path, calls, checkpoint_hash="abc", fail_after=None):
    blocks = lambda rows: iter(_images().split(rows))  # noqa: E731
    return stored_features(tmp_path / "ensemble.pt", checkpoint_hash, SPEC, (M, N, D), _compute(calls, fail_after),
                           blocks, ROWS)


def _expected():
    return _compute([])(_images())


def test_features_are_stored_once_and_reused(tmp_path):
    calls = []
    features = _store(tmp_path, calls)
    assert sum(calls) == N and features.n == N
    torch.testing.assert_close(features.whole(), _expected())
    torch.testing.assert_close(features.gram, _expected().double().transpose(1, 2) @ _expected().double())
    again = []
    reused = _store(tmp_path, again)
    assert again == []  # read back, not computed
    torch.testing.assert_close(reused.whole(), _expected())
    assert features_path(tmp_path / "ensemble.pt").name == "ensemble.pt.features.h5"


def test_a_killed_fill_resumes_at_the_first_block_not_done(tmp_path):
    first = []
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path, first, fail_after=3)
    assert first == [ROWS] * 3
    with h5py.File(features_path(tmp_path / "ensemble.pt"), "r") as f:
        (group,) = f.values()
        assert not group.attrs["complete"] and "gram" not in group and group["done"][()].tolist()[:4] == [1, 1, 1, 0]
    rest = []
    features = _store(tmp_path, rest)
    assert sum(rest) == N - 3 * ROWS  # only the blocks not done
    torch.testing.assert_close(features.whole(), _expected())
    torch.testing.assert_close(features.gram, _expected().double().transpose(1, 2) @ _expected().double())


def test_features_of_another_checkpoint_are_replaced(tmp_path, capsys):
    _store(tmp_path, [])
    calls = []
    _store(tmp_path, calls, checkpoint_hash="retrained")
    assert sum(calls) == N
    assert "holds the features of another checkpoint" in capsys.readouterr().err


def test_another_spec_gets_its_own_group(tmp_path):
    _store(tmp_path, [])
    other = dict(SPEC, timesteps=5)
    stored_features(tmp_path / "ensemble.pt", "abc", other, (M, N, D), _compute([]),
                    lambda rows: iter(_images().split(rows)), ROWS)
    with h5py.File(features_path(tmp_path / "ensemble.pt"), "r") as f:
        assert len(f) == 2 and all(name.startswith("dtrak-") for name in f)
