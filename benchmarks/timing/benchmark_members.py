"""Batched convolutional members against the same members run one by one, side by side in one
run: the built-in UNet (``unet-small``: StackedUNet, written in grouped convolutions) and a small
diffusers UNet2DModel (FoldedEnsemble: members folded into the batch), for a training step
(forward, backward, Adam) and a sampling step (forward without gradients); the built-in UNet's
batched paths against each other (grouped: StackedUNet; batch-folded: FoldedEnsemble; vmap:
VmapEnsemble); and, in full runs, the memory each preset's member takes.

Timings alternate ours and the baseline and keep each one's fastest run: on a machine whose
cores other work shares, the fastest run is the one least disturbed.
"""

import time

import torch
import torch.nn.functional as F

from ensattr_fast.members import (ARCHITECTURES, FoldedEnsemble, MemberOptions, StackedUNet, UNetMember, VmapEnsemble,
                                  build_members, diffusers_ensemble, member_unet)
from ensattr_fast.members.registry import SMALL_WIDTH

from .._common import Record, Suite, check_close

M, SHAPE = 8, (3, 32, 32)
SMALL_DIFFUSERS = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def _inputs(B, device):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(M, B, *SHAPE, generator=g), torch.randn(M, B, *SHAPE, generator=g)
    return x.to(device), torch.randint(0, 1000, (M, B), generator=g).to(device), eps.to(device)


def _training_step(ensemble, x, t, eps):
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(ensemble(x, t), eps).backward()
        optimizer.step()
    return step


def _one_by_one_training_step(members, call, x, t, eps):
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in members]

    def step():
        for m, (member, optimizer) in enumerate(zip(members, optimizers)):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(call(member, x[m], t[m]), eps[m]).backward()
            optimizer.step()
    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _fastest(functions, reps, device, budget_s):
    """Fastest wall time of each function, runs interleaved after one warm-up run each: ``reps``
    rounds, or fewer (at least one) once the rounds have taken ``budget_s`` seconds."""
    best, start_all = [float("inf")] * len(functions), time.perf_counter()
    for r in range(reps + 1):
        for i, f in enumerate(functions):
            _sync(device)
            start = time.perf_counter()
            f()
            _sync(device)
            if r:
                best[i] = min(best[i], time.perf_counter() - start)
        if r and time.perf_counter() - start_all > budget_s:
            break
    return best


def _record(suite, case, ours, baseline, min_ratio=None):
    ratio = baseline / ours
    suite.record(Record(name=f"{suite.label}: {case}", value=ours * 1e3, unit="ms",
                        baseline=baseline * 1e3, ratio=ratio,
                        target=None if min_ratio is None else f"ratio >= {min_ratio}",
                        met=None if min_ratio is None else ratio >= min_ratio))


def _against_members(suite, name, ensemble, members, call, B, device, min_ratio, reps, budget_s):
    """The batched ensemble against its members, each run by ``call(member, x, t)``."""
    x, t, eps = _inputs(B, device)
    one_by_one = lambda: torch.stack([call(member, x[m], t[m]) for m, member in enumerate(members)])  # noqa: E731
    with torch.no_grad():
        want = one_by_one()
        check_close([ensemble(x, t)], [want], name, rtol=0, atol=1e-4 * want.abs().max().item())
        ours, base = _fastest([lambda: ensemble(x, t), one_by_one], reps, device, budget_s)
    _record(suite, f"{name} batched vs one by one, sampling step (M={M}, B={B})", ours, base, min_ratio)
    ours, base = _fastest([_training_step(ensemble, x, t, eps), _one_by_one_training_step(members, call, x, t, eps)],
                          reps, device, budget_s)
    _record(suite, f"{name} batched vs one by one, training step (M={M}, B={B})", ours, base, min_ratio)


def _against_paths(suite, name, ensembles, B, device, reps, budget_s):
    """Batched ensembles of the same members against the first of them."""
    x, t, eps = _inputs(B, device)
    (first, ours), others = ensembles[0], ensembles[1:]
    with torch.no_grad():
        for other_name, other in others:
            want = other(x, t)
            check_close([ours(x, t)], [want], f"{name} vs {other_name}", rtol=0, atol=1e-4 * want.abs().max().item())
        times = _fastest([lambda e=e: e(x, t) for _, e in ensembles], reps, device, budget_s)
    for (other_name, _), base in zip(others, times[1:]):
        _record(suite, f"{name} {first} vs {other_name}, sampling step", times[0], base)
    times = _fastest([_training_step(e, x, t, eps) for _, e in ensembles], reps, device, budget_s)
    for (other_name, _), base in zip(others, times[1:]):
        _record(suite, f"{name} {first} vs {other_name}, training step", times[0], base)


def _activation_bytes(member, batch):
    """Bytes of the tensors a training forward of ``batch`` examples saves for its backward."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x, t = torch.randn(batch, *SHAPE), torch.randint(0, 1000, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        member(x, t).square().mean().backward()
    return sum(seen.values())


def _memory(suite, preset):
    """Per member: fp32 weights, Adam's two moments and an EMA (16 bytes a parameter; 20 with
    the gradient); activations per training example, from the tensors saved for the backward."""
    params = build_members(MemberOptions(arch=preset), 1, SHAPE, True, 0).parameters_per_member()
    member = build_members(MemberOptions(arch=preset), 1, SHAPE, True, 0).member(0).train()
    per_example = _activation_bytes(member, 2) - _activation_bytes(member, 1)
    suite.record(Record(name=f"{preset}: parameters per member at 3x32x32", value=params / 1e6, unit="M"))
    suite.record(Record(name=f"{preset}: fp32 weights+Adam+EMA per member (baseline: +grad)",
                        value=16 * params / 2**20, baseline=20 * params / 2**20, unit="MiB"))
    suite.record(Record(name=f"{preset}: training activations per example per member", value=per_example / 2**20,
                        unit="MiB"))


def run(quick: bool, device: str) -> Suite:
    suite = Suite("members", quick)
    B, reps, budget_s = (8, 3, 5.0) if quick else (16, 7, 30.0)
    small = StackedUNet(M, SHAPE, width=SMALL_WIDTH, seed=0).to(device)
    _against_members(suite, "unet-small", small, [small.member(m) for m in range(M)],
                     lambda member, x, t: member(x, t), B, device, 1.5, reps, budget_s)
    factory = lambda: UNetMember(SHAPE[0], SMALL_WIDTH)  # noqa: E731
    paths = [("grouped", StackedUNet(M, SHAPE, width=SMALL_WIDTH, seed=1)),
             ("batch-folded", FoldedEnsemble(factory, M, SHAPE, seed=1)),
             ("vmap", VmapEnsemble(factory, M, SHAPE, seed=1))]
    _against_paths(suite, "unet-small", [(n, e.to(device)) for n, e in paths], B, device, reps, budget_s)
    try:
        ensemble = diffusers_ensemble(SMALL_DIFFUSERS, M, seed=0).to(device)
    except ImportError:
        return suite
    _against_members(suite, "diffusers (32, 64)", ensemble, [member_unet(ensemble, m) for m in range(M)],
                     lambda unet, x, t: unet(x, t).sample, B // 4, device, 1.3, reps, budget_s)
    if device == "cpu" and not quick:
        for preset in ("unet-small", "seed-cifar10"):
            if preset in ARCHITECTURES:
                _memory(suite, preset)
    return suite
