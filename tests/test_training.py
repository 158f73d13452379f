"""The batched trainer: member data isolation, modes, checkpoints and resume."""

import pytest
import torch

from ensattr_fast import codes
from ensattr_fast.data import Dataset
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.errors import ConfigError, DataError
from ensattr_fast.members import StackedMLP, UNetMember, VmapEnsemble
from ensattr_fast.ops import masked_member_mse
from ensattr_fast.training import TrainConfig, Trainer
from ensattr_fast.training.checkpoint import Checkpoint, CheckpointError

SCHEDULE = NoiseSchedule.linear(200)


def make_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    return Dataset(images, torch.arange(n) % 3, name="toy")


def make_trainer(mode="shared_noise", members=6, steps=20, ensemble=None, seed=0):
    data = make_data()
    units = codes.Units.per_example(len(data))
    code = codes.random_constant_weight(len(data), members, seed=1, allow_duplicates=members < 6)
    ensemble = ensemble or StackedMLP(members, data.data_shape, hidden=16, blocks=1,
                                      shared_init=mode != "independent", seed=seed)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, mode=mode, seed=seed)
    return Trainer(ensemble, data, code, units.unit_of, units.names, SCHEDULE, config)


@pytest.mark.parametrize("mode", ["independent", "shared_noise", "masked_batch"])
def test_members_learn_only_from_their_own_units(mode):
    trainer = make_trainer(mode)
    sees = trainer.code[trainer.unit_of].T.bool()  # [M, n_examples]
    for _ in range(5):
        x_t, t, target, mask = trainer._batch(trainer._draw())
        if mode == "masked_batch":
            # one shared batch; the mask is exactly "member m trained on this example's unit"
            assert x_t.shape[1] == 16 and t.dim() == 1 and target.dim() == 2
            assert mask.sum() > 0 and ((mask == 0) | (mask == 1)).all()
        else:
            assert (mask == 1).all()
            assert (t.dim() == 2) == (mode == "independent")
    # every member's drawn examples come from its pool only
    g = torch.Generator().manual_seed(0)
    where = (torch.rand(6, 500, generator=g) * trainer.pool_sizes[:, None]).long()
    drawn = trainer.pools.gather(1, where)
    assert torch.gather(sees, 1, drawn).all()


def test_gradients_stay_within_each_member():
    trainer = make_trainer()
    x_t, t, target, mask = trainer._batch(trainer._draw())
    _, per_member = masked_member_mse(trainer.ensemble(x_t, t).flatten(2), target, mask)
    per_member[2].backward()
    for name, p in trainer.ensemble.named_parameters():
        others = torch.cat([p.grad[:2], p.grad[3:]])
        assert others.abs().max() == 0, name
        assert p.grad[2].abs().max() > 0, name


def test_shared_init_and_independent_init():
    shared = make_trainer("shared_noise").ensemble.inp.weight
    independent = make_trainer("independent").ensemble.inp.weight
    assert torch.equal(shared[0], shared[3])
    assert not torch.equal(independent[0], independent[3])


def test_training_lowers_every_members_loss():
    trainer = make_trainer(steps=150)
    first = torch.stack([trainer.train_step() for _ in range(10)]).mean(0)
    trainer.train(progress=False)
    last = torch.stack([trainer.train_step() for _ in range(10)]).mean(0)
    assert (last < first).all()


def test_vmap_ensemble_of_a_user_module_trains():
    ensemble = VmapEnsemble(lambda: UNetMember(1, width=8, time_dim=16), 2, (1, 4, 4), shared_init=True)
    trainer = make_trainer(members=2, ensemble=ensemble, steps=3)
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    trainer.train(progress=False)
    assert any(not torch.equal(before[k], v) for k, v in ensemble.state_dict().items())


def test_checkpoint_round_trip_and_resume_is_bit_identical(tmp_path):
    uninterrupted = make_trainer(steps=12)
    uninterrupted.train(progress=False)

    first = make_trainer(steps=12)
    for _ in range(5):  # stopped after 5 of the 12 steps
        first.train_step()
    first.checkpoint().save(tmp_path / "ck.pt")
    resumed = make_trainer(steps=12)
    resumed.restore(Checkpoint.load(tmp_path / "ck.pt"))
    assert resumed.step == 5
    resumed.train(progress=False)
    for key, value in uninterrupted.ensemble.state_dict().items():
        assert torch.equal(value, resumed.ensemble.state_dict()[key]), key

    ck = Checkpoint.load(tmp_path / "ck.pt")
    rebuilt = ck.build(use_ema=False)
    x, t = torch.randn(6, 3, 1, 4, 4), torch.randint(0, 200, (6, 3))
    assert torch.equal(rebuilt(x, t), first.ensemble.eval()(x, t))


def test_corrupt_checkpoints_give_one_clear_error(tmp_path):
    trainer = make_trainer(steps=1)
    trainer.train(checkpoint=tmp_path / "ck.pt", progress=False)
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        Checkpoint.load(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ensattr_fast checkpoint"):
        Checkpoint.load(tmp_path / "other.pt")


def test_trainer_rejects_mismatched_inputs():
    data = make_data()
    units = codes.Units.per_example(len(data))
    code = codes.balanced_constant_weight(len(data), 6, seed=1)
    ensemble = StackedMLP(6, (1, 5, 5), hidden=8, blocks=1)
    with pytest.raises(DataError, match=r"data has shape \(1, 4, 4\) but the ensemble expects \(1, 5, 5\)"):
        Trainer(ensemble, data, code, units.unit_of, units.names, SCHEDULE, TrainConfig())
    with pytest.raises(codes.CodeError, match="code has 6 members but the ensemble 4"):
        Trainer(StackedMLP(4, (1, 4, 4)), data, code, units.unit_of, units.names, SCHEDULE, TrainConfig())
    with pytest.raises(codes.CodeError, match=r"unit ids must lie in \[0, 16\)"):
        Trainer(StackedMLP(6, (1, 4, 4)), data, code, units.unit_of + 1, units.names, SCHEDULE, TrainConfig())
    with pytest.raises(ConfigError, match="training mode must be one of"):
        TrainConfig(mode="solo")
