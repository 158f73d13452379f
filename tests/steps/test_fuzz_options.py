"""A fuzzer of every command's options: whatever values it draws (negative, zero, huge, NaN,
wrong types, duplicates, paths onto inputs or folders), a command exits 0 or 2, prints one line
and no traceback when it refuses, changes no input, and leaves no partial output behind."""

import contextlib
import hashlib
import io
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ensattr_fast.cli.main as cli_main
from ensattr_fast.cli.main import main

NUMBERS = ["-1", "0", "1", "2", str(10**30), str(2**63), "nan", "inf", "-inf", "1.5", "x", "", "1,1", "3:1", "true"]
PRECISIONS = ["bf16", "fp16", "tf32", "fp64", "half", "", "1"]
PATHS = ["{results}", "{plan}", "{checkpoint}", "{dir}", "{dir}/new/out.h5", "/proc/forbidden/out.h5",
         "{dir}/missing.h5"]

# command -> (arguments that make a cheap valid run, {option: kinds of values to draw})
COMMANDS = {
    "plan": (["--out", "{dir}/p.h5", "--data", "{data}", "--members", "8"],
             {"--out": PATHS, "--members": NUMBERS, "--seed": NUMBERS, "--excluders": NUMBERS,
              "--design": ["auto", "sparse", "nope", "1"], "--units": ["class", "group", "1"],
              "--resolution": NUMBERS, "--memory-budget": NUMBERS}),
    "train": (["--plan", "{plan}", "--out", "{dir}/e.pt", "--steps", "2", "--hidden", "8", "--blocks", "1",
               "--batch-size", "4"],
              {"--steps": NUMBERS, "--batch-size": NUMBERS, "--lr": NUMBERS, "--ema": NUMBERS, "--seed": NUMBERS,
               "--hidden": NUMBERS, "--blocks": NUMBERS, "--checkpoint-every": NUMBERS, "--out": PATHS,
               "--plan": PATHS, "--mode": ["solo", "masked_batch", "1"], "--precision": PRECISIONS,
               "--members-per-pass": NUMBERS, "--models": NUMBERS, "--warmup": NUMBERS,
               "--lr-final-fraction": NUMBERS, "--base": PATHS, "--rank": NUMBERS}),
    "sample": (["--checkpoint", "{checkpoint}", "--out", "{dir}/s.h5", "--seeds", "2", "--sampling-steps", "2"],
               {"--seeds": NUMBERS + ["0:3", "2**63", "5,1,5"], "--sampling-steps": NUMBERS, "--eta": NUMBERS,
                "--chunk": NUMBERS, "--out": PATHS, "--checkpoint": PATHS, "--precision": PRECISIONS,
                "--members-per-pass": NUMBERS}),
    "ablate": (["--checkpoint", "{checkpoint}", "--results", "{results}", "--units", "0,1", "--overwrite"],
               {"--units": NUMBERS + ["0,99", "-1", "0,0"], "--nearest": NUMBERS, "--samples": NUMBERS,
                "--results": PATHS, "--phantoms": NUMBERS, "--alpha": NUMBERS}),
    "audit": (["--checkpoint", "{checkpoint}", "--results", "{results}", "--samples", "2", "--overwrite"],
              {"--samples": NUMBERS, "--top-groups": NUMBERS, "--examples": NUMBERS, "--phantoms": NUMBERS,
               "--alpha": NUMBERS, "--method": ["loss", "dtrak", "1"], "--results": PATHS}),
    "attribute": (["--checkpoint", "{checkpoint}", "--results", "{results}", "--method", "loss", "--draws", "2",
                   "--check", "1", "--overwrite"],
                  {"--samples": NUMBERS, "--topk": NUMBERS, "--block-rows": NUMBERS, "--block-units": NUMBERS,
                   "--draws": NUMBERS, "--check": NUMBERS, "--method": ["loss,loss", "nope", "", "1"],
                   "--results": PATHS, "--phantoms": NUMBERS, "--alpha": NUMBERS}),
    "metrics": (["--results", "{results}"],
                {"--samples": NUMBERS, "--json": PATHS, "--results": PATHS}),
    "lds": (["--checkpoint", "{checkpoint}", "--results", "{results}", "--references", "{dir}/refs.pt",
             "--halves", "2", "--seeds", "1", "--steps", "1", "--draws", "2"],
            {"--halves": NUMBERS, "--seeds": NUMBERS, "--steps": NUMBERS, "--draws": NUMBERS, "--samples": NUMBERS,
             "--references": PATHS, "--json": PATHS}),
    "memorization": (["--checkpoint", "{checkpoint}", "--out", "{dir}/m.h5", "--seeds", "2", "--sampling-steps", "2",
                      "--phantoms", "2"],
                     {"--generator": ["full", "member:0", "member:99", "members:0,0", "members:", "x", "member:-1"],
                      "--threshold": NUMBERS, "--seeds": NUMBERS, "--phantoms": NUMBERS, "--out": PATHS,
                      "--checkpoint": PATHS, "--generator-checkpoint": PATHS}),
    "report": (["--results", "{results}", "--out", "{dir}/r.png"],
               {"--rows": NUMBERS, "--out": PATHS, "--results": PATHS}),
    "demo": (["--out", "{dir}/demo", "--steps", "2"],
             {"--members": NUMBERS, "--samples": NUMBERS, "--attribute": NUMBERS, "--per-sample": NUMBERS,
              "--steps": NUMBERS, "--lr": NUMBERS, "--sampling-steps": NUMBERS, "--units": ["class", "group"]}),
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    np.save(d / "toy.npy", np.random.default_rng(5).integers(0, 255, (40, 1, 8, 8), dtype=np.uint8))
    for argv in (["plan", "--out", d / "plan.h5", "--data", d / "toy.npy", "--members", 8],
                 ["train", "--plan", d / "plan.h5", "--out", d / "ensemble.pt", "--steps", 2, "--hidden", 8,
                  "--blocks", 1, "--batch-size", 4],
                 ["sample", "--checkpoint", d / "ensemble.pt", "--out", d / "results.h5", "--seeds", 3,
                  "--sampling-steps", 2],
                 ["ablate", "--checkpoint", d / "ensemble.pt", "--results", d / "results.h5", "--units", "0,1"]):
        assert main([str(a) for a in argv]) == 0
    return d


def _argv(command: str, drawn: dict, where: Path) -> list:
    base, _ = COMMANDS[command]
    argv = list(base)
    for option, value in drawn.items():
        if option in argv:
            at = argv.index(option)
            argv[at : at + 2] = [option, value]
        else:
            argv += [option, value]
    names = dict(dir=where, data=where / "toy.npy", plan=where / "plan.h5", checkpoint=where / "ensemble.pt",
                 results=where / "results.h5")
    return [command] + [a.format(**names) if isinstance(a, str) else a for a in argv]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_bad_options_cleanly(inputs, command):
    options = COMMANDS[command][1]
    draw = st.dictionaries(st.sampled_from(sorted(options)), st.just(None), min_size=1, max_size=2).flatmap(
        lambda chosen: st.fixed_dictionaries({o: st.sampled_from(options[o]) for o in chosen}))

    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(draw)
    def check(drawn):
        where = Path(tempfile.mkdtemp(dir=inputs))
        try:
            for name in ("toy.npy", "plan.h5", "ensemble.pt", "results.h5"):
                shutil.copy(inputs / name, where / name)
            before = {p.name: digest(p) for p in where.iterdir()}
            argv = _argv(command, drawn, where)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                    mock.patch.object(cli_main, "demo", lambda *a, **k: {}):
                code = main(argv)  # any exception but a refusal propagates: a traceback fails the test
            message = err.getvalue()
            assert code in (0, 2), (argv, code, message)
            assert "Traceback" not in message, (argv, message)
            after = {p.name: digest(p) for p in where.iterdir() if p.name in before}
            if code == 2:
                assert message.startswith(f"ensattr {command}: error: ") and message.count("\n") == 1, (argv, message)
                assert after == before, (argv, "an input changed")
                assert sorted(p.name for p in where.iterdir()) == sorted(before), (argv, "partial output")
            else:  # only the steps that add to a results file change it; no other input changes
                allowed = {"results.h5"} if command in {"ablate", "audit", "attribute", "metrics", "lds"} else set()
                changed = [n for n in before if after.get(n) != before[n] and n not in allowed]
                assert not changed, (argv, changed)
        finally:
            shutil.rmtree(where, ignore_errors=True)

    check()
