"""``lds``: the linear datamodeling score of every influence matrix of a results file, against
models of the ensemble's own architecture retrained on random halves of the units; with
``--validation``, of the same methods on held-out images too (``--protocol dtrak``: D-TRAK's
protocol, :data:`~ensattr_fast.evaluation.lds.PROTOCOLS`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from ..attribution import FeatureSpec
from ..attribution.methods import METHODS, Rows
from ..data import check_images
from ..data.spec import data_spec, load_data
from ..errors import ConfigError, DataError, StoreError
from ..evaluation.lds import PROTOCOLS, Queries, lds_table
from ..runtime.files import check_output, same_file
from ..store import open_results
from .features import factor_store, training_features
from .metrics import json_output
from .options import LdsOptions
from .session import Session

__all__ = ["lds"]


def lds(session: Session, options: LdsOptions, progress: bool = True) -> Dict[str, dict]:
    """LDS per method (see :func:`ensattr_fast.evaluation.lds.lds_table`): mean over queries,
    its 95% interval and the number of queries. The reference models are kept in
    ``options.references`` and trained there when missing; ``options.json``: the table is also
    written there. The quick form without validation images gives {method: row} for the
    generated queries; otherwise {"protocol": what was run, "generated": {method: row},
    "validation": {method: row}}."""
    references = options.references
    if references is None:
        raise StoreError("lds needs a file for its reference models (--references)")
    protocol = PROTOCOLS[options.protocol]
    if protocol["validation"] and options.validation is None:
        raise ConfigError(f"--protocol {options.protocol} scores held-out images beside the generated samples: give "
                          "images the ensemble never trained on as --validation")
    inputs = session.inputs()
    if options.validation is not None:
        inputs["--validation"] = options.validation
    for what, given in inputs.items():  # the reference models are trained into this file when it is missing
        if same_file(references, given):
            raise StoreError(f"--references {references} is also the {what} this step reads; give another file")
    if not Path(references).exists():
        check_output(references, "--references", inputs=inputs)
    write = json_output(options.json, options.overwrite, dict(inputs, **{"--references": references}))
    checkpoint = session.checkpoint
    generated = _generated(session, options.samples)
    query_sets = [generated]
    if options.validation is not None:
        query_sets.append(_validation(session, options, list(generated.scores)))
    halves = options.halves or protocol["halves"]
    seeds = options.models_per_half or protocol["seeds"]
    noise_seeds = options.noise_seeds or protocol["noise_seeds"]
    table = lds_table(checkpoint, session.data(), references, query_sets, checkpoint.unit_of, halves, seeds,
                      noise_seeds, options.steps, options.draws, options.device, progress)
    if options.protocol == "quick" and options.validation is None:
        found = table["generated"]  # the quick form's table, as it always was
    else:
        record = dict(name=options.protocol, halves=halves, seeds=seeds, noise_seeds=noise_seeds, draws=options.draws,
                      steps=options.steps or checkpoint.config["train"]["steps"],
                      queries={q.name: len(q.images) for q in query_sets})
        found = dict(protocol=record, **table)
    write(found)
    return found


def _generated(session: Session, samples) -> Queries:
    """The results file's samples (the first ``samples``) with every influence matrix over units;
    the file must be of the checkpoint's code."""
    n_units = len(session.checkpoint.code)
    with open_results(session.check_results()) as r:
        r.check_code(session.checkpoint.code, str(session.checkpoint_path))
        # matrices over units only: unit-set (``_groups``) matrices have other columns
        methods = [m for m in r.methods if r.influence(m).shape[1] == n_units]
        n = r.influence(methods[0]).shape[0] if methods else 0
        n = n if samples is None else min(samples, n)
        images = torch.from_numpy(r.samples[:n])
        labels = torch.from_numpy(r.file["samples/label"][:n]) if "samples/label" in r.file else None
        conditions = torch.from_numpy(r.file["samples/condition"][:n]) if "samples/condition" in r.file else None
        scores = {m: r.influence(m)[:n, :] for m in methods}
    return Queries("generated", images, scores, labels, conditions)


def _validation(session: Session, options: LdsOptions, methods: List[str]) -> Queries:
    """The held-out images of ``options.validation`` (their first ``validation_count``), scored
    by each of ``methods`` that scores images (gradient and curvature methods; the first-order
    methods follow a sample's own sampling trajectory, which a held-out image has none of), with
    the projection each matrix of the results file was computed with."""
    checkpoint, shape = session.checkpoint, tuple(session.checkpoint.spec["data_shape"])
    ensemble = session.ensemble(options.device)
    if ensemble.condition_shape is not None:
        raise ConfigError("--validation images are scored without embeddings: text-conditioned members are not "
                          "supported; score their generated samples only")
    try:
        data = load_data(data_spec(options.validation, resolution=shape[-1], channels=shape[0]))
    except OSError as error:
        raise DataError(f"--validation {options.validation} cannot be read: {error}") from None
    count = len(data) if options.validation_count is None else min(options.validation_count, len(data))
    images = data.read(list(range(count)))
    check_images(images, f"--validation {options.validation}", shape=shape)
    labels = None
    if ensemble.classes:
        if data.labels is None:
            raise DataError(f"--validation {options.validation} has no labels; the members are class-conditional: "
                            "give the images' labels beside them")
        labels = data.labels[:count]
    scored = [m for m in methods if m in METHODS and not METHODS[m].scorer.by_code]
    with open_results(session.results) as r:
        dims = {m: json.loads(r.file[f"influence/{m}"].attrs["spec"]).get("features", {}).get("dim", FeatureSpec.dim)
                for m in scored}
    train, scores = training_features(session, options.device), {}
    factors = factor_store(session)  # the curvature the attribute step fitted
    for dim in dict.fromkeys(dims.values()):  # one Rows per projection: combinations share its features
        rows = Rows(ensemble, checkpoint.schedule, session.sampler(), [], images, checkpoint.code, checkpoint.unit_of,
                    session.data, features=FeatureSpec(dim=dim), train_features=train, labels=labels,
                    factors=factors)
        for m in (m for m in scored if dims[m] == dim):
            scores[m] = METHODS[m].scorer.scores(METHODS[m], rows).numpy()
    return Queries("validation", images, scores, labels)
