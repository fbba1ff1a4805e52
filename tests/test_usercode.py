"""A user's file.py, named by --model and --data, runs once per process, as `import` would run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_ARGS
from safetensors.torch import save_file

from twa_tool.cli import cli
from twa_tool.data import build_data
from twa_tool.models import build_model, load_callable
from twa_tool.usercode import load_file, module_name

USER_FILE = '''
import os
import torch
from twa_tool.models import build_model

with open(os.environ["TWA_TEST_COUNT"], "a") as f:
    f.write("ran\\n")

def make():
    return build_model("twa:cnn", {args!r})

def data():
    g = torch.Generator().manual_seed(0)
    split = lambda n: torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g),
                                                     torch.randint(0, 10, (n,), generator=g))
    return split(64), split(32)
'''


def write_user_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "user.py"
    path.write_text(USER_FILE.format(args=TINY_ARGS))
    return path


def test_a_file_named_by_model_and_data_runs_once(tmp_path: Path, monkeypatch) -> None:
    count = tmp_path / "count"
    monkeypatch.setenv("TWA_TEST_COUNT", str(count))
    path = write_user_file(tmp_path / "code")
    model = build_model("twa:cnn", TINY_ARGS)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(3):
        for p in model.parameters():
            p.data.add_(0.01 * (i + 1))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpts / f"{i}.safetensors")
    result = CliRunner().invoke(cli, ["average", str(ckpts), "--model", f"{path}:make", "--data", f"{path}:data",
                                      "--epochs", "1", "--baselines", "none", "--out", str(tmp_path / "o"), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert count.read_text() == "ran\n"  # before: "ran\nran\n" (once as the model's module, once as the data's)


def test_the_same_file_is_one_module_and_a_changed_file_runs_again(tmp_path: Path, monkeypatch) -> None:
    count = tmp_path / "count"
    monkeypatch.setenv("TWA_TEST_COUNT", str(count))
    path = write_user_file(tmp_path / "a")
    first = load_file(path)
    assert load_callable(f"{path}:make", "--model").__module__ == first.__name__ == module_name(path)
    assert len(build_data(f"{path}:data").train) == 64
    assert count.read_text() == "ran\n"
    path.write_text(path.read_text() + "\nEXTRA = 1\n")
    assert load_file(path).EXTRA == 1 and count.read_text() == "ran\nran\n"


def test_two_files_with_one_stem_are_two_modules(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TWA_TEST_COUNT", str(tmp_path / "count"))
    a, b = write_user_file(tmp_path / "a"), write_user_file(tmp_path / "b")
    b.write_text(b.read_text() + "\nWHICH = 'b'\n")
    assert module_name(a) != module_name(b)
    assert not hasattr(load_file(a), "WHICH") and load_file(b).WHICH == "b"
    assert not hasattr(load_file(a), "WHICH")  # a's module was not replaced by b's


def test_spawned_workers_rerun_data_files_only(tmp_path: Path, monkeypatch) -> None:
    """A DataLoader worker started by spawn runs the --data files again (their classes live there); a file only
    --model named is not among them (running it again in every worker would be wasted, or worse)."""
    from twa_tool.data import WorkerDataset

    monkeypatch.setenv("TWA_TEST_COUNT", str(tmp_path / "count"))
    model_file = write_user_file(tmp_path / "m")
    data_file = write_user_file(tmp_path / "d")
    load_callable(f"{model_file}:make", "--model")
    build_data(f"{data_file}:data")
    files = dict(WorkerDataset(torch.utils.data.TensorDataset(torch.zeros(1))).files)
    assert files.get(module_name(data_file)) == str(data_file)
    assert module_name(model_file) not in files


#: A --model or --data spec that names nothing there is a usage error (2); code that is there but fails is invalid
#: input (4). (case, file content (None: no file, "DIR": a folder), function, exit code)
SPEC_FILES = [
    ("missing file", None, "f", 2),
    ("a folder named like the file", "DIR", "f", 2),
    ("no such function", "def other():\n    pass\n", "f", 2),
    ("empty file", "", "f", 2),
    ("syntax error", "def f(:\n", "f", 4),
    ("import error inside the file", "import twa_qa_no_such_module_inside\n", "f", 4),
    ("raise at import", "raise RuntimeError('at import')\n", "f", 4),
    ("the function raises", "def f(*args, **kwargs):\n    raise ValueError('boom')\n", "f", 4),
]
SPEC_OTHERS = [  # specs without a file of their own: (case, --model value, --data value, exit code)
    ("malformed", "resnet18", "bad-name:f", 2),
    ("no such module", "twa_qa_no_such_module:f", "twa_qa_no_such_module:f", 2),
    ("no such package", "twa_qa_no_such_package.sub:f", "twa_qa_no_such_package.sub:f", 2),
    ("module without the function", "os.path:nope", "os.path:nope", 2),
]


def spec_cases() -> list:
    cases = [pytest.param(flag, True, content, function, code, id=f"{flag} {case}")
             for flag in ("--model", "--data") for case, content, function, code in SPEC_FILES]
    return cases + [pytest.param(flag, False, None, model if flag == "--model" else data, code, id=f"{flag} {case}")
                    for flag in ("--model", "--data") for case, model, data, code in SPEC_OTHERS]


@pytest.mark.parametrize("flag, in_file, content, function, code", spec_cases())
def test_a_user_code_spec_exits_2_when_it_names_nothing_and_4_when_its_code_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, in_file: bool, content: str | None, function: str,
        code: int) -> None:
    """`--data file.py:nope` (no such function) exited 2 but `--model file.py:nope` 4, and so for a missing file or
    module, an unknown model name and a malformed spec: --model reported every spec error as invalid input. One rule
    for both flags, in `twa average`, `twa soup` (and `twa demo`'s --data): a spec that names nothing there is a
    usage error (2), code that is there but fails (a syntax error, a failing import, the function raising) is
    invalid input (4); each one line naming the flag."""
    monkeypatch.chdir(tmp_path)
    if in_file:
        path = tmp_path / "user_spec.py"
        if content == "DIR":
            path.mkdir()
        elif content is not None:
            path.write_text(content)
        spec = f"{path}:{function}"
    else:
        spec = function
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        save_file(build_model("twa:mlp").state_dict(), ckpts / f"{i}.safetensors")
    given = ["--model", spec, "--data", "synthetic"] if flag == "--model" else ["--model", "twa:mlp", "--data", spec]
    runs = {"average": ["average", ckpts, *given, "--dry-run", "--out", tmp_path / "o"],
            "soup": ["soup", ckpts, *given, "--dry-run", "--out", tmp_path / "o"]}
    if flag == "--data":
        runs["demo"] = ["demo", "--data", spec, "--out", tmp_path / "demo"]
    for command, args in runs.items():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert (command, result.exit_code) == (command, code), result.output
        assert len(errors) == 1 and errors[0].startswith(f"error: {flag} {spec}: "), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "demo").exists()
