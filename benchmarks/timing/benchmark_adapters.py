"""What a fine-tune costs with adapter members (issue 21): 16 LoRA adapters on one frozen base
against 16 full members of the same architecture, trained by the same trainer at equal batch,
side by side: time per step, and the bytes of weights plus optimiser and EMA state that training
holds (the base once for the adapters)."""

from __future__ import annotations

import torch

from ensattr_fast import codes
from ensattr_fast.data import load_digits
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import LoraEnsemble, StackedMLP
from ensattr_fast.training import TrainConfig, Trainer

from .._common import Record, Suite

#: the issue's targets: training time per step at equal batch, and weights + optimiser state
STEP_RATIO, STATE_RATIO = 3.0, 10.0


def _held_bytes(trainer: Trainer) -> int:
    """Weights (the trained and the frozen, each once), Adam moments and EMA weights of a trainer."""
    tensors = {t.data_ptr(): t for t in trainer.ensemble.parameters()}
    tensors.update({t.data_ptr(): t for t in trainer.ensemble.buffers()})
    for state in trainer.optimizer.state.values():
        tensors.update({t.data_ptr(): t for t in state.values() if torch.is_tensor(t) and t.dim()})
    if trainer.ema is not None:
        tensors.update({t.data_ptr(): t for t in trainer.ema.module.parameters()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(quick: bool, device: str) -> Suite:
    suite = Suite("adapters", quick)
    data = load_digits()
    M, B, rank, steps = 16, 128, 8, 5 if quick else 20
    units = codes.Units.per_example(len(data))
    code = codes.balanced_constant_weight(len(data), M, seed=0)
    schedule = NoiseSchedule.linear()
    base = StackedMLP(1, data.data_shape, seed=1).requires_grad_(False)
    adapters = LoraEnsemble(base, M, rank=rank, seed=0, shared_init=True)
    full = StackedMLP(M, data.data_shape, shared_init=True)
    config = TrainConfig(steps=10**9, batch_size=B, ema_decay=0.995)
    trainers = {name: Trainer(ensemble, data, code, units.unit_of, units.names, schedule, config, device)
                for name, ensemble in (("adapters", adapters), ("full", full))}

    def steps_of(trainer):
        def go():
            for _ in range(steps):
                trainer.train_step()
        return go

    case = f"{device} M={M} B={B} MLP base of {base.parameters_per_member() / 1e3:.0f}k params, rank {rank}"
    suite.compare_times(f"training, {steps} steps: {case}", steps_of(trainers["adapters"]), steps_of(trainers["full"]),
                        "full members", min_ratio=STEP_RATIO)
    held = {name: _held_bytes(trainer) for name, trainer in trainers.items()}
    ratio = held["full"] / held["adapters"]
    suite.record(Record(name=f"adapters: weights + Adam + EMA state held in training: {case}",
                        value=held["adapters"] / 2**20, unit="MiB", baseline=held["full"] / 2**20, ratio=ratio,
                        target=f"full / adapters >= {STATE_RATIO}", met=ratio >= STATE_RATIO))
    trained = sum(p.numel() for p in adapters.parameters()) / M
    suite.record(Record(name=f"adapters: trained parameters per member: {case}", value=trained, unit="parameters",
                        baseline=full.parameters_per_member(), ratio=full.parameters_per_member() / trained))
    return suite
