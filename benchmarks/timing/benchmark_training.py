"""Batched training of all members against the seed's way (one model after another), and the
trainer's useful FLOP rate against a large matmul, side by side in one run."""


import torch
import torch.nn.functional as F

from ensattr_fast import codes
from ensattr_fast.data import load_digits
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import PlainMLP, StackedMLP
from ensattr_fast.training import TrainConfig, Trainer

from .._common import Record, Suite


def _seed_way(data, code, unit_of, members, batch, schedule, steps):
    """Each member its own module, optimiser and loop, trained one after another."""
    models = [PlainMLP(data.data_shape) for _ in range(members)]
    optims = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    pools = [torch.nonzero(code[unit_of, m]).flatten() for m in range(members)]
    abar = schedule.alphas_cumprod.float()

    def run():
        for model, optim, pool in zip(models, optims, pools):
            for _ in range(steps):
                x0 = data.images[pool[torch.randint(len(pool), (batch,))]]
                t = torch.randint(schedule.steps, (batch,))
                eps = torch.randn_like(x0)
                a = abar[t].view(-1, 1, 1, 1)
                loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
                optim.zero_grad()
                loss.backward()
                optim.step()

    return run


def run(quick: bool, device: str) -> Suite:
    suite = Suite("training", quick)
    data = load_digits()
    M, B, steps = 16, 128, 10 if quick else 30
    units = codes.Units.per_example(len(data))
    code = codes.balanced_constant_weight(len(data), M, seed=0)
    schedule = NoiseSchedule.linear()
    ensemble = StackedMLP(M, data.data_shape, shared_init=True)
    trainer = Trainer(ensemble, data, code, units.unit_of, units.names, schedule,
                      TrainConfig(steps=10**9, batch_size=B, ema_decay=0.995), device)
    params = ensemble.parameters_per_member()

    def batched():
        for _ in range(steps):
            trainer.train_step()

    seed_way = _seed_way(data, code, units.unit_of, M, B, schedule, steps) if device == "cpu" else None
    case = f"{device} M={M} B={B} MLP {params / 1e3:.0f}k params, {steps} steps"
    if seed_way is not None:
        timing = suite.compare_times(case, batched, seed_way, "per-model loops (the seed's way)",
                                     min_ratio=1.5)
        t_batched = timing.value / 1e3
    else:
        t_batched = suite.time(batched, case, "ensattr_fast")
    examples_per_s = M * B * steps / t_batched
    suite.record(Record(name=f"training throughput: {case}", value=examples_per_s,
                        unit="member-examples/s"))

    a = torch.randn(2048, 2048, device=device)
    t_mm = suite.time(lambda: a @ a, "2048x2048 matmul", "torch.matmul")
    mm_rate = 2 * 2048**3 / t_mm
    useful_rate = 6 * params * M * B * steps / t_batched  # forward + backward matmul FLOPs
    suite.record(Record(name=f"training useful FLOP rate vs matmul: {case}", value=useful_rate / 1e9,
                        unit="GFLOP/s", baseline=mm_rate / 1e9, ratio=useful_rate / mm_rate,
                        target="ratio >= 0.3" if device == "cpu" else None,
                        met=useful_rate / mm_rate >= 0.3 if device == "cpu" else None))
    return suite
