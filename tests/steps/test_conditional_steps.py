"""Class-conditional audits on the command line (issue 21, item 1): members trained on the data's
labels, samples drawn with a label per seed and guidance, every replay of them (ablation, the
first-order Jacobians, loss and gradient scores) under the same labels and guidance; labels that
do not fit are refused in one line before anything is written."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.diffusion.sampling import ablation_weights, replay, sample
from ensattr_fast.store import read_sampler
from ensattr_fast.training import Checkpoint

TRAIN = ["--steps", "30", "--hidden", "32", "--blocks", "1", "--batch-size", "16"]
LABELS = [0, 1, 2, 3, 4, -1]


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    d = tmp_path_factory.mktemp("conditional")
    digits = ef.load_digits()
    np.savez(d / "digits.npz", images=digits.images[:60].numpy(), labels=digits.labels[:60].numpy())
    assert ensattr("plan", "--data", d / "digits.npz", "--members", "8", "--out", d / "plan.h5") == 0
    assert ensattr("train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", "--conditional", *TRAIN) == 0
    assert ensattr("sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", "6",
                   "--labels", ",".join(map(str, LABELS)), "--guidance", "2", "--sampling-steps", "6") == 0
    return d


def test_the_samples_keep_their_labels_and_replay_bit_for_bit(audit):
    checkpoint = Checkpoint.load(audit / "ensemble.pt")
    assert checkpoint.spec["classes"] == 10
    sampler = read_sampler(audit / "results.h5")
    assert sampler.guidance == 2.0
    with h5py.File(audit / "results.h5", "r") as f:
        assert f["samples/label"][()].tolist() == LABELS
        stored = torch.from_numpy(f["samples/images"][()])
    ensemble = checkpoint.build().eval()
    again = sample(ensemble, checkpoint.schedule, sampler, list(range(6)), labels=torch.tensor(LABELS))
    assert torch.equal(again, stored)
    unguided = sample(ensemble, checkpoint.schedule, sampler.__class__(steps=6), list(range(6)),
                      labels=torch.tensor(LABELS))
    assert not torch.equal(unguided, stored)


def test_ablation_replays_each_sample_under_its_label_and_guidance(audit):
    assert ensattr("ablate", "--checkpoint", audit / "ensemble.pt", "--results", audit / "results.h5",
                   "--units", "1,7", "--phantoms", "3") == 0
    checkpoint = Checkpoint.load(audit / "ensemble.pt")
    with h5py.File(audit / "results.h5", "r") as f:
        counterfactuals = torch.from_numpy(f["counterfactuals/images"][()])
    weights = ablation_weights(checkpoint.code, [[1], [7]])[None].expand(6, -1, -1)
    want = replay(checkpoint.build().eval(), checkpoint.schedule, read_sampler(audit / "results.h5"),
                  list(range(6)), weights, labels=torch.tensor(LABELS)).images
    assert torch.allclose(counterfactuals, want, atol=1e-6)


def test_every_method_scores_conditional_samples(audit):
    assert ensattr("attribute", "--checkpoint", audit / "ensemble.pt", "--results", audit / "results.h5",
                   "--samples", "6", "--method", "first_order,loss,dtrak", "--projection-dim", "32", "--draws", "4",
                   "--check", "2", "--phantoms", "3", "--overwrite") == 0
    with ef.open_results(audit / "results.h5") as r:
        for method in ("first_order", "loss", "dtrak"):
            assert np.isfinite(r.influence(method)[:, :]).all(), method


def test_the_exact_kernel_scores_conditional_samples(audit, tmp_path):
    """``--exact-kernel`` under labels: the unprojected kernel, which the projected scores approach."""
    results, wide = tmp_path / "results.h5", tmp_path / "wide.h5"
    for path in (results, wide):  # the audit's samples in fresh files (its own holds other runs' scores)
        assert ensattr("sample", "--checkpoint", audit / "ensemble.pt", "--out", path, "--seeds", "6",
                       "--labels", ",".join(map(str, LABELS)), "--guidance", "2", "--sampling-steps", "6") == 0
    assert ensattr("attribute", "--checkpoint", audit / "ensemble.pt", "--results", results, "--samples", "6",
                   "--method", "dtrak", "--exact-kernel", "--check", "1", "--phantoms", "3", "--overwrite") == 0
    assert ensattr("attribute", "--checkpoint", audit / "ensemble.pt", "--results", wide, "--samples", "6",
                   "--method", "dtrak", "--projection-dim", "4096", "--check", "1", "--phantoms", "3",
                   "--overwrite") == 0
    with ef.open_results(results) as exact, ef.open_results(wide) as projected:
        a, b = exact.influence("dtrak")[:, :], projected.influence("dtrak")[:, :]
    assert np.isfinite(a).all()
    assert np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]) > 0.9


def test_first_order_replays_the_guided_samples(audit):
    """The first-order pass replays each sample through the sampler: with labels and guidance
    it must land on the stored sample, else its Jacobians belong to another trajectory."""
    from ensattr_fast.attribution.first_order import first_order_grams

    checkpoint = Checkpoint.load(audit / "ensemble.pt")
    grams = first_order_grams(checkpoint.build().eval(), checkpoint.schedule, read_sampler(audit / "results.h5"),
                              list(range(6)), labels=torch.tensor(LABELS))
    with h5py.File(audit / "results.h5", "r") as f:
        stored = torch.from_numpy(f["samples/images"][()])
    assert torch.allclose(grams.samples, stored, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--labels", "10"], "label 10 is not one the members were trained on (0..9"),
    (["--labels", "1,2"], "--labels gives 2 labels for 6 seeds"),
    (["--labels", "x"], "labels are comma-separated integers"),
    (["--guidance", "3"], "guidance 3.0 needs a label per sample"),
    (["--labels", "1", "--guidance", "-1"], "--guidance"),
])
def test_labels_that_do_not_fit_are_one_line_and_write_nothing(audit, capsys, argv, message):
    out = audit / "refused.h5"
    assert ensattr("sample", "--checkpoint", audit / "ensemble.pt", "--out", out, "--seeds", "6", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_labels_for_unconditional_members_are_refused(audit, capsys):
    assert ensattr("train", "--plan", audit / "plan.h5", "--out", audit / "plain.pt", *TRAIN) == 0
    capsys.readouterr()
    assert ensattr("sample", "--checkpoint", audit / "plain.pt", "--out", audit / "plain.h5", "--labels", "3") == 2
    err = capsys.readouterr().err
    assert "these members are unconditional" in err and err.count("\n") == 1, err
    assert not (audit / "plain.h5").exists()


def test_memorization_samples_and_proves_under_the_labels(audit):
    """Its samples are the full ensemble's under the same labels and guidance: those of
    ``sample``, bit for bit; the labels are stored beside them."""
    out = audit / "copies.h5"
    assert ensattr("memorization", "--checkpoint", audit / "ensemble.pt", "--out", out, "--seeds", "6",
                   "--labels", ",".join(map(str, LABELS)), "--guidance", "2", "--sampling-steps", "6",
                   "--phantoms", "4", "--threshold", "0.5", "--null-check") == 0
    with h5py.File(out, "r") as f, h5py.File(audit / "results.h5", "r") as r:
        assert f["memorization/label"][()].tolist() == LABELS
        assert np.array_equal(f["memorization/images"][()], r["samples/images"][()])
        assert np.isfinite(f["memorization/proof_distance"][()]).all()  # each proven against its nearest unit
