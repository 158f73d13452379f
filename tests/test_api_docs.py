"""docs/api.md lists the whole public face, and is what docs/make_api.py writes from the
docstrings and option fields now (run ``python docs/make_api.py`` after changing either)."""

import importlib.util
from pathlib import Path

import ensattr_fast as ef

ROOT = Path(__file__).resolve().parents[1]


def _maker():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_section_once():
    listed = [name for names in _maker().SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(ef.__all__), set(listed) ^ set(ef.__all__)


def test_the_page_is_current():
    assert (ROOT / "docs" / "api.md").read_text() == _maker().render(), "run: python docs/make_api.py"


def test_every_public_name_and_option_says_what_it_is():
    text = _maker().render()
    assert "`: \n" not in text and ": \n" not in text  # a method without a docstring
    assert "| |" not in text  # an option without help
