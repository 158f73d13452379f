"""The options of the steps that make an audit's answers: plan, train, sample, ablate, attribute,
audit (groups) and memorization."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ...attribution.methods import DEFAULT_METHODS, METHODS
from ...codes.duplicates import DUPLICATE_MODES
from ...data import UNIT_KINDS, data_spec
from ...diffusion.schedules import Sampler
from ...evaluation.floors import NoiseFloor
from ...members import MemberOptions
from ...members.passes import Passes
from ...runtime.fields import nested, option
from ...runtime.kinds import (SEED_LIMIT, Choice, Device, FilePath, Float, Int, Labels, Maybe, Seeds, Switch, Text,
                              UnitKind, Units)
from ...training import TrainConfig
from ..kinds import GeneratorName, GradientMethod, MethodList, MethodName, UnitSets
from ._common import DEVICE as _DEVICE
from ._common import post_init as _post_init

__all__ = ["PlanOptions", "TrainOptions", "SampleOptions", "AblateOptions", "AttributeOptions", "GroupAuditOptions",
           "MemorizationOptions"]


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """``plan``: the code (which member trains on which unit) for a data set's units."""

    step = "plan"
    data: str = option("digits", Text(), "digits (built in), a folder of images (one subfolder per group, or flat), "
                                         "an .npy/.npz array file or an .h5/.hdf5 file")
    units: str = option("example", UnitKind(UNIT_KINDS),
                        "one unit per example, per label, per group (folder or --metadata), or per content cluster: "
                        "clusters:K, K clusters by seeded k-means on pixels")
    metadata: Optional[Path] = option(None, Maybe(FilePath()), "CSV (columns example, group) or JSON giving each "
                                                               "example's group")
    resolution: int = option(32, Int(1, 16384), "image folders: side in pixels")
    channels: int = option(3, Choice(1, 3), "image folders: grayscale or RGB")
    fit: str = option("crop", Choice("crop", "resize"),
                      "image folders: centre-crop after resizing the short side, or resize")
    key: str = option("images", Text(), "arrays and HDF5: the images' key or dataset")
    memory_budget: float = option(2.0, Float(0, 2**20, low_open=True), "HDF5: GiB of images held; past it on disk")
    no_scale: bool = option(False, Switch(), "arrays and HDF5: take values as they are (latents) instead of "
                                             "checking [-1, 1]")
    duplicates: str = option("group", Choice(*DUPLICATE_MODES), "exact and near duplicate images: group each set into "
                             "one unit (so that some members exclude every copy), keep them where the units put them, "
                             "refuse the data, or off: no search (quadratic: minutes at 10^5 images, hours at 10^6)")
    duplicate_radius: float = option(1.0, Float(0, 1e6),
                                     "distance at or under which two images are duplicates: pixel L2 on the data "
                                     "scale [-1, 1] (memorization's --threshold scale), or embedding L2")
    embeddings: Optional[Path] = option(None, Maybe(FilePath()),
                                        "an .npy array [n, k] of one embedding per training image: the duplicate "
                                        "search measures distances there instead of on pixels")
    members: int = option(16, Int(1, 4096), "members of the ensemble (M)")
    design: str = option("auto", Choice("auto", "balanced", "random", "sparse"),
                         "auto: sparse exclusion for few large units, a balanced constant-weight code otherwise")
    excluders: int = option(2, Int(1, 4096), "excluders per group (sparse)")
    seed: int = option(0, Int(0, SEED_LIMIT - 1), "seed of the code (and of content clusters)")
    overwrite: bool = option(False, Switch(), "replace an existing plan")

    __post_init__ = _post_init

    def dataset(self) -> Union[str, dict]:
        """What the plan stores to reload the data: a built-in name, or the spec of its kind."""
        return data_spec(self.data, self.resolution, self.channels, self.fit, self.key,
                         int(self.memory_budget * 2**30), not self.no_scale, self.metadata)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """``train``: every member of a planned ensemble at once, into one checkpoint."""

    step = "train"
    train: TrainConfig = nested(TrainConfig)
    architecture: MemberOptions = nested(MemberOptions)
    passes: Passes = nested(Passes, skip=("shard_members",))
    checkpoint_every: int = option(250, Int(0), "steps between checkpoints (0: at the end only)")
    all_units: bool = option(False, Switch(), "train --models models on every unit instead of the planned "
                                              "ensemble: the full-data baseline (memorization's "
                                              "--generator-checkpoint, lds, the base of a fine-tune)")
    models: int = option(1, Int(1, 4096), "with --all-units: how many models, each on all the data, independent "
                                          "(their own initial weights and draws) where more than one")
    resume: bool = option(False, Switch(), "continue from the checkpoint if it exists")
    overwrite: bool = option(False, Switch(), "replace an existing checkpoint")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """``sample``: full-ensemble samples into a new results file, chunk by chunk."""

    step = "sample"
    seeds: Tuple[int, ...] = option(tuple(range(64)), Seeds(), "N, A:B or a,b,c")
    labels: Optional[Tuple[int, ...]] = option(None, Maybe(Labels()), "class-conditional members: the label of "
                                               "every seed, or one per seed (-1: none); replays keep them")
    condition_file: Optional[Path] = option(None, Maybe(FilePath()), "text-conditioned members: an .npy, .npz or "
                                            ".h5 array 'conditions' [S, L, D] (or [1, L, D]) of every seed's "
                                            "embedding, e.g. a text encoder's outputs; replays keep them")
    sampler: Sampler = nested(Sampler)
    passes: Passes = nested(Passes, skip=("checkpoint_activations",))
    chunk: int = option(256, Int(1), "samples written (and flagged done) at a time")
    resume: bool = option(False, Switch(), "continue an interrupted sampling into the results file")
    overwrite: bool = option(False, Switch(), "replace an existing results file")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class AblateOptions:
    """``ablate``: exact counterfactuals of the samples, each judged against its noise floor."""

    step = "ablate"
    units: Optional[Tuple[int, ...]] = option(None, Maybe(Units()), "units to ablate for every sample, e.g. '3,17,250'")
    nearest: int = option(4, Int(1, 4096), "else: the k pixel-nearest units")
    samples: Optional[int] = option(None, Maybe(Int(1)), "first S samples (default all)")
    floor: NoiseFloor = nested(NoiseFloor)
    passes: Passes = nested(Passes, skip=("checkpoint_activations",))
    overwrite: bool = option(False, Switch(), "replace counterfactuals already in the results file")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class AttributeOptions:
    """``attribute``: the influence of every unit on the first samples, by every method asked
    for, streamed to the results file; then the exact check of each sample's top units."""

    step = "attribute"
    methods: Tuple[str, ...] = option(DEFAULT_METHODS, MethodList(), "comma-separated: " + ", ".join(METHODS),
                                      flag="--method")
    samples: int = option(32, Int(1), "rows: the first S samples")
    topk: int = option(10, Int(1, 2**20), "top units kept per row")
    block_rows: int = option(64, Int(1, 2**20), "rows per streamed block")
    block_units: int = option(16384, Int(1, 2**24), "units per streamed block")
    draws: int = option(64, Int(1, 2**20), "shared (t, eps) draws per loss")
    projection_dim: int = option(1024, Int(1, 2**20), "numbers each gradient is projected to (dtrak/trak methods)")
    keep_features: bool = option(False, Switch(), "copy <checkpoint>.features.h5's training features in as well")
    feature_rows: int = option(0, Int(0, 2**24), "training examples per block of features (0: 256 MiB's worth)")
    exact_kernel: bool = option(False, Switch(), "dtrak/trak on the full gradients, no projection (small data only)")
    check: int = option(8, Int(0, 4096), "exact ablation of each sample's top units (0: none)")
    check_by: Optional[str] = option(None, Maybe(MethodName()), "method whose top units are checked (default: "
                                                             "first_order when computed)")
    certify: str = option("auto", Choice("auto", "exhaustive", "estimate"),
                          "copy certificates: exhaustive ablates every distinct code row of each checked sample (the "
                          "true maximum, with its unit); estimate scales first order from the checked units (not a "
                          "bound); auto: exhaustive where the code has at most 256 distinct rows")
    groups: Optional[Union[Path, Dict[str, List[int]]]] = option(
        None, Maybe(UnitSets()), "also score unit sets, from a JSON file {name: [units]}")
    floor: NoiseFloor = nested(NoiseFloor)
    overwrite: bool = option(False, Switch(), "let the exact check replace counterfactuals of `ensattr ablate`")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init

    @property
    def checked_by(self) -> str:
        return self.check_by or ("first_order" if "first_order" in self.methods else self.methods[0])


@dataclasses.dataclass(frozen=True)
class GroupAuditOptions:
    """``audit``: each sample's groups ranked by exact ablation with their significance, then
    the examples inside its top groups by a gradient method."""

    step = "audit"
    samples: int = option(32, Int(1), "the first S samples")
    top_groups: int = option(3, Int(1, 4096), "groups per sample whose examples are ranked")
    examples: int = option(10, Int(1, 2**20), "examples ranked inside each top group")
    method: str = option("dtrak", GradientMethod(), "gradient method that ranks the examples")
    floor: NoiseFloor = nested(NoiseFloor)
    overwrite: bool = option(False, Switch(), "replace counterfactuals of another step already in the results file")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init


@dataclasses.dataclass(frozen=True)
class MemorizationOptions:
    """``memorization``: near-copies of training units that a generator draws, each proven by
    exact ablation against a phantom floor."""

    step = "memorization"
    generator: str = option("full", GeneratorName(), "the members that sample: full, member:M or members:a,b,c")
    generator_checkpoint: Optional[Path] = option(
        None, Maybe(FilePath()), "sample from this model's members instead (same data and units, e.g. one model "
                                 "trained on everything); copies are proven by the ensemble's excluders")
    seeds: Tuple[int, ...] = option(tuple(range(512)), Seeds(), "N, A:B or a,b,c")
    labels: Optional[Tuple[int, ...]] = option(None, Maybe(Labels()), "class-conditional members: the label of "
                                               "every seed, or one per seed (-1: none); proofs replay them")
    condition_file: Optional[Path] = option(None, Maybe(FilePath()), "text-conditioned members: an array "
                                            "'conditions' [S, L, D] (or [1, L, D]) of every seed's embedding "
                                            "(sample's --condition-file); proofs replay them")
    threshold: float = option(1.0, Float(0, 1e6, low_open=True),
                              "distance under which a sample copies a training image: pixel L2 (data scale [-1, 1]), "
                              "or embedding L2 with --embed")
    embed: Optional[str] = option(None, Maybe(Text()), "module:function mapping images [B, C, H, W] in [-1, 1] to "
                                  "embeddings [B, k]: the copy test measures L2 there, not on pixels (pixel L2 means "
                                  "little past small images)")
    statistic: str = option("trend", Choice("trend", "floor"),
                            "the proof's test: trend (do replays keeping more of the copied units' includers stay "
                            "nearer to them, beyond phantom rows?) or floor (the counterfactual's move against the "
                            "phantoms' alone)")
    null_check: bool = option(False, Switch(), "also prove every non-copy against its nearest unit as if it copied "
                                               "it: the share that passes (false flags) should stay <= --alpha")
    null_target: str = option("nearest", Choice("nearest", "planted"), "--null-check: each non-copy's nearest unit, "
                              "or a planted near-copy of a random training image's units")
    sampler: Sampler = nested(Sampler, skip=("precision",))
    # a phantom beyond a copy's effect still leaves p = 2/65 < 0.05
    floor: NoiseFloor = nested(NoiseFloor, phantoms=64)
    overwrite: bool = option(False, Switch(), "replace an existing memorization file")
    device: str = option("cpu", Device(), _DEVICE)

    __post_init__ = _post_init
