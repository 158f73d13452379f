"""``report``: a PNG of samples beside their exact counterfactuals and the training images of the
units they removed, and the same as one self-contained HTML page beside it, each effect marked as
above or within the noise floor of phantom ablations when the file has one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from matplotlib.figure import Figure
from torch import Tensor

from ..data import data_spec
from ..errors import ConfigError
from ..report.figures import counterfactual_figure
from ..report.html import write_report_html
from ..report.view import pictures, read_view
from ..runtime.files import atomic_output, check_output
from ..store import read_dataset
from .options import ReportOptions
from .session import Session, data_files

__all__ = ["report"]


def _outputs(inputs, out, html, overwrite) -> Optional[Path]:
    """Check both outputs before any work; the HTML page's path, or None for none."""
    formats = Figure().canvas.get_supported_filetypes()
    if Path(out).suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out {out}: a report is a picture; end the name with one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    check_output(out, "--out", overwrite, inputs=inputs)
    page = Path(out).with_suffix(".html") if html is True else (Path(html) if html else None)
    if page is not None:
        check_output(page, "the HTML report", overwrite, inputs=dict(inputs, **{"--out": out}))
    return page


def report(session: Session, out: os.PathLike, options: ReportOptions = ReportOptions(),
           decode: Optional[Callable[[Tensor], Tensor]] = None, dataset=None,
           html: Union[bool, os.PathLike] = True) -> Tuple[Path, Optional[Path]]:
    """A PNG of samples beside their counterfactuals and the removed units' images, with the
    predicted first-order distance of each and the distribution of all first-order scores; with
    a noise floor in the file, each effect marked significant or within noise. Returns the
    picture's and the page's paths.

    ``decode`` maps what the members model to pictures in [-1, 1] (latents [k, ...] to images
    [k, C, H, W], e.g. a VAE's decoder), for ensembles trained on latents. ``dataset`` (or
    ``options.data``): the training data (a name or spec) for a results file that does not
    record it. ``html``: True writes the same report as a self-contained page beside ``out``
    (``report.png`` -> ``report.html``), a path writes it there, False writes none."""
    results, rows = session.check_results(hash_required=False), options.rows  # it only shows the file
    if dataset is None:
        dataset = data_spec(options.data) if options.data else read_dataset(results)
    page = _outputs(dict(session.inputs(), **data_files(dataset)), out, html, options.overwrite)
    v = read_view(results, rows)
    cf, top = v["cf"], v["top"]
    samples, images, unit_images = pictures(v, dataset, decode)
    title = (f"{Path(results).name}: each sample, its exact counterfactual without a unit (d: true distance, "
             "pred: first-order), and the unit below")
    if v["summary"]["headline"]:
        title += "\n" + v["summary"]["headline"]
    with atomic_output(out) as tmp:
        counterfactual_figure(tmp, samples, images, cf["units"], cf["distance"], unit_images=unit_images,
                              unit_names=v["names"], scores=cf.get("predicted_first_order"), score_name="pred",
                              score_distribution=v["distribution"], rows=rows, title=title,
                              significance=v["significance"], certificate=v["certificate"], top=top)
    if page is not None:
        with atomic_output(page) as tmp:
            write_report_html(tmp, title=Path(results).name, samples=samples, counterfactuals=images,
                              units=cf["units"], distances=cf["distance"], unit_images=unit_images,
                              unit_names=v["names"], predicted=cf.get("predicted_first_order"), seeds=v["seeds"],
                              significance=v["significance"], certificate=v["certificate"], top=top,
                              summary=v["summary"], rows=rows)
    return Path(out), page
