"""The ensattr command line over files, end to end at toy size, and the results layout."""

import json

import h5py
import numpy as np
import pytest

from ensattr_fast.cli.main import main
from ensattr_fast.store import open_results

DIGIT_UNITS = 1794  # the 1,797 digits planned one unit per image, their 3 near-duplicate pairs grouped


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["plan", "--out", str(d / "plan.h5"), "--members", "16"]) == 0
    assert main(["train", "--plan", str(d / "plan.h5"), "--out", str(d / "ensemble.pt"), "--steps", "6",
                 "--hidden", "32", "--blocks", "1", "--batch-size", "16", "--checkpoint-every", "3"]) == 0
    assert main(["sample", "--checkpoint", str(d / "ensemble.pt"), "--out", str(d / "results.h5"),
                 "--seeds", "6", "--sampling-steps", "4"]) == 0
    return d


def test_steps_write_the_documented_layout(run_dir):
    d = run_dir
    assert main(["ablate", "--checkpoint", str(d / "ensemble.pt"), "--results", str(d / "results.h5"),
                 "--nearest", "2", "--samples", "3"]) == 0
    with h5py.File(d / "results.h5", "r") as f:
        assert f["code"].dtype == np.uint8 and f["code"].shape == (DIGIT_UNITS, 16)
        assert f["units/of_example"].dtype == np.int64 and f["units/of_example"].shape == (1797,)
        assert f["units/name"].shape == (DIGIT_UNITS,)
        assert f["samples/images"].dtype == np.float32 and f["samples/images"].shape == (6, 1, 8, 8)
        assert f["samples/seed"][()].tolist() == list(range(6))
        assert f["counterfactuals/units"].shape == (3, 2) and f["counterfactuals/units"].dtype == np.int64
        assert f["counterfactuals/images"].shape == (3, 2, 1, 8, 8)
        assert f["counterfactuals/distance"].dtype == np.float32
        for key in ("config", "versions", "code_hash", "checkpoint_hash", "sampler"):
            json.loads(f.attrs[key])  # every attribute is JSON


def test_attribute_metrics_report_and_lds(run_dir, capsys):
    d = run_dir
    (d / "groups.json").write_text(json.dumps({f"pair {i}": [2 * i, 2 * i + 1] for i in range(12)}))
    assert main(["attribute", "--checkpoint", str(d / "ensemble.pt"), "--results", str(d / "results.h5"),
                 "--samples", "4", "--block-units", "500", "--draws", "4", "--check", "2",
                 "--method", "first_order,direct,loss", "--overwrite",  # the check replaces ablate's
                 "--groups", str(d / "groups.json")]) == 0
    with open_results(d / "results.h5") as r:
        assert r.methods == ["direct", "direct_groups", "first_order", "first_order_groups", "loss", "loss_groups"]
        groups = r.influence("loss_groups")
        assert groups.shape == (4, 12)
        assert r.file["groups/ptr"][-1] == 24 and r.file["groups/units"][3] == 3
        for method in ("direct", "first_order", "loss"):
            view = r.influence(method)
            assert view.complete and view.shape == (4, DIGIT_UNITS)
            assert np.isfinite(view[:, :]).all()
            index, score = r.topk(method)
            assert index.shape == (4, 10)
        assert r.counterfactuals["units"].shape == (4, 2)
        assert "predicted_first_order" in r.counterfactuals
        assert "first_order" in r.attrs["agreement"]
    assert main(["metrics", "--results", str(d / "results.h5"), "--checkpoint", str(d / "ensemble.pt"),
                 "--samples", "2", "--json", str(d / "metrics.json")]) == 0
    found = json.loads((d / "metrics.json").read_text())
    assert len(found["counterfactual_radius"]["per_sample"]) == 4
    assert 0 <= found["false_attribution"]["rate_ablating_nearest"] <= 1
    assert main(["report", "--results", str(d / "results.h5"), "--out", str(d / "report.png")]) == 0
    assert (d / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["lds", "--checkpoint", str(d / "ensemble.pt"), "--results", str(d / "results.h5"),
                 "--references", str(d / "refs.pt"), "--halves", "4", "--seeds", "2", "--steps", "2",
                 "--draws", "3", "--json", str(d / "lds.json")]) == 0
    table = json.loads((d / "lds.json").read_text())
    assert set(table) == {"first_order", "direct", "loss", "pixel_similarity", "pixel_nearest_10", "dtrak_one_model",
                          "dtrak_16_full_models"}  # the TRAK ensemble of the same compute: 16 models on all units
    assert all(-1 <= row["mean"] <= 1 for row in table.values() if np.isfinite(row["mean"]))


def test_bad_input_gives_one_clear_error_and_keeps_files(run_dir, tmp_path, capsys):
    before = (run_dir / "results.h5").read_bytes()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert main(["sample", "--checkpoint", str(run_dir / "ensemble.pt"), "--out", str(run_dir / "results.h5")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "broken.pt"), "--out", str(run_dir / "results.h5"),
                 "--overwrite"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert (run_dir / "results.h5").read_bytes() == before
    assert main(["train", "--plan", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "e.pt")]) == 2
    assert "not a readable plan file" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["metrics", "audit", "lds", "plan"])
def test_steps_that_do_not_split_their_work_refuse_torchrun(run_dir, step, monkeypatch, capsys):
    """Under torchrun every rank of a one-process step would write the same files at once:
    refused in one line before any file is touched."""
    before = (run_dir / "results.h5").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    files = ["--out", str(run_dir / "plan2.h5")] if step == "plan" else [
        "--checkpoint", str(run_dir / "ensemble.pt"), "--results", str(run_dir / "results.h5")]
    files += ["--references", str(run_dir / "refs2.pt")] if step == "lds" else []
    assert main([step, *files]) == 2
    err = capsys.readouterr().err
    assert f"ensattr {step}: error: {step} does not run under torchrun (WORLD_SIZE 2)" in err
    assert "train, sample, ablate, attribute" in err and err.count("\n") == 1
    assert (run_dir / "results.h5").read_bytes() == before
    assert not (run_dir / "plan2.h5").exists() and not (run_dir / "refs2.pt").exists()
