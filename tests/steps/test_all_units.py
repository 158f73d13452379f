"""``ensattr train --all-units``: the full-data baseline of an audit's plan, one or several
models of its architecture on every unit, and the generator that memorization proves against
the encoded ensemble's excluders."""

import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main

TRAIN = ["--steps", "12", "--hidden", "32", "--blocks", "1", "--batch-size", "8"]


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("all_units")
    np.save(d / "data.npy", np.random.default_rng(2).integers(0, 255, (24, 1, 8, 8), dtype=np.uint8))
    assert ensattr("plan", "--out", d / "plan.h5", "--data", d / "data.npy", "--members", 8) == 0
    assert ensattr("train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", *TRAIN) == 0
    return d


def test_one_model_on_every_unit(planned, capsys):
    assert ensattr("train", "--plan", planned / "plan.h5", "--out", planned / "full.pt", "--all-units", *TRAIN) == 0
    full, ensemble = ef.Checkpoint.load(planned / "full.pt"), ef.Checkpoint.load(planned / "ensemble.pt")
    assert full.code.shape == (24, 1) and bool((full.code == 1).all()) and full.step == 12
    assert torch.equal(full.unit_of, ensemble.unit_of) and full.data_fingerprint == ensemble.data_fingerprint
    assert full.spec["hidden"] == ensemble.spec["hidden"]
    assert full.config["options"]["all_units"] is True
    capsys.readouterr()
    # the baseline memorization samples from; its copies are proven by the ensemble's excluders
    assert ensattr("memorization", "--checkpoint", planned / "ensemble.pt", "--generator-checkpoint",
                   planned / "full.pt", "--out", planned / "copies.h5", "--seeds", 3, "--sampling-steps", 3,
                   "--phantoms", 2, "--threshold", 50) == 0
    assert "of 3 samples are near-copies" in capsys.readouterr().out


def test_several_independent_models(planned, capsys):
    assert ensattr("train", "--plan", planned / "plan.h5", "--out", planned / "three.pt", "--all-units",
                   "--models", 3, *TRAIN) == 0
    assert "the models train independently" in capsys.readouterr().err
    three = ef.Checkpoint.load(planned / "three.pt")
    assert three.code.shape == (24, 3) and three.config["train"]["mode"] == "independent"
    weights = next(v for k, v in three.ensemble.items() if v.dim() >= 2)
    assert not torch.equal(weights[0], weights[1])  # their own initial weights and draws


def test_models_without_all_units_is_refused(planned, capsys):
    assert ensattr("train", "--plan", planned / "plan.h5", "--out", planned / "x.pt", "--models", 2, *TRAIN) == 2
    assert "--models counts the models of --all-units" in capsys.readouterr().err
    assert not (planned / "x.pt").exists()
