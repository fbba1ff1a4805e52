"""Running a user's ``path/to/file.py`` (for ``--model`` and ``--data`` specs) as Python runs a script."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


class NotPythonSource(Exception):
    """The file cannot be loaded as Python source (e.g. its name has no loader)."""


#: Prefix of the ``sys.modules`` names of the user's files (``module_name``).
USER_MODULE_PREFIX = "twa_user_"


def module_name(path: Path) -> str:
    """The ``sys.modules`` name ``path`` runs under: one per file (its stem and a digest of its resolved
    path), so a file named by both ``--model`` and ``--data`` is one module, and two files with one stem
    are two."""
    resolved = str(Path(path).resolve())
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    return f"{USER_MODULE_PREFIX}{stem}_{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def _stamp(path: Path) -> str:
    """The digest of the file's bytes (a source file is small; a timestamp can miss a quick rewrite)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_file(path: Path) -> ModuleType:
    """``path`` as a module, run once per process as ``import`` would (``module_name(path)``): the module
    already run is returned while the file is unchanged; a changed file runs again."""
    name, stamp = module_name(path), _stamp(path)
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__twa_stamp__", None) == stamp:
        return module
    module = run_file(path, name)
    module.__twa_stamp__ = stamp  # type: ignore[attr-defined]  # the bytes read before it ran
    return module


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


def pythonpath_hint(missing: str | None, function: str | None = None) -> str:
    """How to make the missing module ``missing`` (a ``ModuleNotFoundError``'s ``name``) importable: twa is an
    installed script, so the current folder is not on its ``sys.path`` as it is for ``python train.py``.
    ``function``: a spec's function name, to suggest ``train.py:FUNCTION`` for a module file in that folder."""
    if not missing:
        return ""
    top = missing.split(".")[0]
    if function is not None and top == missing and Path(f"{top}.py").is_file():
        return (f"{top}.py is in the current folder, which twa does not import from: write {top}.py:{function}, "
                f"or run PYTHONPATH=. twa ...")
    if Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file():
        return f"{top} is in the current folder, which twa does not import from: run PYTHONPATH=. twa ..."
    return f"if {top} is your project's code, put the folder that holds it on PYTHONPATH: PYTHONPATH=DIR twa ..."


def current_folder_hint(missing: str | None, function: str) -> str:
    """For a ``module:function`` spec whose module was not found: ``pythonpath_hint`` when ``missing.py`` sits in
    the current folder (``--model train:make_model`` beside train.py), else "" (the caller's own advice stands)."""
    return pythonpath_hint(missing, function) if missing and Path(f"{missing}.py").is_file() else ""


def missing_file_fix(path: Path, function: str) -> str:
    """Where a ``file.py:function`` spec's missing file was looked for and what to fix: the path of the file that
    defines ``function`` (a relative one is taken from the current folder, which the line names)."""
    where = "" if path.is_absolute() else f" (a relative path is taken from the current folder, {Path.cwd()})"
    return f"check the path of the file that defines {function}{where}"


def missing_function_fix(module: ModuleType, target: str, name: str, returns: str) -> str:
    """What to write instead of ``target:name`` when ``module`` (``target``, a file or module) has no function
    ``name``: the close name it has (``buid`` -> ``build``); else, for the user's file, the functions and classes it
    defines itself, or that it defines none. ``returns``: what the function must return, for the line."""
    value = getattr(module, name, None)
    what = f"{name} there is a value of type {type(value).__name__}, not a function; " if value is not None else ""
    public = [n for n in dir(module) if not n.startswith("_") and n != name and callable(getattr(module, n, None))]
    close = difflib.get_close_matches(name, public, n=1)
    if close:
        return f"{what}did you mean {target}:{close[0]}?"
    if not str(module.__name__).startswith(USER_MODULE_PREFIX):  # an installed module: its names are not ours to list
        return f"{what}check the function's name"
    own = [n for n in public if getattr(getattr(module, n), "__module__", None) == module.__name__]
    if len(own) == 1:
        return f"{what}it defines {own[0]}: write {target}:{own[0]} if that returns {returns}, or define {name} in it"
    if own:
        shown = ", ".join(own[:6]) + (f" and {len(own) - 6} more" if len(own) > 6 else "")
        return (f"{what}it defines {shown}: write {target}:NAME with the one that returns {returns}, or define "
                f"{name} in it")
    return f"{what}it defines no function: define {name} in it, returning {returns}"
