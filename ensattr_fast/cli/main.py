"""``ensattr``: the command line, a thin shell over :class:`~ensattr_fast.Audit`. Parses the
command (:mod:`.parser`), joins the process group that ``torchrun`` describes, runs the step
through an ``Audit`` on the files given, prints what it found, and prints any refused input
(an :class:`~ensattr_fast.errors.EnsattrError`) as one line with exit status 2."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..audit import Audit
from ..errors import ConfigError, DiskError, EnsattrError
from ..evaluation.floors import summary as significance_summary
from ..runtime import distributed, memory
from ..runtime.files import fault_line, quiet_hdf5_teardown, system_fault
from ..steps import demo
from ..steps.groups import describe as describe_audit
from ..steps.plan import design_reason
from ..store import dump_json
from ..store.hdf5 import exit_after_faults
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


def _system_fault(error: RuntimeError) -> bool:
    """Whether a RuntimeError is HDF5's or torch's word for a fault of the system (a failed write
    or read, with its errno), not a fault of the package."""
    return system_fault(error) or "PytorchStreamWriter failed" in str(error)


def _error(command: str, error) -> int:
    line = " ".join(str(error).split())
    print(f"ensattr {command}: error: {line}" if command else f"ensattr: error: {line}", file=sys.stderr)
    return 2


#: (wall, CPU) when this process started its command, what ``_cost`` counts from
_STARTED = (time.monotonic(), 0.0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``ensattr`` command (``argv``: its arguments; None: this process's own, and then a
    fault of the system ends the process at once, see :func:`_stop`). Returns the exit status."""
    global _STARTED
    own = argv is None
    _STARTED = _clock()
    quiet_hdf5_teardown()  # after a fault of the system, its one line and no echo from every freed handle
    if own:  # a fault of the system ends this process at once (_stop): nothing given up need be closed
        exit_after_faults()
    try:
        command = parse(argv)
    except EnsattrError as error:
        return _error(getattr(error, "prog", "ensattr").removeprefix("ensattr").strip(), error)
    try:
        return _run(command)
    except DiskError as error:
        return _stop(command.step, error, own)
    except EnsattrError as error:
        return _error(command.step, error)
    except OSError as error:  # a full disk, a read-only folder, a file taken away
        return _stop(command.step, fault_line(error), own)
    except KeyError as error:  # h5py's error for an object whose metadata a damaged file garbles
        if not _hdf5_damage(error):
            raise
        return _error(command.step, f"an input HDF5 file is damaged ({error.args[0]}): restore it from a copy "
                                    "and run this again")
    except RuntimeError as error:
        if _hdf5_damage(error):  # h5py's word for a group whose links a damaged file garbles
            return _error(command.step, f"an input HDF5 file is damaged ({error}): restore it from a copy and run "
                                        "this again")
        if not _system_fault(error):
            raise
        return _stop(command.step, fault_line(error), own)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _hdf5_damage(error: Exception) -> bool:
    """Whether h5py raised ``error`` on reading a damaged object (a checksum or a header that
    does not hold: "Unable to ..." as a KeyError, "Link iteration failed ..." as a RuntimeError),
    rather than on a name that is missing or a fault of the package."""
    text = str(error.args[0]) if error.args else ""
    return (text.startswith("Unable to") or "iteration failed" in text) and any(
        w in text for w in ("checksum", "metadata", "header", "decode", "bad", "corrupt", "truncated"))


def _stop(command: str, error, own: bool) -> int:
    """After the system refused a write: the line, then (for the process's own command line) an
    exit that skips the interpreter's teardown. HDF5 leaves a file whose last write failed half
    closed, and freeing its objects at exit can crash the process; every lock and temporary file
    is gone by now."""
    code = _error(command, error)
    if not own:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)


#: the steps that split their work over torchrun's ranks; the others run in one process
DISTRIBUTED_STEPS = ("train", "sample", "ablate", "attribute")


def _run(command: Command) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and command.step not in DISTRIBUTED_STEPS:  # each rank would write the same files at once
        raise ConfigError(f"{command.step} does not run under torchrun (WORLD_SIZE {world}): only "
                          f"{', '.join(DISTRIBUTED_STEPS)} split their work over ranks; run it as one process")
    memory.set_budget(command.memory)
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
    _cost(command.step)
    return 0


def _cost(step: str) -> None:
    """What the command cost, on stderr: the process's peak resident memory, and the CPU and
    wall time since the command began (imports not counted)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime - _STARTED[1]
    print(f"{step}: peak memory {peak / 2**30:.2f} GiB, CPU {cpu:.1f} s, wall {time.monotonic() - _STARTED[0]:.1f} s",
          file=sys.stderr, flush=True)


def _clock() -> tuple:
    """(wall, CPU) seconds now: where a command's cost is counted from."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), usage.ru_utime + usage.ru_stime


def _plan(audit: Audit, options, out) -> None:
    found = audit.plan(options)
    print(f"plan written to {out}: {found.stats}\nduplicates: {found.duplicates_line()}\n"
          f"design: {design_reason(out)}")


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
          f"{dump_json(found.agreement)}")


def _audit(audit: Audit, options, out) -> None:
    found = audit.audit_groups(options)
    print(describe_audit(found.arrays(), audit.session.results))
    print(significance_summary(audit.session.results))


def _metrics(audit: Audit, options, out) -> None:
    print(dump_json(audit.metrics(options), indent=2))


def _lds(audit: Audit, options, out) -> None:
    table = audit.lds(options)
    if "protocol" in table:
        print("protocol: " + ", ".join(f"{k} {v}" for k, v in table["protocol"].items()))
    sets = {k: v for k, v in table.items() if k != "protocol"} if "protocol" in table else {"generated": table}
    print(f"{'method':<26} {'queries':<10} {'LDS':>7} {'95% interval':>18} {'n':>6}")
    for name, rows in sets.items():
        for method, row in sorted(rows.items(), key=lambda kv: -np.nan_to_num(kv[1]["mean"], nan=-9)):
            print(f"{method:<26} {name:<10} {row['mean']:7.3f} {row['low']:8.3f} .. {row['high']:6.3f} {row['n']:6d}")


def _memorization(audit: Audit, options, out) -> None:
    found = audit.memorization(out, options)
    print(f"{found.summary()}; written to {out}")


def _report(audit: Audit, options, out) -> None:
    picture, page = audit.report(out, options)
    print(f"report written to {picture} and {page}")


def _export(audit: Audit, options, out) -> None:
    folders = audit.export(out, options)
    print(f"{len(folders)} members written to {out}: {', '.join(f.name for f in folders)}")


COMMANDS: Dict[str, Callable] = {"plan": _plan, "train": _train, "sample": _sample, "ablate": _ablate,
                                 "audit": _audit, "attribute": _attribute, "metrics": _metrics, "lds": _lds,
                                 "memorization": _memorization, "report": _report, "export": _export}


if __name__ == "__main__":
    sys.exit(main())
