"""The module layout shows the architecture: imports inside twa_tool flow one way, toward the pure math."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "twa_tool"

#: Each module's layer. A module imports only modules of a lower layer, at the top of the file or inside a
#: function (a function-local import is still an import: it must not dodge a cycle), so the graph has no cycle.
LAYERS: dict[str, int] = {
    # leaves: no twa_tool imports
    "__init__": 0, "errors": 0, "signals": 0, "usercode": 0, "folders": 0, "plots": 0, "report": 0, "subspace": 0,
    "config": 1, "distributed": 1,
    "checkpoints": 2, "models": 2, "data": 2,
    "selection": 3, "writer": 3, "trainer": 3,
    "catalog": 4, "demo": 4,
    "pipeline": 5,  # run_average and the steps the soup reuses
    "soup": 6,
    "cli": 7,
    "entry": 8, "__main__": 9,
}

#: Third-party packages only the user-facing layer may import.
ONLY_IN = {"click": {"cli"}, "rich": {"cli", "report"}}


def imports_of(source: str, module: str) -> list[tuple[str, int]]:
    """(twa_tool module, line) for every import of one in ``source`` (the file of ``module``), wherever it is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "twa_tool"
            if not (node.level or absolute):
                continue
            parts = (node.module or "").split(".")[1 if absolute else 0:]
            if parts and parts[0]:
                found.append((parts[0], node.lineno))
            else:  # ``from . import name``: a submodule, or a name of the package (``__version__``)
                found += [(a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__", node.lineno)
                          for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("twa_tool.")]
    return [(name, line) for name, line in found if name != module]


def third_party_of(source: str) -> set[str]:
    """The top-level packages outside the standard library and twa_tool that ``source`` imports."""
    tops = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops - set(sys.stdlib_module_names) - {"twa_tool"}


def layer_violations(sources: dict[str, str]) -> list[str]:
    problems = []
    for module, source in sorted(sources.items()):
        if module not in LAYERS:
            problems.append(f"twa_tool/{module}.py has no layer: add it to LAYERS in tests/test_architecture.py")
            continue
        for imported, line in imports_of(source, module):
            if LAYERS.get(imported, -1) >= LAYERS[module]:
                problems.append(f"twa_tool/{module}.py:{line} imports {imported} (layer {LAYERS.get(imported)}), not "
                                f"below {module} (layer {LAYERS[module]}): move what it needs down a layer")
    return problems


def package_sources() -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer_and_every_layer_is_a_module() -> None:
    modules = set(package_sources())
    assert modules == set(LAYERS), f"new: {sorted(modules - set(LAYERS))}, gone: {sorted(set(LAYERS) - modules)}"


def test_imports_flow_down_the_layers() -> None:
    assert layer_violations(package_sources()) == []


def test_subspace_is_pure_tensor_math() -> None:
    source = package_sources()["subspace"]
    assert imports_of(source, "subspace") == []
    assert third_party_of(source) <= {"torch", "numpy"}


def test_trainer_reads_no_files_and_builds_no_data() -> None:
    assert {name for name, _ in imports_of(package_sources()["trainer"], "trainer")}.isdisjoint(
        {"checkpoints", "data", "writer", "pipeline"})


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_user_facing_packages_stay_in_the_cli_layer(package: str) -> None:
    users = {module for module, source in package_sources().items() if package in third_party_of(source)}
    assert users <= ONLY_IN[package], f"{package} imported by {sorted(users - ONLY_IN[package])}"


@pytest.mark.parametrize("wrong", [
    ("subspace", "from .pipeline import Event\n"),
    ("checkpoints", "def f() -> None:\n    from .soup import run_soup\n"),  # function-local: still an import
    ("models", "import twa_tool.trainer\n"),
    ("errors", "from twa_tool import cli\n"),
    ("config", "from . import config, writer\n"),
])
def test_an_import_up_the_layers_is_reported(wrong: tuple[str, str]) -> None:
    module, line = wrong
    sources = package_sources()
    sources[module] += "\n" + line
    problems = layer_violations(sources)
    assert len(problems) == 1 and problems[0].startswith(f"twa_tool/{module}.py:"), problems


#: The modules that write to the process's stdout or stderr (README, Layout): the CLI, and the entry's one line for a
#: Ctrl-C while the CLI imports. Every other module returns what it has to say (report.py renders onto the console
#: the CLI hands it).
WRITERS = {"cli", "entry"}


def stream_writes(source: str) -> list[int]:
    """Lines of ``source`` that print or reach for a standard stream: ``print(...)``, ``sys.stdout``/``sys.stderr``,
    ``os.write(...)``, ``click.echo(...)``, a ``Console(...)`` of its own."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if (name, owner) in {("print", ""), ("Console", ""), ("Console", "console"), ("write", "os"),
                                 ("echo", "click"), ("secho", "click")}:
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__") \
                and isinstance(node.value, ast.Name) and node.value.id == "sys":
            lines.append(node.lineno)
    return lines


def test_only_the_cli_writes_to_the_terminal() -> None:
    found = {module: lines for module, source in package_sources().items() if (lines := stream_writes(source))}
    assert set(found) == WRITERS, {module: lines for module, lines in found.items() if module not in WRITERS}


def test_a_print_outside_the_cli_is_reported() -> None:
    assert stream_writes("def f() -> None:\n    print('x')\n") == [2]
    assert stream_writes("import sys\nsys.stderr.write('x')\n") == [2]
    assert stream_writes("from rich.console import Console\nc = Console(stderr=True)\n") == [2]
    assert stream_writes("def f(console):\n    console.print('x')\n") == []  # rendering onto the CLI's console
