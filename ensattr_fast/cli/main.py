"""``ensattr``: the command line. Parses the options (:mod:`ensattr_fast.options`), joins the
process group that ``torchrun`` describes, runs one step (:mod:`ensattr_fast.steps`), and
prints any refused input (an :class:`~ensattr_fast.errors.EnsattrError`) as one line with exit
status 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import distributed, steps
from .attribution.methods import parse_methods
from .data import data_spec
from .errors import EnsattrError
from .files import atomic_output, check_output
from .options import floor, member_options, parse, passes, sampler, train_config
from .steps.audit import describe as describe_audit
from .store import ResultsWriter

__all__ = ["main", "launch"]


def launch(device: str = "cpu") -> str:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1) and return the
    device of this rank: gloo for CPU runs, NCCL and ``cuda:LOCAL_RANK`` for CUDA runs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _error(command: str, error: Exception) -> int:
    line = " ".join(str(error).splitlines())
    print(f"ensattr {command}: error: {line}" if command else f"ensattr: error: {line}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse(argv)
    except EnsattrError as error:
        return _error(getattr(error, "prog", "ensattr").removeprefix("ensattr").strip(), error)
    try:
        return _run(args)
    except EnsattrError as error:
        return _error(args.command, error)
    except OSError as error:  # a full disk, a read-only folder, a file taken away
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        return _error(args.command, OSError(f"{error.strerror or error}{where}"))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args) -> int:
    args.device = launch(getattr(args, "device", "cpu"))
    if not distributed.world().main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run
    COMMANDS[args.command](args)
    _record_options(args)
    return 0


def _options(args) -> dict:
    """The options a step ran with (flags, config file and defaults), as JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if isinstance(v, (str, int, float, bool, list, Path, type(None)))}


def _record_options(args) -> None:
    """Keep each step's options in the file it wrote (``options_<step>``, JSON)."""
    written = {"plan": "out", "sample": "out", "ablate": "results", "attribute": "results",
               "metrics": "results", "lds": "results"}.get(args.command)
    if written is not None and distributed.world().main:
        with ResultsWriter(getattr(args, written), "a") as writer:
            writer.set_attrs(**{f"options_{args.command}": _options(args)})


def _demo(args) -> None:
    steps.run_demo(args.out, train_config(args), sampler(args), member_options(args), units=args.units,
                   n_members=args.members, samples=args.samples, attribute=args.attribute,
                   per_sample=args.per_sample, device=args.device, overwrite=args.overwrite)


def _plan(args) -> None:
    spec = data_spec(args.data, args.resolution, args.channels, args.fit, args.key,
                     int(args.memory_budget * 2**30), not args.no_scale, args.metadata)
    stats = steps.make_plan(args.out, spec, args.units, args.members, args.design, args.excluders, args.seed,
                            args.overwrite)
    print(f"plan written to {args.out}: {stats}\ndesign: {steps.plan.design_reason(args.out)}")


def _train(args) -> None:
    steps.train(args.plan, args.out, train_config(args), member_options(args), args.device,
                args.checkpoint_every, args.resume, options=_options(args), overwrite=args.overwrite,
                passes=passes(args))
    print(f"checkpoint written to {args.out}")


def _sample(args) -> None:
    steps.sample_step(args.checkpoint, args.out, args.seeds, sampler(args), args.device, args.overwrite,
                      args.resume, args.chunk, passes(args))
    print(f"{len(args.seeds)} samples written to {args.out}")


def _ablate(args) -> None:
    start = time.perf_counter()
    _, distances, evaluations = steps.ablate_step(args.checkpoint, args.results, args.units, args.device,
                                                  nearest=args.nearest, samples=args.samples,
                                                  overwrite=args.overwrite, floor=floor(args), passes=passes(args))
    print(f"{distances.numel()} counterfactuals written to {args.results} in {time.perf_counter() - start:.1f} s "
          f"({evaluations:,} member evaluations); mean distance {distances.mean():.3f}")


def _attribute(args) -> None:
    methods = [m.name for m in parse_methods(args.method)]
    check_by = args.check_by or ("first_order" if "first_order" in methods else methods[0])
    agreement = steps.attribute_step(
        args.checkpoint, args.results, args.samples, methods, args.topk, args.block_rows, args.block_units,
        args.draws, args.check, check_by, args.device,
        groups=steps.read_groups(args.groups) if args.groups else None, overwrite=args.overwrite,
        projection_dim=args.projection_dim, exact_kernel=args.exact_kernel, floor=floor(args))
    print(f"influence written to {args.results}; agreement with exact ablation: {json.dumps(agreement)}")


def _audit(args) -> None:
    arrays = steps.audit_step(args.checkpoint, args.results, args.samples, args.top_groups, args.examples,
                              args.method, args.device, floor(args), args.overwrite)
    print(describe_audit(arrays, args.results))
    print(steps.significance_summary(args.results))


def _json_output(args, inputs: dict):
    """Check ``--json`` before the step runs; returns a writer of it for after."""
    if args.json is None:
        return lambda payload: None
    check_output(args.json, "--json", args.overwrite, inputs=inputs)

    def write(payload) -> None:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))

    return write


def _metrics(args) -> None:
    write = _json_output(args, {"--results": args.results, "--checkpoint": args.checkpoint})
    found = steps.metrics_step(args.results, args.checkpoint, args.samples, args.device)
    print(json.dumps(found, indent=2))
    write(found)


def _lds(args) -> None:
    write = _json_output(args, {"--results": args.results, "--checkpoint": args.checkpoint,
                                "--references": args.references})
    table = steps.lds_step(args.results, args.checkpoint, args.references, args.halves, args.seeds, args.steps,
                           args.draws, args.samples, args.device)
    print(f"{'method':<26} {'LDS':>7} {'95% interval':>18} {'queries':>8}")
    for method, row in sorted(table.items(), key=lambda kv: -np.nan_to_num(kv[1]["mean"], nan=-9)):
        print(f"{method:<26} {row['mean']:7.3f} {row['low']:8.3f} .. {row['high']:6.3f} {row['n']:8d}")
    write(table)


def _memorization(args) -> None:
    arrays = steps.memorization_step(args.checkpoint, args.out, args.generator, args.seeds, sampler(args),
                                     args.threshold, args.generator_checkpoint, args.phantoms, args.alpha,
                                     device=args.device, overwrite=args.overwrite)
    print(f"{steps.memorization_summary(arrays, args.threshold)}; written to {args.out}")


def _report(args) -> None:
    steps.report_step(args.results, args.out, args.rows, dataset=data_spec(args.data) if args.data else None,
                      overwrite=args.overwrite)
    print(f"report written to {args.out} and {Path(args.out).with_suffix('.html')}")


COMMANDS = {"demo": _demo, "plan": _plan, "train": _train, "sample": _sample, "ablate": _ablate, "audit": _audit,
            "attribute": _attribute, "metrics": _metrics, "lds": _lds, "memorization": _memorization,
            "report": _report}


if __name__ == "__main__":
    sys.exit(main())
