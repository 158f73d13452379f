"""The rules the package's layout keeps, read from its own source (ast), with the layers in the
order that docs/architecture.md states: no import cycles; every import goes to a lower layer
(or stays inside its own subpackage); h5py only in the store and the disk reader; small
modules."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ensattr_fast"
MAX_LINES = 300
#: modules allowed past MAX_LINES, and why (docs/architecture.md says so too)
LONG_MODULES = {
    "ensattr_fast.ops": "the typed face of all three kernels with their fake kernels and autograd, "
                        "one file as in the extension-cpp layout the project follows",
}
H5PY_ALLOWED = ("ensattr_fast.store", "ensattr_fast.data.disk")


def _modules():
    """module name -> path, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(imported module of the package or external top-level name, line) of module ``name``."""
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from . import codes` imports the module codes
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    yield sub, node.lineno
                elif not list(PACKAGE.glob(f"{alias.name}.*.so")):  # the compiled library is below all
                    yield target, node.lineno


def _internal_graph():
    graph = defaultdict(set)
    for name in MODULES:
        for target, _ in _imports(name):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _unit(name: str) -> str:
    """The part of the package a module belongs to: ``data`` for ensattr_fast.data.disk."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layers():
    """unit -> layer number, from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layers = {}
    for number, cells in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", text, flags=re.M):
        for unit in re.findall(r"`([\w.]+)`", cells):
            layers[unit.strip("/").removesuffix(".py")] = int(number)
    return layers


def test_docs_name_a_layer_for_every_part_of_the_package():
    layers = _layers()
    assert layers, "docs/architecture.md has no layer table"
    missing = sorted({_unit(name) for name in MODULES} - set(layers))
    assert not missing, f"docs/architecture.md gives no layer to {missing}"


def test_layers_import_only_downwards():
    layers, wrong = _layers(), []
    for name, targets in _internal_graph().items():
        for target in targets:
            a, b = _unit(name), _unit(target)
            if a != b and layers[b] >= layers[a]:
                wrong.append(f"{name} (layer {layers[a]}) imports {target} (layer {layers[b]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph, state, cycles = _internal_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_h5py_only_in_the_store_and_the_disk_reader():
    users = sorted(name for name in MODULES if any(t.split(".")[0] == "h5py" for t, _ in _imports(name)))
    assert users and all(u.startswith(H5PY_ALLOWED) for u in users), users


def test_modules_are_small():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    long = {name: n for name, n in long.items() if n > MAX_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_cited_design_document_exists():
    cited = defaultdict(list)
    for name, path in MODULES.items():
        for doc in re.findall(r"\b([\w/.-]+\.md)\b", path.read_text()):
            cited[doc].append(name)
    for doc, where in cited.items():
        assert (ROOT / doc).exists() or (PACKAGE / doc).exists(), f"{doc}, cited by {where}, does not exist"
    headings = (ROOT / "docs" / "method.md").read_text()
    for name, path in MODULES.items():
        for section in re.findall(r'docs/method\.md, "([^"]+)"', path.read_text()):
            assert re.search(rf"^#+ {re.escape(section)}", headings, flags=re.M), f"{name} cites {section!r}"


def test_the_rules_can_fail():
    # the checks above read real imports: a module importing upwards is seen as doing so
    assert "ensattr_fast.audit" in {t for t, _ in _imports("ensattr_fast.cli.main")}
    assert "ensattr_fast.codes" in {t for t, _ in _imports("ensattr_fast.store.reads")}
