"""Duplicates at plan time: every pair within the radius found (both search paths, against
brute force), sets as connected components, units grouped so that some members exclude every
copy, and the three modes of ``plan``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components

from ensattr_fast import codes
from ensattr_fast.codes import duplicates as dup
from ensattr_fast.data import load_digits, plant_canaries
from ensattr_fast.data.canaries import save_canaries
from ensattr_fast.errors import DataError
from ensattr_fast.runtime import memory
from ensattr_fast.steps.options import PlanOptions
from ensattr_fast.steps.plan import plan

SEARCHES = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(dup._faiss_index(torch.zeros(1, 2)) is None,
                                                                     reason="faiss-cpu is not installed"))]


def brute_force(points: torch.Tensor, radius: float) -> np.ndarray:
    """Set of each point by the definition: components of the within-radius graph, -1 alone."""
    within = (torch.cdist(points.double(), points.double()) <= radius).numpy()
    _, label = connected_components(within, directed=False)
    sizes = np.bincount(label)
    out, number = np.full(len(points), -1), {}
    for i, lab in enumerate(label):
        if sizes[lab] > 1:
            out[i] = number.setdefault(lab, len(number))
    return out


def planted(dim: int, seed: int = 0) -> torch.Tensor:
    """Random points with exact copies, jittered near-copies and a chain (a~b, b~c, a not ~ c)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(600, dim, generator=g) * 2 - 1
    x[10] = x[3]  # exact
    x[500:520] = x[7] + 0.2 * torch.randn(20, dim, generator=g) / dim**0.5  # near, within ~0.2..0.3
    step = torch.zeros(dim)
    step[0] = 0.8
    x[100], x[101], x[102] = x[99] + step, x[99] + 2 * step, x[99] + 3 * step  # a chain of 0.8 links
    return x


@pytest.fixture(params=SEARCHES)
def search(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(dup, "_faiss_index", lambda y: None)
    return request.param


@pytest.mark.parametrize("dim", [16, 300])  # 300 > 64: the filter works on a projection
@pytest.mark.parametrize("radius", [0.0, 1.0, 1.7])
def test_duplicate_sets_equal_brute_force(search, dim, radius):
    x = planted(dim)
    found = dup.find_duplicates(x, radius)
    assert np.array_equal(found.set_of.numpy(), brute_force(x, radius))
    if radius >= 1.0:
        assert found.set_of[99] == found.set_of[102] >= 0  # transitively, though 2.4 apart
        assert (torch.cdist(x[99:100], x[102:103]) > radius).all()
    assert found.set_of[3] == found.set_of[10] >= 0  # exact copies, at any radius


def test_sets_are_numbered_by_first_image_and_stated():
    x = planted(16)
    found = dup.find_duplicates(x, 1.0)
    firsts = [int(found.members(k)[0]) for k in range(found.n_sets)]
    assert firsts == sorted(firsts) and firsts[0] == 3
    assert found.n_images == int(found.sizes.sum()) and found.largest == 21  # x[7] and its 20 near-copies
    assert str(found).startswith(f"{found.n_images} images in {found.n_sets} duplicate sets within pixel L2 1 ")
    assert str(dup.find_duplicates(torch.eye(5), 0.5)) == "no duplicate images (none within pixel L2 0.5)"


def test_same_sets_on_any_thread_count():
    x = planted(300, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dup.find_duplicates(x, 1.0).set_of
        torch.set_num_threads(max(2, threads))
        many = dup.find_duplicates(x, 1.0).set_of
    finally:
        torch.set_num_threads(threads)
    assert one.equal(many)


def test_bad_points_are_refused():
    with pytest.raises(DataError, match="NaN"):
        dup.find_duplicates(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1.0)
    with pytest.raises(DataError, match="embeddings must be one row per training image"):
        dup.check_embeddings(np.zeros((3, 2)), 4)


def test_grouped_units_keep_each_set_in_one_unit():
    units = codes.Units.from_labels(["a", "a", "b", "c", "d", "d", "e"])  # units a b c d e
    set_of = torch.tensor([-1, 0, 0, -1, 1, -1, 1])  # set 0 spans a, b; set 1 spans d, e
    grouped, merged = units.grouped(set_of)
    assert merged == 2 and grouped.n_units == 3
    assert grouped.names == ("a (+1 duplicate)", "c", "d (+1 duplicate)")
    assert grouped.unit_of.tolist() == [0, 0, 0, 1, 2, 2, 2]
    same, none = units.grouped(torch.full((7,), -1))
    assert none == 0 and same.unit_of.equal(units.unit_of) and same.names == units.names


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    """4 canaries x 12 copies in the digits, as one file a user plans one unit per image."""
    where = tmp_path_factory.mktemp("scattered")
    found = plant_canaries(load_digits(), canaries=4, copies=12, seed=3)
    save_canaries(where / "data.npz", where / "groups.csv", found)
    return where, found


def _plan(where, name, **options):
    options = {"units": "example", **options}
    return plan(where / name, PlanOptions(data=str(where / "data.npz"), members=16, **options))


def test_plan_groups_scattered_copies(scattered):
    where, found = scattered
    n = len(found.data) - 48
    made = _plan(where, "grouped.h5")
    assert made.duplicates.n_sets >= 4 and made.duplicates.largest >= 12
    with h5py.File(where / "grouped.h5", "r") as f:
        unit_of, code = f["units/of_example"][:], f["code"][:]
        set_of = f["duplicates/set_of"][:]
        assert f["duplicates"].attrs["mode"] == '"group"'
    for k in range(4):
        copies = np.arange(n + 12 * k, n + 12 * (k + 1))
        assert len(set(unit_of[copies])) == 1  # each canary's copies are one unit ...
        assert (code[unit_of[copies[0]]] == 0).any()  # ... which some member excludes whole
        assert len(set(set_of[copies])) == 1 and set_of[copies[0]] >= 0
    assert "units merged so that each set is one unit" in made.duplicates_line()


def test_plan_keep_and_refuse(scattered, capsys):
    where, found = scattered
    kept = _plan(where, "kept.h5", duplicates="keep")
    assert "no exact ablation removes it" in capsys.readouterr().err
    assert kept.scattered >= 4 and kept.stats.n_units == len(found.data)
    with pytest.raises(DataError, match="holds duplicates: .* duplicate sets"):
        _plan(where, "refused.h5", duplicates="refuse")
    assert not (where / "refused.h5").exists()
    alone = _plan(where, "zero.h5", duplicate_radius=0.5, duplicates="refuse", units="group",
                  metadata=where / "groups.csv")  # grouped by hand: every set within one unit
    assert alone.scattered == 0 and alone.merged == 0


def test_plan_on_embeddings(scattered):
    where, found = scattered
    embeddings = np.arange(len(found.data), dtype=np.float32)[:, None] * 10.0
    embeddings[5] = embeddings[900]  # two different digits the user's embedding calls the same
    np.save(where / "emb.npy", embeddings)
    made = _plan(where, "emb.h5", embeddings=where / "emb.npy", duplicate_radius=1.0)
    assert made.duplicates.space == "embeddings" and made.duplicates.n_sets == 1 and made.merged == 1
    np.save(where / "bad.npy", embeddings[:10])
    with pytest.raises(DataError, match=r"one row per training image"):
        _plan(where, "bad.h5", embeddings=where / "bad.npy")


def test_plan_duplicates_off_searches_nothing_and_says_so(scattered, capsys):
    """``--duplicates off`` (the search is quadratic: hours at 10^6 images) plans the units as
    they are, records that no search was made, and says what that leaves unnoticed."""
    from ensattr_fast.cli.main import main

    where, found = scattered
    assert main(["plan", "--data", str(where / "data.npz"), "--units", "example", "--members", "16",
                 "--duplicates", "off", "--out", str(where / "off.h5")]) == 0
    out, err = capsys.readouterr()
    assert "not searched (--duplicates off)" in out
    assert "plan: peak memory " in err and " GiB, CPU " in err  # every command's cost line
    with h5py.File(where / "off.h5", "r") as f:
        assert f["duplicates"].attrs["space"] == '"none"' and (f["duplicates/set_of"][:] == -1).all()
        assert f["code"].shape[0] == len(found.data)  # every copy its own unit


def test_a_small_budget_finds_the_same_duplicates(search):
    """--memory sizes the blocks of rows compared at once, never the sets."""
    x = planted(16)
    with memory.budget_of(1 / 1024):  # 1 MiB: a few dozen rows compared at a time
        assert memory.share(dup._PAIRS_SHARE, 4) // len(x) < len(x) // 10
        small = dup.find_duplicates(x, 1.0).set_of
    with memory.budget_of(8):
        large = dup.find_duplicates(x, 1.0).set_of
    assert np.array_equal(small.numpy(), large.numpy())
    assert np.array_equal(small.numpy(), brute_force(x, 1.0))
