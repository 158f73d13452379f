"""``ensattr lds --protocol dtrak`` end to end at small size: reference models over halves x
training seeds, losses over noise seeds, held-out validation images scored by the image methods
beside the generated samples, one table and one JSON with the protocol recorded."""

import json

import numpy as np
import pytest
import torch

from ensattr_fast.attribution.gradients import FeatureSpec, combine, dataset_features, gradient_features, member_scores
from ensattr_fast.cli.main import main
from ensattr_fast.data import load_data, load_digits
from ensattr_fast.evaluation.lds import Queries, reference_losses, reference_subsets
from ensattr_fast.evaluation.metrics import lds as lds_of
from ensattr_fast.training import Checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's GradScaler call


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol")
    digits = load_digits().images
    np.save(d / "train.npy", digits[:12].numpy())
    np.save(d / "validation.npy", digits[100:105].numpy())  # five images the ensemble never sees
    for argv in (["plan", "--out", d / "plan.h5", "--data", d / "train.npy", "--members", "6", "--design", "balanced"],
                 ["train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", "--steps", "20", "--batch-size", "8",
                  "--hidden", "16", "--blocks", "1"],
                 ["sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", "4",
                  "--sampling-steps", "4"],
                 ["attribute", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5", "--method",
                  "dtrak,loss,kfac", "--samples", "4", "--projection-dim", "32"]):
        assert main([str(a) for a in argv]) == 0, argv
    return d


def _lds(d, *extra):
    return main([str(a) for a in ["lds", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5",
                                  "--references", d / "refs.pt", "--halves", "3", "--seeds", "2", "--steps", "5",
                                  "--draws", "4", *extra]])


def test_the_dtrak_protocol_scores_generated_and_validation_queries(run, capsys):
    d = run
    assert _lds(d, "--protocol", "dtrak", "--validation", d / "validation.npy", "--noise-seeds", "2",
                "--json", d / "lds.json") == 0
    printed = capsys.readouterr().out
    table = json.loads((d / "lds.json").read_text())
    assert table["protocol"] == dict(name="dtrak", halves=3, seeds=2, noise_seeds=2, draws=4, steps=5,
                                     queries=dict(generated=4, validation=5))
    baselines = {"pixel_similarity", "pixel_nearest_10", "dtrak_one_model", "dtrak_6_full_models"}
    assert set(table["generated"]) == {"dtrak", "loss", "kfac"} | baselines
    # a held-out image has no sampling trajectory and no code statistics: the image methods only
    assert set(table["validation"]) == {"dtrak", "kfac"} | baselines
    assert all(row["n"] <= 5 for row in table["validation"].values())
    assert "protocol: name dtrak" in printed and "validation" in printed

    # the validation rows are the LDS of each method's scores of the held-out images, against
    # the references' losses averaged over the two noise seeds
    checkpoint = Checkpoint.load(d / "ensemble.pt")
    refs = Checkpoint.load(d / "refs.pt")
    assert refs.spec["n_members"] == 3 * 2
    images = torch.from_numpy(np.load(d / "validation.npy"))
    queries = Queries("validation", images, {})
    losses = reference_losses(refs, queries, 3, 2, draws=4, noise_seeds=2)
    one = reference_losses(refs, queries, 3, 2, draws=4, noise_seeds=1)
    assert not np.allclose(losses, one)  # the second noise seed is in the average
    ensemble, spec = checkpoint.build(), FeatureSpec(dim=32)
    train = dataset_features(ensemble, checkpoint.schedule, load_data(checkpoint.data_source), spec)
    query = gradient_features(ensemble, checkpoint.schedule, images, spec)
    scores = combine(member_scores(train, query, checkpoint.unit_of, len(checkpoint.code)), checkpoint.code, "mean")
    subsets = reference_subsets(len(checkpoint.code), 3, seed=checkpoint.config["train"]["seed"] + 1)
    want = lds_of(scores.numpy(), subsets.numpy(), losses)
    assert table["validation"]["dtrak"]["mean"] == pytest.approx(want["mean"], abs=1e-4, nan_ok=True)


def test_the_dtrak_protocol_needs_validation_images_and_checks_them(run, capsys):
    d = run
    assert _lds(d, "--protocol", "dtrak") == 2
    assert "--validation" in capsys.readouterr().err
    np.save(d / "wrong.npy", np.zeros((3, 4, 4), np.uint8))
    assert _lds(d, "--validation", d / "wrong.npy") == 2
    err = capsys.readouterr().err
    assert "--validation" in err and len(err.strip().splitlines()) == 1
