"""What the report shows, read from a results file: the samples, their counterfactuals and the
training images of the units they removed (decoded to pictures where the members model
latents), the noise floor's verdict on each, the certificates and the top units of the default
method."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from ..data import load_data
from ..errors import StoreError
from ..store import open_results, parse_json

__all__ = ["read_view", "pictures", "DEFAULT_METHOD"]

#: the method whose top training images the report shows, when the file has its top-k
DEFAULT_METHOD = "dtrak"


def _decoded(decode: Callable[[Tensor], Tensor], x, dims: int) -> np.ndarray:
    """``decode`` applied to the last ``dims`` axes of ``x`` (any leading axes)."""
    x = torch.as_tensor(np.asarray(x))
    lead = x.shape[: x.dim() - dims]
    with torch.no_grad():
        out = decode(x.reshape(-1, *x.shape[len(lead):]))
    return out.reshape(*lead, *out.shape[1:]).float().numpy()


def _significance(cf: Dict[str, np.ndarray], floor_attr) -> Optional[Dict]:
    """The noise floor of each sample and the verdict on each counterfactual, or None for a
    file written before the floor (no ``floor_distance``, ``qvalue`` or ``significant``)."""
    if not {"floor_distance", "qvalue", "significant"} & set(cf):
        return None
    meta = parse_json(floor_attr) if floor_attr is not None else {}
    alpha = float(meta.get("alpha", 0.05))
    checked = cf["units"] >= 0
    if "significant" in cf:
        significant = cf["significant"].astype(bool)
    elif "qvalue" in cf:
        significant = np.nan_to_num(cf["qvalue"], nan=np.inf) <= alpha
    else:  # a floor without tests yet: nothing is claimed above it
        significant = np.zeros_like(checked)
    floor = cf.get("floor_distance")
    out = dict(meta, alpha=alpha, significant=significant & checked, floor=floor,
               pvalue=cf.get("pvalue"), qvalue=cf.get("qvalue"), zscore=cf.get("zscore"),
               floor_median=None, floor_p95=None)
    if floor is not None and floor.size:
        out["floor_median"], out["floor_p95"] = _quantile(floor, 50, axis=1), _quantile(floor, 95, axis=1)
    return out


def _quantile(x: Optional[np.ndarray], q: float, axis=None):
    """The ``q``-th percentile of the finite values of ``x`` (NaN where there are none)."""
    if x is None or not x.size:
        return None
    with warnings.catch_warnings():  # a sample whose floor is not written yet is all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(x, q, axis=axis)


def _rows(significance: Optional[Dict], rows: int) -> Optional[Dict]:
    """``significance`` of the first ``rows`` samples."""
    if significance is None:
        return None
    return {key: value[:rows] if isinstance(value, np.ndarray) else value for key, value in significance.items()}


def _summary(significance: Optional[Dict], units: np.ndarray, shown: int) -> Dict:
    """Counts over every sample with counterfactuals in the file (``significance`` and
    ``units`` of all of them), and the headline of the ``shown`` first ones."""
    checked = units >= 0
    out = dict(headline="", tested=int(checked.sum()), significant=None, samples=len(units), shown=shown)
    if significance is None:
        return out
    alpha, significant = significance["alpha"], significance["significant"]
    if significance["pvalue"] is not None:
        out["tested"] = int(np.isfinite(significance["pvalue"]).sum())
    shown_sig, shown_checked = int(significant[:shown].sum()), int(checked[:shown].sum())
    headline = ("no counterfactual of these samples is tested against the noise floor" if not shown_checked else
                f"in the {min(shown, len(units))} samples shown, single-unit effects are within the noise floor: "
                "removing any one checked unit moves these samples no more than removing a phantom unit does "
                f"(FDR {alpha:g})" if shown_sig == 0 else
                f"{shown_sig} of {shown_checked} counterfactuals shown are above the noise floor "
                f"(q ≤ {alpha:g}); the rest are within it")
    return dict(out, headline=headline, significant=int(significant.sum()), alpha=alpha,
                phantoms=significance.get("phantoms"), kind=significance.get("kind"),
                floor_median=_quantile(significance["floor"], 50), floor_p95=_quantile(significance["floor"], 95))


def _top(r, rows: int) -> Optional[Dict]:
    """The default method's top units of the first ``rows`` samples (-1 past its rows), or None."""
    try:
        index, score = (np.asarray(a[:rows]) for a in r.topk(DEFAULT_METHOD))
    except StoreError:  # no such method, or its top-k not written yet
        return None
    units, scores = np.full((rows, index.shape[1]), -1), np.full((rows, index.shape[1]), np.nan)
    units[: len(index)], scores[: len(index)] = index, score
    return dict(method=DEFAULT_METHOD, units=units[:, :8], scores=scores[:, :8])


def _images_of_units(data, first_example: Tensor, units: np.ndarray) -> np.ndarray:
    """A training image of each unit [..., C, H, W] (that of unit 0 where the unit is -1)."""
    found = data.read(first_example[torch.from_numpy(units).clamp_min(0)].flatten())
    return found.view(*units.shape, *data.data_shape).numpy()


def read_view(results: os.PathLike, rows: int) -> Dict:
    """Everything the report shows, read from the results file."""
    with open_results(results) as r:
        samples = np.asarray(r.samples[:rows])  # samples first: a file without them names `sample`
        cf = r.counterfactual_arrays(rows)
        shown = min(rows, len(cf["units"]))
        every = r.counterfactual_arrays(None, images=False)
        significance = _significance(every, r.counterfactuals.attrs.get("floor"))
        view = dict(samples=samples[:shown], cf=cf, names=r.unit_names,
                    seeds=np.asarray(r.seeds[:shown]), unit_of=torch.from_numpy(r.unit_of[()]), top=_top(r, shown),
                    certificate=r.certificate(), significance=_rows(significance, shown), distribution=None,
                    summary=_summary(significance, every["units"], shown))
        if "first_order" in r.methods:
            scores = r.influence("first_order")
            view["distribution"] = scores[: min(scores.shape[0], 64), :].ravel()
    return view


def pictures(v: Dict, dataset, decode) -> tuple:
    """(samples, counterfactuals, unit images) as pictures, and the top units' images into
    ``v["top"]``; unit images come from the training data (the first example of each unit)."""
    cf, top = v["cf"], v["top"]
    data = load_data(dataset)
    first_example = torch.full((len(v["names"]),), len(v["unit_of"]), dtype=torch.long).scatter_reduce(
        0, v["unit_of"], torch.arange(len(v["unit_of"])), "amin")
    pictures = [v["samples"], cf["images"], _images_of_units(data, first_example, cf["units"])]
    if top is not None:
        top["images"] = _images_of_units(data, first_example, top["units"])
    if decode is not None:
        dims = len(data.data_shape)
        pictures = [_decoded(decode, x, dims) for x in pictures]
        if top is not None:
            top["images"] = _decoded(decode, top["images"], dims)
    return tuple(pictures)


