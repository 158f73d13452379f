"""Text conditions on the command line (issue 21, item 1): images with an embedding per example
(an array ``conditions`` [n, L, D] beside them), ``UNet2DConditionModel`` members
(``--arch diffusers-text``), samples drawn under each seed's embedding (``--condition-file``) with
guidance, the embeddings kept in the results file, and every later step (ablation, attribution,
memorization, LDS) replaying them. A condition that does not fit is refused in one line before
anything is written. Skipped without diffusers."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import ensattr_fast as ef  # noqa: E402
from ensattr_fast.cli.main import main  # noqa: E402
from ensattr_fast.diffusion.sampling import sample  # noqa: E402
from ensattr_fast.members.text import sample_index  # noqa: E402
from ensattr_fast.store import read_sampler  # noqa: E402
from ensattr_fast.training import Checkpoint  # noqa: E402

L, D, SEEDS = 3, 8, 6
UNET = dict(block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=4)


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    digits = ef.load_digits()
    g = np.random.default_rng(0)
    # each digit's embedding: a fixed random caption per class, plus a little noise per image
    captions = g.normal(size=(10, L, D)).astype(np.float32)
    labels = digits.labels.numpy()[:40]
    conditions = captions[labels] + 0.1 * g.normal(size=(40, L, D)).astype(np.float32)
    np.savez(d / "captioned.npz", images=digits.images.numpy()[:40], conditions=conditions)
    np.save(d / "seeds.npy", captions[[0, 1, 2, 3, 4, 5]])
    (d / "unet.json").write_text(json.dumps(UNET))
    assert ensattr("plan", "--data", d / "captioned.npz", "--members", 8, "--out", d / "plan.h5") == 0
    assert ensattr("train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", "--arch", "diffusers-text",
                   "--unet-config", d / "unet.json", "--steps", 4, "--batch-size", 4) == 0
    assert ensattr("sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", SEEDS,
                   "--condition-file", d / "seeds.npy", "--guidance", 2, "--sampling-steps", 4) == 0
    return d


def test_the_results_file_keeps_each_seeds_embedding_and_its_samples_replay(text):
    with h5py.File(text / "results.h5", "r") as f:
        kept = torch.from_numpy(f["samples/condition"][()])
        index = torch.from_numpy(f["samples/label"][()])
        images = torch.from_numpy(f["samples/images"][()])
    assert torch.equal(kept, torch.from_numpy(np.load(text / "seeds.npy")))
    assert torch.equal(index, sample_index(torch.arange(SEEDS)))
    ensemble = Checkpoint.load(text / "ensemble.pt").build().eval()
    ensemble.set_conditions(samples=kept)
    again = sample(ensemble, Checkpoint.load(text / "ensemble.pt").schedule, read_sampler(text / "results.h5"),
                   range(SEEDS), labels=index)
    assert torch.allclose(again, images, atol=1e-5)
    ensemble.set_conditions(samples=kept.flip(0))  # other embeddings: other samples
    other = sample(ensemble, Checkpoint.load(text / "ensemble.pt").schedule, read_sampler(text / "results.h5"),
                   range(SEEDS), labels=index)
    assert (other - images).abs().amax() > 1e-3


def test_ablation_attribution_memorization_and_lds_replay_the_embeddings(text, tmp_path):
    assert ensattr("ablate", "--checkpoint", text / "ensemble.pt", "--results", text / "results.h5", "--units",
                   "0,3", "--samples", 2) == 0
    assert ensattr("attribute", "--checkpoint", text / "ensemble.pt", "--results", text / "results.h5", "--method",
                   "first_order,loss,dtrak", "--samples", 2, "--draws", 2, "--projection-dim", 16, "--check", 1,
                   "--overwrite") == 0
    with ef.Audit(checkpoint=text / "ensemble.pt", results=text / "results.h5").results() as r:
        for method in ("first_order", "loss", "dtrak"):
            scores = r.influence(method)[()]
            assert scores.shape == (2, 40) and np.isfinite(scores).all(), method
    assert ensattr("memorization", "--checkpoint", text / "ensemble.pt", "--out", tmp_path / "copies.h5", "--seeds",
                   SEEDS, "--condition-file", text / "seeds.npy", "--guidance", 2, "--sampling-steps", 3,
                   "--phantoms", 4) == 0
    with h5py.File(tmp_path / "copies.h5", "r") as f:
        kept = f["memorization/condition"][()]
    assert np.array_equal(kept, np.load(text / "seeds.npy"))
    assert ensattr("lds", "--checkpoint", text / "ensemble.pt", "--results", text / "results.h5", "--references",
                   tmp_path / "refs.pt", "--halves", 2, "--seeds", 1, "--steps", 2, "--draws", 2, "--samples", 2) == 0


def _refused(capsys, argv, message):
    capsys.readouterr()
    assert ensattr(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_conditions_that_do_not_fit_are_refused_before_anything_is_written(text, tmp_path, capsys):
    out = tmp_path / "r.h5"
    sample = ["sample", "--checkpoint", text / "ensemble.pt", "--out", out, "--seeds", SEEDS, "--sampling-steps", 2]
    captions = np.load(text / "seeds.npy")
    for name, array, message in (("short.npy", captions[:4], "4 conditions for 6 rows"),
                                 ("wide.npy", np.zeros((6, L, D + 1), np.float32), "[L, D] = [3, 8]"),
                                 ("ints.npy", np.zeros((6, L, D), np.int64), "must be float embeddings"),
                                 ("flat.npy", np.zeros((6, L * D), np.float32), "must be float embeddings"),
                                 ("nan.npy", np.full((6, L, D), np.nan, np.float32), "NaN")):
        np.save(tmp_path / name, array)
        _refused(capsys, sample + ["--condition-file", tmp_path / name], message)
    _refused(capsys, sample + ["--condition-file", tmp_path / "missing.npy"], "no condition file")
    _refused(capsys, sample + ["--labels", "1"], "these members are text-conditioned")
    _refused(capsys, sample + ["--guidance", 2], "needs a condition per sample")
    assert not out.exists()
    np.save(tmp_path / "one.npy", captions[:1])  # one embedding for every seed
    assert ensattr(*sample, "--condition-file", tmp_path / "one.npy") == 0


def test_text_conditions_for_members_that_take_none_are_refused(text, tmp_path, capsys):
    assert ensattr("train", "--plan", text / "plan.h5", "--out", tmp_path / "mlp.pt", "--steps", 2, "--hidden", 16,
                   "--blocks", 1, "--batch-size", 4) == 0
    _refused(capsys, ["sample", "--checkpoint", tmp_path / "mlp.pt", "--out", tmp_path / "r.h5", "--seeds", 2,
                      "--condition-file", text / "seeds.npy"], "these members take no text conditions")
    np.savez(tmp_path / "bare.npz", images=np.load(text / "captioned.npz")["images"])
    assert ensattr("plan", "--data", tmp_path / "bare.npz", "--members", 8, "--out", tmp_path / "plan.h5") == 0
    _refused(capsys, ["train", "--plan", tmp_path / "plan.h5", "--out", tmp_path / "t.pt", "--arch",
                      "diffusers-text", "--steps", 1], "needs an array 'conditions'")
    assert not (tmp_path / "t.pt").exists()


def test_first_order_jacobians_replay_each_sample_under_its_embedding(text):
    """First order replays each guided sample under its own embedding: it lands on the stored
    sample, and each sample's Grams are the same computed alone or beside the others."""
    from ensattr_fast.attribution.first_order import first_order_grams

    checkpoint = Checkpoint.load(text / "ensemble.pt")
    ensemble = checkpoint.build().eval()
    with h5py.File(text / "results.h5", "r") as f:
        ensemble.set_conditions(samples=torch.from_numpy(f["samples/condition"][()]))
        stored = torch.from_numpy(f["samples/images"][()])
    sampler, index = read_sampler(text / "results.h5"), sample_index(torch.arange(3))
    together = first_order_grams(ensemble, checkpoint.schedule, sampler, [0, 1, 2], chunk=3, labels=index)
    assert torch.allclose(together.samples, stored[:3], atol=1e-5)
    alone = first_order_grams(ensemble, checkpoint.schedule, sampler, [2], chunk=1, labels=index[2:])
    assert torch.allclose(alone.exact[0], together.exact[2], rtol=1e-4, atol=1e-7)
    assert torch.isfinite(together.exact).all() and together.exact.abs().amax() > 0
