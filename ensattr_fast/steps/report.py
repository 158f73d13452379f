"""``ensattr report``: a PNG of samples beside their exact counterfactuals and the training
images of the units they removed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..data import load_data
from ..errors import ConfigError
from ..files import atomic_output, check_output
from ..store import open_results, read_dataset

__all__ = ["report_step"]


def _decoded(decode: Callable[[Tensor], Tensor], x, dims: int) -> np.ndarray:
    """``decode`` applied to the last ``dims`` axes of ``x`` (any leading axes)."""
    x = torch.as_tensor(np.asarray(x))
    lead = x.shape[: x.dim() - dims]
    with torch.no_grad():
        out = decode(x.reshape(-1, *x.shape[len(lead):]))
    return out.reshape(*lead, *out.shape[1:]).float().numpy()


def report_step(results: os.PathLike, out: os.PathLike, rows: int = 8,
                decode: Optional[Callable[[Tensor], Tensor]] = None, dataset=None, overwrite: bool = False) -> None:
    """A PNG of samples beside their counterfactuals and the removed units' images, with the
    predicted first-order distance of each and the distribution of all first-order scores.

    ``decode`` maps what the members model to pictures in [-1, 1] (latents [k, ...] to images
    [k, C, H, W], e.g. a VAE's decoder), for ensembles trained on latents. ``dataset``: the
    training data (a name or spec) for a results file that does not record it."""
    from ..figures import counterfactual_figure

    formats = Figure().canvas.get_supported_filetypes()
    if Path(out).suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out {out}: a report is a picture; end the name with one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    check_output(out, "--out", overwrite, inputs={"--results": results})
    dataset = dataset if dataset is not None else read_dataset(results)
    with open_results(results) as r:
        samples = r.samples[:rows]
        cf = r.counterfactual_arrays(rows)
        units, images, distances = cf["units"], cf["images"], cf["distance"]
        scores = cf.get("predicted_first_order")
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
    with atomic_output(out) as tmp:
        counterfactual_figure(tmp, samples, images, units, distances, unit_images=unit_images,
                              unit_names=names, scores=scores, score_name="pred",
                              score_distribution=distribution, rows=rows,
                              title=f"{Path(results).name}: each sample, its exact counterfactual without a "
                                    "unit (d: true distance, pred: first-order), and the unit below")
