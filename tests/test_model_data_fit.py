"""A model that does not fit the data is refused before any checkpoint is read (``models.check_accepts``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from twa_tool.cli import cli
from twa_tool.errors import InputError
from twa_tool.models import build_model, check_accepts

RGB_ARGS = (("in_channels", "3"), ("num_classes", "10"), ("width", "4"))


def rgb_flags() -> list[str]:
    return ["--model", "twa:cnn"] + [f for k, v in RGB_ARGS for f in ("--model-arg", f"{k}={v}")]


def test_a_fitting_example_passes_and_leaves_the_model_as_it_was() -> None:
    model = build_model("twa:cnn", RGB_ARGS).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_accepts(model, [(torch.randn(3, 16, 16), 4)], 10, "twa:cnn", "x")
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and batch count untouched
    model.eval()
    check_accepts(model, [(torch.randn(3, 16, 16), 4)], 10, "twa:cnn", "x")
    assert not model.training


def test_wrong_channels_name_the_flags_and_the_shape() -> None:
    model = build_model("twa:cnn", RGB_ARGS)
    with pytest.raises(InputError) as err:
        check_accepts(model, [(torch.randn(1, 16, 16), 4)], 10, "twa:cnn", "fashion-mnist")
    message = str(err.value)
    assert "--data fashion-mnist" in message and "--model twa:cnn" in message and "(1, 16, 16)" in message
    assert "3 channels" in message and "\n" not in message


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_inputs_of_another_dtype_name_the_dtype_fix(dtype: torch.dtype) -> None:
    """uint8 pixels or float64 arrays from a file.py:function: the fix given was "(e.g. in_channels)"."""
    model = build_model("twa:cnn", RGB_ARGS)
    with pytest.raises(InputError) as err:
        check_accepts(model, [(torch.zeros(3, 16, 16, dtype=dtype), 4)], 10, "twa:cnn", "mine.py:data")
    message = str(err.value)
    assert f"{dtype}" in message and "return float32 inputs" in message and "in_channels" not in message


def test_fewer_outputs_than_classes_is_refused() -> None:
    model = build_model("twa:cnn", (("in_channels", "3"), ("num_classes", "5"), ("width", "4")))
    with pytest.raises(InputError, match="has 10 classes but --model twa:cnn outputs 5"):
        check_accepts(model, [(torch.randn(3, 16, 16), 4)], 10, "twa:cnn", "cifar10")
    check_accepts(model, [(torch.randn(3, 16, 16), 4)], 5, "twa:cnn", "cifar10")  # as many: fine
    check_accepts(model, [(torch.randn(3, 16, 16), 4)], None, "twa:cnn", "mine.py:data")  # unknown: not checked


def test_items_that_are_not_input_target_pairs_are_not_checked() -> None:
    model = build_model("twa:cnn", RGB_ARGS)
    for example in ({"image": torch.randn(1, 16, 16)}, ()):
        check_accepts(model, [example], 10, "twa:cnn", "mine.py:data")
    check_accepts(model, [], 10, "twa:cnn", "mine.py:data")  # empty


class Failing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise KeyError(index)


@pytest.mark.parametrize("dataset, text", [
    (Failing(), r"reading its first example failed \(KeyError: 0\)"),
    ([(Image.new("RGB", (16, 16)), 1)], r"its examples cannot be batched \(TypeError: default_collate"),
    ([("text", 1)], "its inputs are str, not tensors"),
    ([(torch.randn(3, 16, 16), "cat")], "its targets are str, not tensors"),
    ([(np.random.rand(3, 16, 16), 1)], r"its inputs \(shape \(3, 16, 16\), torch.float64\) do not fit"),
])
def test_examples_the_loader_or_the_model_cannot_take_are_refused(dataset: object, text: str) -> None:
    # each of these passed the check and failed mid-run as an 'unexpected error' (exit 1)
    model = build_model("twa:cnn", RGB_ARGS)
    with pytest.raises(InputError, match=text) as info:
        check_accepts(model, dataset, 10, "twa:cnn", "mine.py:data")
    assert str(info.value).startswith("--data mine.py:data: ") and "\n" not in str(info.value)


def test_numpy_float32_examples_are_accepted_as_the_loader_batches_them() -> None:
    check_accepts(build_model("twa:cnn", RGB_ARGS), [(np.zeros((3, 16, 16), np.float32), np.int64(2))], 10,
                  "twa:cnn", "mine.py:data")


def test_the_example_is_drawn_with_the_rng_forked() -> None:
    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.randn(3, 16, 16), 0  # a random transform draws from torch's RNG

    model = build_model("twa:cnn", RGB_ARGS)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    check_accepts(model, Augmented(), 10, "twa:cnn", "x")
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="module")
def rgb_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 3-channel checkpoints: the synthetic data has one channel."""
    folder = tmp_path_factory.mktemp("rgb") / "ckpts"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_model("twa:cnn", RGB_ARGS)
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), folder / f"{i}.pt")
    return folder


@pytest.mark.parametrize("command", ["average", "soup"])
def test_cli_refuses_before_reading_any_checkpoint(command: str, rgb_ckpts: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import twa_tool.pipeline as pipeline
    import twa_tool.soup as soup

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr(pipeline, "stream_checkpoints", no_reading)
    monkeypatch.setattr(soup, "read_uniform", no_reading)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [command, str(rgb_ckpts), *rgb_flags(), "--data", "synthetic", "--out", str(out)])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = "--data synthetic: its inputs (shape (1, 16, 16)) do not fit"
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_dry_run_checks_the_data_against_the_model(rgb_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["average", str(rgb_ckpts), *rgb_flags(), "--out", str(out), "--dry-run"]
    result = CliRunner().invoke(cli, [*args, "--data", "synthetic"])
    assert result.exit_code == 4, result.output
    assert "--data synthetic: its inputs (shape (1, 16, 16)) do not fit" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_dry_run_reports_the_data_it_would_use(demo_ckpts: Path, tmp_path: Path) -> None:
    import json

    args = ["average", str(demo_ckpts), "--data", "synthetic", "--out", str(tmp_path / "o"), "--dry-run", "--json",
            "--fit-on", "holdout", "--holdout-fraction", "0.25"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert data["num_classes"] == 10 and data["fit_on"] == "holdout" and not data["would_download"]
    assert data["fit_examples"] == round(0.25 * data["bn_examples"]) and data["eval_examples"] > 0
    assert "one went through the model" in result.stderr


def test_dry_run_names_missing_data_and_never_downloads(demo_ckpts: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import twa_tool.data as data

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run downloaded")

    monkeypatch.setattr(data, "_torchvision_download", no_download)
    base = ["average", str(demo_ckpts), "--data", "mnist", "--data-root",
            str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--dry-run"]
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 4, result.output
    assert "--data mnist: no MNIST files under" in result.stderr and "--download" in result.stderr
    result = CliRunner().invoke(cli, [*base, "--download", "--json"])
    assert result.exit_code == 0, result.output
    into = tmp_path / "empty" / "MNIST" / "raw"  # where torchvision's MNIST puts the files it fetches
    assert json.loads(result.stdout)["data"] == {"spec": "mnist", "would_download": True, "download_into": str(into)}
    assert f"the run would download it into {into} (--download)" in result.stderr
    assert not (tmp_path / "empty").exists() and not (tmp_path / "o").exists()


def test_an_integer_tensor_where_the_model_has_floats_is_refused(demo_ckpts: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for path in sorted(demo_ckpts.iterdir()):
        state = load_file(path)
        if path.name == "4.safetensors":  # the last: its dtypes would be the output's
            state["head.bias"] = state["head.bias"].round().to(torch.int64)
        save_file(state, str(folder / path.name))
    from tests.conftest import model_flags

    result = CliRunner().invoke(cli, ["average", str(folder), *model_flags(), "--data", "synthetic",
                                      "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 4, result.output
    assert "do not match the model" in result.stderr and "dtype int64" in result.stderr, result.stderr


LATE_FAILURE = """
import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, n, broken):
        self.n, self.broken = n, broken

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index == self.broken:
            raise OSError(f"cannot identify image file 'train/{index}.jpg'")
        return torch.randn(1, 16, 16), torch.tensor(index % 10, dtype=torch.int32)


def data():
    return Images(40, broken=33), Images(10, broken=-1)
"""


def test_an_example_that_fails_mid_run_is_exit_4_naming_it(demo_ckpts: Path, tmp_path: Path) -> None:
    # int32 labels pass; the 34th image cannot be read: one line, exit 4, nothing written (was exit 1)
    (tmp_path / "late.py").write_text(LATE_FAILURE)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), "--model", "twa:cnn", "--model-arg", "width=4",
                                      "--data", f"{tmp_path / 'late.py'}:data", "--out", str(out), "--epochs", "1",
                                      "--baselines", "none", "--threads", "1", "--batch-size", "16"])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot identify image file 'train/33.jpg'" in errors[0], result.stderr
    assert "Traceback" not in result.output and not out.exists()


DEMO_DATA = '''
import torch
from torch.utils.data import TensorDataset


def rgb():  # 3-channel inputs, 3 classes
    g = torch.Generator().manual_seed(0)
    return (TensorDataset(torch.randn(24, 3, 8, 8, generator=g), torch.arange(24) % 3),
            TensorDataset(torch.randn(9, 3, 8, 8, generator=g), torch.arange(9) % 3))


def many_classes():  # labels up to 11: the demo's CNN has 10 outputs
    g = torch.Generator().manual_seed(0)
    return (TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.arange(24) % 12),
            TensorDataset(torch.randn(9, 1, 8, 8, generator=g), torch.arange(9)))
'''


def test_demo_builds_its_cnn_for_the_data(tmp_path: Path) -> None:
    """``twa demo`` picked the CNN's input channels by the exact spelling of --data (3 for "cifar10", "cifar100",
    "svhn", else 1) and always 10 classes: RGB data under any other spec (``CIFAR10``, accepted by --data,
    ``imagefolder:``, ``file.py:function``) or CIFAR-100 failed mid-training as an unexpected error (exit 1). The
    channels now come from the data, the classes from the dataset when it knows them, and data that still does
    not fit is a one-line exit 4 before training."""
    source = tmp_path / "demo_data.py"
    source.write_text(DEMO_DATA)
    fast = ["--train-epochs", "1", "--epochs", "1", "--threads", "1", "-q"]
    result = CliRunner().invoke(cli, ["demo", "--data", f"{source}:rgb", "--out", str(tmp_path / "rgb"), *fast])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rgb" / "twa" / "model.safetensors").is_file()
    result = CliRunner().invoke(cli, ["demo", "--data", f"{source}:many_classes", "--out", str(tmp_path / "many"),
                                      *fast])
    assert result.exit_code == 4 and "class labels from 0 to 11" in result.stderr
    assert not (tmp_path / "many" / "ckpts").exists()


def test_a_model_too_big_for_the_device_is_not_called_a_misfit() -> None:
    """The one example through the model ran out of memory: that is the device's size (exit 9 at the CLI), not
    inputs that 'do not fit --model' (exit 4)."""
    class Greedy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")

    with pytest.raises(torch.OutOfMemoryError):
        check_accepts(Greedy(), [(torch.randn(3, 16, 16), 4)], 10, "twa:cnn", "x")


def test_dry_run_line_leaves_out_an_unknown_class_count() -> None:
    """A file.py:function dataset has no class count (None): the plan said 'None classes'."""
    import io

    from rich.console import Console

    from twa_tool.report import render_dry_run

    report = {"checkpoints": ["a", "b"], "excluded": [], "memory_estimate_bytes": {"basis": 2**20, "total": 2**21},
              "model": {"spec": "twa:cnn", "parameters": 10}, "would_write": [],
              "data": {"spec": "d.py:data", "would_download": False, "num_classes": None, "fit_examples": 40,
                       "fit_on": "train", "eval_examples": 12}}
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=200))
    assert "data d.py:data: 40 examples to fit on (train), 12 to evaluate" in out.getvalue()
    report["data"]["num_classes"] = 10
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=200))
    assert "data d.py:data: 10 classes, 40 examples" in out.getvalue()
