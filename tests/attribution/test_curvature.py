"""EK-FAC and K-FAC influence over the members against kronfluence called directly on each
member as a plain module, and (with no curvature) against the gradient dot products of the
stacked members computed by torch.func; the methods run through ``ensattr attribute``."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

import ensattr_fast as ef  # noqa: E402
from ensattr_fast.attribution import curvature  # noqa: E402
from ensattr_fast.attribution.curvature import CurvatureSpec, fit_factors, member_influence  # noqa: E402
from ensattr_fast.attribution.factors import FactorStore  # noqa: E402
from ensattr_fast.attribution.gradients import combine  # noqa: E402
from ensattr_fast.attribution.methods import get_method  # noqa: E402
from ensattr_fast.data import load_digits  # noqa: E402
from ensattr_fast.diffusion.schedules import NoiseSchedule  # noqa: E402
from ensattr_fast.errors import MethodError  # noqa: E402
from ensattr_fast.members import StackedMLP, UNetMember, VmapEnsemble, plain_member  # noqa: E402
from ensattr_fast.store import open_results  # noqa: E402

SCHEDULE = NoiseSchedule.linear()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's GradScaler call
K = 3


def _setup(classes=0):
    g = torch.Generator().manual_seed(0)
    ensemble = StackedMLP(3, (1, 4, 4), hidden=12, blocks=1, time_dim=8, classes=classes, seed=1)
    images = torch.rand(10, 1, 4, 4, generator=g) * 2 - 1
    queries = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    unit_of = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])  # units 0 and 3 hold two examples
    code = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]],
                        dtype=torch.uint8)
    return ensemble, images, queries, unit_of, code


class _Loss(Task):
    """The reference task, written from the method's definition: an image's diffusion loss, its
    mean over K fixed draws of the per-pixel squared error; the curvature's targets drawn from
    N(output, D K / 2)."""

    def __init__(self, t, eps):
        self.t, self.eps = t, eps

    def compute_train_loss(self, batch, model, sample=False):
        images, _ = batch
        abar = SCHEDULE.alphas_cumprod[self.t].float().view(1, K, 1, 1, 1)
        x_t = abar.sqrt() * images[:, None] + (1 - abar).sqrt() * self.eps
        out = model(x_t, self.t.expand(len(images), K))
        target = self.eps.expand_as(out)
        if sample:
            target = out.detach() + torch.randn_like(out) * (16 * K / 2) ** 0.5
        return ((out - target) ** 2).mean(dim=(2, 3, 4)).mean(1).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], torch.tensor(-1)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_each_member_scores_as_kronfluence_on_the_member_alone(strategy, tmp_path):
    ensemble, images, queries, unit_of, code = _setup()
    spec = CurvatureSpec(strategy=strategy, timesteps=K, batch=4)
    got = member_influence(ensemble, SCHEDULE, images, queries, spec, unit_of, code)
    t, eps = spec.draws(SCHEDULE, (1, 4, 4))
    task = _Loss(t, eps)
    for m in range(3):
        torch.manual_seed(spec.seed + m)  # member m's targets, whichever rank or run fits it
        analyzer = Analyzer(f"m{m}", prepare_model(plain_member(ensemble, m), task), task, cpu=True,
                            disable_tqdm=True, output_dir=str(tmp_path))
        seen = [i for i in range(len(images)) if code[unit_of[i], m]]  # the member's own examples
        analyzer.fit_all_factors("f", torch.utils.data.Subset(_Pairs(images), seen), per_device_batch_size=4,
                                 factor_args=FactorArguments(strategy=strategy))
        analyzer.compute_pairwise_scores("s", "f", _Pairs(queries), _Pairs(images), per_device_query_batch_size=4,
                                         per_device_train_batch_size=4,
                                         score_args=ScoreArguments(damping_factor=None))
        per_example = analyzer.load_pairwise_scores("s")["all_modules"]
        want = torch.zeros(len(queries), len(code)).index_add_(1, unit_of, per_example)
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-5)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("classes,function", [(0, "loss"), (3, "loss"), (0, "dtrak")])
def test_without_curvature_the_scores_are_gradient_dot_products(classes, function):
    """kronfluence's identity strategy: each member's score is g_q . g_i, the gradients of the
    diffusion loss (or of D-TRAK's squared output norm) of the stacked member in its linear
    layers (layer-norm gains are not tracked)."""
    ensemble, images, queries, unit_of, code = _setup(classes)
    labels = torch.arange(len(images)) % 3 if classes else None
    query_labels = torch.tensor([0, 2, 1, 0]) if classes else None

    class Data:  # a dataset of images with labels, as the members take them
        def __init__(self):
            self.images = images

        def __len__(self):
            return len(images)

        def read(self, index):
            return images[torch.as_tensor(index)]

        def class_labels(self, n):
            return labels

    spec = CurvatureSpec(strategy="identity", timesteps=K, seed=3, function=function)
    got = member_influence(ensemble, SCHEDULE, Data(), queries, spec, unit_of, code, labels=query_labels)
    t, eps = spec.draws(SCHEDULE, (1, 4, 4))
    abar = SCHEDULE.alphas_cumprod[t].float().view(K, 1, 1, 1)
    params = {k: v.detach() for k, v in ensemble.named_parameters()}

    def loss(params, x, label):
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
        conditions = (t, label.expand(K)) if classes else (t,)
        out = functional_call(ensemble, params, (x_t.expand(3, *x_t.shape), *conditions))
        if function == "dtrak":
            return (out ** 2).sum(dim=(2, 3, 4)).mean(-1).sum()
        return ((out - eps) ** 2).mean(dim=(2, 3, 4)).mean(-1).sum()

    def gradients(x, label):
        label = torch.zeros(len(x), dtype=torch.long) if label is None else label
        found = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, label)
        return {k: v for k, v in found.items() if "norm" not in k}  # [n, M, ...]

    g_train, g_query = gradients(images, labels), gradients(queries, query_labels)
    for m in range(3):
        dots = sum(g_query[k][:, m].flatten(1) @ g_train[k][:, m].flatten(1).T for k in g_train)
        want = torch.zeros(len(queries), len(code)).index_add_(1, unit_of, dots)
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-4)


def _counting_fits(monkeypatch) -> list:
    fitted = []
    fit = Analyzer.fit_all_factors

    def counted(self, *args, **kwargs):
        fitted.append(self.output_dir.name)  # the analysis name: member-<m>
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Analyzer, "fit_all_factors", counted)
    return fitted


def test_the_fitted_curvature_is_kept_and_fitted_again_only_where_it_must(tmp_path, monkeypatch):
    """A store keeps each member's factors: scoring again (other queries, another damping)
    fits nothing; a member whose fit was killed (no folder, a partial one left) is fitted
    again alone; another checkpoint's store is emptied and fitted afresh."""
    ensemble, images, queries, unit_of, code = _setup()
    spec = CurvatureSpec(timesteps=K, batch=4)
    fresh = member_influence(ensemble, SCHEDULE, images, queries, spec, unit_of, code)
    fitted = _counting_fits(monkeypatch)
    store = FactorStore(tmp_path / "e.pt.curvature", "hash-a")
    got = member_influence(ensemble, SCHEDULE, images, queries, spec, unit_of, code, store=store)
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-7)  # the same fit, kept or not
    assert sorted(fitted) == ["member-0", "member-1", "member-2"]
    damped = CurvatureSpec(timesteps=K, batch=4, damping=1e-2)
    member_influence(ensemble, SCHEDULE, images, queries[:2], damped, unit_of, code, store=store)
    assert len(fitted) == 3  # the damping and the queries are not the fit's

    import shutil
    shutil.rmtree(store.member(spec, 1))
    (store.root / spec.fit_name / ".fitting-rank0" / "member-1").mkdir(parents=True)  # a killed fit's
    again = member_influence(ensemble, SCHEDULE, images, queries, spec, unit_of, code, store=store)
    assert fitted[3:] == ["member-1"] and not (store.root / spec.fit_name / ".fitting-rank0").exists()
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-7)

    other = FactorStore(store.root, "hash-b")  # the checkpoint was trained again
    member_influence(ensemble, SCHEDULE, images, queries, spec, unit_of, code, store=other)
    assert sorted(fitted[4:]) == ["member-0", "member-1", "member-2"]
    assert (store.root / "checkpoint_hash").read_text() == "hash-b"


def test_a_folder_that_is_no_store_is_refused_and_kept(tmp_path):
    ensemble, images, queries, unit_of, code = _setup()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ef.StoreError, match="is not a store of fitted curvature"):
        member_influence(ensemble, SCHEDULE, images, queries, CurvatureSpec(timesteps=K), unit_of, code,
                         store=FactorStore(tmp_path / "mine", "h"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _fit_and_score_on_two_ranks(rank: int, world: int, init: str, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ensemble, images, queries, unit_of, code = _setup()
        spec = CurvatureSpec(timesteps=K, batch=4)
        store = FactorStore(Path(root), "h", rank, world, dist.barrier)
        if rank == 0:
            store.prepare()
        dist.barrier()
        fitted = []
        fit = curvature._analyzer
        curvature._analyzer = lambda name, *rest: fitted.append(name) or fit(name, *rest)
        fit_factors(ensemble, SCHEDULE, images, spec, unit_of, code, store)
        curvature._analyzer = fit
        mine = queries[rank::world]  # each rank its rows
        got = member_influence(ensemble, SCHEDULE, images, mine, spec, unit_of, code, store=store)
        torch.save(dict(fitted=fitted, scores=got), f"{root}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_fit_their_share_of_the_members_and_score_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    root = str(tmp_path / "e.pt.curvature")
    mp.spawn(_fit_and_score_on_two_ranks, args=(2, f"file://{tmp_path / 'init'}", root), nprocs=2)
    parts = [torch.load(f"{root}.{rank}") for rank in range(2)]
    assert [p["fitted"] for p in parts] == [["member-0", "member-2"], ["member-1"]]
    ensemble, images, queries, unit_of, code = _setup()
    whole = member_influence(ensemble, SCHEDULE, images, queries, CurvatureSpec(timesteps=K, batch=4), unit_of, code)
    for rank, part in enumerate(parts):
        torch.testing.assert_close(part["scores"], whole[:, rank::2], rtol=1e-5, atol=1e-7)


def test_kronfluence_runs_as_one_process_on_each_rank(monkeypatch):
    """Under torchrun on GPUs (LOCAL_RANK set, CUDA there) kronfluence would join the process
    group and split its data over the ranks, whose rows differ: it is made one process's."""
    from kronfluence.utils.state import State

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    State._reset_state()
    try:
        with curvature._kronfluence(torch.device("cuda", 1)):  # nothing runs on it: the state is only made
            assert State().num_processes == 1 and State().device.type == "cuda"
        assert os.environ["LOCAL_RANK"] == "1"
    finally:
        State._reset_state()


def test_members_that_are_not_linear_modules_are_refused_in_one_line():
    unet = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=8), 2, (1, 8, 8), seed=0)
    _, images, queries, unit_of, code = _setup()
    with pytest.raises(MethodError, match="plain linear modules.*use dtrak or trak"):
        member_influence(unet, SCHEDULE, images, queries, CurvatureSpec(), unit_of, code[:, :2])


def test_the_attribute_step_scores_ekfac_and_kfac_over_members(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("digits.npy", load_digits().images[:12].numpy())
    audit = ef.Audit.create("digits.npy", members=6, workdir=".", design="balanced", progress=False)
    audit.train(steps=10, batch_size=8, hidden=16, blocks=1)
    audit.sample(seeds=3, sampling_steps=4)
    audit.attribute(methods=["ekfac", "kfac_includers"], samples=3)
    ensemble, checkpoint = audit.session.ensemble("cpu"), audit.session.checkpoint
    kept = audit.session.checkpoint_path.parent / f"{audit.session.checkpoint_path.name}.curvature"
    for strategy in ("ekfac", "kfac"):  # fitted once beside the checkpoint, for later runs
        fit = kept / CurvatureSpec(strategy=strategy).fit_name
        assert sorted(p.name for p in fit.iterdir()) == [f"member-{m}" for m in range(6)]
    with open_results("results.h5") as r:
        queries = torch.from_numpy(r.samples[:3])
        written = {m: torch.from_numpy(r.influence(m)[:3]) for m in ("ekfac", "kfac_includers")}
    for name, got in written.items():
        method = get_method(name)
        spec = CurvatureSpec(strategy=method.statistic)
        per_member = member_influence(ensemble, checkpoint.schedule, audit.session.data(), queries, spec,
                                      checkpoint.unit_of, checkpoint.code)
        torch.testing.assert_close(got, combine(per_member, checkpoint.code, method.combination),
                                   rtol=1e-4, atol=1e-6)
