"""Curvature-aware influence over the members: EK-FAC and K-FAC influence functions (Grosse et
al. 2023; for diffusion models, Mlodozeniec et al. 2024), computed for each member by
kronfluence and combined over the members as the gradient methods are.

A member's score of query q and training example i is g_q^T (G + lambda I)^-1 g_i, where

- g is the gradient of the diffusion loss in the member's weights, the loss of an image being
  its mean over the K fixed timesteps and noises the D-TRAK features use
  (:meth:`~.gradients.FeatureSpec.draws`), for the training examples and the queries alike;
- G is the member's Gauss-Newton matrix on its own training half, approximated by Kronecker
  factors per layer (``kfac``) with eigenvalue-corrected diagonals (``ekfac``), drawn with
  targets sampled from the member's Gaussian;
- lambda is kronfluence's heuristic, 0.1 times the mean eigenvalue, unless given.

Positive scores are examples whose training lowered the query's loss, as with every method.
An image's K noised copies go to the member as one example's tokens [n, K, ...], so that
kronfluence's per-example gradient of a linear layer is the sum over them, and the
scores are those of whole examples (a K^2 smaller score matrix than one row per copy).

A member's fitted curvature is kept in a :class:`FactorStore` (``<checkpoint>.curvature``
beside the checkpoint, under the attribute step): it is fitted once per checkpoint and spec,
shared by the ranks of a torchrun (rank r fits members r, r + W, ...) and by later runs.

Why kronfluence: it is the maintained implementation of EK-FAC (factors, eigendecompositions,
the eigenvalue correction, batched query preconditioning) that the field's published numbers
come from; what is written here is only the task (the diffusion loss) and the bridge from
stacked members to plain modules. kronfluence is an extra (``pip install ensattr_fast[ekfac]``);
it tracks ``nn.Linear`` and ``nn.Conv2d`` layers of plain modules, and the members that exist as
plain linear modules are the MLP members (:func:`~ensattr_fast.members.plain_member`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset

from ..diffusion.schedules import NoiseSchedule
from ..errors import ConfigError, MethodError
from ..members import Ensemble, LoraEnsemble, plain_member
from ..members.mlp import StackedMLP
from ..runtime.progress import Progress
from .factors import FactorStore
from .gradients import FeatureSpec

__all__ = ["STRATEGIES", "CurvatureSpec", "FactorStore", "DiffusionTask", "fit_factors", "member_influence",
           "check_members"]

STRATEGIES = ("ekfac", "kfac")  # the methods'; a spec also takes kronfluence's "diagonal" and "identity"
_KRONFLUENCE = STRATEGIES + ("diagonal", "identity")


@dataclasses.dataclass(frozen=True)
class CurvatureSpec:
    strategy: str = "ekfac"  # kronfluence's strategy: ekfac, kfac, diagonal or identity (no curvature)
    timesteps: int = 10  # the K fixed draws, as the D-TRAK features'
    seed: int = 0  # the draws' noises, and the targets sampled for the curvature
    damping: Optional[float] = None  # None: kronfluence's heuristic, 0.1 x the mean eigenvalue
    #: the function whose gradients are scored: "loss", the diffusion loss (the influence function);
    #: "dtrak", D-TRAK's mean_k ||eps(x_tk, t_k)||^2. The curvature is the diffusion loss's either way.
    function: str = "loss"
    batch: int = 64  # examples per kronfluence batch
    query_batch: int = 64  # queries preconditioned together (each batch is one pass over the data)

    def __post_init__(self):
        if self.strategy not in _KRONFLUENCE:
            raise ConfigError(f"curvature strategy must be one of {_KRONFLUENCE}, got {self.strategy!r}")
        if self.timesteps < 1:
            raise ConfigError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.function not in ("loss", "dtrak"):
            raise ConfigError(f"curvature function must be 'loss' or 'dtrak', got {self.function!r}")
        if self.damping is not None and not self.damping > 0:
            raise ConfigError(f"damping must be positive (or None: kronfluence's heuristic), got {self.damping}")

    def draws(self, schedule: NoiseSchedule, shape) -> tuple:
        """The fixed timesteps [K] and noises [K, *shape]: the D-TRAK features' own."""
        return FeatureSpec(timesteps=self.timesteps, seed=self.seed).draws(schedule, shape)

    @property
    def fit_name(self) -> str:
        """What the fitted curvature depends on (not the damping, the function scored or the
        query batch): the name of its folder in a :class:`FactorStore`."""
        return f"{self.strategy}-k{self.timesteps}-seed{self.seed}-batch{self.batch}"


def _task_base():
    try:
        from kronfluence.task import Task
    except ImportError:
        raise MethodError("ekfac and kfac compute influence with kronfluence, which is not installed: "
                          "pip install 'ensattr_fast[ekfac]' (or pip install kronfluence)") from None
    return Task


def check_members(ensemble: Ensemble) -> None:
    """One line where these methods cannot score ``ensemble``'s members: kronfluence missing, or
    members that are not plain linear modules."""
    _task_base()
    if isinstance(ensemble, LoraEnsemble) or not isinstance(ensemble, StackedMLP):
        kind = "adapter" if isinstance(ensemble, LoraEnsemble) else type(ensemble).__name__
        raise MethodError(f"ekfac and kfac score members as plain linear modules, which the MLP members are; "
                          f"{kind} members are not: use dtrak or trak for them")


def DiffusionTask(schedule: NoiseSchedule, t: Tensor, eps: Tensor, conditional: bool, function: str = "loss"):
    """kronfluence's task for a member: the diffusion loss of each image (with its label,
    ``conditional``) at the fixed draws ``t`` [K], ``eps`` [K, *shape], both as the training
    loss and as the queries' measurement (``function`` "dtrak": the gradients scored are those
    of mean_k ||eps(x_tk, t_k)||^2 instead, the curvature still the loss's); a function returning
    an instance, so that kronfluence is imported only when these methods run."""

    class _DiffusionTask(_task_base()):
        def loss(self, batch, model, sample: bool = False) -> Tensor:
            images, labels = batch
            n, K, shape = len(images), len(t), images.shape[1:]
            abar = schedule.alphas_cumprod.to(images)[t.to(images.device)].view(1, K, *([1] * len(shape)))
            noise = eps.to(images)
            x_t = abar.sqrt() * images[:, None] + (1 - abar).sqrt() * noise  # [n, K, *shape]
            steps = t.to(images.device).expand(n, K)
            out = model(x_t, steps, labels[:, None].expand(n, K) if conditional else None)
            if function == "dtrak" and not sample:
                return out.pow(2).flatten(2).sum(-1).mean(-1).sum()
            target = noise.expand_as(out)
            if sample:  # the Gauss-Newton: targets from the Gaussian whose log-likelihood is the loss
                variance = shape.numel() * K / 2
                target = out.detach() + torch.randn_like(out) * variance ** 0.5
            return (out - target).pow(2).flatten(2).mean(-1).mean(-1).sum()

        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            return self.loss(batch, model, sample)

        def compute_measurement(self, batch, model) -> Tensor:
            return self.loss(batch, model)

    return _DiffusionTask()


class _Images(TorchDataset):
    """Images (a :class:`~ensattr_fast.data.Dataset`'s, read in batches, or a tensor) with
    their labels (-1 where there are none) as a torch dataset."""

    def __init__(self, images, labels: Optional[Tensor]):
        self.read = images.read if hasattr(images, "read") else (lambda index: images[torch.as_tensor(index)])
        self.n = len(images)
        self.labels = torch.full((self.n,), -1, dtype=torch.long) if labels is None else labels.long().cpu()

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, index: Sequence[int]):
        images = self.read(list(index)).float()
        return [(images[j], self.labels[i]) for j, i in enumerate(index)]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


@contextlib.contextmanager
def _kronfluence(device: torch.device):
    """kronfluence's one process on each rank, with its warnings kept in. kronfluence joins
    torchrun's process group when LOCAL_RANK is set and CUDA is there, and then splits its
    datasets over the ranks and gathers the scores; here every rank scores its own rows, so its
    shared state is made before that, as one process's (on ``device``)."""
    from kronfluence.utils.state import State

    saved = os.environ.pop("LOCAL_RANK", None)
    try:
        State(cpu=device.type == "cpu")  # made once per process: later calls find it made
    finally:
        if saved is not None:
            os.environ["LOCAL_RANK"] = saved
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its GradScaler call
        yield


def _task(ensemble: Ensemble, schedule: NoiseSchedule, data, spec: CurvatureSpec):
    """(the task, the training examples with their conditions as a torch dataset)."""
    t, eps = spec.draws(schedule, ensemble.data_shape)
    conditions = ensemble.example_conditions(data)
    return DiffusionTask(schedule, t, eps, conditions is not None, spec.function), _Images(data, conditions)


def _analyzer(name: str, ensemble: Ensemble, m: int, task, folder: Path):
    from kronfluence.analyzer import Analyzer, prepare_model

    device = next(ensemble.parameters()).device
    model = prepare_model(plain_member(ensemble, m), task)
    return Analyzer(name, model, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=str(folder))


def fit_factors(ensemble: Ensemble, schedule: NoiseSchedule, data, spec: CurvatureSpec, unit_of: Tensor,
                code: Tensor, store: FactorStore, progress: bool = False) -> None:
    """Each member's curvature under ``spec`` fitted on the examples of its own units (``code``
    [N, M], examples to units by ``unit_of``) into ``store``; members already there are kept.
    Rank r of the store's ranks fits members r, r + W, ...: a collective, every rank calls it
    (the store prepared by rank 0 first) and returns once every member is there. Member m's
    targets are drawn after ``torch.manual_seed(spec.seed + m)``: a member's fit is the same
    whichever rank or run makes it."""
    check_members(ensemble)
    if store.ranks == 1:
        store.prepare()
    todo = [m for m in range(store.rank, ensemble.n_members, store.ranks) if not store.member(spec, m).is_dir()]
    if todo:  # a kept fit costs no task, no data read
        _fit(ensemble, schedule, data, spec, unit_of, code, store, todo, progress)
    store.barrier()


def _fit(ensemble: Ensemble, schedule: NoiseSchedule, data, spec: CurvatureSpec, unit_of: Tensor, code: Tensor,
         store: FactorStore, todo: Sequence[int], progress: bool) -> None:
    from kronfluence.arguments import FactorArguments

    device = next(ensemble.parameters()).device
    task, train = _task(ensemble, schedule, data, spec)
    seen = code[unit_of].bool()  # [n, M]: the examples each member trained on
    partial = store.root / spec.fit_name / f".fitting-rank{store.rank}"  # what a killed fit leaves is redone
    rng_devices = [device] if device.type == "cuda" else []
    with _kronfluence(device), torch.random.fork_rng(devices=rng_devices), \
            Progress(len(todo), f"{spec.strategy} curvature", "members", enabled=progress) as bar:
        for m in todo:
            shutil.rmtree(partial, ignore_errors=True)
            torch.manual_seed(spec.seed + m)  # the targets sampled for member m's Gauss-Newton
            mine = Subset(train, torch.nonzero(seen[:, m]).flatten().tolist())
            _analyzer(f"member-{m}", ensemble, m, task, partial).fit_all_factors(
                "factors", mine, per_device_batch_size=spec.batch, factor_args=FactorArguments(strategy=spec.strategy),
                overwrite_output_dir=True)
            os.replace(partial / f"member-{m}", store.member(spec, m))
            bar.update(1)
    shutil.rmtree(partial, ignore_errors=True)


def member_influence(ensemble: Ensemble, schedule: NoiseSchedule, data, queries: Tensor, spec: CurvatureSpec,
                     unit_of: Tensor, code: Tensor, labels: Optional[Tensor] = None, progress: bool = False,
                     store: Optional[FactorStore] = None) -> Tensor:
    """Each member's influence scores [M, Q, N] of ``queries`` [Q, *shape] (with their ``labels``,
    class-conditional members) on the units of ``code`` [N, M] (examples to units by
    ``unit_of``); member m's curvature is fitted on the examples of its own units.

    ``store``: where the fitted curvature is kept (None: fitted here, in a temporary folder).
    A store of one process is filled here as needed; one shared by ranks must have been filled
    by :func:`fit_factors` on every rank first."""
    from kronfluence.arguments import ScoreArguments

    M, N, Q = ensemble.n_members, len(code), len(queries)
    device = next(ensemble.parameters()).device
    with tempfile.TemporaryDirectory() as folder:
        store = store or FactorStore(Path(folder) / "factors")
        if store.ranks == 1:
            fit_factors(ensemble, schedule, data, spec, unit_of, code, store, progress)
        missing = [m for m in range(M) if not store.member(spec, m).is_dir()]
        if missing:
            raise MethodError(f"the {spec.strategy} curvature of members {missing} is not in {store.root}: under "
                              "torchrun every rank runs fit_factors before scoring")
        task, train = _task(ensemble, schedule, data, spec)
        query = _Images(queries, labels)
        out = torch.zeros(M, Q, N)
        score_args = ScoreArguments(damping_factor=spec.damping)
        with _kronfluence(device), Progress(M, f"{spec.strategy} influence", "members", enabled=progress) as bar:
            for m in range(M):
                # the scores go to this call's folder, the factors are read where the store keeps them
                (Path(folder) / f"member-{m}").mkdir()
                os.symlink(store.member(spec, m).absolute() / "factors_factors",
                           Path(folder) / f"member-{m}" / "factors_factors")
                analyzer = _analyzer(f"member-{m}", ensemble, m, task, Path(folder))
                analyzer.compute_pairwise_scores("scores", "factors", query, train,
                                                 per_device_query_batch_size=min(Q, spec.query_batch),
                                                 per_device_train_batch_size=spec.batch, score_args=score_args,
                                                 overwrite_output_dir=True)
                scores = analyzer.load_pairwise_scores("scores")["all_modules"]  # [Q, n]
                out[m].index_add_(1, unit_of.cpu(), scores.float().cpu())
                bar.update(1)
    return out
