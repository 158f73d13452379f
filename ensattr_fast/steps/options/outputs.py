"""The options of the steps that read an audit's answers or hand them on (metrics, lds, report,
export), and of the demo that chains every step."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from ...diffusion.schedules import Sampler
from ...members import MemberOptions
from ...runtime.fields import nested, option
from ...runtime.kinds import Choice, Device, FilePath, Int, Maybe, Switch, Text, Units
from ...training import TrainConfig
from ._common import DEVICE as _DEVICE
from ._common import post_init as _post_init

__all__ = ["MetricsOptions", "LdsOptions", "ReportOptions", "ExportOptions", "DemoOptions"]


@dataclasses.dataclass(frozen=True)
class MetricsOptions:
    """``metrics``: validity metrics of a results file (and, with the checkpoint, the false
    attribution rate of the ABC protocol)."""

    step = "metrics"
    samples: int = option(32, Int(1), "samples for false attribution")
    json: Optional[Path] = option(None, Maybe(FilePath()), "also write them here")
    overwrite: bool = option(False, Switch(), "replace an existing --json")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class LdsOptions:
    """``lds``: the linear datamodeling score of every influence matrix, against models of the
    ensemble's architecture retrained on random halves of the units. ``--protocol dtrak`` is
    D-TRAK's: 64 halves x 3 training seeds x 3 noise seeds, and held-out ``--validation``
    images scored beside the generated samples."""

    step = "lds"
    references: Optional[Path] = option(None, Maybe(FilePath()), "checkpoint of the reference models (trained "
                                                                 "here if missing)", required=True)
    protocol: str = option("quick", Choice("quick", "dtrak"), "quick: 32 halves x 2 seeds, generated queries; "
                                                              "dtrak: D-TRAK's, 64 halves x 3 seeds x 3 noise "
                                                              "seeds, validation and generated queries")
    halves: Optional[int] = option(None, Maybe(Int(1, 4096)), "random halves of the units (R) (default: the "
                                                             "protocol's)")
    models_per_half: Optional[int] = option(None, Maybe(Int(1, 64)), "models per half, averaged (default: the "
                                                                    "protocol's)", flag="--seeds")
    noise_seeds: Optional[int] = option(None, Maybe(Int(1, 64)), "seeds of each reference loss's (t, eps) draws, "
                                                                "averaged (default: the protocol's)")
    steps: Optional[int] = option(None, Maybe(Int(1)), "training steps (default: the ensemble's)")
    draws: int = option(256, Int(1, 2**20), "fixed (t, eps) draws per loss and noise seed")
    samples: Optional[int] = option(None, Maybe(Int(1)), "first S generated rows (default: all)")
    validation: Optional[str] = option(None, Maybe(Text()), "held-out images (an .npy/.npz/.h5 file or a folder), "
                                                           "scored as queries too (required by --protocol dtrak)")
    validation_count: Optional[int] = option(None, Maybe(Int(1)), "first V validation images (default: all)")
    json: Optional[Path] = option(None, Maybe(FilePath()), "also write the table here")
    overwrite: bool = option(False, Switch(), "replace an existing --json")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """``report``: samples beside their counterfactuals, as a picture and an HTML page."""

    step = "report"
    rows: int = option(8, Int(1, 4096), "samples shown")
    data: Optional[str] = option(None, Maybe(Text()), "the training data (`plan --data`) if the results file lacks it")
    overwrite: bool = option(False, Switch(), "replace an existing report")

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """``export``: members as folders that other tools load: adapter members in peft's LoRA format
    (``PeftModel.from_pretrained`` onto the base), diffusers members as ``save_pretrained`` folders."""

    step = "export"
    members: Optional[Tuple[int, ...]] = option(None, Maybe(Units()), "members to export, e.g. '0,3' (default: all)")
    overwrite: bool = option(False, Switch(), "replace existing member folders")

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """``demo``: every step on the embedded digits."""

    step = "demo"
    units: str = option("example", Choice("example", "class"), "one unit per digit image, or per class")
    finetune: bool = option(False, Switch(), "the fine-tune: a conditional base on the digits 0-4, adapter members "
                                             "(--rank) on 5-9, guided samples of 5-9 (--guidance, default 2)")
    members: Optional[int] = option(None, Maybe(Int(2, 4096)), "16 (example units), 20 (class; 10 --finetune)")
    samples: int = option(256, Int(1), "full-ensemble samples")
    attribute: int = option(32, Int(1), "samples whose influence rows and exact checks are computed (example units)")
    per_sample: int = option(8, Int(1, 4096), "top units ablated exactly per sample")
    train: TrainConfig = nested(TrainConfig, steps=3500, lr=3e-3)
    architecture: MemberOptions = nested(MemberOptions)
    sampler: Sampler = nested(Sampler, skip=("precision",))
    overwrite: bool = option(False, Switch(), "replace the files of an earlier demo")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init
