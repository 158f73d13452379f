"""The README's Python example runs as written, from ``import ensattr_fast as ef`` alone,
against the files a (tiny) ``ensattr demo`` run leaves in ``demo/``."""

import re
from pathlib import Path

import pytest

import ensattr_fast as ef
from ensattr_fast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python section holds one example"
    return blocks[0]


def test_the_example_imports_only_the_public_api():
    imports = [line for line in _python_example().splitlines() if re.match(r"\s*(import|from) ", line)]
    assert imports == ["import ensattr_fast as ef"]
    used = set(re.findall(r"\bef\.(\w+)", _python_example()))
    assert used <= set(ef.__all__), used - set(ef.__all__)


@pytest.mark.slow
def test_the_example_runs(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    for argv in (["plan", "--out", demo / "plan.h5", "--members", 16],
                 ["train", "--plan", demo / "plan.h5", "--out", demo / "ensemble.pt", "--steps", 3,
                  "--batch-size", 16, "--hidden", 32, "--blocks", 1],
                 ["sample", "--checkpoint", demo / "ensemble.pt", "--out", demo / "results.h5", "--seeds", 2,
                  "--sampling-steps", 5],
                 ["attribute", "--checkpoint", demo / "ensemble.pt", "--results", demo / "results.h5",
                  "--method", "first_order", "--samples", 2, "--check", 0]):
        assert main([str(a) for a in argv]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_example(), str(README), "exec"), scope)
    assert tuple(scope["cf"].images.shape) == (2, 3, 1, 8, 8)
    assert tuple(scope["top"].scores.shape) == (3, 1797) and tuple(scope["losses"].shape) == (3, 16)
    assert scope["best"].shape == (2,) and (scope["best"] >= 0).all()
    assert "torch.Size([2, 3, 1, 8, 8])" in capsys.readouterr().out
