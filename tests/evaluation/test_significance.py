"""The noise floor: phantom rows, p-values and Benjamini-Hochberg against references, the exact
floor against a brute-force replay of each phantom, and the copy certificate against exhaustive
exact ablation on a tiny ensemble."""

import h5py
import numpy as np
import pytest
import torch
from scipy import stats

import ensattr_fast as ef
from ensattr_fast import codes
from ensattr_fast.diffusion.sampling import ablate, run_trajectories
from ensattr_fast.errors import CodeError
from ensattr_fast.evaluation.significance import benjamini_hochberg, empirical_pvalues, significance, trend_pvalues
from ensattr_fast.store import open_results, read_sampler
from ensattr_fast.training.checkpoint import Checkpoint


def test_phantom_rows_are_of_the_codes_kind_and_belong_to_no_unit():
    code = codes.balanced_constant_weight(50, 8, seed=0)
    rows = codes.phantom_rows(code, 20, seed=3)
    assert rows.shape == (20, 8) and (rows.sum(1) == 4).all()
    taken = {tuple(r) for r in code.tolist()}
    assert not {tuple(r) for r in rows.tolist()} & taken
    assert len({tuple(r) for r in rows.tolist()}) == 20
    assert torch.equal(rows, codes.phantom_rows(code, 20, seed=3))
    assert codes.free_phantom_rows(code) == 70 - 50
    with pytest.raises(CodeError, match="20 rows of its kind free"):
        codes.phantom_rows(code, 21)
    sparse = codes.sparse_exclusion(10, 20, 2)
    excluders = (codes.phantom_rows(sparse, 40, seed=1) == 0).sum(1)
    assert (excluders == 2).all()  # sub-ensembles of the design's own size


def test_empirical_pvalues_count_the_floor():
    rng = np.random.default_rng(0)
    floor = rng.lognormal(0, 0.3, (4, 50))
    effects = np.concatenate([np.quantile(floor, [0.1, 0.5, 0.9], axis=1).T, 10 * floor.max(1, keepdims=True)], 1)
    p, z = empirical_pvalues(effects, floor)
    brute = (1 + (floor[:, None, :] >= effects[:, :, None]).sum(-1)) / 51
    np.testing.assert_allclose(p[:, :3], brute[:, :3])
    assert (p[:, 3] < 1 / 51).all() and (p[:, 3] > 0).all()  # beyond the floor: the fitted tail
    np.testing.assert_allclose(z, (effects - floor.mean(1, keepdims=True)) / floor.std(1, ddof=1, keepdims=True))
    p_plain, _ = empirical_pvalues(effects, floor, tail=False)
    np.testing.assert_allclose(p_plain, brute)
    p, z = empirical_pvalues(np.array([[np.nan, 1.0]]), np.ones((1, 0)))
    assert np.isnan(p).all() and np.isnan(z).all()


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(1).random((5, 40)) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, axis=-1))
    padded = np.concatenate([p, np.ones((5, 60))], 1)  # untested units count as p = 1
    np.testing.assert_allclose(benjamini_hochberg(p, tests=100), stats.false_discovery_control(padded, axis=-1)[:, :40])
    with_nan = p.copy()
    with_nan[:, ::3] = np.nan
    q = benjamini_hochberg(with_nan)
    assert np.isnan(q[:, ::3]).all()
    keep = np.isfinite(with_nan[0])
    np.testing.assert_allclose(q[0, keep], stats.false_discovery_control(with_nan[0, keep]))
    judged = significance(p[:, :3], np.random.default_rng(2).random((5, 20)), alpha=0.05)
    assert set(judged) == {"pvalue", "zscore", "qvalue", "significant"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Six members on eight units (images of the digits), trained briefly, four samples."""
    d = tmp_path_factory.mktemp("floor")
    from ensattr_fast.data import load_digits

    images = load_digits().images[:8].numpy()
    np.save(d / "eight.npy", images)
    audit = ef.Audit.open(d, progress=False)
    audit.plan(data=str(d / "eight.npy"), members=6, design="balanced")
    audit.train(steps=30, batch_size=8, lr=3e-3, mode="independent", hidden=32, blocks=1)
    audit.sample(seeds=range(4), sampler="ddim", sampling_steps=6, eta=1.0)
    return d


def test_exact_floor_equals_each_phantom_replayed_alone(tiny, tmp_path):
    results = tmp_path / "r.h5"
    results.write_bytes((tiny / "results.h5").read_bytes())
    ef.Audit(checkpoint=tiny / "ensemble.pt", results=results).ablate([0, 5], phantoms=5)
    checkpoint = Checkpoint.load(tiny / "ensemble.pt")
    ensemble, sampler = checkpoint.build(), read_sampler(results)
    with open_results(results) as r:
        cf = r.counterfactual_arrays(images=False)
        samples = torch.from_numpy(r.samples[()])
    phantoms = torch.from_numpy(cf["floor_code"])
    assert phantoms.shape == (5, 6)
    for j, row in enumerate(phantoms):
        weights = codes.ablation_weights_of_rows(row[None]).expand(4, -1)
        alone = run_trajectories(ensemble, checkpoint.schedule, sampler, range(4), weights, torch.arange(4)).images
        np.testing.assert_allclose(cf["floor_distance"][:, j], (alone - samples).flatten(1).norm(dim=1).numpy(),
                                   rtol=1e-5, atol=1e-6)
    judged = significance(cf["distance"], cf["floor_distance"], tests=2)
    np.testing.assert_allclose(cf["pvalue"], judged["pvalue"])
    np.testing.assert_allclose(cf["qvalue"], judged["qvalue"])


def test_certificate_against_exhaustive_exact_ablation(tiny, tmp_path):
    checkpoint = Checkpoint.load(tiny / "ensemble.pt")
    ensemble, n_units = checkpoint.build(), len(checkpoint.code)
    with open_results(tiny / "results.h5") as r:
        samples, sampler = torch.from_numpy(r.samples[()]), read_sampler(tiny / "results.h5")
    every = ablate(ensemble, checkpoint.schedule, sampler, checkpoint.code, range(4), [[u] for u in range(n_units)])
    truth = (every.images - samples[None]).flatten(2).norm(dim=-1).max(0).values.numpy()  # [S]
    for check, certify in ((n_units, "estimate"), (3, "estimate"), (2, "exhaustive"), (1, "auto")):
        results = tmp_path / f"r{check}.h5"
        results.write_bytes((tiny / "results.h5").read_bytes())
        ef.Audit(checkpoint=tiny / "ensemble.pt", results=results, progress=False).attribute(
            methods=["first_order"], samples=4, topk=n_units, check=check, certify=certify)
        with open_results(results) as r:
            certificate = r.certificate()
        if check == n_units or certify != "estimate":  # every unit checked, or every distinct row ablated
            assert certificate["meta"]["exhaustive"] and not certificate["meta"]["estimate"]
            np.testing.assert_allclose(certificate["radius"], truth, rtol=1e-5)
            np.testing.assert_allclose(certificate["bound"], truth, rtol=1e-5)
        else:
            assert not certificate["meta"]["exhaustive"] and certificate["meta"]["estimate"]
            assert "not a bound" in certificate["meta"]["bound"] and (certificate["checked"] == 3).all()
            assert (certificate["radius"] <= truth + 1e-6).all()
            assert (certificate["bound"] >= certificate["radius"]).all()
        if certify != "estimate":  # the unit that reaches the bound, and its exact distance is the bound
            unit = certificate["unit"]
            alone = (every.images[unit, range(4)] - samples).flatten(1).norm(dim=1).numpy()
            np.testing.assert_allclose(alone, truth, rtol=1e-5)


def test_score_floor_is_stored_beside_the_top_units(tiny, tmp_path):
    results = tmp_path / "r.h5"
    results.write_bytes((tiny / "results.h5").read_bytes())
    ef.Audit(checkpoint=tiny / "ensemble.pt", results=results, progress=False).attribute(
        methods=["first_order", "loss"], samples=4, topk=4, check=0)
    code = Checkpoint.load(tiny / "ensemble.pt").code
    with open_results(results) as r:
        for method in ("first_order", "loss"):
            judged = r.significance(method)
            assert judged["floor"].shape == (4, codes.free_phantom_rows(code))
            index = r.topk(method)[0][()]
            scores = np.take_along_axis(np.asarray(r.influence(method)), index, 1)
            p, _ = empirical_pvalues(np.asarray(r.influence(method)), judged["floor"])
            np.testing.assert_allclose(judged["pvalue"], np.take_along_axis(p, index, 1), rtol=1e-6)
            assert judged["meta"]["tests"] == len(code)
            assert np.isfinite(scores).all()
    with h5py.File(results, "r") as f:  # plain h5py reads it too
        assert f["significance/first_order/qvalue"].shape == (4, 4)


def _replays(rng, effect: float, members: int = 16, replays: int = 65, saturate: bool = False):
    """One copy replayed under ``replays`` random half-ensembles, subset 0 the copied unit's
    excluders: each replay moves from the unit by ``effect`` x the share of its members that
    excluded the unit (capped at 1 after doubling with ``saturate``: any excluder already helps),
    plus unit noise."""
    subsets = np.zeros((replays, members), dtype=bool)
    for k in range(replays):
        subsets[k, rng.choice(members, members // 2, replace=False)] = True
    share = subsets.astype(float) @ subsets[0].astype(float) / (members // 2)
    signal = np.minimum(2 * share, 1.0) if saturate else share
    return subsets, effect * signal + rng.normal(size=replays)


def test_the_trend_test_holds_its_level_and_outpowers_the_floor():
    rng = np.random.default_rng(7)
    null = np.array([trend_pvalues(*(a[None] for a in _replays(rng, 0.0)))[0] for _ in range(400)])
    assert 0.02 <= (null <= 0.05).mean() <= 0.08  # valid: about alpha under the null
    assert 0.4 <= null.mean() <= 0.6
    for saturate in (False, True):
        trend, floor = [], []
        for _ in range(150):
            subsets, moved = _replays(rng, 3.0, saturate=saturate)
            trend.append(trend_pvalues(subsets[None], moved[None])[0] <= 0.05)
            floor.append(empirical_pvalues(moved[None, :1], moved[None, 1:], tail=False)[0][0, 0] <= 0.05)
        assert np.mean(trend) > np.mean(floor) + 0.1, (saturate, np.mean(trend), np.mean(floor))


def test_the_trend_test_needs_phantoms():
    subsets, moved = _replays(np.random.default_rng(0), 1.0, replays=3)
    moved[1:] = np.nan  # no phantom replay finished
    assert np.isnan(trend_pvalues(subsets[None], moved[None])).all()
    subsets, moved = _replays(np.random.default_rng(0), 50.0)
    p = trend_pvalues(subsets[None], moved[None])[0]
    assert p == 1 / 65  # the smallest p 64 phantom rows allow

