"""The README's Python section runs as written: its first example is a whole audit from
``import ensattr_fast as ef`` alone, in under 15 lines; the second reaches a building block."""

import re
from pathlib import Path

import pytest

import ensattr_fast as ef

DIGIT_UNITS = 1794  # the 1,797 digits planned one unit per image, their 3 near-duplicate pairs grouped

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_examples() -> list:
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_audit_example_is_short_and_uses_only_the_public_api():
    audit = _python_examples()[0]
    code = [line for line in audit.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code) < 15, len(code)
    imports = [line for line in code if re.match(r"\s*(import|from) ", line)]
    assert imports == ["import ensattr_fast as ef"]
    used = set(re.findall(r"\bef\.(\w+)", audit))
    assert used <= set(ef.__all__), used - set(ef.__all__)


@pytest.mark.slow
def test_the_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    audit, block = _python_examples()
    exec(compile(audit, str(README), "exec"), scope)
    for name in ("plan.h5", "ensemble.pt", "results.h5", "report.png", "report.html"):
        assert (tmp_path / "audit" / name).stat().st_size > 0, name
    assert tuple(scope["samples"].images.shape) == (8, 1, 8, 8)
    assert scope["top"].shape == (4, 10) and (scope["top"] >= 0).all()
    assert tuple(scope["cf"].distances.shape) == (4, 3) and scope["cf"].significant.shape == (4, 3)
    assert tuple(scope["scores"].shape) == (4, DIGIT_UNITS)
    exec(compile(block, str(README), "exec"), scope)
    assert tuple(scope["cf"].images.shape) == (2, 3, 1, 8, 8)
