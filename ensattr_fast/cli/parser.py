"""The options of every ``ensattr`` command: the parser, and the values a ``--config`` file
gives (flags win over the file, the file over the defaults)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .attribution.methods import DEFAULT_METHODS, METHODS
from .config import config_value, options_for, read_config
from .data import UNIT_KINDS
from .errors import ConfigError
from .execution import PRECISIONS, Passes
from .members import ARCHITECTURES, MemberOptions
from .option_types import SEED_LIMIT, _device, _float, _int, _Parser, _seeds, _unit_kind, _units, _width
from .schedules import Sampler
from .steps.ablate import Floor
from .steps.memorization import generator_option
from .training import MODES, TrainConfig

__all__ = ["parser", "parse", "train_config", "sampler", "member_options", "floor", "passes"]

DESCRIPTION = """The ``ensattr`` command line: ``demo``, and ``plan``, ``train``, ``sample``, ``ablate``,
``attribute``, ``metrics``, ``lds``, ``report`` as separate steps over files.

Under ``torchrun`` (``torchrun --nproc_per_node 2 -m ensattr_fast train ...``) ``train``,
``sample``, ``ablate`` and ``attribute`` split their work across the ranks (see
:mod:`ensattr_fast.distributed`); rank 0 writes the files and prints."""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_int(1), default=TrainConfig.steps, help="optimisation steps")
    p.add_argument("--batch-size", type=_int(1, 2**20), default=TrainConfig.batch_size)
    p.add_argument("--lr", type=_float(0, 10, low_open=True), default=TrainConfig.lr)
    p.add_argument("--mode", choices=MODES, default=TrainConfig.mode,
                   help="independent members, shared (t, eps) draws, or one masked batch")
    p.add_argument("--ema", type=_float(0, 1, high_open=True), default=TrainConfig.ema_decay,
                   help="EMA decay (0: none)")
    p.add_argument("--arch", choices=list(ARCHITECTURES), default=MemberOptions.arch,
                   help="members: " + "; ".join(f"{name}, {a.description}" for name, a in ARCHITECTURES.items()))
    p.add_argument("--hidden", type=_int(1, 2**16), default=MemberOptions.hidden, help="width of the MLP members")
    p.add_argument("--blocks", type=_int(0, 256), default=MemberOptions.blocks, help="residual blocks of the MLP members")
    p.add_argument("--width", type=_width, default=MemberOptions.width, help="channels of the built-in UNet members")
    p.add_argument("--unet-config", type=Path, help="diffusers: JSON file of UNet2DModel arguments")
    p.add_argument("--seed", type=_int(0, SEED_LIMIT - 1), default=0)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of the training images")
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help="of the members: fp32; tf32 (CUDA matmuls and convolutions; the CPU stays fp32); bf16 or "
                        "fp16 autocast with float32 weights, Adam state and loss (fp16: loss scaling)")


def _add_pass_args(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--members-per-pass", type=_int(1, 4096), default=None,
                   help="evaluate the members K at a time (less memory, the same numbers; default: all at once)")
    if training:
        p.add_argument("--checkpoint-activations", action="store_true",
                       help="recompute the members' activations in the backward instead of keeping them")
    p.add_argument("--compile", action="store_true", help="torch.compile the member forward (slow start)")
    if not training:
        p.add_argument("--shard-members", action="store_true",
                       help="under torchrun: each rank holds its share of the members (the same numbers)")


def passes(args) -> Passes:
    return Passes(members_per_pass=args.members_per_pass, compile=args.compile,
                  checkpoint_activations=getattr(args, "checkpoint_activations", False),
                  shard_members=getattr(args, "shard_members", False))


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--sampling-steps", type=_int(1, 1000), default=50, help="DDIM steps")
    p.add_argument("--eta", type=_float(0, 1), default=0.0, help="DDIM stochasticity (0: deterministic, 1: DDPM-like)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1]")


def _add_floor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phantoms", type=_int(0, 2**16), default=Floor.phantoms,
                   help="phantom ablations per sample: the noise floor every exact effect is judged against "
                        "(fewer when the code leaves fewer rows free; 0: none)")
    p.add_argument("--alpha", type=_float(0, 1, low_open=True, high_open=True), default=Floor.alpha,
                   help="false discovery rate at which effects are called significant")


def floor(args) -> Floor:
    return Floor(phantoms=args.phantoms, alpha=args.alpha)


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mode=args.mode,
                       ema_decay=args.ema or None, seed=args.seed, hflip=args.hflip, precision=args.precision)


def sampler(args) -> Sampler:
    return Sampler(args.sampler, args.sampling_steps if args.sampler == "ddim" else None,
                   args.eta, None if args.no_clip else (-1.0, 1.0), getattr(args, "precision", None))


def member_options(args) -> MemberOptions:
    unet_config = None
    if args.unet_config:
        try:
            unet_config = json.loads(args.unet_config.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"--unet-config {args.unet_config} cannot be read as JSON: {error}") from None
        if not isinstance(unet_config, dict):
            raise ConfigError(f"--unet-config {args.unet_config} must hold an object of UNet2DModel arguments")
    return MemberOptions(arch=args.arch, hidden=args.hidden, blocks=args.blocks, width=args.width,
                         unet_config=unet_config)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="ensattr", description=DESCRIPTION)
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="train, sample, ablate and report on the embedded digits")
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--units", choices=["example", "class"], default="example")
    p.add_argument("--members", type=_int(2, 4096), default=None, help="16 (example units), 20 (class)")
    p.add_argument("--samples", type=_int(1), default=256)
    p.add_argument("--attribute", type=_int(1), default=32,
                   help="samples whose influence rows and exact checks are computed (example units)")
    p.add_argument("--per-sample", type=_int(1, 4096), default=8, help="top units ablated exactly per sample")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in --out")
    _add_train_args(p)
    _add_sampler_args(p)
    p.set_defaults(steps=3500, lr=3e-3)

    p = sub.add_parser("plan", help="write the code (which member trains on which unit)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="digits",
                   help="digits (built in), a folder of images (one subfolder per group, or flat), "
                        "an .npy/.npz array file or an .h5/.hdf5 file")
    p.add_argument("--units", type=_unit_kind(UNIT_KINDS), default="example",
                   help="one unit per example, per label, per group (folder or --metadata), or per "
                        "content cluster: clusters:K, K clusters by seeded k-means on pixels")
    p.add_argument("--metadata", help="CSV (columns example, group) or JSON giving each example's group")
    p.add_argument("--resolution", type=_int(1, 16384), default=32, help="image folders: side in pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="image folders: grayscale or RGB")
    p.add_argument("--fit", choices=["crop", "resize"], default="crop",
                   help="image folders: centre-crop after resizing the short side, or resize")
    p.add_argument("--key", default="images", help="arrays and HDF5: the images' key or dataset")
    p.add_argument("--memory-budget", type=_float(0, 2**20, low_open=True), default=2.0,
                   help="HDF5: GiB above which the images stay on disk and are read per batch")
    p.add_argument("--no-scale", action="store_true",
                   help="arrays and HDF5: take values as they are (latents) instead of checking [-1, 1]")
    p.add_argument("--members", type=_int(1, 4096), default=16)
    p.add_argument("--design", choices=["auto", "balanced", "random", "sparse"], default="auto")
    p.add_argument("--excluders", type=_int(1, 4096), default=2, help="excluders per group (sparse)")
    p.add_argument("--seed", type=_int(0, SEED_LIMIT - 1), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("train", help="train every member of a planned ensemble at once")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint file")
    p.add_argument("--checkpoint-every", type=_int(0), default=250, help="steps (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", type=_device, default="cpu")
    _add_train_args(p)
    _add_pass_args(p, training=True)

    p = sub.add_parser("sample", help="full-ensemble samples into a new results file")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="results file (HDF5)")
    p.add_argument("--seeds", type=_seeds, default=_seeds("64"), help="N, A:B or a,b,c")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sampling into --out")
    p.add_argument("--chunk", type=_int(1), default=256, help="samples written (and flagged done) at a time")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="of the members (default: the precision they were trained in); recorded with the samples, "
                        "whose every replay (ablate, attribute) uses it")
    _add_sampler_args(p)
    _add_pass_args(p, training=False)

    p = sub.add_parser("ablate", help="exact counterfactuals of the samples in a results file")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--units", type=_units, help="units to ablate for every sample, e.g. '3,17,250'")
    p.add_argument("--nearest", type=_int(1, 4096), default=4, help="else: the k pixel-nearest units")
    p.add_argument("--samples", type=_int(1), default=None, help="first S samples (default all)")
    p.add_argument("--overwrite", action="store_true", help="replace counterfactuals already in --results")
    p.add_argument("--device", type=_device, default="cpu")
    _add_floor_args(p)
    _add_pass_args(p, training=False)

    p = sub.add_parser("audit", help="groups ranked by exact ablation with significance, examples inside them "
                                     "by a gradient method")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--samples", type=_int(1), default=32, help="the first S samples")
    p.add_argument("--top-groups", type=_int(1, 4096), default=3, help="groups per sample whose examples are ranked")
    p.add_argument("--examples", type=_int(1, 2**20), default=10, help="examples ranked inside each top group")
    p.add_argument("--method", default="dtrak", choices=[m for m in METHODS if METHODS[m].scorer == "gradient"],
                   help="gradient method that ranks the examples")
    p.add_argument("--overwrite", action="store_true",
                   help="replace counterfactuals of another step already in --results")
    p.add_argument("--device", type=_device, default="cpu")
    _add_floor_args(p)

    p = sub.add_parser("attribute", help="influence of every unit on the samples, streamed to HDF5")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True, help="results file holding the samples")
    p.add_argument("--method", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--samples", type=_int(1), default=32, help="rows: the first S samples")
    p.add_argument("--topk", type=_int(1, 2**20), default=10)
    p.add_argument("--block-rows", type=_int(1, 2**20), default=64)
    p.add_argument("--block-units", type=_int(1, 2**24), default=16384)
    p.add_argument("--draws", type=_int(1, 2**20), default=64, help="shared (t, eps) draws per loss")
    p.add_argument("--projection-dim", type=_int(1, 2**20), default=1024,
                   help="numbers each gradient is projected to (dtrak/trak methods)")
    p.add_argument("--exact-kernel", action="store_true",
                   help="dtrak/trak methods on the full gradients, no projection (small training sets only)")
    p.add_argument("--check", type=_int(0, 4096), default=8, help="exact ablation of each sample's top units (0: none)")
    p.add_argument("--groups", default=None,
                   help="also score unit sets, from a JSON file {name: [units]}")
    p.add_argument("--check-by", default=None,
                   help="method whose top units are checked (default: first_order when computed)")
    p.add_argument("--overwrite", action="store_true",
                   help="let the exact check replace counterfactuals of `ensattr ablate` in --results")
    p.add_argument("--device", type=_device, default="cpu")
    _add_floor_args(p)

    p = sub.add_parser("metrics", help="validity metrics of a results file")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="also run the false-attribution protocol")
    p.add_argument("--samples", type=_int(1), default=32, help="samples for false attribution")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", type=Path, help="also write them here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json")

    p = sub.add_parser("lds", help="linear datamodeling score of every influence matrix")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--references", type=Path, required=True,
                   help="checkpoint of the reference models (trained here if missing)")
    p.add_argument("--halves", type=_int(1, 4096), default=32, help="random halves of the units (R)")
    p.add_argument("--seeds", type=_int(1, 64), default=2, help="models per half, averaged")
    p.add_argument("--steps", type=_int(1), default=None, help="training steps (default: the ensemble's)")
    p.add_argument("--draws", type=_int(1, 2**20), default=256, help="fixed (t, eps) draws per loss")
    p.add_argument("--samples", type=_int(1), default=None, help="first S rows (default: all)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json")

    p = sub.add_parser("memorization", help="near-copies of training units that a generator draws, each proven "
                                            "by exact ablation")
    p.add_argument("--checkpoint", type=Path, required=True, help="the encoded ensemble")
    p.add_argument("--out", type=Path, required=True, help="new HDF5 file (/memorization)")
    p.add_argument("--generator", type=generator_option, default="full",
                   help="the members that sample: full, member:M or members:a,b,c")
    p.add_argument("--generator-checkpoint", type=Path, default=None,
                   help="sample from this model's members instead (same data and units, e.g. one model trained "
                        "on everything); copies are proven by the ensemble's excluders")
    p.add_argument("--seeds", type=_seeds, default=_seeds("512"), help="N, A:B or a,b,c")
    p.add_argument("--threshold", type=_float(0, 1e6, low_open=True), default=1.0,
                   help="pixel L2 (data scale [-1, 1]) under which a sample copies its nearest training image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", type=_device, default="cpu")
    _add_sampler_args(p)
    _add_floor_args(p)
    p.set_defaults(phantoms=64)  # a phantom beyond a copy's effect still leaves p = 2/65 < 0.05

    p = sub.add_parser("report", help="a PNG of samples beside their counterfactuals, marked significant or "
                                      "within noise, and the same as a self-contained HTML page beside it")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=_int(1, 4096), default=8)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--data", default=None,
                   help="the training data (as given to `ensattr plan --data`), for a results file that "
                        "does not record it")
    for step in sub.choices.values():
        step.add_argument("--config", type=Path, help="TOML or YAML file of options (flags win over it)")
    return top


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """Flags over ``--config FILE`` over the defaults. A config value goes through the same
    type and range as its flag; booleans must be true or false."""
    top = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = next((a for a in argv if a in steps), None)
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if command is not None and path is not None:
        every = {name: {a.dest for a in step._actions} - {"help", "config"} for name, step in steps.items()}
        step = steps[command]
        actions = {a.dest: a for a in step._actions}
        for dest, value in options_for(read_config(path), command, every, path).items():
            step.set_defaults(**{dest: config_value(actions[dest], value, command, path)})
            actions[dest].required = False
    return top.parse_args(argv)
