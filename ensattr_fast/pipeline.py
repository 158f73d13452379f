"""The steps of an audit over files: plan, train, sample, ablate, attribute, metrics, report.

Each step reads what the previous one wrote (a plan file, a checkpoint, a results file) so
that the command line can run them separately and ``ensattr demo`` can chain them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import codes, distributed
from .checkpoint import Checkpoint
from .data import DataError, Dataset, check_images, load_dataset, load_digits
from .gradients import parse_method
from .members import Ensemble, StackedMLP, build_ensemble, diffusers_ensemble
from .sampling import ablate, sample
from .schedules import NoiseSchedule, Sampler
from .store import ResultsWriter, SampleStream, StoreError, code_hash, file_hash, read_hdf5, versions
from .training import TrainConfig, Trainer

__all__ = ["load_data", "make_plan", "read_plan", "train", "sample_step", "ablate_step",
           "attribute_step", "exact_check", "metrics_step", "report_step"]

DATASETS = {"digits": load_digits}


def load_data(dataset) -> Dataset:
    """A data set by built-in name (``digits``) or by the spec a plan stores (a dict, see
    :func:`ensattr_fast.data.load_dataset` and :func:`data_spec`)."""
    if isinstance(dataset, dict):
        return load_dataset(dataset)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; built in: {', '.join(DATASETS)}, or give a path")
    return DATASETS[dataset]()


def data_spec(source: str, resolution: int = 32, channels: int = 3, fit: str = "crop", key: str = "images",
              memory_budget: int = 2 << 30, scale: bool = True, metadata: Optional[str] = None):
    """What a plan stores for ``--data SOURCE``: a built-in name as it is; a folder of images,
    an ``.npy``/``.npz`` array file or an HDF5 file as the spec of its kind, paths absolute."""
    if source in DATASETS and metadata is None:
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"--data {source}: not a built-in data set ({', '.join(DATASETS)}) and no such file or folder")
    where = str(path.resolve())
    if path.is_dir():
        spec = dict(kind="folder", path=where, resolution=resolution, channels=channels, fit=fit)
    elif path.suffix in (".npy", ".npz"):
        spec = dict(kind="arrays", path=where, key=key, scale=scale)
    elif path.suffix in (".h5", ".hdf5"):
        spec = dict(kind="hdf5", path=where, dataset=key, memory_budget=memory_budget, scale=scale)
    else:
        raise DataError(f"--data {source}: give a folder of images, an .npy/.npz file or an .h5/.hdf5 file")
    if metadata is not None:
        spec["metadata"] = str(Path(metadata).resolve())
    return spec


def units_for(data: Dataset, kind: str) -> codes.Units:
    """``example``: one unit per image (named by its file where there is one); ``class``: one
    unit per label; ``group``: one unit per group (the folder of each image, or metadata)."""
    if kind == "example":
        if data.example_names is not None:
            return codes.Units(torch.arange(len(data)), tuple(data.example_names))
        return codes.Units.per_example(len(data))
    if kind == "class":
        if data.labels is None:
            raise DataError(f"{data.name} has no labels to group into class units")
        return codes.Units.from_labels(data.labels)
    if kind == "group":
        if data.groups is None:
            raise DataError(f"{data.name} has no groups: put the images in one folder per group, or "
                            "give --metadata (a CSV or JSON mapping each example to its group)")
        return codes.Units.from_labels(data.groups)
    raise DataError(f"unit kind must be 'example', 'class' or 'group', got {kind!r}")


# ---------------------------------------------------------------------------------- plan


def _refuse_overwrite(path: os.PathLike, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise StoreError(f"{path} exists; pass --overwrite to replace it, or write elsewhere")


def make_plan(path: os.PathLike, dataset, unit_kind: str, members: int, design: str = "auto",
              excluders: int = 2, seed: int = 0, overwrite: bool = False) -> codes.CodeStats:
    """Write the code and the units to an HDF5 plan file (same layout as a results file).
    ``dataset``: a built-in name or a spec (see :func:`data_spec`), stored in the plan."""
    _refuse_overwrite(path, overwrite)
    data = load_data(dataset)
    units = units_for(data, unit_kind)
    code, used = codes.plan(units, members, seed=seed, design=design, excluders_per_group=excluders)
    stats = codes.statistics(code)
    with ResultsWriter(path, "w") as writer:
        writer.write_code(code, units.unit_of, units.names)
        writer.set_attrs(plan=dict(dataset=dataset, units=unit_kind, members=members, design=used,
                                   excluders=excluders, seed=seed),
                         code_statistics=dataclasses.asdict(stats), versions=versions())
    return stats


def read_plan(path: os.PathLike):
    """(dataset name, code, units) from a plan or results file."""
    try:
        with h5py.File(path, "r") as f:
            plan = json.loads(f.attrs["plan"])
            code = torch.from_numpy(f["code"][()])
            unit_of = torch.from_numpy(f["units/of_example"][()])
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in f["units/name"][()])
    except (OSError, KeyError) as error:
        raise StoreError(f"{path} is not a readable plan file ({error})") from None
    codes.validate(code, unit_of=unit_of)
    return plan["dataset"], code, codes.Units(unit_of, names)


# --------------------------------------------------------------------------------- train


def train(plan_path: os.PathLike, out: os.PathLike, config: TrainConfig, hidden: int = 256,
          blocks: int = 3, device: str = "cpu", checkpoint_every: int = 0, resume: bool = False,
          progress: bool = True, options: Optional[dict] = None, arch: str = "mlp",
          unet_config: Optional[dict] = None, width: int = 32) -> None:
    """Train the planned ensemble into the checkpoint ``out``; resume from it when asked and
    it exists. Distributed, each rank trains its share of the members."""
    dataset, code, units = read_plan(plan_path)
    data = load_data(dataset)
    if len(units.unit_of) != len(data):
        raise codes.CodeError(f"the plan maps {len(units.unit_of)} examples but {data.name} has {len(data)}")
    ensemble = build_members(arch, code.shape[1], data.data_shape, config.mode != "independent", config.seed,
                             hidden=hidden, blocks=blocks, width=width, unet_config=unet_config)
    if distributed.world().size > code.shape[1]:
        raise codes.CodeError(f"{distributed.world().size} ranks for {code.shape[1]} members: "
                              "launch at most one rank per member")
    members = distributed.shard(code.shape[1])  # all of them in one process
    trainer = Trainer(ensemble.select(members), data, code, units.unit_of, units.names,
                      NoiseSchedule.linear(), config, device, members=members, data_spec=dataset)
    trainer.options = options  # the command's options, kept in the checkpoint
    if resume and Path(out).exists():
        trainer.restore(Checkpoint.load(out))
    trainer.train(checkpoint=Path(out), checkpoint_every=checkpoint_every, progress=progress)


ARCHITECTURES = ("mlp", "unet", "diffusers")


def build_members(arch: str, n_members: int, data_shape, shared_init: bool, seed: int, hidden: int = 256,
                  blocks: int = 3, width: int = 32, unet_config: Optional[dict] = None) -> Ensemble:
    """The members of an ensemble: the residual MLP (``hidden``, ``blocks``), the built-in
    UNet (``width``) or a diffusers UNet2DModel of ``unet_config`` (its shape from the data)."""
    if arch == "mlp":
        return StackedMLP(n_members, data_shape, hidden=hidden, blocks=blocks, shared_init=shared_init, seed=seed)
    if arch == "unet":
        return build_ensemble(dict(kind="unet", n_members=n_members, data_shape=list(data_shape), width=width,
                                   shared_init=shared_init, seed=seed))
    if arch == "diffusers":
        C, H, W = data_shape
        config = dict(unet_config or {})
        for key, value in (("sample_size", H), ("in_channels", C), ("out_channels", C)):
            if config.setdefault(key, value) != value and not (key == "sample_size" and list(config[key]) == [H, W]):
                raise DataError(f"the UNet config has {key} = {config[key]} but the data {value}")
        return diffusers_ensemble(config, n_members, shared_init=shared_init, seed=seed)
    raise DataError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")


def _schedule(checkpoint: Checkpoint) -> NoiseSchedule:
    return NoiseSchedule(tuple(checkpoint.config["schedule"]["betas"]))


# -------------------------------------------------------------------------------- sample


def sample_step(checkpoint_path: os.PathLike, results: os.PathLike, seeds: Sequence[int],
                sampler: Sampler, device: str = "cpu", overwrite: bool = False, resume: bool = False,
                chunk: int = 256) -> None:
    """Full-ensemble samples of ``seeds`` into a new results file (code, units, provenance).

    Samples are written ``chunk`` at a time with done flags: ``resume`` continues a run that
    was killed. Distributed, every rank holds all members and runs its share of each chunk.
    """
    if not len(seeds):
        raise DataError("no seeds to sample: give --seeds N (N >= 1), A:B or a,b,c")
    if not resume:
        _refuse_overwrite(results, overwrite)
    checkpoint = Checkpoint.load(checkpoint_path)
    ensemble = checkpoint.build().to(device)
    seeds = [int(s) for s in seeds]
    spec = json.loads(json.dumps(dict(checkpoint_hash=file_hash(checkpoint_path), seeds=seeds, chunk=chunk,
                                      sampler=dataclasses.asdict(sampler))))  # as stored: tuples become lists
    stream, pending = None, None
    if distributed.world().main:
        try:
            fresh = not (resume and Path(results).exists())
            if fresh:
                with ResultsWriter(results, "w") as writer:
                    writer.write_code(checkpoint.code, checkpoint.unit_of, checkpoint.unit_names)
                    writer.file.require_group("samples").create_dataset("seed", data=np.asarray(seeds, np.int64))
                    writer.set_attrs(config=checkpoint.config, sampler=dataclasses.asdict(sampler),
                                     versions=versions(), checkpoint_hash=spec["checkpoint_hash"],
                                     data_fingerprint=checkpoint.data_fingerprint,
                                     plan=dict(dataset=checkpoint.data_source))
            stream = SampleStream(results, len(seeds), ensemble.data_shape, chunk, spec)
            pending = [(r.start, r.stop) for r in stream.pending()]
        except StoreError as error:
            pending = str(error)
    pending = distributed.broadcast_object(pending)
    if isinstance(pending, str):  # rank 0 refused the file: every rank stops with its reason
        raise StoreError(pending)
    schedule = _schedule(checkpoint)
    try:
        for start, stop in tqdm(pending, desc="sampling", unit="chunk", disable=None if stream else True):
            mine = distributed.shard(stop - start)
            images = sample(ensemble, schedule, sampler, seeds[start + mine.start : start + mine.stop])
            images = distributed.gather_rows(images).cpu()
            if stream is not None:
                stream.write(range(start, stop), images.float().numpy())
    finally:
        if stream is not None:
            stream.close()
    distributed.barrier()


def _results_sampler(results: os.PathLike) -> Sampler:
    with read_hdf5(results) as f:
        spec = json.loads(f.attrs["sampler"])
    spec["clip"] = tuple(spec["clip"]) if spec["clip"] is not None else None
    return Sampler(**spec)


def nearest_units(images: Tensor, data: Dataset, unit_of: Tensor, k: int) -> Tensor:
    """The k units whose training images lie nearest (pixel L2) to each image [S, k]."""
    check_images(images, f"samples searched among the images of {data.name}", shape=data.data_shape,
                 allow_empty=True)
    if len(unit_of) != len(data):
        raise codes.CodeError(f"the units map {len(unit_of)} examples but {data.name} has {len(data)}")
    distances = data.pixel_distances(images)
    order = distances.argsort(1)
    out = torch.full((len(images), k), -1, dtype=torch.long)
    for i, row in enumerate(unit_of[order]):
        seen: List[int] = []
        for u in row.tolist():
            if u not in seen:
                seen.append(u)
            if len(seen) == k:
                break
        out[i, : len(seen)] = torch.tensor(seen)
    return out


# -------------------------------------------------------------------------------- ablate


def ablate_step(checkpoint_path: os.PathLike, results: os.PathLike, units: Tensor,
                device: str = "cpu", max_trajectories: int = 4096, **extra: Tensor):
    """Exact counterfactuals: sample i re-run without unit ``units[i, k]`` for each k.

    Uses the sampler recorded in ``results`` (the same noise and steps as the samples).
    Returns (images [S, K, ...], distances [S, K], member evaluations).
    """
    checkpoint = Checkpoint.load(checkpoint_path)
    with read_hdf5(results) as f:
        if json.loads(f.attrs["code_hash"]) != code_hash(checkpoint.code):
            raise StoreError(f"{results} holds results of another ensemble than {checkpoint_path}")
        seeds = f["samples/seed"][: len(units)].tolist()
        samples = torch.from_numpy(f["samples/images"][: len(units)])
    check_images(samples, f"samples in {results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    codes.check_unit_ids(units, len(checkpoint.code), "units to ablate", allow_none=True)
    ensemble = checkpoint.build().to(device)
    unit_sets = [[[u] if u >= 0 else [] for u in row] for row in units.tolist()]
    mine = distributed.shard(len(unit_sets))  # every rank holds all members, runs its samples
    result = ablate(ensemble, _schedule(checkpoint), _results_sampler(results), checkpoint.code,
                    seeds[mine.start : mine.stop], unit_sets[mine.start : mine.stop], per_sample=True,
                    max_trajectories=max_trajectories)
    images = distributed.gather_rows(result.images).cpu()
    evaluations = int(distributed.gather_rows(torch.tensor([result.member_evaluations])).sum())
    distances = (images - samples[:, None]).flatten(2).norm(dim=-1)
    if distributed.world().main:
        with ResultsWriter(results, "a") as writer:
            writer.check_code(checkpoint.code)
            writer.write_counterfactuals(units, images, distances, **extra)
    distributed.barrier()
    return images, distances, evaluations


# -------------------------------------------------------------------------------- report


def _decoded(decode: Callable[[Tensor], Tensor], x, dims: int) -> np.ndarray:
    """``decode`` applied to the last ``dims`` axes of ``x`` (any leading axes)."""
    x = torch.as_tensor(np.asarray(x))
    lead = x.shape[: x.dim() - dims]
    with torch.no_grad():
        out = decode(x.reshape(-1, *x.shape[len(lead):]))
    return out.reshape(*lead, *out.shape[1:]).float().numpy()


def report_step(results: os.PathLike, out: os.PathLike, rows: int = 8,
                decode: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """A PNG of samples beside their counterfactuals and the removed units' images, with the
    predicted first-order distance of each and the distribution of all first-order scores.

    ``decode`` maps what the members model to pictures in [-1, 1] (latents [k, ...] to images
    [k, C, H, W], e.g. a VAE's decoder), for ensembles trained on latents."""
    from .report import counterfactual_figure
    from .results import open_results

    with open_results(results) as r:
        dataset = r.attrs.get("plan", {}).get("dataset", "digits")
        samples = r.samples[:rows]
        cf = r.counterfactuals
        units, images, distances = cf["units"][:rows], cf["images"][:rows], cf["distance"][:rows]
        scores = cf["predicted_first_order"][:rows] if "predicted_first_order" in cf else None
        names, unit_of = r.unit_names, torch.from_numpy(r.unit_of[()])
        distribution = None
        if "first_order" in r.methods:
            view = r.influence("first_order")
            distribution = view[: min(view.shape[0], 64), :].ravel()
    data = load_data(dataset)
    first_example = torch.full((len(names),), len(unit_of), dtype=torch.long).scatter_reduce(
        0, unit_of, torch.arange(len(unit_of)), "amin")
    unit_images = data.read(first_example[torch.from_numpy(units).clamp_min(0)].flatten())
    unit_images = unit_images.view(*units.shape, *data.data_shape).numpy()
    if decode is not None:
        dims = len(data.data_shape)
        samples, images, unit_images = (_decoded(decode, x, dims) for x in (samples, images, unit_images))
    counterfactual_figure(out, samples, images, units, distances, unit_images=unit_images,
                          unit_names=names, scores=scores, score_name="pred",
                          score_distribution=distribution, rows=rows,
                          title=f"{Path(results).name}: each sample, its exact counterfactual without a unit "
                                "(d: true distance, pred: first-order), and the unit below")


# ----------------------------------------------------------------------------- attribute


def read_groups(path: os.PathLike) -> dict:
    """Unit sets from a JSON file mapping names to unit lists, e.g. {"artist 7": [3, 18, 40]}.

    Under a constant-weight code the excluders of a set are the members that excluded every
    unit of it, so sets of more than a few units have none (their scores are NaN): plan large
    groups as units with a sparse exclusion design instead.
    """
    try:
        groups = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"groups file {path} cannot be read as JSON {{name: [units]}}: {error}") from None
    try:
        return {str(k): [int(u) for u in v] for k, v in groups.items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"groups file {path} must map names to lists of unit ids, e.g. "
                        '{"artist 7": [3, 18, 40]}') from None


def _statistics(results: os.PathLike, name: str, compute):
    """A statistic of the rows, computed once and kept in /statistics/<name> for resumes."""
    with h5py.File(results, "r") as f:
        if f"statistics/{name}" in f:
            return torch.from_numpy(f[f"statistics/{name}"][()])
    value = compute().float().numpy()
    with ResultsWriter(results, "a") as writer:
        writer.file.require_group("statistics").create_dataset(name, data=value)
    return torch.from_numpy(value)  # as stored: a resumed run scores the very same numbers


def _part_path(results: os.PathLike, rank: int, size: int) -> Path:
    results = Path(results)
    return results.with_name(results.name + ".parts") / f"rank{rank}-of-{size}.h5"


def attribute_step(checkpoint_path: os.PathLike, results: os.PathLike, rows: int,
                   methods: Sequence[str] = ("dtrak", "first_order", "direct", "loss"), k: int = 10,
                   block_rows: int = 64, block_units: int = 16384, draws: int = 64,
                   check: int = 8, check_method: str = "first_order", device: str = "cpu",
                   progress: bool = True, groups: Optional[dict] = None) -> dict:
    """Influence of every unit on the first ``rows`` samples of ``results``, streamed to it;
    then the exact check of each sample's top-``check`` units by ``check_method``.

    ``groups`` (name -> units) adds ``/influence/<method>_groups`` [rows, G]: the influence
    of removing each whole group, its members the intersection of its units' excluders.
    Returns the agreement metrics of the first-order scores with the exact distances.

    Distributed (torchrun): rank r scores its share of the rows, in whole row blocks, into its
    part file ``<results>.parts/rank<r>-of-<W>.h5``; rank 0 then stitches the parts into
    ``results`` with virtual datasets, so that readers see one matrix per method.
    """
    from .streaming import stitch_parts

    checkpoint = Checkpoint.load(checkpoint_path)
    sampler = _results_sampler(results)
    with read_hdf5(results) as f:
        if json.loads(f.attrs["code_hash"]) != code_hash(checkpoint.code):
            raise StoreError(f"{results} holds results of another ensemble than {checkpoint_path}")
        rows = min(rows, len(f["samples/seed"]))
        mine = distributed.shard(rows, align=block_rows)
        seeds = f["samples/seed"][mine.start : mine.stop].tolist()
        samples = torch.from_numpy(f["samples/images"][mine.start : mine.stop])
    check_images(samples, f"samples in {results}", shape=checkpoint.spec["data_shape"], allow_empty=True)
    for name, units in (groups or {}).items():  # before anything is written
        codes.check_unit_ids(units, len(checkpoint.code), f"group {name!r}")
    unknown = {m for m in methods if m not in ("first_order", "direct", "loss") and parse_method(m) is None}
    if unknown:
        raise DataError(f"unknown methods {sorted(unknown)}: use first_order, direct, loss, or a gradient "
                        f"method: dtrak or trak, alone (the members' mean) or with _includers or _contrast")
    world = distributed.world()
    target = Path(results)
    if world.distributed:
        target = _part_path(results, world.rank, world.size)
        with ResultsWriter(target, "a") as writer:  # resumes the part of an interrupted run
            writer.check_code(checkpoint.code)
            writer.set_attrs(code_hash=code_hash(checkpoint.code), rows=[mine.start, mine.stop])

    if groups and world.main:
        with ResultsWriter(results, "a") as writer:
            writer.write_groups(list(groups), list(groups.values()))
    if len(mine):
        _score_rows(checkpoint, checkpoint_path, sampler, seeds, samples, target, methods, k, block_rows,
                    block_units, draws, groups, progress and world.main, device)
    if world.distributed:
        distributed.barrier()  # every part is complete
        if world.main:
            stitch_parts(results, [_part_path(results, r, world.size) for r in range(world.size)])
        distributed.barrier()
    if not check:
        return {}
    return exact_check(checkpoint_path, results, rows, check, check_method, methods, device)


def _score_rows(checkpoint, checkpoint_path, sampler, seeds, samples, target, methods, k, block_rows,
                block_units, draws, groups, progress, device) -> None:
    """Statistics of the rows (kept in ``target`` for resumes) and every method's matrix."""
    from .attribution import first_order_grams, group_code, member_losses
    from .gradients import FeatureSpec, combine, dataset_features, gradient_features, member_scores
    from .streaming import stream_influence, stream_scores

    ensemble, schedule = checkpoint.build().to(device), _schedule(checkpoint)

    stats = {}
    if {"first_order", "direct"} & set(methods):
        grams = None

        def compute(which):
            nonlocal grams
            if grams is None:  # chunks end on row-block ends, so ranks batch rows as one process does
                grams = first_order_grams(ensemble, schedule, sampler, seeds, chunk=math.gcd(block_rows, 16))
            return getattr(grams, which)

        stats["first_order"] = ("first_order", _statistics(target, "gram_exact", lambda: compute("exact")))
        stats["direct"] = ("first_order", _statistics(target, "gram_direct", lambda: compute("direct")))
    if "loss" in methods:
        stats["loss"] = ("loss", _statistics(target, "losses", lambda: member_losses(ensemble, schedule, samples, draws)))
    stats = {m: stats[m] for m in methods if m in stats}
    spec = dict(rows="samples", sampler=dataclasses.asdict(sampler), draws=draws,
                checkpoint_hash=file_hash(checkpoint_path))
    stream_influence(target, checkpoint.code, stats, k=k, block_rows=block_rows,
                     block_units=block_units, spec=spec, progress=progress, device=device)
    gradient = {m: parse_method(m) for m in methods if parse_method(m) is not None}
    data = load_data(checkpoint.data_source) if gradient else None
    for kind in sorted({kind for kind, _ in gradient.values()}):
        features = FeatureSpec(kind=kind)
        train = _statistics(target, f"features_{kind}_train",
                            lambda: dataset_features(ensemble, schedule, data, features, progress))
        queries = _statistics(target, f"features_{kind}", lambda: gradient_features(ensemble, schedule, samples, features))
        per_member = member_scores(train, queries, checkpoint.unit_of, len(checkpoint.code))
        for name, (of_kind, how) in gradient.items():
            if of_kind == kind:
                stream_scores(target, name, combine(per_member, checkpoint.code, how), k, block_rows, block_units,
                              dict(spec, features=dataclasses.asdict(features), combination=how))
    if groups:
        group_rows = group_code(checkpoint.code, list(groups.values()))
        stream_influence(target, group_rows, {f"{m}_groups": v for m, v in stats.items()}, k=min(k, len(groups)),
                         block_rows=block_rows, block_units=block_units, spec=dict(spec, rows="samples", columns="groups"),
                         progress=progress, device=device)


def exact_check(checkpoint_path: os.PathLike, results: os.PathLike, rows: int, check: int,
                check_method: str, methods: Sequence[str], device: str = "cpu") -> dict:
    """Ablate each sample's top-``check`` units by ``check_method`` exactly; store the true
    distances beside every method's scores of those units and the agreement metrics."""
    from .metrics import agreement
    from .results import open_results

    with open_results(results) as r:
        units = torch.from_numpy(r.topk(check_method)[0][:rows, :check])
        predicted = {}
        for method in methods:
            view = r.influence(method)
            block = view[:rows, :]
            predicted[method] = torch.from_numpy(np.take_along_axis(block, units.clamp_min(0).numpy(), 1))
    _, distances, _ = ablate_step(checkpoint_path, results, units, device,
                                  **{f"predicted_{m}": v for m, v in predicted.items()})
    metrics = {m: agreement(predicted[m].numpy(), distances.numpy())
               for m in methods if m in ("first_order", "direct")}
    if distributed.world().main:
        with ResultsWriter(results, "a") as writer:
            writer.set_attrs(agreement=metrics, checked_by=check_method)
    distributed.barrier()
    return metrics


# ------------------------------------------------------------------------------- metrics


def metrics_step(results: os.PathLike, checkpoint_path: Optional[os.PathLike] = None,
                 samples: int = 32, device: str = "cpu", seed: int = 0) -> dict:
    """Counterfactual radius and agreement from the file; with a checkpoint, also the false
    attribution rate (ABC protocol, see :mod:`ensattr_fast.metrics`)."""
    from .metrics import agreement, counterfactual_radius, mean_interval
    from .results import open_results

    found: dict = {}
    with open_results(results) as r:
        dataset = r.attrs.get("plan", {}).get("dataset", "digits")
        if "counterfactuals" in r.file:
            cf = r.counterfactuals
            distance = cf["distance"][()]
            radius = counterfactual_radius(distance)
            found["counterfactual_radius"] = mean_interval(radius) | {"per_sample": radius.tolist()}
            for name in cf:
                if name.startswith("predicted_") and name[len("predicted_"):] in ("first_order", "direct"):
                    found[f"agreement_{name[len('predicted_'):]}"] = agreement(cf[name][()], distance)
        seeds = r.seeds[:samples].tolist()
        images = torch.from_numpy(r.samples[:samples])
        unit_of = torch.from_numpy(r.unit_of[()])
        n_units = r.code.shape[0]
        stored_hash = r.attrs.get("code_hash")
    if checkpoint_path is None:
        return found
    data = load_data(dataset)
    nearest = nearest_units(images, data, unit_of, 1)[:, 0]
    g = torch.Generator().manual_seed(seed)
    random_units = torch.randint(n_units, (len(seeds),), generator=g)
    checkpoint = Checkpoint.load(checkpoint_path)
    if stored_hash != code_hash(checkpoint.code):
        raise StoreError(f"{results} holds results of another ensemble than {checkpoint_path}")
    ensemble = checkpoint.build().to(device)
    sets = [[[int(a)], [int(b)]] for a, b in zip(nearest, random_units)]
    result = ablate(ensemble, _schedule(checkpoint), _results_sampler(results), checkpoint.code,
                    seeds, sets, per_sample=True)
    after = result.images.cpu()
    still_nearest = torch.stack([nearest_units(after[:, j], data, unit_of, 1)[:, 0] for j in range(2)], 1)
    found["false_attribution"] = {
        "rate_ablating_nearest": (still_nearest[:, 0] == nearest).float().mean().item(),
        "rate_ablating_random": (still_nearest[:, 1] == nearest).float().mean().item(),
        "samples": len(seeds),
    }
    with ResultsWriter(results, "a") as writer:
        writer.set_attrs(validity={k: v for k, v in found.items() if k != "counterfactual_radius"})
    return found
