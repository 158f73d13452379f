"""Content clusters (``--units clusters:K``): seeded k-means that replays bit for bit, by faiss
and by the hand-written fallback, its renumbering rule, its bounds, and plans built on it."""

import json
import sys

import h5py
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast import codes
from ensattr_fast.cli.main import main
from ensattr_fast.codes import clusters
from ensattr_fast.codes.clusters import _fill_empty, kmeans
from ensattr_fast.data import load_data, load_hdf5, units_for
from ensattr_fast.errors import CodeError, DataError
from ensattr_fast.runtime import memory


@pytest.fixture(scope="module")
def digits_points():
    """The 1797 digits flattened, float64 [1797, 64]: big enough for torch's threaded paths."""
    return torch.cat([b.flatten(1).double() for b in load_data("digits").blocks()])


def blobs(seed=0, per_blob=(30, 20, 25)):
    """Three tight Gaussian blobs far apart, shuffled: points [75, 5] and each point's blob [75]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * 5, [100.0] * 5, [-100.0, 100.0, -100.0, 100.0, -100.0]], dtype=torch.float64)
    blob = torch.cat([torch.full((n,), b) for b, n in enumerate(per_blob)])
    blob = blob[torch.randperm(len(blob), generator=g)]
    points = centres[blob] + torch.randn(len(blob), 5, generator=g, dtype=torch.float64)
    return points, blob


@pytest.fixture(params=["faiss", "fallback"])
def engine(request, monkeypatch):
    """Each k-means test once through faiss and once through the fallback (faiss made unimportable)."""
    if request.param == "faiss":
        pytest.importorskip("faiss")
    else:
        monkeypatch.setitem(sys.modules, "faiss", None)  # ``import faiss`` raises ImportError
    return request.param


def first_appearance(labels):
    """``labels`` renumbered by first appearance in example order."""
    order = {}
    return torch.tensor([order.setdefault(int(v), len(order)) for v in labels])


def test_the_same_seed_replays_bit_for_bit_on_any_thread_count(digits_points, engine):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(digits_points, 8, seed=3)
        torch.set_num_threads(2)
        two = kmeans(digits_points, 8, seed=3)
        again = kmeans(digits_points, 8, seed=3)
        torch.set_num_threads(4)
        four = kmeans(digits_points, 8, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == torch.int64 and one.shape == (1797,)
    assert torch.equal(one, two) and torch.equal(two, again) and torch.equal(one, four)


def test_faiss_replays_on_one_and_two_threads_and_restores_its_thread_count(digits_points):
    faiss = pytest.importorskip("faiss")
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    labels = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            labels.append(kmeans(digits_points, 100, seed=7))
            assert faiss.omp_get_max_threads() == threads  # the caller's setting, as it was
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)
    assert all(torch.equal(labels[0], other) for other in labels[1:])


def test_another_seed_may_cluster_differently(digits_points, engine):
    first = kmeans(digits_points, 8, seed=0)
    assert any(not torch.equal(first, kmeans(digits_points, 8, seed=s)) for s in range(1, 4))  # draws follow the seed


def test_well_separated_blobs_are_recovered_exactly(engine):
    points, blob = blobs()
    for seed in range(5):
        assert torch.equal(kmeans(points, 3, seed=seed), first_appearance(blob))


def test_clusters_are_numbered_by_first_appearance(digits_points, engine):
    labels = kmeans(digits_points, 10, seed=1)
    assert labels[0] == 0
    assert torch.equal(labels, first_appearance(labels))
    assert torch.equal(torch.unique(labels), torch.arange(10))  # no cluster left empty


def test_faiss_leaves_no_cluster_empty_even_with_many_clusters(digits_points):
    pytest.importorskip("faiss")
    labels = kmeans(digits_points, 300, seed=2)
    assert torch.equal(torch.unique(labels), torch.arange(300))
    assert torch.equal(labels, first_appearance(labels))


def test_points_distinct_only_in_float64_still_fill_every_faiss_cluster():
    pytest.importorskip("faiss")
    points = torch.ones(12, 3, dtype=torch.float64)
    points[:, 0] += torch.arange(12, dtype=torch.float64) * 1e-10  # one point in float32
    labels = kmeans(points, 4, seed=0)  # faiss puts every point in one cluster; three are filled
    assert torch.equal(torch.unique(labels), torch.arange(4))
    assert torch.equal(labels, first_appearance(labels))


def test_the_fallback_runs_when_faiss_is_missing(monkeypatch):
    calls = []
    lloyd, faiss_kmeans = clusters._lloyd, clusters._faiss_kmeans
    monkeypatch.setattr(clusters, "_lloyd", lambda *a: calls.append("fallback") or lloyd(*a))
    monkeypatch.setattr(clusters, "_faiss_kmeans", lambda *a: calls.append("faiss") or faiss_kmeans(*a))
    points, blob = blobs()
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "faiss", None)  # ``import faiss`` raises ImportError
        assert torch.equal(kmeans(points, 3, seed=0), first_appearance(blob))
    assert calls == ["fallback"]
    if clusters._faiss() is not None:  # and faiss, once importable again
        kmeans(points, 3, seed=0)
        assert calls == ["fallback", "faiss"]


def test_an_empty_cluster_takes_the_point_farthest_from_its_centre():
    labels = torch.tensor([0, 0, 2, 2, 2])
    own = torch.tensor([5.0, 5.0, 1.0, 7.0, 0.0])  # squared distance of each point to its centre
    assert torch.equal(_fill_empty(labels, own, 3), torch.tensor([0, 0, 2, 1, 2]))
    own[3] = 5.0  # ties go to the lowest index
    assert torch.equal(_fill_empty(labels, own, 3), torch.tensor([1, 0, 2, 2, 2]))
    # cluster 0 loses its last point to cluster 3 and takes the next farthest in turn
    assert torch.equal(_fill_empty(labels, own, 4), torch.tensor([1, 3, 2, 0, 2]))


def test_units_from_clusters_are_named_cluster_0_to_k_minus_1():
    points, blob = blobs()
    units = codes.Units.from_clusters(points, 3, seed=0)
    assert units.names == ("cluster 0", "cluster 1", "cluster 2")
    assert torch.equal(units.unit_of, first_appearance(blob))
    assert units.sizes.sum() == len(points)


@pytest.mark.parametrize("k", [0, 1, -3, 76])
def test_k_out_of_bounds_is_refused(k):
    points, _ = blobs()
    with pytest.raises(CodeError, match=r"2 <= k <= n = 75"):
        kmeans(points, k, seed=0)


def test_fewer_distinct_points_than_clusters_is_refused():
    points = torch.zeros(10, 3, dtype=torch.float64)
    points[5:] = 1.0
    with pytest.raises(CodeError, match="only 2 distinct"):
        kmeans(points, 3, seed=0)


@pytest.mark.parametrize("kind", ["clusters:", "clusters:1", "clusters:x", "clusters:-3", "cluster:4"])
def test_units_for_refuses_malformed_cluster_kinds(kind):
    with pytest.raises(DataError, match="unit kind"):
        units_for(load_data("digits"), kind)


def test_plan_on_eight_content_clusters(tmp_path):
    path = tmp_path / "plan.h5"
    stats = ef.Audit(plan=path).plan(data="digits", units="clusters:8", members=16, seed=5).stats
    assert stats.n_units == 8 and stats.n_members == 16
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["units/name"][()]]
        unit_of = torch.from_numpy(f["units/of_example"][()])
        plan = json.loads(f.attrs["plan"])
    assert names == [f"cluster {j}" for j in range(8)]
    assert plan["units"] == "clusters:8" and plan["seed"] == 5
    assert plan["design"] == "sparse"  # few large units, as for groups
    assert plan["design_reason"].startswith("sparse exclusion: 8 units of 225 examples on average")
    assert torch.equal(unit_of, units_for(load_data("digits"), "clusters:8", seed=5).unit_of)


def test_clusters_of_data_on_disk_equal_those_in_memory(tmp_path):
    digits = load_data("digits")
    with h5py.File(tmp_path / "digits.h5", "w") as f:
        f["images"] = digits.images.numpy()
    on_disk = load_hdf5(tmp_path / "digits.h5", memory_budget=0)
    assert not on_disk.in_memory
    assert torch.equal(units_for(on_disk, "clusters:5", seed=2).unit_of,
                       units_for(digits, "clusters:5", seed=2).unit_of)


def test_design_reason_explains_the_auto_rule():
    many = codes.Units.per_example(300)
    code, design = codes.plan(many, 12)
    reason = codes.design_reason(many, code, design)
    assert reason.startswith("balanced constant weight: 300 units of 1 example on average, many small units")
    assert reason.endswith("each member sees at least 50% of the data")
    few = codes.Units.from_labels(torch.arange(100) % 10)
    code, design = codes.plan(few, 20)
    reason = codes.design_reason(few, code, design)
    assert reason.startswith("sparse exclusion: 10 units of 10 examples on average, few units (fewer than 4 x 20")
    assert reason.endswith("each member sees at least 90% of the data")


def test_the_command_line_prints_the_design_and_refuses_bad_cluster_counts(tmp_path, capsys):
    out = tmp_path / "plan.h5"
    assert main(["plan", "--out", str(out), "--units", "clusters:4", "--members", "8"]) == 0
    printed = capsys.readouterr().out
    assert "design: sparse exclusion: 4 units" in printed
    for bad in ("clusters:0", "clusters:", "clusters:1", "clusters:x", "clusters:-3"):
        refused = tmp_path / "refused.h5"
        assert main(["plan", "--out", str(refused), "--units", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ensattr plan: error: ") and len(err.splitlines()) == 1, err
        assert "clusters:K" in err
        assert not refused.exists() and list(tmp_path.iterdir()) == [out]


def test_a_small_budget_gives_the_same_clusters(monkeypatch):
    """--memory sizes the blocks of the distances to the centres, never the clusters."""
    monkeypatch.setattr(clusters, "_faiss", lambda: None)  # the blocked float64 path
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(3))
    with memory.budget_of(1 / 1024):
        small = clusters.kmeans(x, 12, seed=0, iterations=20)
    with memory.budget_of(8):
        large = clusters.kmeans(x, 12, seed=0, iterations=20)
    assert torch.equal(small, large)
