"""``ensattr metrics``: validity metrics of a results file (counterfactual radius, agreement of
each distance-predicting method with exact ablation) and, with the checkpoint, the false
attribution rate of the ABC protocol."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

import torch

from ..attribution.baselines import nearest_units
from ..attribution.methods import METHODS
from ..checkpoint import Checkpoint
from ..data import load_data
from ..evaluation.metrics import agreement, counterfactual_radius, mean_interval
from ..sampling import ablate
from ..files import writing
from ._rules import existing
from ..store import ResultsWriter, open_results, read_sampler, recover_after_kill

__all__ = ["metrics_step"]

_PREDICTED = "predicted_"


def metrics_step(results: os.PathLike, checkpoint_path: Optional[os.PathLike] = None,
                 samples: int = 32, device: str = "cpu", seed: int = 0) -> dict:
    """Counterfactual radius and agreement from the file; with a checkpoint, also the false
    attribution rate (ABC protocol, see :mod:`ensattr_fast.evaluation.metrics`)."""
    existing(results)
    with writing(results, "results file"):
        recover_after_kill(results)
        return _metrics(results, checkpoint_path, samples, device, seed)


def _exact_significance(arrays: dict, attrs) -> dict:
    """How many exact counterfactuals stand above their samples' noise floor."""
    if "floor_distance" not in arrays:
        return {}
    valid = arrays["units"] >= 0
    floor = arrays["floor_distance"]
    meta = json.loads(attrs["floor"])
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


def _metrics(results, checkpoint_path, samples, device, seed) -> dict:
    found: dict = {}
    checkpoint = None if checkpoint_path is None else Checkpoint.load(checkpoint_path)
    with open_results(results) as r:
        if checkpoint is not None:
            r.check_code(checkpoint.code, str(checkpoint_path))
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
            found["certificate"] = {**meta, "bound_rule": meta.get("bound"), "radius": mean_interval(certificate["radius"]),
                                    "bound": mean_interval(certificate["bound"])}
        seeds = r.seeds[:samples].tolist()
        images = torch.from_numpy(r.samples[:samples])
        unit_of = torch.from_numpy(r.unit_of[()])
        n_units = r.code.shape[0]
    if checkpoint is None:
        return found
    data = load_data(checkpoint.data_source)
    nearest = nearest_units(images, data, unit_of, 1)[:, 0]
    g = torch.Generator().manual_seed(seed)
    random_units = torch.randint(n_units, (len(seeds),), generator=g)
    ensemble = checkpoint.build().to(device)
    sets = [[[int(a)], [int(b)]] for a, b in zip(nearest, random_units)]
    result = ablate(ensemble, checkpoint.schedule, read_sampler(results), checkpoint.code,
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
