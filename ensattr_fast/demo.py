"""``ensattr demo``: the whole method on the embedded digits, end to end.

Example units (default): 16 members on a balanced constant-weight code, one unit per image;
samples; first-order, direct and loss-based influence of every unit on the first samples,
streamed to the results file; then the exact counterfactuals of each of those samples without
each of its top units by first-order score.
Class units (``--units class``): 20 members on a leave-one-class-out design (each class
excluded by 2 members); every sample re-drawn without each class.
Writes plan.h5, ensemble.pt, results.h5 and report.png under ``--out``.
"""

from __future__ import annotations

import json
import time

import torch

from . import pipeline
from .results import open_results
from .store import ResultsWriter


def _step(name: str, start: float) -> float:
    now = time.perf_counter()
    print(f"[{now - start:6.1f} s] {name}", flush=True)
    return now


def run_demo(args) -> dict:
    from .cli import _sampler, _train_config  # the demo takes the same flags as the steps
    from .evaluation import train_judge

    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    by_class = args.units == "class"
    members = args.members or (20 if by_class else 16)
    plan, checkpoint, results = out / "plan.h5", out / "ensemble.pt", out / "results.h5"

    stats = pipeline.make_plan(plan, "digits", args.units, members,
                               design="sparse" if by_class else "balanced", excluders=2, seed=args.seed,
                               overwrite=True)
    _step(f"plan: {stats}", start)
    pipeline.train(plan, checkpoint, _train_config(args), args.hidden, args.blocks, args.device, arch=args.arch,
                   width=args.width, unet_config=json.loads(args.unet_config.read_text()) if args.unet_config else None)
    _step(f"trained {members} members for {args.steps} steps -> {checkpoint}", start)
    pipeline.sample_step(checkpoint, results, range(args.samples), _sampler(args), args.device, overwrite=True)
    with open_results(results) as r:
        samples = torch.from_numpy(r.samples[()])
    _step(f"{args.samples} samples -> {results}", start)

    data = pipeline.load_data("digits")
    _, code, units = pipeline.read_plan(plan)
    if by_class:
        ablated = torch.arange(units.n_units).expand(args.samples, -1).clone()
        images, distances, evaluations = pipeline.ablate_step(checkpoint, results, ablated, args.device)
        _step(f"{ablated.numel()} exact counterfactuals ({evaluations:,} member evaluations), "
              f"mean distance {distances.mean():.3f}", start)
    else:
        n = min(args.attribute, args.samples)
        agreement = pipeline.attribute_step(checkpoint, results, n, k=max(10, args.per_sample),
                                            check=args.per_sample, device=args.device)
        _step(f"influence of all {units.n_units} units on {n} samples (dtrak, first_order, direct, loss); "
              f"exact check of each sample's top {args.per_sample}: {agreement}", start)

    judge = train_judge(data)
    quality = judge.judge(samples)
    quality["held_out_confident"] = judge.held_out_confident
    if by_class:
        # share of the class-c ablation's samples confidently labelled c, for every class c
        quality["ablated_confident_as_removed_class"] = [
            judge.judge(images[:, c])["confident_of_class"][c] for c in range(units.n_units)
        ]
    with ResultsWriter(results, "a") as writer:
        writer.set_attrs(quality=quality)
    pipeline.report_step(results, out / "report.png")
    _step(f"report -> {out / 'report.png'}", start)
    print(f"sample quality: {quality['relative_confident']:.2f} of the held-out real digits' share "
          f"of confident labels; class shares {[round(s, 3) for s in quality['class_shares']]}")
    if by_class:
        print("ablated ensembles drawing their removed class (confidently): "
              f"{[round(s, 3) for s in quality['ablated_confident_as_removed_class']]}; the full "
              f"ensemble: {[round(s, 3) for s in quality['confident_of_class']]}")
    return quality
