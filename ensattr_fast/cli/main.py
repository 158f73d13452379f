"""``ensattr``: the command line, a thin shell over :class:`~ensattr_fast.Audit`. Parses the
command (:mod:`.parser`), joins the process group that ``torchrun`` describes, runs the step
through an ``Audit`` on the files given, prints what it found, and prints any refused input
(an :class:`~ensattr_fast.errors.EnsattrError`) as one line with exit status 2."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..audit import Audit
from ..errors import EnsattrError
from ..evaluation.floors import summary as significance_summary
from ..runtime import distributed
from ..steps import demo
from ..steps.groups import describe as describe_audit
from ..steps.plan import design_reason
from .parser import Command, parse

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
        command = parse(argv)
    except EnsattrError as error:
        return _error(getattr(error, "prog", "ensattr").removeprefix("ensattr").strip(), error)
    try:
        return _run(command)
    except EnsattrError as error:
        return _error(command.step, error)
    except OSError as error:  # a full disk, a read-only folder, a file taken away
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        return _error(command.step, OSError(f"{error.strerror or error}{where}"))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(command: Command) -> int:
    options = command.options
    if hasattr(options, "device"):
        device = launch(options.device)
        if device != options.device:
            import dataclasses

            options = dataclasses.replace(options, device=device)
    else:
        launch()
    if not distributed.world().main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run
    if command.step == "demo":
        demo(command.files["out"], options)
        return 0
    files = command.files
    out = files.get("out")
    audit = Audit(plan=files.get("plan", out if command.step == "plan" else None),
                  checkpoint=files.get("checkpoint", out if command.step == "train" else None),
                  results=files.get("results", out if command.step == "sample" else None),
                  config=command.config)
    COMMANDS[command.step](audit, options, out)
    return 0


def _plan(audit: Audit, options, out) -> None:
    found = audit.plan(options)
    print(f"plan written to {out}: {found.stats}\ndesign: {design_reason(out)}")


def _train(audit: Audit, options, out) -> None:
    audit.train(options)
    print(f"checkpoint written to {out}")


def _sample(audit: Audit, options, out) -> None:
    audit.sample(options)
    print(f"{len(options.seeds)} samples written to {out}")


def _ablate(audit: Audit, options, out) -> None:
    start = time.perf_counter()
    found = audit.ablate(options=options)
    print(f"{found.distances.numel()} counterfactuals written to {audit.session.results} in "
          f"{time.perf_counter() - start:.1f} s ({found.member_evaluations:,} member evaluations); "
          f"mean distance {found.distances.mean():.3f}")


def _attribute(audit: Audit, options, out) -> None:
    found = audit.attribute(options)
    print(f"influence written to {audit.session.results}; agreement with exact ablation: "
          f"{json.dumps(found.agreement)}")


def _audit(audit: Audit, options, out) -> None:
    found = audit.audit_groups(options)
    print(describe_audit(found.arrays(), audit.session.results))
    print(significance_summary(audit.session.results))


def _metrics(audit: Audit, options, out) -> None:
    print(json.dumps(audit.metrics(options), indent=2))


def _lds(audit: Audit, options, out) -> None:
    table = audit.lds(options)
    print(f"{'method':<26} {'LDS':>7} {'95% interval':>18} {'queries':>8}")
    for method, row in sorted(table.items(), key=lambda kv: -np.nan_to_num(kv[1]["mean"], nan=-9)):
        print(f"{method:<26} {row['mean']:7.3f} {row['low']:8.3f} .. {row['high']:6.3f} {row['n']:8d}")


def _memorization(audit: Audit, options, out) -> None:
    found = audit.memorization(out, options)
    print(f"{found.summary()}; written to {out}")


def _report(audit: Audit, options, out) -> None:
    picture, page = audit.report(out, options)
    print(f"report written to {picture} and {page}")


COMMANDS: Dict[str, Callable] = {"plan": _plan, "train": _train, "sample": _sample, "ablate": _ablate,
                                 "audit": _audit, "attribute": _attribute, "metrics": _metrics, "lds": _lds,
                                 "memorization": _memorization, "report": _report}


if __name__ == "__main__":
    sys.exit(main())
