"""Users' own data end to end: a folder of 32x32 RGB pictures in 10 group folders trains,
samples, ablates a group and attributes; config files; data on disk trains like data in
memory."""

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ensattr_fast import codes
from ensattr_fast.cli.main import main
from ensattr_fast.data import Dataset, load_hdf5
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import StackedMLP
from ensattr_fast.training import TrainConfig, Trainer
from ensattr_fast.training.checkpoint import Checkpoint

GROUPS = [f"artist{g}" for g in range(10)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 group folders of 6 pictures each: every group its own colour and stripe direction."""
    root = tmp_path_factory.mktemp("own") / "pictures"
    rng = np.random.default_rng(0)
    for g, name in enumerate(GROUPS):
        (root / name).mkdir(parents=True)
        colour = np.array([(37 * g) % 256, (91 * g + 60) % 256, (173 * g + 120) % 256])
        for i in range(6):
            stripes = (np.arange(32) // (2 + g % 4)) % 2
            pattern = stripes[:, None] if g % 2 else stripes[None, :]
            pixels = colour * (0.5 + 0.5 * pattern[..., None]) + rng.normal(0, 10, (32, 32, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_group_folders_train_sample_ablate_and_attribute(folder, tmp_path):
    plan, ckpt, results = tmp_path / "plan.h5", tmp_path / "ensemble.pt", tmp_path / "results.h5"
    assert main(["plan", "--out", str(plan), "--data", str(folder), "--units", "group", "--members", "10",
                 "--resolution", "32"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "20", "--hidden", "64",
                 "--blocks", "1", "--batch-size", "16", "--hflip"]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(results), "--seeds", "4",
                 "--sampling-steps", "8"]) == 0
    assert main(["ablate", "--checkpoint", str(ckpt), "--results", str(results), "--units", "3,7"]) == 0
    assert main(["attribute", "--checkpoint", str(ckpt), "--results", str(results), "--samples", "4",
                 "--method", "first_order,loss", "--draws", "8", "--check", "2", "--overwrite"]) == 0
    with h5py.File(results, "r") as f:
        names = [n.decode() for n in f["units/name"][()]]
        assert names == GROUPS  # unit names travel from the folders into the results
        assert f["units/of_example"][()].tolist() == [g for g in range(10) for _ in range(6)]
        assert f["samples/images"].shape == (4, 3, 32, 32)
        assert f["influence/first_order"].shape == (4, 10) and np.isfinite(f["influence/first_order"][()]).all()
        assert f["counterfactuals/images"].shape == (4, 2, 3, 32, 32)
        spec = json.loads(f.attrs["plan"])["dataset"]
        assert spec["kind"] == "folder" and spec["resolution"] == 32
    checkpoint = Checkpoint.load(ckpt)
    assert checkpoint.config["train"]["hflip"] and checkpoint.config["data"]["spec"]["kind"] == "folder"
    code = checkpoint.code
    assert code.shape == (10, 10) and ((code == 0).sum(1) >= 1).all()  # every group has excluders


def test_config_file_with_flags_over_it(folder, tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text(f'''
data = "{folder}"
units = "group"
members = 10
seed = 3
[train]
steps = 4
hidden = 32
blocks = 1
batch-size = 8
''')
    plan, ckpt = tmp_path / "plan.h5", tmp_path / "ensemble.pt"
    assert main(["plan", "--config", str(config), "--out", str(plan)]) == 0
    assert main(["train", "--config", str(config), "--plan", str(plan), "--out", str(ckpt), "--steps", "6"]) == 0
    checkpoint = Checkpoint.load(ckpt)
    assert checkpoint.step == 6  # the flag wins over the file
    assert checkpoint.config["train"]["batch_size"] == 8 and checkpoint.config["train"]["seed"] == 3
    assert checkpoint.config["options"]["config"] == str(config)
    with h5py.File(plan, "r") as f:
        assert json.loads(f.attrs["options_plan"])["units"] == "group"
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 4\n")
    assert main(["train", "--config", str(bad), "--plan", str(plan), "--out", str(tmp_path / "x.pt")]) == 2


def test_data_on_disk_trains_like_data_in_memory(tmp_path):
    """Past the memory budget the trainer reads each batch from HDF5 a step ahead; the draws,
    and so the weights and a checkpoint's resume, are those of the data in memory."""
    images = torch.rand(40, 1, 4, 4) * 2 - 1
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = images.numpy()
    on_disk, in_memory = load_hdf5(tmp_path / "data.h5", memory_budget=64), Dataset(images, name="data")
    assert not on_disk.in_memory
    units = codes.Units.per_example(40)
    code = codes.balanced_constant_weight(40, 8, seed=0)

    def trainer(data, steps):
        ensemble = StackedMLP(8, (1, 4, 4), hidden=16, blocks=1, shared_init=True)
        config = TrainConfig(steps=steps, batch_size=8, warmup=2, hflip=True)
        return Trainer(ensemble, data, code, units.unit_of, units.names, NoiseSchedule.linear(), config)

    memory, disk = trainer(in_memory, 12), trainer(on_disk, 12)
    memory.train(progress=False)
    disk.train(checkpoint=tmp_path / "disk.pt", checkpoint_every=5, progress=False)
    for key, value in memory.ensemble.state_dict().items():
        assert torch.equal(disk.ensemble.state_dict()[key], value), key
    half = trainer(on_disk, 12)
    for _ in range(5):  # the next step's batch is already drawn and being read
        half.train_step()
    half.checkpoint().save(tmp_path / "half.pt")
    resumed = trainer(on_disk, 12)
    resumed.restore(Checkpoint.load(tmp_path / "half.pt"))
    resumed.train(progress=False)
    for key, value in memory.ensemble.state_dict().items():
        assert torch.equal(resumed.ensemble.state_dict()[key], value), key


def test_latents_train_and_report_through_a_decoder(tmp_path):
    """Members trained on precomputed latents (values outside [-1, 1], taken as they are);
    the report shows them through a decoder callback."""
    import ensattr_fast as ef

    latents = np.random.default_rng(0).normal(0, 2, (24, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    plan, ckpt, results = tmp_path / "plan.h5", tmp_path / "ensemble.pt", tmp_path / "results.h5"
    assert main(["plan", "--out", str(plan), "--data", str(tmp_path / "latents.npy"), "--members", "8"]) == 2
    assert main(["plan", "--out", str(plan), "--data", str(tmp_path / "latents.npy"), "--members", "8",
                 "--no-scale"]) == 0
    assert main(["train", "--plan", str(plan), "--out", str(ckpt), "--steps", "3", "--hidden", "16", "--blocks", "1",
                 "--batch-size", "4"]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(results), "--seeds", "2", "--sampling-steps", "4",
                 "--no-clip"]) == 0
    assert main(["ablate", "--checkpoint", str(ckpt), "--results", str(results), "--units", "0,5"]) == 0
    seen = []

    def decode(z):  # latents [k, 4, 4, 4] -> pictures [k, 3, 8, 8]
        seen.append(tuple(z.shape))
        return torch.nn.functional.interpolate(z[:, :3].tanh(), scale_factor=2)

    ef.Audit(results=results).report(tmp_path / "report.png", decode=decode)
    assert (tmp_path / "report.png").stat().st_size > 0
    assert seen and all(s[1:] == (4, 4, 4) for s in seen)


def test_yaml_config(folder, tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "audit.yaml"
    config.write_text(f"data: {folder}\nunits: group\nmembers: 10\nplan:\n  design: sparse\n")
    assert main(["plan", "--config", str(config), "--out", str(tmp_path / "plan.h5")]) == 0
    with h5py.File(tmp_path / "plan.h5", "r") as f:
        assert json.loads(f.attrs["plan"])["design"] == "sparse" and f["code"].shape == (10, 10)
