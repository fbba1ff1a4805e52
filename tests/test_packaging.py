"""pyproject.toml declares what twa_tool imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow"}
#: imported but deliberately not declared
UNDECLARED = {
    "timm": "imported only for --model timm:NAME, with an install hint when missing",
    "scipy": "imported only for --data svhn (its .mat files), with an install hint when missing",
    "PIL": "torchvision's image type: data.py hands its transforms the PIL images they take (Image.fromarray "
           "only), so its version is torchvision's choice",
}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in twa_tool/ -> the files that import them."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "twa_tool").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top != "twa_tool":
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_third_party_import_is_declared() -> None:
    """numpy was imported by checkpoints.py, data.py and subspace.py (the exact float64 mean is numpy's) but
    only arrived through torchvision, with no floor of twa's own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}
    imported = third_party_imports()
    assert {"torch", "numpy", "click"} <= set(imported)  # the scan sees imports at all
    missing = {name: sorted(files) for name, files in imported.items()
               if DISTRIBUTION.get(name, name).lower() not in declared and name not in UNDECLARED}
    assert not missing, f"imported by twa_tool but not declared in pyproject.toml: {missing}"
