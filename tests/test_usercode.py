"""A user's file.py, named by --model and --data, runs once per process, as `import` would run it."""

from __future__ import annotations

from pathlib import Path

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
