"""Bad input gives one clear error and leaves the files it was given as they were (issue 5).

Each test is one kind of bad input: the library raises one of its own errors (CodeError,
DataError, CheckpointError, StoreError) whose message names the problem, ``ensattr`` turns
it into one line ``ensattr <cmd>: error: ...`` and exit code 2, and every plan, checkpoint
and results file that existed before is byte for byte unchanged afterwards.

The runs are tiny: a toy data set of 40 images of 1 x 4 x 4 registered as ``toy``, 8 members,
2 training steps, 2 sampling steps.
"""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import requires_cuda

from ensattr_fast import codes
from ensattr_fast.attribution import group_code, member_losses
from ensattr_fast.cli.main import main
from ensattr_fast.data import DATASETS, DataError, Dataset
from ensattr_fast.diffusion.sampling import ablation_weights
from ensattr_fast.diffusion.schedules import NoiseSchedule
from ensattr_fast.members import StackedMLP
from ensattr_fast.ops import code_scores, ensemble_step, masked_member_mse
from ensattr_fast.store import ResultsWriter

N, SHAPE = 40, (1, 4, 4)
TRAIN = ["--steps", "2", "--hidden", "8", "--blocks", "1", "--batch-size", "4"]


def toy_images(n=N, shape=SHAPE, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def toy() -> Dataset:
    return Dataset(toy_images(), torch.arange(N) % 4, name="toy")


def with_nan() -> Dataset:
    images = toy_images()
    images[7, 0, 1, 2] = float("nan")
    return Dataset(images, name="with_nan")


def blank() -> Dataset:
    return Dataset(torch.zeros(0, *SHAPE), name="blank")


def ensattr(*argv) -> int:
    return main([str(a) for a in argv])


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """plan.h5, ensemble.pt, results.h5 (samples and counterfactuals) of the toy data set, and
    other_plan.h5, other.pt: an ensemble of the same data under another code."""
    d = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as patch:
        for name, load in (("toy", toy), ("with_nan", with_nan), ("blank", blank)):
            patch.setitem(DATASETS, name, load)
        for prefix, seed, checkpoint in (("", 0, "ensemble.pt"), ("other_", 1, "other.pt")):
            assert ensattr("plan", "--out", d / f"{prefix}plan.h5", "--data", "toy", "--members", 8,
                           "--seed", seed) == 0
            assert ensattr("train", "--plan", d / f"{prefix}plan.h5", "--out", d / checkpoint, *TRAIN) == 0
        assert ensattr("sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5",
                       "--seeds", 3, "--sampling-steps", 2) == 0
        assert ensattr("ablate", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5",
                       "--units", "0,1") == 0
        yield d


@pytest.fixture
def files(run, tmp_path):
    """Fresh copies of the run's files, for tests that damage or edit them."""
    for name in ("plan.h5", "ensemble.pt", "results.h5", "other.pt"):
        shutil.copy(run / name, tmp_path / name)
    return tmp_path


def fails(capsys, argv, *keep) -> str:
    """Run ``ensattr argv``: exit code 2, one error line naming the command, the files ``keep``
    byte for byte unchanged. Returns the message."""
    before = {path: digest(path) for path in keep}
    assert ensattr(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ensattr {argv[0]}: error: ") and len(err.splitlines()) == 1, err
    for path in keep:
        assert digest(path) == before[path], f"{path.name} changed"
    return err


# the steps that read a results file r, with the checkpoint ensemble.pt of directory d
COMMANDS = {
    "ablate": lambda d, r: ["ablate", "--checkpoint", d / "ensemble.pt", "--results", r, "--units", 1,
                            "--overwrite"],
    "ablate --nearest": lambda d, r: ["ablate", "--checkpoint", d / "ensemble.pt", "--results", r, "--nearest", 1,
                                      "--overwrite"],
    "attribute": lambda d, r: ["attribute", "--checkpoint", d / "ensemble.pt", "--results", r, "--samples", 2,
                               "--draws", 2, "--check", 1, "--overwrite"],
    "metrics": lambda d, r: ["metrics", "--results", r, "--checkpoint", d / "ensemble.pt"],
    "report": lambda d, r: ["report", "--results", r, "--out", d / "report.png"],
    "lds": lambda d, r: ["lds", "--checkpoint", d / "ensemble.pt", "--results", r,
                         "--references", d / "refs.pt", "--halves", 2, "--steps", 1],
    "sample --resume": lambda d, r: ["sample", "--checkpoint", d / "ensemble.pt", "--out", r, "--resume",
                                     "--seeds", 3],
}


def write_plan(path, code, unit_of, dataset="toy"):
    """A plan file of any code and units, as ``ensattr plan`` writes it."""
    with ResultsWriter(path, "w") as writer:
        writer.write_code(code, unit_of, [str(u) for u in range(len(code))])
        writer.set_attrs(plan=dict(dataset=dataset, units="example", members=code.shape[1]))


def edit_dataset(path, name, value) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        f[name] = value


def losses_of(queries):
    """``member_losses`` of a small untrained ensemble on ``queries``."""
    return member_losses(StackedMLP(4, SHAPE, hidden=8, blocks=1), NoiseSchedule.linear(50), queries, draws=2)


# ---------------------------------------------------------------- 1. images of the wrong shape
# (Trainer fed data of another shape: tests/test_training.py::test_trainer_rejects_mismatched_inputs)


@pytest.mark.parametrize("shape", [(3, 4, 4), (1, 8, 8)], ids=["channels", "size"])
def test_query_images_of_another_shape_are_refused(shape):
    with pytest.raises(DataError, match=r"query images have shape \[C, H, W\] = .*, expected \[1, 4, 4\]"):
        losses_of(toy_images(2, shape))


@pytest.mark.parametrize("command", ["ablate", "ablate --nearest", "attribute", "metrics"])
def test_results_with_samples_of_another_shape_are_refused(files, capsys, command):
    results = files / "results.h5"
    edit_dataset(results, "samples/images", toy_images(3, (3, 4, 4)).numpy())
    err = fails(capsys, COMMANDS[command](files, results), results, files / "ensemble.pt")
    assert "samples" in err and "have shape [C, H, W] = [3, 4, 4], expected [1, 4, 4]" in err


def test_resume_with_another_architecture_is_refused(files, capsys):
    checkpoint = files / "ensemble.pt"
    err = fails(capsys, ["train", "--plan", files / "plan.h5", "--out", checkpoint, "--resume",
                         *TRAIN[:2], "--hidden", 16, "--blocks", 1], checkpoint)
    assert "another architecture (hidden 8 there, 16 here)" in err


# ---------------------------------------------------------------------- 2. NaN or Inf in data


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_training_data_and_queries_with_nan_or_inf_are_refused(bad):
    images = toy_images()
    images[5, 0, 2, 3] = bad
    with pytest.raises(DataError, match=r"toy holds NaN or Inf values \(first in image 5\)"):
        Dataset(images, name="toy")
    with pytest.raises(DataError, match=r"query images holds NaN or Inf values \(first in image 5\)"):
        losses_of(images)


def test_plan_on_data_with_nan_is_refused(files, capsys):
    plan = files / "plan.h5"
    err = fails(capsys, ["plan", "--out", plan, "--data", "with_nan", "--overwrite"], plan)
    assert "with_nan holds NaN or Inf values (first in image 7)" in err


@pytest.mark.parametrize("command", ["ablate", "attribute"])
def test_results_with_nan_samples_are_refused(files, capsys, command):
    results = files / "results.h5"
    with h5py.File(results, "r") as f:
        samples = f["samples/images"][()]
    samples[1, 0, 0, 0] = np.nan
    edit_dataset(results, "samples/images", samples)
    err = fails(capsys, COMMANDS[command](files, results), results)
    assert "holds NaN or Inf values (first in image 1)" in err


# ------------------------------------------------------ 3. a plan that does not fit the data set


def test_plan_of_another_number_of_examples_is_refused(files, capsys):
    write_plan(files / "short.h5", codes.balanced_constant_weight(30, 8, seed=0), torch.arange(30))
    err = fails(capsys, ["train", "--plan", files / "short.h5", "--out", files / "fresh.pt", *TRAIN],
                files / "short.h5", files / "ensemble.pt")
    assert "the plan maps 30 examples but toy has 40" in err


def test_results_whose_units_do_not_fit_the_data_set_are_refused(files, capsys):
    results = files / "results.h5"
    edit_dataset(results, "units/of_example", np.arange(30, dtype=np.int64))
    err = fails(capsys, ["ablate", "--checkpoint", files / "ensemble.pt", "--results", results,
                         "--nearest", 1, "--overwrite"], results)
    assert "the units map 30 examples but toy has 40" in err


# ----------------------------------------------------------- 4. an odd number of members
# Constant-weight designs (balanced, random: every unit seen by M/2 members and excluded by the
# other M/2) need M even; sparse exclusion (few large units) does not.
# (codes.balanced_constant_weight(10, 15): tests/test_codes.py::test_errors_name_the_problem)


@pytest.mark.parametrize("members,design", [(7, "auto"), (7, "random"), (1, "balanced")])
def test_odd_members_for_a_constant_weight_design_are_refused(files, capsys, members, design):
    plan = files / "plan.h5"
    err = fails(capsys, ["plan", "--out", plan, "--data", "toy", "--members", members, "--design", design,
                         "--overwrite"], plan)
    assert "constant-weight codes need an even number of members >= 2" in err and f"got M = {members}" in err
    # the design that does not need it takes the same odd M
    assert ensattr("plan", "--out", files / "classes.h5", "--data", "toy", "--units", "class",
                   "--members", 7) == 0


# ----------------------------------------------- 5. a unit no member excludes, or none sees
# (codes.validate alone: tests/test_codes.py::test_errors_name_the_problem)


@pytest.mark.parametrize("edit,message", [
    (lambda code: code[3].fill_(1), "unit 3 has no excluder: every member trains on it, so no ablation can remove it"),
    (lambda code: code[3].fill_(0), "unit 3 is seen by no member"),
    (lambda code: code[:, 0].fill_(0), "member 0 trains on no example"),
], ids=["no excluder", "no includer", "member without data"])
def test_plans_without_excluders_or_includers_are_refused(files, capsys, edit, message):
    code = codes.balanced_constant_weight(N, 8, seed=0)
    edit(code)
    write_plan(files / "bad.h5", code, torch.arange(N))
    err = fails(capsys, ["train", "--plan", files / "bad.h5", "--out", files / "fresh.pt", *TRAIN],
                files / "bad.h5", files / "ensemble.pt")
    assert message in err


def test_ablating_a_set_no_member_excludes_is_refused():
    code = codes.balanced_constant_weight(N, 8, seed=0)
    with pytest.raises(codes.CodeError, match="leaves no member: every member trained on at least one of them"):
        ablation_weights(code, [list(range(N))])


# ------------------------------------------------- 6. a truncated or corrupt checkpoint
# (Checkpoint.load of a truncated, missing or foreign file: tests/test_training.py)


def _damage_checkpoint(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "flipped bytes":  # inside the weights: torch.load alone would not notice
        middle = len(data) // 2
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
        path.write_bytes(bytes(data))
    else:  # edited: a payload torch.load reads, but not one of ours any more
        payload = torch.load(path, weights_only=True)
        if how == "spec not JSON":
            payload["spec"] = "{hidden: 8"
        elif how == "missing code":
            del payload["code"]
        elif how == "weights of another shape":
            payload["ema"] = None
            payload["ensemble"] = {k: v[:, :1] for k, v in payload["ensemble"].items()}
        torch.save(payload, path)


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated, corrupt, or not an ensattr_fast checkpoint"),
    ("random bytes", "truncated, corrupt, or not an ensattr_fast checkpoint"),
    ("flipped bytes", "fails its CRC-32 check"),
    ("spec not JSON", "is incomplete or corrupt (JSONDecodeError"),
    ("missing code", "is incomplete or corrupt (TypeError"),
    ("weights of another shape", "weights do not fit its architecture"),
])
@pytest.mark.parametrize("command", ["sample", "ablate", "train --resume"])
def test_damaged_checkpoints_are_refused(files, capsys, how, message, command):
    checkpoint, results = files / "ensemble.pt", files / "results.h5"
    _damage_checkpoint(checkpoint, how)
    argv = {"sample": ["sample", "--checkpoint", checkpoint, "--out", results, "--overwrite", "--seeds", 2],
            "ablate": ["ablate", "--checkpoint", checkpoint, "--results", results, "--units", 1, "--overwrite"],
            "train --resume": ["train", "--plan", files / "plan.h5", "--out", checkpoint, "--resume", *TRAIN]}
    err = fails(capsys, argv[command], checkpoint, results)
    assert message in err


# ------------------------------------------------- 7. a truncated or corrupt HDF5 file


def _damage_hdf5(path, how, run):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(20_000))
    else:  # a plan file where a results file belongs: sound HDF5 without samples
        shutil.copy(run / "plan.h5", path)


@pytest.mark.parametrize("how", ["truncated", "random bytes", "a plan file"])
@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "ablate --nearest"])
def test_damaged_results_files_are_refused(run, files, capsys, how, command):
    results = files / "results.h5"
    _damage_hdf5(results, how, run)
    err = fails(capsys, COMMANDS[command](files, results), results, files / "ensemble.pt")
    if how == "a plan file":
        assert any(phrase in err for phrase in ("has no /samples", "is incomplete or damaged",
                                                "holds no interrupted sampling to resume")), err
    else:  # sample --resume too, which opens the file to append
        assert f"{results} cannot be read" in err and "missing, truncated or not HDF5" in err
    assert not (files / "report.png").exists() and not (files / "refs.pt").exists()


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_damaged_plan_files_are_refused(files, capsys, how, run):
    plan = files / "plan.h5"
    _damage_hdf5(plan, how, run)
    err = fails(capsys, ["train", "--plan", plan, "--out", files / "fresh.pt", *TRAIN], plan, files / "ensemble.pt")
    assert "is not a readable plan file" in err


def test_report_before_ablate_names_the_missing_step(files, capsys):
    results = files / "results.h5"
    with h5py.File(results, "a") as f:
        del f["counterfactuals"]
    err = fails(capsys, ["report", "--results", results, "--out", files / "r.png"], results)
    assert "has no /counterfactuals (written by `ensattr ablate or attribute`)" in err


# ------------------------------------------------- 8. results of another ensemble
# (ResultsWriter.check_code and InfluenceStream specs: tests/test_store.py)


@pytest.mark.parametrize("command", ["ablate", "attribute", "metrics"])
def test_results_of_another_ensemble_are_refused(files, capsys, command):
    results = files / "results.h5"
    argv = COMMANDS[command](files, results)
    argv[argv.index(files / "ensemble.pt")] = files / "other.pt"
    err = fails(capsys, argv, results, files / "other.pt")
    assert f"{results} holds results of another ensemble than {files / 'other.pt'}" in err


def test_resume_from_a_checkpoint_of_another_plan_is_refused(files, capsys):
    err = fails(capsys, ["train", "--plan", files / "plan.h5", "--out", files / "other.pt", "--resume", *TRAIN],
                files / "plan.h5", files / "other.pt")
    assert "the checkpoint was trained under another code" in err


# ------------------------------------------------------------------- 9. an empty data set


def test_empty_data_is_refused(files, capsys):
    with pytest.raises(DataError, match="toy is empty"):
        Dataset(torch.zeros(0, *SHAPE), name="toy")
    plan = files / "plan.h5"
    err = fails(capsys, ["plan", "--out", plan, "--data", "blank", "--overwrite"], plan)
    assert "blank is empty" in err


def test_sampling_no_seeds_is_refused(files, capsys):
    results = files / "results.h5"
    err = fails(capsys, ["sample", "--checkpoint", files / "ensemble.pt", "--out", results, "--seeds", 0,
                         "--overwrite"], results)
    assert "no seeds to sample" in err


# ---------------------------------------------------------------- 10. unit ids out of range


@pytest.mark.parametrize("units", ["99999", "0,40", "-5"])
def test_ablating_units_out_of_range_is_refused(files, capsys, units):
    results = files / "results.h5"
    err = fails(capsys, ["ablate", "--checkpoint", files / "ensemble.pt", "--results", results,
                         f"--units={units}", "--overwrite"], results)
    bad = [u for u in units.split(",") if not 0 <= int(u) < N][0]
    assert f"unit {bad} is out of range, the code has 40 units" in err


@pytest.mark.parametrize("groups,message", [
    ({"pair": [0, 1], "far": [2, 99999]}, "group 'far': unit 99999 is out of range"),
    ({"negative": [-3]}, "group 'negative': unit -3 is out of range"),
    ([[0, 1]], "must map names to lists of unit ids"),
    ({"a": "0,1,x"}, "must be a non-empty list of unit ids"),
])
def test_groups_with_units_out_of_range_are_refused(files, capsys, groups, message):
    results = files / "results.h5"
    (files / "groups.json").write_text(json.dumps(groups))
    err = fails(capsys, ["attribute", "--checkpoint", files / "ensemble.pt", "--results", results,
                         "--samples", 2, "--draws", 2, "--check", 0, "--groups", files / "groups.json"], results)
    assert message in err


def test_example_units_out_of_range_are_refused(files, capsys):
    unit_of = torch.arange(N)
    unit_of[4] = N  # one past the last unit
    write_plan(files / "bad.h5", codes.balanced_constant_weight(N, 8, seed=0), unit_of)
    err = fails(capsys, ["train", "--plan", files / "bad.h5", "--out", files / "fresh.pt", *TRAIN],
                files / "bad.h5", files / "ensemble.pt")
    assert "is damaged: /units/of_example names units outside [0, 40)" in err


def test_library_unit_ids_out_of_range_are_refused():
    code = codes.balanced_constant_weight(N, 8, seed=0)
    with pytest.raises(codes.CodeError, match="group 1: unit 40 is out of range"):
        group_code(code, [[0], [1, 40]])
    with pytest.raises(codes.CodeError, match="group 0: unit -1 is out of range"):
        group_code(code, [[-1]])  # would index the last unit
    with pytest.raises(codes.CodeError, match="unit 40 is out of range"):
        ablation_weights(code, [[40]])
    with pytest.raises(codes.CodeError, match="unit 41 is out of range"):
        codes.validate(code, unit_of=torch.tensor([0, 41]))


# ------------------------------------------------------- 11. a CPU tensor among CUDA tensors


@requires_cuda
@pytest.mark.parametrize("op", ["masked_member_mse", "ensemble_step", "code_scores"])
def test_a_cpu_tensor_among_cuda_tensors_names_the_device(op):
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match=r"is on cpu but the other inputs are on cuda"):
        if op == "masked_member_mse":
            masked_member_mse(torch.randn(2, 3, 4, device=cuda), torch.randn(2, 3, 4))
        elif op == "ensemble_step":
            x = torch.randn(2, 3, device=cuda)
            ensemble_step(torch.randn(2, 3, device=cuda), x, torch.tensor([0, 1, 2], device=cuda),
                          torch.tensor([0, 1]), torch.full((2,), 1.0, device=cuda),
                          coefficients=(1.0, 0.0, 1.0, 0.0, 0.0))
        else:
            code_scores(codes.balanced_constant_weight(6, 4).to(cuda), losses=torch.rand(3, 4))


@pytest.mark.parametrize("where", ["counterfactuals/units"])
def test_unit_indices_a_damaged_file_garbles_are_one_line(files, capsys, where):
    """Raw data carries no checksum: a flipped bit in a unit index reads back as a number. The
    reader that looks it up refuses the file in one line, not with an IndexError."""
    with h5py.File(files / "results.h5", "a") as f:
        units = f[where][()]
        units.flat[0] = 1 << 20
        f[where][...] = units
    err = fails(capsys, ["report", "--results", files / "results.h5", "--out", files / "report.png"],
                files / "results.h5")
    assert "names units outside" in err and not (files / "report.png").exists()


def test_a_group_whose_links_a_damaged_file_garbles_is_one_line(files, capsys, monkeypatch):
    """h5py reports a damaged group's links as a RuntimeError ("Link iteration failed (incorrect
    metadata checksum ...)"), met by the report of a results file with one bit flipped."""
    import ensattr_fast.cli.main as cli_main

    def damaged(audit, options, out):
        raise RuntimeError("Link iteration failed (incorrect metadata checksum after all read attempts)")

    monkeypatch.setitem(cli_main.COMMANDS, "report", damaged)
    err = fails(capsys, ["report", "--results", files / "results.h5", "--out", files / "report.png"])
    assert "an input HDF5 file is damaged (Link iteration failed" in err
    monkeypatch.setitem(cli_main.COMMANDS, "report", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # a fault of the package is not hidden as damage
        ensattr("report", "--results", files / "results.h5", "--out", files / "report.png")
