"""The batched trainer: every member of an encoded ensemble in one process, in the same steps
(the modes: :mod:`ensattr_fast.training`)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..codes import member_pools, validate
from ..data import Dataset
from ..diffusion.schedules import NoiseSchedule
from ..errors import CheckpointError, CodeError, ConfigError, DataError
from ..members import Ensemble
from ..members.passes import MemberPasses, Passes, precision_scope
from ..ops import masked_member_mse
from ..runtime import distributed
from ..runtime.progress import Progress
from .checkpoint import Checkpoint
from .config import TrainConfig

__all__ = ["Trainer"]


class Trainer:
    """Trains ``ensemble`` on ``data`` under ``code`` (units given by ``unit_of``).

    ``members``: the members of the code that ``ensemble`` holds, when it is one rank's shard
    of a distributed run (see :mod:`ensattr_fast.runtime.distributed`); all of them by default. Every
    shard draws the random numbers of all members and keeps its own, so the members of a
    sharded run train exactly as in one process. ``passes``: how the members are evaluated
    (:class:`~ensattr_fast.members.passes.Passes`: K members per pass, activation checkpointing,
    compile). fp16 scales the loss of all members together: a step in which any member's
    gradient overflows is skipped by all of them (as ``torch.amp.GradScaler`` does).
    """

    def __init__(
        self,
        ensemble: Ensemble,
        data: Dataset,
        code: Tensor,
        unit_of: Tensor,
        unit_names,
        schedule: NoiseSchedule,
        config: TrainConfig,
        device: str | torch.device = "cpu",
        require_exact_ablation: bool = True,
        members: Optional[range] = None,
        data_spec=None,
        passes: Passes = Passes(),
    ):
        # reference models for the LDS train on random halves, where a unit may be in every
        # half or in none; an encoded ensemble needs both excluders and includers per unit
        if require_exact_ablation:
            validate(code)
        if members is None and code.shape[1] != ensemble.n_members:
            raise CodeError(f"the code has {code.shape[1]} members but the ensemble {ensemble.n_members}")
        self.members = range(code.shape[1]) if members is None else members
        self._sharded = len(self.members) != code.shape[1]
        if len(self.members) != ensemble.n_members or self.members.stop > code.shape[1]:
            raise CodeError(f"the ensemble holds {ensemble.n_members} members but is given members "
                            f"{self.members.start}..{self.members.stop - 1} of a code of {code.shape[1]}")
        if len(unit_of) != len(data):
            raise DataError(f"unit_of maps {len(unit_of)} examples but the data has {len(data)}")
        if len(unit_of) and (unit_of.min() < 0 or unit_of.max() >= len(code)):
            raise CodeError(f"unit ids must lie in [0, {len(code)}), got "
                            f"{unit_of.min().item()}..{unit_of.max().item()}")
        if tuple(data.data_shape) != tuple(ensemble.data_shape):
            raise DataError(f"the data has shape {data.data_shape} but the ensemble expects {ensemble.data_shape}")
        self.device = torch.device(device)
        self.ensemble = ensemble.to(self.device)
        self.passes = MemberPasses(self.ensemble, passes)
        if config.precision == "fp16" and self._sharded:
            raise ConfigError("fp16 scales the loss of each process on its own, so its ranks would skip different "
                              "steps: train in bf16 under torchrun, or fp16 in one process")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.data, self.code, self.unit_of, self.unit_names = data, code, unit_of, list(unit_names)
        self.data_spec = data_spec  # how to load the data again (stored in checkpoints)
        self.options: Optional[dict] = None  # the options of the run that made it (stored too)
        self.schedule, self.config = schedule, config
        # data on disk (a Dataset not in memory) is read a step ahead by one background thread
        self.images = data.images.to(self.device) if data.in_memory else None
        # conditional members: each example's label, or its condition index (text-conditioned)
        conditions = self.ensemble.example_conditions(data)
        self.labels = None if conditions is None else conditions.to(self.device)
        self._reader = ThreadPoolExecutor(max_workers=1) if self.images is None else None
        self._pending: Optional[dict] = None
        self._state_before_pending: Optional[Tensor] = None
        self.alphas_cumprod = schedule.alphas_cumprod.to(self.device, torch.float32)
        own = slice(self.members.start, self.members.stop)
        self.pools, self.pool_sizes = (t[own].to(self.device) for t in member_pools(code, unit_of))
        self.example_members = code[unit_of].T[own].to(self.device, torch.float32)  # [M, n]
        self.optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.lr)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = AveragedModel(ensemble, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step = 0

    # ---------------------------------------------------------------------------- one step

    def _draw(self) -> dict:
        """The random numbers of one step: which examples (``index`` [M,B], or [2B] for
        masked_batch), t, eps and the horizontal flips. Per-member draws are made for every
        member of the code and cut to this shard's."""
        B, g, cfg = self.config.batch_size, self.generator, self.config
        M_all, own = self.code.shape[1], slice(self.members.start, self.members.stop)
        T, shape, dev = self.schedule.steps, self.ensemble.data_shape, self.device
        if cfg.mode == "masked_batch":
            index = torch.randint(len(self.data), (2 * B,), generator=g, device=dev)
            t = torch.randint(T, (2 * B,), generator=g, device=dev)
            eps = torch.randn((2 * B, *shape), generator=g, device=dev)
        else:
            where = (torch.rand(M_all, B, generator=g, device=dev)[own] * self.pool_sizes[:, None]).long()
            index = self.pools.gather(1, where)
            if cfg.mode == "independent":
                t = torch.randint(T, (M_all, B), generator=g, device=dev)[own]
                eps = torch.randn((M_all, B, *shape), generator=g, device=dev)[own]
            else:  # shared_noise
                t = torch.randint(T, (B,), generator=g, device=dev)
                eps = torch.randn((B, *shape), generator=g, device=dev)
        flip = None
        if cfg.hflip:
            flip = torch.rand(index.shape[-1] if cfg.mode == "masked_batch" else (M_all, B), generator=g,
                              device=dev)
            flip = (flip if cfg.mode == "masked_batch" else flip[own]) < 0.5
        drop = None
        if self.labels is not None:  # drawn last: an unconditional run's draws stay as they were
            drop = torch.rand(index.shape[-1] if cfg.mode == "masked_batch" else (M_all, B), generator=g, device=dev)
            drop = (drop if cfg.mode == "masked_batch" else drop[own]) < cfg.cond_dropout
        return dict(index=index, t=t, eps=eps, flip=flip, drop=drop)

    def _examples(self, draw: dict) -> Tensor:
        """The clean examples x0 of a draw: from memory, or from disk (prefetched while the
        previous step computed)."""
        if self.images is not None:
            return self.images[draw["index"]]
        future = draw.pop("x0", None)
        x0 = future.result() if future is not None else self.data.read(draw["index"].flatten().cpu())
        return x0.to(self.device, non_blocking=True).view(*draw["index"].shape, *self.ensemble.data_shape)

    def _labels(self, draw: dict):
        """The labels of a draw's examples, -1 where dropped (None: unconditional members)."""
        return None if self.labels is None else torch.where(draw["drop"], -1, self.labels[draw["index"]])

    def _batch(self, draw: dict):
        """(x_t [M,B,...], t [M,B] or [B], eps [M,B,D] or [B,D], mask [M,B]) of a draw."""
        M, B, mode = self.ensemble.n_members, self.config.batch_size, self.config.mode
        x0, t, eps = self._examples(draw), draw["t"], draw["eps"]
        if draw["flip"] is not None:
            flip = draw["flip"].view(*draw["flip"].shape, *([1] * len(self.ensemble.data_shape)))
            x0 = torch.where(flip, x0.flip(-1), x0)
        if mode == "masked_batch":
            x_t = self._noisy(x0, t, eps).expand(M, *eps.shape)
            return x_t, t, eps.flatten(1), self.example_members[:, draw["index"]]
        target = eps.flatten(2) if mode == "independent" else eps.flatten(1)
        return self._noisy(x0, t, eps), t, target, torch.ones(M, B, device=self.device)

    def _next_draw(self) -> dict:
        """This step's draw. Data on disk: the next step's draw is made now (the generator
        state before it is kept for checkpoints) and its examples read in the background."""
        draw = self._pending if self._pending is not None else self._draw()
        if self.images is None:
            self._state_before_pending = self.generator.get_state()
            self._pending = self._draw()
            self._pending["x0"] = self._reader.submit(self.data.read, self._pending["index"].flatten().cpu())
        return draw

    def _noisy(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t].reshape(*t.shape, *([1] * (eps.dim() - t.dim())))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def train_step(self) -> Tensor:
        """One optimisation step of every member; returns the per-member losses [M]."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate(self.step)
        draw = self._next_draw()
        x_t, t, target, mask = self._batch(draw)
        labels = self._labels(draw)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for cut, forward in self.passes.passes():  # members share no weights: one backward per pass
            conditions = [v[cut] if v.dim() == 2 else v for v in (t, labels) if v is not None]
            with precision_scope(self.config.precision, self.device):
                pred = forward(x_t[cut], *conditions).flatten(2)
            # the loss in float32 whatever the members' precision (as autocast's mse_loss): eps unrounded
            _, per_member = masked_member_mse(pred.to(torch.promote_types(pred.dtype, torch.float32)),
                                              target[cut] if target.dim() == 3 else target, mask[cut])
            self.scaler.scale(per_member.sum()).backward()
            losses.append(per_member.detach())
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed; else optimizer.step()
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.ensemble)
        self.step += 1
        return torch.cat(losses)

    # ----------------------------------------------------------------------------- the run

    def train(
        self,
        checkpoint: Optional[Path] = None,
        checkpoint_every: int = 0,
        progress: bool = True,
    ) -> Tensor:
        """Run until ``config.steps``; write ``checkpoint`` every ``checkpoint_every`` steps and
        at the end. Returns the last per-member losses (of this shard's members).

        In a distributed run every rank calls this; rank 0 writes the checkpoints."""
        losses = torch.zeros(self.ensemble.n_members)
        with Progress(self.config.steps, "train", "steps", initial=self.step,
                      enabled=progress and distributed.world().main) as bar:
            while self.step < self.config.steps:
                losses = self.train_step()
                if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                    self._save(checkpoint)
                if self.step % 25 == 0 or self.step == self.config.steps:
                    bar.set_postfix(loss=f"{losses.mean().item():.4f}")
                bar.update(1)
        if checkpoint is not None:
            self._save(checkpoint)
        return losses.cpu()

    def _save(self, path: Path) -> None:
        state = self.checkpoint()  # collective in a distributed run
        if distributed.world().main:
            state.save(path)
        distributed.barrier()  # the file is complete before any rank reads it

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint(self) -> Checkpoint:
        """The state of every member of the code: in a distributed run every rank calls this
        and the shards are gathered to rank 0 (members in rank order); the other ranks get a
        checkpoint of their own members only, which they must not save."""
        config = dict(train=dataclasses.asdict(self.config), schedule=dict(betas=list(self.schedule.betas)),
                      data=dict(name=self.data.name, n_examples=len(self.data), spec=self.data_spec or self.data.name),
                      options=self.options)
        if self.scaler.is_enabled():  # fp16: the loss scale, so that a resumed run scales as this one
            config["grad_scaler"] = self.scaler.state_dict()

        def everyone(state):
            state = {k: v.detach().cpu() for k, v in state.items()}
            return distributed.gather_members(state) if self._sharded else state

        optimizer = self.optimizer.state_dict()
        return Checkpoint(
            spec=dict(self.ensemble.spec(), n_members=self.code.shape[1]), config=config,
            ensemble=everyone(self.ensemble.state_dict()),
            code=self.code.cpu(), unit_of=self.unit_of.cpu(), unit_names=self.unit_names,
            data_fingerprint=self.data.fingerprint(), step=self.step,
            ema=None if self.ema is None else everyone(self.ema.state_dict()),
            optimizer=distributed.gather_members(optimizer) if self._sharded else optimizer,
            generator=(self.generator.get_state() if self._pending is None else self._state_before_pending).cpu(),
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: weights, optimiser, EMA, RNG and step."""
        if checkpoint.data_fingerprint != self.data.fingerprint():
            raise DataError("the checkpoint was trained on other data (fingerprint mismatch)")
        if not torch.equal(checkpoint.code, self.code.cpu()):
            raise CodeError("the checkpoint was trained under another code")
        ours = dict(self.ensemble.spec(), n_members=self.code.shape[1])
        differ = sorted(k for k in set(ours) | set(checkpoint.spec)
                        if k not in ("seed", "shared_init") and ours.get(k) != checkpoint.spec.get(k))
        if differ:
            detail = ", ".join(f"{k} {checkpoint.spec.get(k)} there, {ours.get(k)} here" for k in differ)
            raise CheckpointError(f"the checkpoint holds another architecture ({detail}): resume with the same "
                                  "--arch, --hidden, --blocks and --width")
        precision = checkpoint.config["train"].get("precision", "fp32")
        if precision != self.config.precision:
            raise CheckpointError(f"the checkpoint was trained in {precision}, this run is {self.config.precision}: "
                                  f"resume with --precision {precision}")
        stored, ours = checkpoint.config["train"], dataclasses.asdict(self.config)
        differ = sorted(k for k in ours if k in stored and stored[k] != ours[k])
        if differ:  # the learning-rate schedule and the draws would change mid-run, and the record lie
            detail = ", ".join(f"{k} {stored[k]} there, {ours[k]} here" for k in differ)
            raise CheckpointError(f"the checkpoint was trained with other settings ({detail}): resume with the same "
                                  "ones, or pass --overwrite to train anew")

        def mine(state):
            return distributed.select_members(state, self.members) if self._sharded else state

        checkpoint.load_state(self.ensemble, mine(checkpoint.ensemble))
        if checkpoint.optimizer is not None:
            checkpoint.load_state(self.optimizer, mine(checkpoint.optimizer))
        if self.ema is not None and checkpoint.ema is not None:
            checkpoint.load_state(self.ema, mine(checkpoint.ema))
        if "grad_scaler" in checkpoint.config:
            self.scaler.load_state_dict(checkpoint.config["grad_scaler"])
        if checkpoint.generator is not None:
            self.generator.set_state(checkpoint.generator.to(self.generator.get_state().device))
            self._pending = None  # drawn again from the restored state
        self.step = checkpoint.step
