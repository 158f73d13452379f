"""The hierarchical audit: groups ranked by exact ablation with significance, examples ranked
inside the top groups by the gradient method."""

import numpy as np
import pytest

import ensattr_fast as ef
from ensattr_fast.cli.main import main
from ensattr_fast.data import load_digits
from ensattr_fast.errors import ConfigError
from ensattr_fast.members import MemberOptions
from ensattr_fast.store import open_results
from ensattr_fast.training import TrainConfig


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    np.save(d / "forty.npy", load_digits().images[:40].numpy())
    audit = ef.Audit.create(str(d / "forty.npy"), 8, d, units="clusters:4", design="sparse", excluders=2,
                            progress=False)
    audit.train(ef.TrainOptions(train=TrainConfig(steps=40, batch_size=16, lr=3e-3),
                                architecture=MemberOptions(hidden=32, blocks=1)))
    audit.sample(seeds=range(3), sampler="ddim", sampling_steps=5)
    return d


def test_audit_ranks_groups_exactly_and_examples_inside_them(grouped):
    audit = ef.Audit.open(grouped)
    arrays = audit.audit_groups(samples=3, top_groups=2, examples=4).arrays()
    with open_results(grouped / "results.h5") as r:
        cf = r.counterfactual_arrays(images=False)
        unit_of = r.unit_of[()]
        assert r.file["audit/groups"].shape == (3, 2) and r.file["audit/examples"].shape == (3, 2, 4)
    assert (cf["units"] == np.arange(4)).all()  # every group ablated for every sample
    assert cf["floor_distance"].shape[0] == 3 and np.isfinite(cf["qvalue"]).all()
    for s in range(3):
        order = np.argsort(-cf["distance"][s], kind="stable")[:2]
        assert arrays["groups"][s].tolist() == order.tolist()
        for j, group in enumerate(arrays["groups"][s]):
            chosen = arrays["examples"][s, j][arrays["examples"][s, j] >= 0]
            assert len(chosen) and (unit_of[chosen] == group).all()
            scores = arrays["example_scores"][s, j][: len(chosen)]
            assert (np.diff(scores) <= 0).all()  # best first
    # a second audit of the same file replaces its own counterfactuals without --overwrite
    audit.audit_groups(samples=2, top_groups=1, examples=2)


def test_audit_command_line(grouped, capsys):
    assert main(["audit", "--checkpoint", str(grouped / "ensemble.pt"), "--results", str(grouped / "results.h5"),
                 "--samples", "2", "--top-groups", "1", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "sample 0:" in out and ("significant" in out or "within noise" in out)
    assert main(["audit", "--checkpoint", str(grouped / "ensemble.pt"), "--results", str(grouped / "results.h5"),
                 "--method", "loss"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'loss'" in err
    with pytest.raises(ConfigError, match="gradient method"):
        ef.Audit.open(grouped).audit_groups(method="loss")
