"""Running a user's ``path/to/file.py`` (for ``--model`` and ``--data`` specs) as Python runs a script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


class NotPythonSource(Exception):
    """The file cannot be loaded as Python source (e.g. its name has no loader)."""


def run_file(path: Path, module_name: str) -> ModuleType:
    """Execute ``path`` as the module ``module_name`` (registered in ``sys.modules``) and return it.

    While it runs, the file's folder is first on ``sys.path``, as for ``python path/to/file.py``, so
    the file can import the modules beside it (``from blocks import ResBlock``); those stay imported.
    Whatever the file raises propagates, and the module is then unregistered. ``NotPythonSource`` when
    ``path`` cannot be loaded as Python source at all.
    """
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise NotPythonSource(f"cannot load {path} as Python source")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        if folder in sys.path:  # the first occurrence: the one inserted above
            sys.path.remove(folder)
    return module
