"""``ensattr report``: the PNG and the self-contained HTML page, with each counterfactual marked
significant or within the noise floor; files from before the floor still draw; the overwrite
rule. The results files are built by hand with h5py (docs/results-format.md plus the floor)."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest

import ensattr_fast as ef
from ensattr_fast.errors import StoreError

N, M, S, K, P, TOPK = 1797, 16, 3, 4, 32, 5
#: the significant (sample, slot) pairs of the fixture; slot 3 of sample 2 holds no unit
SIGNIFICANT = {(0, 1), (2, 0)}


def _write(path, floor: bool, significant=SIGNIFICANT):
    """A small results file of the digits: S samples with K counterfactuals each and, with
    ``floor``, the noise floor, the tests against it, the certificate and a D-TRAK top-k."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["plan"] = json.dumps({"dataset": "digits"})
        f["code"] = rng.integers(0, 2, (N, M), dtype=np.uint8)
        f["units/of_example"] = np.arange(N, dtype=np.int64)
        f.create_dataset("units/name", data=[f"<u{u}>&" for u in range(N)], dtype=h5py.string_dtype())
        f["samples/images"] = rng.uniform(-1, 1, (S, 1, 8, 8)).astype(np.float32)
        f["samples/seed"] = np.arange(S, dtype=np.int64)
        units = rng.choice(N, (S, K), replace=False).astype(np.int64)
        units[2, 3] = -1
        cf = f.create_group("counterfactuals")
        cf["units"] = units
        cf["images"] = rng.uniform(-1, 1, (S, K, 1, 8, 8)).astype(np.float32)
        cf["distance"] = rng.uniform(0.1, 0.5, (S, K)).astype(np.float32)
        cf["predicted_first_order"] = rng.uniform(0.1, 0.5, (S, K)).astype(np.float32)
        if not floor:
            return
        sig = np.zeros((S, K), dtype=np.uint8)
        for i, k in significant:
            sig[i, k] = 1
        tested = units >= 0
        cf["floor_distance"] = rng.uniform(0.1, 0.4, (S, P)).astype(np.float32)
        cf["pvalue"] = np.where(tested, np.where(sig, 0.001, 0.4), np.nan).astype(np.float32)
        cf["qvalue"] = np.where(tested, np.where(sig, 0.01, 0.6), np.nan).astype(np.float32)
        cf["zscore"] = np.where(tested, np.where(sig, 4.0, 0.3), np.nan).astype(np.float32)
        cf["significant"] = sig
        cf.attrs["floor"] = json.dumps({"phantoms": P, "kind": "random_rows", "alpha": 0.05,
                                        "tests": int(tested.sum())})
        cert = f.create_group("certificate")
        cert["radius"] = np.full(S, 0.5, dtype=np.float32)
        cert["bound"] = np.full(S, 0.9, dtype=np.float32)
        cert["floor_p95"] = np.full(S, 0.38, dtype=np.float32)
        cert["checked"] = np.full(S, K, dtype=np.int64)
        cert.attrs["certificate"] = json.dumps({"method": "first_order", "exhaustive": False, "units": N})
        f["topk/dtrak/index"] = rng.choice(N, (S, TOPK), replace=False).astype(np.int64)
        f["topk/dtrak/score"] = rng.uniform(0, 1, (S, TOPK)).astype(np.float32)


class _Page(HTMLParser):
    """What the tests look at in a page: sections, image sources, links."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.links = 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.sections += tag == "section"
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v]


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _report(tmp_path, floor: bool, **kwargs):
    results = tmp_path / "results.h5"
    _write(results, floor, **kwargs)
    ef.Audit(results=results).report(tmp_path / "report.png")
    return tmp_path / "report.png", tmp_path / "report.html"


def test_png_and_html_mark_effects_against_the_floor(tmp_path):
    png, page = _report(tmp_path, floor=True)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    text = page.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.sections == S
    assert parsed.images and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert "http://" not in text and "https://" not in text and not any("//" in v.split(",")[0] for v in parsed.links)
    assert text.count('<tr class="sig">') == len(SIGNIFICANT)
    assert text.count('<tr class="noise">') == S * K - 1 - len(SIGNIFICANT)
    assert ">significant<" in text and ">within noise<" in text
    assert re.search(r'<span id="count">(\d+)</span> of (\d+)', text).groups() == (str(len(SIGNIFICANT)),
                                                                                   str(S * K - 1))
    assert "&lt;u" in text and "<u1" not in text  # unit names are escaped
    assert "Top training units by dtrak" in text and "Certificate (estimate):" in text and "not a bound" in text


def test_the_headline_says_when_nothing_is_above_the_floor(tmp_path):
    png, page = _report(tmp_path, floor=True, significant=set())
    text = page.read_text(encoding="utf-8")
    assert re.search(r"In the \d+ samples shown, single-unit effects are within the noise floor", text)
    assert '<span id="count">0</span>' in text and ">significant<" not in text
    assert png.stat().st_size > 0


def test_files_from_before_the_floor_still_render(tmp_path):
    png, page = _report(tmp_path, floor=False)
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = page.read_text(encoding="utf-8")
    assert _parse(page).sections == S
    assert "within noise" not in text and "has no noise floor" in text


def test_no_output_is_replaced_without_overwrite(tmp_path):
    results = tmp_path / "results.h5"
    _write(results, floor=True)
    (tmp_path / "report.html").write_text("mine")
    with pytest.raises(StoreError, match="exists"):
        ef.Audit(results=results).report(tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists() and (tmp_path / "report.html").read_text() == "mine"
    ef.Audit(results=results).report(tmp_path / "report.png", overwrite=True)
    assert (tmp_path / "report.html").read_text() != "mine"
    with pytest.raises(StoreError, match="exists"):
        ef.Audit(results=results).report(tmp_path / "report.png")
    ef.Audit(results=results).report(tmp_path / "other.png", html=False)
    assert not (tmp_path / "other.html").exists()


BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
#: CI installs Debian's chromium and sets this, so that the test runs there instead of skipping
REQUIRE_BROWSER = os.environ.get("ENSATTR_REQUIRE_BROWSER") == "1"


@pytest.mark.skipif(BROWSER is None and not REQUIRE_BROWSER, reason="no headless browser on PATH")
def test_the_page_renders_in_a_headless_browser(tmp_path):
    assert BROWSER is not None, "ENSATTR_REQUIRE_BROWSER=1 but no chromium on PATH"
    _, page = _report(tmp_path, floor=True)
    shot = tmp_path / "shot.png"
    # the flags keep a root, offline, headless chromium from reaching for the network or a sandbox
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.resolve().as_uri()], check=True, timeout=120, capture_output=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1200, 3)
    gray = pixels.mean(-1)
    inked = gray < 200  # text, tables and pictures on the white page
    rows_inked = inked.any(1)
    assert inked.mean() > 0.01, "the page rendered blank"
    assert rows_inked[:300].any(), "no title or summary at the top of the page"
    assert rows_inked.sum() > 200, "the page shows too little: its tables or images did not render"
    # the significant effects are marked in red, as the picture marks them
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.sum() > 20, "no effect is marked significant on the page"
    # the samples' pictures render: many grey levels, not only text on white
    assert len(np.unique(gray[inked].astype(np.uint8))) > 32
