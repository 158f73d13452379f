"""The ``ensattr`` command line: ``demo``, and ``plan``, ``train``, ``sample``, ``ablate``,
``attribute``, ``metrics``, ``lds``, ``report`` as separate steps over files.

Under ``torchrun`` (``torchrun --nproc_per_node 2 -m ensattr_fast train ...``) ``train``,
``sample``, ``ablate`` and ``attribute`` split their work across the ranks (see
:mod:`ensattr_fast.distributed`); rank 0 writes the files and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from . import distributed, pipeline
from .checkpoint import CheckpointError
from .codes import CodeError
from .config import ConfigError, options_for, read_config
from .data import DataError
from .schedules import Sampler
from .store import ResultsWriter, StoreError
from .training import MODES, TrainConfig

ERRORS = (CodeError, DataError, CheckpointError, StoreError, ConfigError)


def _seeds(text: str) -> List[int]:
    """``256`` (seeds 0..255), ``100:164`` (a range) or ``1,5,9`` (a list)."""
    if ":" in text:
        start, stop = (int(v) for v in text.split(":"))
        return list(range(start, stop))
    if "," in text:
        return [int(v) for v in text.split(",")]
    return list(range(int(text)))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--mode", choices=MODES, default=TrainConfig.mode,
                   help="independent members, shared (t, eps) draws, or one masked batch")
    p.add_argument("--ema", type=float, default=TrainConfig.ema_decay, help="EMA decay (0: none)")
    p.add_argument("--arch", choices=["mlp", "unet", "diffusers"], default="mlp",
                   help="members: residual MLP, the built-in UNet, or a diffusers UNet2DModel")
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP members")
    p.add_argument("--blocks", type=int, default=3, help="residual blocks of the MLP members")
    p.add_argument("--width", type=int, default=32, help="channels of the built-in UNet members")
    p.add_argument("--unet-config", type=Path, help="diffusers: JSON file of UNet2DModel arguments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of the training images")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic, 1: DDPM-like)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1]")


def _train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mode=args.mode,
                       ema_decay=args.ema or None, seed=args.seed, hflip=args.hflip)


def _sampler(args) -> Sampler:
    return Sampler(args.sampler, args.sampling_steps if args.sampler == "ddim" else None,
                   args.eta, None if args.no_clip else (-1.0, 1.0))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ensattr", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train, sample, ablate and report on the embedded digits")
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--units", choices=["example", "class"], default="example")
    p.add_argument("--members", type=int, default=None, help="16 (example units), 20 (class)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--attribute", type=int, default=32,
                   help="samples whose influence rows and exact checks are computed (example units)")
    p.add_argument("--per-sample", type=int, default=8, help="top units ablated exactly per sample")
    p.add_argument("--device", default="cpu")
    _add_train_args(p)
    _add_sampler_args(p)
    p.set_defaults(steps=3500, lr=3e-3)

    p = sub.add_parser("plan", help="write the code (which member trains on which unit)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="digits",
                   help="digits (built in), a folder of images (one subfolder per group, or flat), "
                        "an .npy/.npz array file or an .h5/.hdf5 file")
    p.add_argument("--units", choices=["example", "class", "group"], default="example",
                   help="one unit per example, per label, or per group (folder or --metadata)")
    p.add_argument("--metadata", help="CSV (columns example, group) or JSON giving each example's group")
    p.add_argument("--resolution", type=int, default=32, help="image folders: side in pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="image folders: grayscale or RGB")
    p.add_argument("--fit", choices=["crop", "resize"], default="crop",
                   help="image folders: centre-crop after resizing the short side, or resize")
    p.add_argument("--key", default="images", help="arrays and HDF5: the images' key or dataset")
    p.add_argument("--memory-budget", type=float, default=2.0,
                   help="HDF5: GiB above which the images stay on disk and are read per batch")
    p.add_argument("--no-scale", action="store_true",
                   help="arrays and HDF5: take values as they are (latents) instead of checking [-1, 1]")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--design", choices=["auto", "balanced", "random", "sparse"], default="auto")
    p.add_argument("--excluders", type=int, default=2, help="excluders per group (sparse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("train", help="train every member of a planned ensemble at once")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint file")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--device", default="cpu")
    _add_train_args(p)

    p = sub.add_parser("sample", help="full-ensemble samples into a new results file")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="results file (HDF5)")
    p.add_argument("--seeds", type=_seeds, default=_seeds("64"), help="N, A:B or a,b,c")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sampling into --out")
    p.add_argument("--chunk", type=int, default=256, help="samples written (and flagged done) at a time")
    _add_sampler_args(p)

    p = sub.add_parser("ablate", help="exact counterfactuals of the samples in a results file")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--units", help="units to ablate for every sample, e.g. '3,17,250'")
    p.add_argument("--nearest", type=int, default=4, help="else: the k pixel-nearest units")
    p.add_argument("--samples", type=int, default=None, help="first S samples (default all)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("attribute", help="influence of every unit on the samples, streamed to HDF5")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True, help="results file holding the samples")
    p.add_argument("--method", default="dtrak,first_order,direct,loss",
                   help="comma-separated: first_order, direct, loss; gradient methods dtrak and trak "
                        "(the members' mean), dtrak_includers, dtrak_contrast, trak_includers, trak_contrast")
    p.add_argument("--samples", type=int, default=32, help="rows: the first S samples")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--block-rows", type=int, default=64)
    p.add_argument("--block-units", type=int, default=16384)
    p.add_argument("--draws", type=int, default=64, help="shared (t, eps) draws per loss")
    p.add_argument("--check", type=int, default=8, help="exact ablation of each sample's top units (0: none)")
    p.add_argument("--groups", default=None,
                   help="also score unit sets, from a JSON file {name: [units]}")
    p.add_argument("--check-by", default=None,
                   help="method whose top units are checked (default: first_order when computed)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("metrics", help="validity metrics of a results file")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="also run the false-attribution protocol")
    p.add_argument("--samples", type=int, default=32, help="samples for false attribution")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write them here")

    p = sub.add_parser("lds", help="linear datamodeling score of every influence matrix")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--references", type=Path, required=True,
                   help="checkpoint of the reference models (trained here if missing)")
    p.add_argument("--halves", type=int, default=32, help="random halves of the units (R)")
    p.add_argument("--seeds", type=int, default=2, help="models per half, averaged")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the ensemble's)")
    p.add_argument("--draws", type=int, default=256, help="fixed (t, eps) draws per loss")
    p.add_argument("--samples", type=int, default=None, help="first S rows (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)

    p = sub.add_parser("report", help="a PNG of samples beside their counterfactuals")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=8)
    for step in sub.choices.values():
        step.add_argument("--config", type=Path, help="TOML or YAML file of options (flags win over it)")
    return top


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


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """Flags over ``--config FILE`` over the defaults."""
    top = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = next((a for a in argv if a in steps), None)
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if command is not None and path is not None:
        step = steps[command]
        actions = {a.dest: a for a in step._actions}
        values = options_for(read_config(path), command, set(actions) - {"help", "config"}, path)
        for dest, value in values.items():
            action = actions[dest]
            if isinstance(value, list):  # seeds = [1, 5, 9]
                value = ",".join(str(v) for v in value)
            if action.type is not None and not isinstance(value, (str, bool)):
                value = str(value)  # argparse converts string defaults with the option's type
            action.required = False
            step.set_defaults(**{dest: value})
    return top.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = _parse(argv)
    except ConfigError as error:
        print(f"ensattr: error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args) -> int:
    args.device = distributed.init_from_env(getattr(args, "device", "cpu"))
    if not distributed.world().main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args)
        elif args.command == "plan":
            spec = pipeline.data_spec(args.data, args.resolution, args.channels, args.fit, args.key,
                                      int(args.memory_budget * 2**30), not args.no_scale, args.metadata)
            stats = pipeline.make_plan(args.out, spec, args.units, args.members, args.design,
                                       args.excluders, args.seed, args.overwrite)
            print(f"plan written to {args.out}: {stats}")
        elif args.command == "train":
            pipeline.train(args.plan, args.out, _train_config(args), args.hidden, args.blocks,
                           args.device, args.checkpoint_every, args.resume, options=_options(args),
                           arch=args.arch, width=args.width,
                           unet_config=json.loads(args.unet_config.read_text()) if args.unet_config else None)
            print(f"checkpoint written to {args.out}")
        elif args.command == "sample":
            pipeline.sample_step(args.checkpoint, args.out, args.seeds, _sampler(args), args.device,
                                 args.overwrite, args.resume, args.chunk)
            print(f"{len(args.seeds)} samples written to {args.out}")
        elif args.command == "ablate":
            _ablate(args)
        elif args.command == "attribute":
            methods = [m.strip() for m in args.method.split(",") if m.strip()]
            check_by = args.check_by or ("first_order" if "first_order" in methods else methods[0])
            agreement = pipeline.attribute_step(
                args.checkpoint, args.results, args.samples, methods, args.topk, args.block_rows,
                args.block_units, args.draws, args.check, check_by, args.device,
                groups=pipeline.read_groups(args.groups) if args.groups else None)
            print(f"influence written to {args.results}; agreement with exact ablation: {json.dumps(agreement)}")
        elif args.command == "metrics":
            found = pipeline.metrics_step(args.results, args.checkpoint, args.samples, args.device)
            print(json.dumps(found, indent=2))
            if args.json:
                args.json.write_text(json.dumps(found, indent=2))
        elif args.command == "lds":
            _lds(args)
        elif args.command == "report":
            pipeline.report_step(args.results, args.out, args.rows)
            print(f"report written to {args.out}")
        _record_options(args)
    except ERRORS as error:
        print(f"ensattr {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _lds(args) -> None:
    from .lds import lds_table
    from .results import open_results

    with open_results(args.results) as r:
        dataset = r.attrs.get("plan", {}).get("dataset", "digits")
    table = lds_table(args.results, args.checkpoint, pipeline.load_data(dataset), args.references,
                      args.halves, args.seeds, args.steps, args.draws, args.samples, args.device)
    print(f"{'method':<26} {'LDS':>7} {'95% interval':>18} {'queries':>8}")
    for method, row in sorted(table.items(), key=lambda kv: -np.nan_to_num(kv[1]["mean"], nan=-9)):
        print(f"{method:<26} {row['mean']:7.3f} {row['low']:8.3f} .. {row['high']:6.3f} {row['n']:8d}")
    if args.json:
        args.json.write_text(json.dumps({m: {k: v for k, v in row.items()} for m, row in table.items()}, indent=2))


def _ablate(args) -> None:
    from .store import read_hdf5

    with read_hdf5(args.results) as f:
        n = len(f["samples/seed"]) if args.samples is None else min(args.samples, len(f["samples/seed"]))
        samples = torch.from_numpy(f["samples/images"][:n])
        dataset = json.loads(f.attrs["plan"])["dataset"]
        unit_of = torch.from_numpy(f["units/of_example"][()])
    if args.units:
        units = torch.tensor([int(u) for u in args.units.split(",")]).expand(n, -1).clone()
    else:
        units = pipeline.nearest_units(samples, pipeline.load_data(dataset), unit_of, args.nearest)
    start = time.perf_counter()
    _, distances, evaluations = pipeline.ablate_step(args.checkpoint, args.results, units, args.device)
    print(f"{units.numel()} counterfactuals written to {args.results} in {time.perf_counter() - start:.1f} s "
          f"({evaluations:,} member evaluations); mean distance {distances.mean():.3f}")


if __name__ == "__main__":
    sys.exit(main())
