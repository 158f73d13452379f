"""``metrics``: validity metrics of a results file (counterfactual radius, agreement of
each distance-predicting method with exact ablation) and, with the checkpoint, the false
attribution rate of the ABC protocol."""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
import torch

from ..attribution.baselines import nearest_units
from ..attribution.methods import METHODS
from ..diffusion.sampling import ablate
from ..evaluation.metrics import agreement, counterfactual_radius, mean_interval
from ..runtime.files import atomic_output, check_output, writing
from ..store import ResultsWriter, dump_json, open_results, parse_json
from ._rules import existing, recovered
from .options import MetricsOptions
from .session import Session

__all__ = ["metrics", "json_output"]

_PREDICTED = "predicted_"


def metrics(session: Session, options: MetricsOptions = MetricsOptions(), seed: int = 0) -> dict:
    """Counterfactual radius and agreement from the session's results file; with a checkpoint,
    also the false attribution rate (ABC protocol, see :mod:`ensattr_fast.evaluation.metrics`).
    ``options.json``: also written there (never over an input; an existing file only with
    ``overwrite``)."""
    results = session.results
    write = json_output(options.json, options.overwrite, session.inputs())
    existing(results)
    with writing(results, "results file"):
        recovered(results)
        found = _metrics(session, options.samples, options.device, seed)
    write(found)
    return found


def json_output(path: Optional[os.PathLike], overwrite: bool, inputs: dict) -> Callable[[object], None]:
    """Check a ``--json`` output before the step runs; returns a writer of it for after."""
    if path is None:
        return lambda payload: None
    check_output(path, "--json", overwrite, inputs=inputs)

    def write(payload) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(dump_json(payload, indent=2))

    return write


def _exact_significance(arrays: dict, attrs) -> dict:
    """How many exact counterfactuals stand above their samples' noise floor."""
    if "floor_distance" not in arrays:
        return {}
    valid = arrays["units"] >= 0
    floor = arrays["floor_distance"]
    meta = parse_json(attrs["floor"])
    return {"exact_significance": {
        "pairs": int(valid.sum()), "significant": int(arrays["significant"][valid].sum()),
        "share_significant": float(arrays["significant"][valid].mean()) if valid.any() else math.nan,
        "floor_median": float(np.median(floor)) if floor.size else math.nan,
        "effect_median": float(np.nanmedian(arrays["distance"][valid])) if valid.any() else math.nan,
        "mean_z": float(np.nanmean(arrays["zscore"][valid])) if valid.any() else math.nan, **meta}}


def _score_significance(judged: dict) -> dict:
    """How many units of each row stand above the row's phantom floor, at the file's FDR."""
    return {"rows": int(len(judged["n_significant"])),
            "units_significant_per_row": mean_interval(judged["n_significant"].astype(float)),
            "top1_significant": float(judged["significant"][:, 0].mean()) if judged["significant"].size else math.nan,
            **judged["meta"]}


def _metrics(session: Session, samples: int, device: str, seed: int) -> dict:
    found: dict = {}
    results = session.results
    checkpoint = None if session.checkpoint_path is None else session.checkpoint
    with open_results(results) as r:
        if checkpoint is not None:
            r.check_code(checkpoint.code, str(session.checkpoint_path))
        if r.has_counterfactuals:
            arrays = r.counterfactual_arrays(images=False)
            radius = counterfactual_radius(arrays["distance"])
            found["counterfactual_radius"] = mean_interval(radius) | {"per_sample": radius.tolist()}
            found |= _exact_significance(arrays, r.counterfactuals.attrs)
            for name, predicted in arrays.items():
                method = METHODS.get(name[len(_PREDICTED):]) if name.startswith(_PREDICTED) else None
                if method is not None and method.predicts_distance:
                    found[f"agreement_{method.name}"] = agreement(predicted, arrays["distance"])
        for method in r.methods:
            judged = r.significance(method)
            if judged is not None:
                found[f"significance_{method}"] = _score_significance(judged)
        certificate = r.certificate()
        if certificate is not None:
            meta = certificate["meta"]
            found["certificate"] = {**meta, "bound_rule": meta.get("bound"),
                                    "radius": mean_interval(certificate["radius"]),
                                    "bound": mean_interval(certificate["bound"])}
        seeds = r.seeds[:samples].tolist()
        images = torch.from_numpy(r.samples[:samples])
        unit_of = torch.from_numpy(r.unit_of[()])
        n_units = r.code.shape[0]
    if checkpoint is None:
        return found
    data = session.data()
    nearest = nearest_units(images, data, unit_of, 1)[:, 0]
    g = torch.Generator().manual_seed(seed)
    random_units = torch.randint(n_units, (len(seeds),), generator=g)
    ensemble = session.ensemble(device)
    sets = [[[int(a)], [int(b)]] for a, b in zip(nearest, random_units)]
    result = ablate(ensemble, checkpoint.schedule, session.sampler(), checkpoint.code,
                    seeds, sets, per_sample=True, labels=session.labels(len(seeds)))
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
