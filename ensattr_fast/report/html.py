"""The report as one self-contained HTML page: images inline as PNG data URIs, tables sortable
by a click on a header (a few lines of inline script), no external asset, nothing fetched.
Every text from the file (unit names, method names) is escaped."""

from __future__ import annotations

import base64
import io
import os
from html import escape
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["write_report_html", "png_data_uri"]

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-top:1px solid #ccc;padding-top:1em}
.summary{background:#f6f6f6;padding:.8em 1.2em;border-left:4px solid #888}
.headline{font-weight:bold}
figure{display:inline-block;margin:0 .6em .6em 0;text-align:center;font-size:12px}
img.px{image-rendering:pixelated;width:84px;height:84px;border:2px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{padding:.25em .6em;border-bottom:1px solid #e3e3e3;text-align:right;vertical-align:middle}
th{cursor:pointer;background:#fafafa;user-select:none}th:after{content:" \\2195";color:#bbb}
td.t{text-align:left}tr.sig td{color:#c0392b;font-weight:bold}tr.sig img.px{border-color:#c0392b}
tr.noise td{color:#777}
"""

# a click on a header sorts its table's rows by that column (numbers by value, NaN last)
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], up = th.dataset.dir !== "up";
    th.dataset.dir = up ? "up" : "down";
    var key = function (tr) { var c = tr.children[th.cellIndex], v = c.dataset.v;
      return v === undefined ? c.textContent : (v === "" ? NaN : parseFloat(v)); };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === "string") return up ? x.localeCompare(y) : y.localeCompare(x);
      if (isNaN(x)) return 1; if (isNaN(y)) return -1;
      return up ? x - y : y - x;
    }).forEach(function (tr) { body.appendChild(tr); });
  });
});
"""


def png_data_uri(image: np.ndarray, size: int = 84) -> str:
    """An image [C, H, W] in [-1, 1] as a ``data:image/png;base64,`` URI, ``size`` pixels wide."""
    picture = np.clip((np.nan_to_num(np.asarray(image, dtype=np.float32)).transpose(1, 2, 0) + 1) * 127.5, 0, 255)
    picture = picture.round().astype(np.uint8)
    pil = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture[..., :3])
    scale = max(1, size // max(pil.size))
    pil = pil.resize((pil.size[0] * scale, pil.size[1] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: np.ndarray, caption: str = "") -> str:
    tag = f'<img class="px" alt="{escape(caption)}" src="{png_data_uri(image)}">'
    return f"<figure>{tag}<figcaption>{escape(caption)}</figcaption></figure>" if caption else tag


def _num(x, digits: int = 3) -> str:
    """A table cell holding a number: sortable by ``data-v``; blank for a missing one."""
    if x is None or not np.isfinite(x):
        return '<td data-v="">–</td>'
    return f'<td data-v="{float(x)!r}">{float(x):.{digits}g}</td>'


def _name(unit: int, names: Optional[Sequence[str]]) -> str:
    return names[unit] if names is not None else str(unit)


def _summary(summary: Dict) -> str:
    """Three or four plain sentences on what the file shows, at the top of the page."""
    if summary.get("significant") is None:
        return ('<div class="summary"><p>This file has no noise floor: the distances below are not compared '
                'with what removing a code row that no training unit has (a phantom) would do, so no effect '
                'is judged against it.</p></div>')
    alpha = summary["alpha"]
    floor = (f"removing a phantom unit (a code row of the design that no training unit has) moves a sample by "
             f"{summary['floor_median']:.3g} in median, and by up to {summary['floor_p95']:.3g} in 95% of cases"
             if summary.get("floor_median") is not None else "the file records no phantom distances")
    sentences = [
        f'<span class="headline">{escape(summary["headline"][:1].upper() + summary["headline"][1:])}.</span>',
        f'<span id="count">{summary["significant"]}</span> of {summary["tested"]} (sample, unit) pairs tested in '
        f'this file ({summary["samples"]} samples) are significant at false discovery rate {alpha:g}.',
        f"The noise floor: {floor}.",
        "A counterfactual marked “within noise” moved its sample no more than such a phantom does: the data do "
        "not show that this one training unit shaped the sample; only those marked “significant” do.",
    ]
    return '<div class="summary"><p>' + " ".join(sentences) + "</p></div>"


def _verdict(sig: Optional[Dict], i: int, k: int) -> str:
    if sig is None:
        return ""
    return "significant" if sig["significant"][i, k] else "within noise"


def _table(i: int, units, distances, counterfactuals, unit_images, names, predicted, sig) -> str:
    """The counterfactuals of sample ``i``, one row per ablated unit."""
    get = (lambda key, k: sig[key][i, k] if sig is not None and sig.get(key) is not None else None)
    floor = (lambda key: sig[key][i] if sig is not None and sig.get(key) is not None else None)
    head = ["unit", "name", "counterfactual", "unit image", "distance d", "predicted", "floor median",
            "floor p95", "z", "p", "q", "verdict"]
    lines: List[str] = []
    for k in np.flatnonzero(units[i] >= 0):
        verdict = _verdict(sig, i, k)
        css = {"significant": "sig", "within noise": "noise"}.get(verdict, "")
        lines.append(
            f'<tr class="{css}"><td data-v="{int(units[i, k])}">{int(units[i, k])}</td>'
            f'<td class="t">{escape(_name(int(units[i, k]), names))}</td>'
            f"<td>{_img(counterfactuals[i, k])}</td><td>{_img(unit_images[i, k])}</td>"
            + _num(distances[i, k]) + _num(predicted[i, k] if predicted is not None else None)
            + _num(floor("floor_median")) + _num(floor("floor_p95"))
            + _num(get("zscore", k)) + _num(get("pvalue", k)) + _num(get("qvalue", k))
            + f'<td class="t">{escape(verdict) or "–"}</td></tr>')
    if not lines:
        return "<p>No counterfactual of this sample was computed.</p>"
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="sortable"><thead><tr>{header}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _certificate(certificate: Optional[Dict], i: int) -> str:
    if certificate is None or "bound" not in certificate or i >= len(certificate["bound"]):
        return ""
    meta = certificate.get("meta", {})
    get = (lambda key: certificate[key][i] if key in certificate else np.nan)
    if meta.get("exhaustive"):
        return (f"<p><b>Certificate:</b> no single training unit moves this sample by more than r = "
                f"{get('bound'):.3g} (exact: every unit's removal replayed, units of one code row once). 95th "
                f"percentile of the noise floor: {get('floor_p95'):.3g}.</p>")
    scope = (f"an estimate, not a bound: exact for the {int(get('checked')) if np.isfinite(get('checked')) else ''} "
             f"checked units, first order ({escape(str(meta.get('method', 'first_order')))}) scaled for the rest")
    return (f"<p><b>Certificate (estimate):</b> no single training unit is expected to move this sample by more "
            f"than r = {get('bound'):.3g} ({scope}). Largest exact distance among the checked units: "
            f"{get('radius'):.3g}; 95th percentile of the noise floor: {get('floor_p95'):.3g}.</p>")


def _top(top: Optional[Dict], i: int, names) -> str:
    if top is None:
        return ""
    shown = [(u, s, img) for u, s, img in zip(top["units"][i], top["scores"][i], top["images"][i]) if u >= 0]
    if not shown:
        return ""
    figures = "".join(_img(img, f"{_name(int(u), names)} ({s:.3g})") for u, s, img in shown)
    return f"<h3>Top training units by {escape(top['method'])}</h3><div>{figures}</div>"


def write_report_html(path: os.PathLike, title: str, samples: np.ndarray, counterfactuals: np.ndarray,
                      units: np.ndarray, distances: np.ndarray, unit_images: np.ndarray,
                      unit_names: Optional[Sequence[str]] = None, predicted: Optional[np.ndarray] = None,
                      seeds: Optional[np.ndarray] = None, significance: Optional[Dict] = None,
                      certificate: Optional[Dict] = None, top: Optional[Dict] = None,
                      summary: Optional[Dict] = None, rows: int = 8) -> None:
    """Write the page: a summary, then one ``<section>`` per sample (the sample, its top
    training units by ``top['method']``, a sortable table of its counterfactuals with their
    verdict against the noise floor, its certificate). Arrays as in
    :func:`ensattr_fast.report.figures.counterfactual_figure`; ``summary``: the counts of the file."""
    sections = []
    for i in range(min(rows, len(units))):
        seed = f" (seed {int(seeds[i])})" if seeds is not None and i < len(seeds) else ""
        sections.append(
            f'<section id="sample-{i}"><h2>Sample {i}{escape(seed)}</h2>{_img(samples[i], "the sample")}'
            + _top(top, i, unit_names) + "<h3>Counterfactuals: the sample re-drawn without one unit</h3>"
            + _table(i, units, distances, counterfactuals, unit_images, unit_names, predicted, significance)
            + _certificate(certificate, i) + "</section>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>Training data attribution report: {escape(title)}</h1>"
            + _summary(summary or {}) + "".join(sections) + f"<script>{_SCRIPT}</script></body></html>\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
