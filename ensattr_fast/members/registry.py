"""The member architectures, by name: how to build a new ensemble of each from the options a
user gives (``--arch``, ``--hidden`` ...), and how to rebuild one from the spec a checkpoint
stores. A new architecture is one :class:`Architecture` entry in :data:`ARCHITECTURES`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from ..errors import ArchitectureError, ConfigError
from ..runtime.fields import Choice, FilePath, Int, Kind, Switch, Width, check_fields, option
from .adapters import LoraEnsemble
from .base import Ensemble
from .diffusers_unet import SEED_CIFAR10, diffusers_ensemble
from .mlp import StackedMLP
from .text import text_ensemble
from .unet import StackedUNet

__all__ = ["MemberOptions", "Architecture", "ARCHITECTURES", "build_members", "build_ensemble"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    description: str
    spec: Callable[[MemberOptions, Sequence[int]], dict]  # options, data shape -> spec of one member
    rebuild: Callable[[dict], Ensemble]  # a full spec (with kind, n_members ...) -> the ensemble


#: the ``unet-small`` preset's width (164k parameters per member at 3 channels)
SMALL_WIDTH = 32


def _diffusers_spec(options: MemberOptions, data_shape: Sequence[int], preset: Optional[dict] = None) -> dict:
    C, H, W = data_shape
    config = dict(preset or {}, **(options.unet_config or {}))
    for key, value in (("sample_size", H), ("in_channels", C), ("out_channels", C)):
        given = config.setdefault(key, value)
        height_width = key == "sample_size" and isinstance(given, (list, tuple)) and list(given) == [H, W]
        if given != value and not height_width:
            raise ArchitectureError(f"the UNet config has {key} = {given} but the data {value}")
    return dict(config=config)


def _diffusers(spec: dict) -> Ensemble:
    return diffusers_ensemble(spec["config"], spec["n_members"], spec.get("shared_init", False), spec.get("seed", 0))


#: a small UNet2DConditionModel, the default of ``--arch diffusers-text`` (--unet-config entries override it)
TEXT_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D",
                 "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8,
                 attention_head_dim=8)


def _text(spec: dict) -> Ensemble:
    return text_ensemble(spec["config"], spec["n_members"], spec["data_shape"], spec["condition_shape"],
                         spec.get("shared_init", False), spec.get("seed", 0))


ARCHITECTURES: Dict[str, Architecture] = {
    "mlp": Architecture(
        "residual MLP, weights stacked over members (the demo's)",
        lambda o, shape: dict(hidden=o.hidden, blocks=o.blocks),
        lambda spec: StackedMLP(**{k: v for k, v in spec.items() if k != "kind"})),
    "unet": Architecture(
        "the built-in small UNet of --width channels, members in grouped convolutions",
        lambda o, shape: dict(width=o.width),
        lambda spec: StackedUNet(**{k: v for k, v in spec.items() if k != "kind"})),
    "unet-small": Architecture(
        f"the built-in UNet at width {SMALL_WIDTH} (164k parameters at 3x32x32; for 32x32 on CPU)",
        lambda o, shape: dict(width=SMALL_WIDTH),
        lambda spec: StackedUNet(**{k: v for k, v in spec.items() if k != "kind"})),
    "diffusers": Architecture(
        "a diffusers UNet2DModel of --unet-config, members folded into the batch",
        _diffusers_spec,
        _diffusers),
    "seed-cifar10": Architecture(
        "the seed paper's CIFAR-10 UNet (DDPM, Ho et al. 2020; 35.7M parameters at 3x32x32) as a diffusers "
        "UNet2DModel; --unet-config entries override it",
        lambda o, shape: _diffusers_spec(o, shape, SEED_CIFAR10),
        _diffusers),
    "diffusers-text": Architecture(
        "a diffusers UNet2DConditionModel (small by default; --unet-config entries override it) cross-attending "
        "to each example's embedding, the data's 'conditions' [n, L, D]; sample with --condition-file",
        lambda o, shape: _diffusers_spec(o, shape, TEXT_UNET),
        _text),
}


#: the architectures that take class labels (``--conditional``); diffusers' through its class embedding
CONDITIONAL = ("mlp", "unet", "unet-small", "diffusers", "seed-cifar10")


class _ArchitectureName(Kind):
    """A name in :data:`ARCHITECTURES` (read when parsed: plugins may add their own)."""

    @property
    def choices(self):
        return tuple(ARCHITECTURES)

    def parse(self, value) -> str:
        return Choice(*ARCHITECTURES).parse(value)


def _unet_config(path) -> dict:
    """The UNet2DModel arguments in the JSON file ``path``."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--unet-config {path} cannot be read as JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--unet-config {path} must hold an object of UNet2DModel arguments")
    return config


def _describe_architectures() -> str:
    return "members: " + "; ".join(f"{name}, {a.description}" for name, a in ARCHITECTURES.items())


@dataclasses.dataclass(frozen=True)
class MemberOptions:
    """What a user chooses about the members: the architecture and its sizes."""

    arch: str = option("mlp", _ArchitectureName(), _describe_architectures())
    hidden: int = option(256, Int(1, 2**16), "width of the MLP members")
    blocks: int = option(3, Int(0, 256), "residual blocks of the MLP members")
    width: int = option(32, Width(), "channels of the built-in UNet members")
    unet_config: Optional[dict] = option(None, FilePath(), "diffusers: JSON file of UNet2DModel arguments "
                                         "(UNet2DConditionModel's for diffusers-text)",
                                         convert=_unet_config)  # the arguments (shape from the data)
    conditional: bool = option(False, Switch(), "class-conditional members (mlp, unet, diffusers) on the data's "
                                                "labels, each also its unconditional model (--cond-dropout): sample "
                                                "with --labels and --guidance")
    base: Optional[str] = option(None, FilePath(), "fine-tune this base model (a checkpoint of one model: train "
                                                   "--all-units --models 1, or a diffusers UNet2DModel folder): "
                                                   "see --tune")
    rank: int = option(8, Int(1, 4096), "with --base: the rank of each member's adapters")
    tune: str = option("lora", Choice("lora", "full"), "with --base: LoRA adapters of --rank on the frozen base (mlp "
                                                      "bases), or full: each member starts as the base and trains "
                                                      "every weight (any architecture, the base's; a small base)")

    def __post_init__(self):
        _architecture(self.arch)  # an unknown one is an ArchitectureError, as when a checkpoint names it
        check_fields(self, "members: ")
        if self.unet_config is not None and not isinstance(self.unet_config, dict):
            raise ConfigError(f"members: unet_config must be a dict of UNet2DModel arguments, got {self.unet_config!r}")


def _architecture(name) -> Architecture:
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"member architecture must be one of {tuple(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def build_members(options: MemberOptions, n_members: int, data_shape: Sequence[int], shared_init: bool,
                  seed: int, classes: int = 0, base: Optional[Ensemble] = None, base_ref: Optional[dict] = None,
                  condition_shape: Optional[Sequence[int]] = None) -> Ensemble:
    """A new ensemble of ``n_members`` members of ``options.arch`` for data of ``data_shape``
    [C, H, W], sharing initial weights when ``shared_init`` (all drawn from ``seed``);
    conditioned on ``classes`` labels where ``options.conditional``, on embeddings of
    ``condition_shape`` [L, D] (the data's conditions) for ``diffusers-text``. With ``base``
    (loaded from ``options.base``, described by ``base_ref``): adapters of ``options.rank`` on it,
    or (``options.tune`` full) members of its architecture that start as it."""
    if base is not None and options.tune == "full":
        return _full_finetune(base, options, n_members, data_shape, classes)
    if base is not None:
        if not isinstance(base, StackedMLP):
            raise ArchitectureError(f"--base {options.base} is a {base.spec().get('kind')} model: adapters are built "
                                    f"for mlp bases; fine-tune it in full (--tune full)")
        if options.arch != "mlp":
            raise ArchitectureError(f"--base: the members are adapters on the base's own architecture (an mlp); "
                                    f"--arch {options.arch} does not apply to them")
        if tuple(base.data_shape) != tuple(data_shape):
            raise ArchitectureError(f"--base {options.base} models data of shape {tuple(base.data_shape)}, "
                                    f"not the data's {tuple(data_shape)}")
        if options.conditional and classes < 1:
            raise ArchitectureError("--conditional needs class labels in the data")
        return LoraEnsemble(base, n_members, options.rank, seed=seed, shared_init=shared_init,
                            classes=classes if options.conditional or base.classes else 0, base_ref=base_ref)
    own = _architecture(options.arch).spec(options, data_shape)
    if options.arch == "diffusers-text":
        if condition_shape is None:
            raise ArchitectureError("--arch diffusers-text cross-attends to a condition per example: the data needs "
                                    "an array 'conditions' [n, L, D] beside its images")
        if options.conditional:
            raise ArchitectureError("--conditional is for class labels; --arch diffusers-text is conditioned on the "
                                    "data's embeddings already")
        own["condition_shape"] = list(condition_shape)
    if options.conditional:
        if options.arch not in CONDITIONAL:
            raise ArchitectureError(f"--conditional: class-conditional members are built for --arch "
                                    f"{', '.join(CONDITIONAL)}, not {options.arch}")
        if classes < 1:
            raise ArchitectureError("--conditional needs class labels in the data (digits, an array's labels, "
                                    "image folders by class)")
        if "config" in own:  # a diffusers UNet2DModel: one class embedding per class and the empty label
            own["config"] = dict(own["config"], num_class_embeds=classes + 1)
        own["classes"] = classes
    return build_ensemble(dict(kind=options.arch, n_members=n_members, data_shape=list(data_shape), **own,
                               shared_init=shared_init, seed=seed))


def _full_finetune(base: Ensemble, options: MemberOptions, n_members: int, data_shape: Sequence[int],
                   classes: int) -> Ensemble:
    """``n_members`` members of the base's architecture, each starting as the base: every weight
    trains (no adapter, so nothing of the base is shared or needed to run them afterwards)."""
    if tuple(base.data_shape) != tuple(data_shape):
        raise ArchitectureError(f"--base {options.base} models data of shape {tuple(base.data_shape)}, "
                                f"not the data's {tuple(data_shape)}")
    if (options.conditional or base.classes) and classes > base.classes:
        raise ArchitectureError(f"--tune full keeps the base's {base.classes} classes, and the data has labels up to "
                                f"{classes - 1}: a fine-tune that adds classes takes adapters (--tune lora)")
    ensemble = build_ensemble(dict(base.spec(), n_members=n_members, shared_init=True))
    state = {k: v.expand(n_members, *v.shape[1:]).clone() for k, v in base.state_dict().items()}
    ensemble.load_state_dict(state)
    return ensemble.requires_grad_(True).train()


def build_ensemble(spec: dict, base: Optional[Ensemble] = None) -> Ensemble:
    """Rebuild an ensemble of a built-in architecture from :meth:`Ensemble.spec` (adapter
    members: on their ``base``, which the caller loads from the spec's ``base`` entry)."""
    if spec.get("kind") == "lora":
        if base is None:
            raise ArchitectureError("adapter members are rebuilt on their base: load them from their checkpoint")
        return LoraEnsemble.rebuild(spec, base)
    return _architecture(spec.get("kind")).rebuild(spec)
