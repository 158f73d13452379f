"""Batched ablated sampling against running the ablations one at a time with per-member
loops (same steps, same noise, same results), side by side in one run; then the same with
class-conditional members, a label per sample and classifier-free guidance (issue 21: the
guided step through the fused op's CSR weights against each member's two evaluations in turn)."""

import torch

from ensattr_fast import codes
from ensattr_fast.diffusion.sampling import ablate, ablation_weights, seeded_normal
from ensattr_fast.diffusion.schedules import NoiseSchedule, Sampler
from ensattr_fast.members import StackedMLP

from .._common import Record, Suite, check_close


def _one_member(ensemble, m):
    """Member m as a function of its own batch: the stacked weights sliced once."""
    params = {name: p[m : m + 1] for name, p in ensemble.named_parameters()}

    def forward(x, t, labels=None):
        extra = () if labels is None else (labels[None],)
        return torch.func.functional_call(ensemble, params, (x[None], t[None], *extra))[0]

    return forward


def _one_at_a_time(ensemble, schedule, sampler, code, seeds, unit_sets, labels=None):
    """For each ablation, for each step, each kept member evaluated on the samples in turn
    (with ``labels``: on them with and without their labels, guided by ``sampler.guidance``)."""
    members = [_one_member(ensemble, m) for m in range(ensemble.n_members)]
    weights = ablation_weights(code, unit_sets).float()
    shape, steps = ensemble.data_shape, sampler.plan(schedule)
    noise = [seeded_normal(seeds, k + 1, shape) for k in range(len(steps))]
    out = []
    for w in weights:
        x = seeded_normal(seeds, 0, shape)
        kept = torch.nonzero(w).flatten().tolist()
        for k, step in enumerate(steps):
            t = torch.full((len(seeds),), step.t)
            if labels is None:
                eps_bar = sum(w[m] * members[m](x, t) for m in kept)
            else:
                g, none = sampler.guidance, torch.full_like(labels, -1)
                eps_bar = sum(w[m] * ((1 + g) * members[m](x, t, labels) - g * members[m](x, t, none)) for m in kept)
            x0 = (step.a * x + step.b * eps_bar).clamp(*sampler.clip)
            x = step.c * x0 + step.d * x + step.s * noise[k]
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def run(quick: bool, device: str) -> Suite:
    suite = Suite("batched ablated sampling", quick)
    M, A, S = 16, 64, 8
    ensemble = StackedMLP(M, (1, 8, 8), seed=0).eval().to(device)
    code = codes.balanced_constant_weight(1797, M, seed=0)
    schedule, sampler = NoiseSchedule.linear(), Sampler("ddim", 20 if quick else 50, 1.0)
    seeds, unit_sets = list(range(S)), [[u] for u in range(A)]
    ours = lambda: ablate(ensemble, schedule, sampler, code, seeds, unit_sets).images  # noqa: E731
    if device == "cpu":
        baseline = lambda: _one_at_a_time(ensemble, schedule, sampler, code, seeds, unit_sets)  # noqa: E731
        check_close([ours()], [baseline()], "batched ablated sampling", rtol=1e-4, atol=1e-4)
        suite.compare_times(f"{A} ablations x {S} samples, {len(sampler.plan(schedule))} steps, M={M}",
                            ours, baseline, "one at a time, per-member loops", min_ratio=8.0)
    else:
        t = suite.time(ours, f"{device} {A} ablations x {S} samples", "ensattr_fast")
        suite.record(Record(name=f"batched ablated sampling {device}", value=t * 1e3, unit="ms"))
    conditional = StackedMLP(M, (1, 8, 8), seed=0, classes=10).eval().to(device)
    guided, labels = Sampler("ddim", 20 if quick else 50, 1.0, guidance=2.0), torch.arange(S) % 10
    ours = lambda: ablate(conditional, schedule, guided, code, seeds, unit_sets, labels=labels).images  # noqa: E731
    if device == "cpu":
        baseline = lambda: _one_at_a_time(conditional, schedule, guided, code, seeds, unit_sets, labels)  # noqa: E731
        check_close([ours()], [baseline()], "guided batched ablated sampling", rtol=1e-4, atol=1e-4)
        suite.compare_times(f"guided (w = 2, a label per sample): {A} ablations x {S} samples, "
                            f"{len(guided.plan(schedule))} steps, M={M}", ours, baseline,
                            "one at a time, per-member loops, each member with and without its label", min_ratio=8.0)
    else:
        t = suite.time(ours, f"{device} guided, {A} ablations x {S} samples", "ensattr_fast")
        suite.record(Record(name=f"guided batched ablated sampling {device}", value=t * 1e3, unit="ms"))
    return suite
