"""`twa average`'s training and run options at their edges: --device, --lr/--wd, --seed, --batch-size,
--fail-if-worse-than, --amp, --num-workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from twa_tool.cli import cli
from twa_tool.errors import ConfigError

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "256", "--lr", "0.5", "--threads", "1",
        "--baselines", "none"]


def run(*args: object):
    return CliRunner().invoke(cli, ["average", *map(str, args)], prog_name="twa")


def assert_one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("device", ["meta", "xla", "xpu", "hpu"])
def test_a_device_twa_does_not_run_on_is_a_usage_error(device: str, demo_ckpts: Path, tmp_path: Path) -> None:
    # torch.device() parses these: 'meta' ran the whole job on meta tensors (dozens of torch warnings, then
    # 'unexpected error: RuntimeError: Tensor.item() cannot be called on meta tensors', exit 1); 'xla' was an
    # unexpected error too
    result = run(demo_ckpts, *FAST, "--device", device, "--out", tmp_path / "o")
    assert_one_line_error(result, 2, f"--device {device}: use auto, cpu, cuda, cuda:N or mps")
    assert not (tmp_path / "o").exists()


def test_a_cuda_index_the_machine_lacks_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from twa_tool.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("args, text", [
    (["--lr", "1e300"], "--lr 1e+300: too large; the weights are float32, so it must be at most 3.403e+38"),
    (["--wd", "1e39"], "--wd 1e+39: too large"),
    (["--seed", str(2**64)], f"--seed {2**64}: must be a 64-bit integer"),
    (["--seed", str(-2**63 - 1)], f"--seed {-2**63 - 1}: must be a 64-bit integer"),
])
def test_numbers_torch_cannot_take_are_usage_errors(args: list[str], text: str, demo_ckpts: Path,
                                                    tmp_path: Path) -> None:
    # were 'unexpected error: RuntimeError: value cannot be converted to type float without overflow' from the
    # first SGD step (after reading every checkpoint and evaluating the baselines), and 'unexpected error:
    # ValueError: Overflow when unpacking long long' from torch.manual_seed; both exit 1
    result = run(demo_ckpts, *FAST, "--device", "cpu", *args, "--out", tmp_path / "o")
    assert_one_line_error(result, 2, text)
    assert not (tmp_path / "o").exists()


def test_the_largest_values_torch_takes_are_accepted() -> None:
    from twa_tool.config import AverageConfig, CoefficientTrainConfig, TrainConfig

    TrainConfig(lr=3.4e38, weight_decay=3.4e38)
    for seed in (-2**63, 2**64 - 1):
        AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic", seed=seed)
        torch.manual_seed(seed)  # what the run does with it
    with pytest.raises(ConfigError, match=r"--lr 1e\+39: too large"):
        CoefficientTrainConfig(lr=1e39)  # twa soup shares the check


@pytest.mark.parametrize("baseline, twa, tolerance, passed", [
    (0.02, 0.018, 0.002, True),  # 10 vs 9 of 500: 0.018 >= 0.02 - 0.002 is False in floating point
    (0.92, 0.82, 0.1, True),  # 460 vs 410 of 500
    (0.545, 0.495, 0.05, True),  # 1090 vs 990 of 2000
    (0.84, 0.84, 0.0, True),
    (0.84, 0.838, 0.0, False),
    (0.02, 0.016, 0.002, False),  # 2 examples short with a tolerance of 1
    (0.9132, 0.9111, 0.002, False),  # 21 of 10,000 short with a tolerance of 20
])
def test_a_shortfall_of_exactly_the_tolerance_passes_the_gate(baseline: float, twa: float, tolerance: float,
                                                              passed: bool) -> None:
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import quality_gate

    config = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic", fail_if_worse_than="swa",
                           tolerance=tolerance)
    gate = quality_gate(config, {"swa": {"accuracy": baseline}, "twa": {"accuracy": twa}})
    assert gate is not None and gate["passed"] is passed


@pytest.fixture(scope="module")
def mlp_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three perturbed copies of twa:mlp (Linear -> BatchNorm1d -> ...), which fits the synthetic data."""
    from twa_tool.models import build_model

    out = tmp_path_factory.mktemp("mlp")
    torch.manual_seed(0)
    state = build_model("twa:mlp").state_dict()
    for i in range(3):
        torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
                   out / f"{i}.pt")
    return out


@pytest.mark.parametrize("dry_run", [False, True])
def test_batch_size_1_with_batchnorm1d_is_refused_before_any_work(dry_run: bool, mlp_ckpts: Path,
                                                                  tmp_path: Path) -> None:
    # was 'unexpected error: ValueError: Expected more than 1 value per channel when training' (exit 1) after every
    # checkpoint was read, and --dry-run passed
    result = run(mlp_ckpts, "--model", "twa:mlp", *FAST, "--batch-size", "1", "--out", tmp_path / "o",
                 *(["--dry-run"] if dry_run else []))
    assert_one_line_error(result, 2, "--batch-size 1: the model's BatchNorm layers cannot normalise a batch of one "
                                     "example in training mode")
    assert not (tmp_path / "o").exists()


def test_soup_batch_size_1_with_batchnorm1d_is_refused_before_any_work(mlp_ckpts: Path, tmp_path: Path) -> None:
    # was 'unexpected error: ValueError: Expected more than 1 value per channel when training' (exit 1) after every
    # ingredient was read and evaluated
    result = CliRunner().invoke(cli, ["soup", str(mlp_ckpts), "--model", "twa:mlp", "--data", "synthetic", "--epochs",
                                      "1", "--batch-size", "1", "--threads", "1", "--out", str(tmp_path / "o")],
                                prog_name="twa")
    assert_one_line_error(result, 2, "--batch-size 1: the model's BatchNorm layers cannot normalise a batch of one "
                                     "example in training mode")
    assert not (tmp_path / "o").exists()


def test_the_batch_of_one_check_leaves_a_model_that_takes_it_as_it_was() -> None:
    from twa_tool.config import AverageConfig, TrainConfig
    from twa_tool.data import build_data
    from twa_tool.models import build_model
    from twa_tool.pipeline import check_batch_of_one

    model = build_model("twa:cnn", (("in_channels", "1"), ("width", "4")))  # BatchNorm2d: one example is fine
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic",
                           train=TrainConfig(batch_size=1))
    rng = torch.get_rng_state()
    check_batch_of_one(model, config, build_data("synthetic").train)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics and the count untouched
    assert not model.training and torch.equal(torch.get_rng_state(), rng)


WORKER_SCRIPT = """
import multiprocessing, sys
from dataclasses import replace
from pathlib import Path

import torch

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1], force=True)
    from twa_tool.config import AverageConfig, TrainConfig
    from twa_tool.data import build_data
    from twa_tool.pipeline import _loader

    data = build_data(sys.argv[2])
    config = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data=sys.argv[2], num_workers=1,
                           train=TrainConfig(batch_size=4))
    with_workers = [b for _, b in zip(range(2), _loader(data.train, config, shuffle=True, seed=0))]
    in_process = [b for _, b in zip(range(2), _loader(data.train, replace(config, num_workers=0), shuffle=True,
                                                    seed=0))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(with_workers, in_process))
    print("same batches")
"""

USER_DATA = """
import torch
from torch.utils.data import Dataset


class Noise(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(n)
        self.x, self.y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def splits():
    return Noise(40), Noise(12)
"""


def test_num_workers_with_a_file_dataset_under_spawn(tmp_path: Path) -> None:
    # spawn is macOS's start method (and forkserver Linux's from Python 3.14): the workers unpickle the dataset,
    # whose class lives in the module twa ran from file.py, which they could not import; each worker printed a
    # traceback ('No module named twa_user_data_mydata') and the run failed with exit 4, 'reading a batch of --data
    # failed (DataLoader worker ... exited unexpectedly); fix or remove the example it names'
    import os
    import subprocess
    import sys

    (tmp_path / "mydata.py").write_text(USER_DATA)
    (tmp_path / "check.py").write_text(WORKER_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(tmp_path / "check.py"), "spawn", f"{tmp_path / 'mydata.py'}:splits"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and "same batches" in result.stdout, result.stderr[-2000:]


def test_amp_bf16_really_autocasts_on_cpu() -> None:
    # test_mixed_precision_runs_on_cpu passes whether or not --amp reaches the trainer; this one does not
    import copy

    from conftest import TinyBN

    from twa_tool.config import TrainConfig
    from twa_tool.models import flatten, trainable_names
    from twa_tool.subspace import build_subspace
    from twa_tool.trainer import train_projected

    torch.manual_seed(0)
    model = TinyBN()
    names = trainable_names(model)
    base = flatten(dict(model.named_parameters()), names)
    basis = build_subspace([base + 0.1 * torch.randn_like(base) for _ in range(3)]).basis
    x = torch.randn(32, 6)
    batches = [(x, (x[:, 0] > 0).long())]
    config = TrainConfig(lr=0.5, epochs=2, batch_size=32, schedule="constant")
    results = {}
    for amp in ("off", "bf16"):
        trained = copy.deepcopy(model)
        train_projected(trained, names, basis, batches, config, torch.device("cpu"), amp)
        results[amp] = flatten(dict(trained.named_parameters()), names)
    assert not torch.equal(results["off"], results["bf16"])  # bf16 matmuls round differently
    assert torch.allclose(results["off"], results["bf16"], atol=0.05)  # but it is the same training


@pytest.mark.parametrize(("text", "expected"), [("NONE", ()), ("", ()), ("SWA,Last", ("swa", "last")),
                                                ("swa, swa ,best", ("swa", "best"))])
def test_baselines_are_read_whatever_their_case(text: str, expected: tuple[str, ...]) -> None:
    from twa_tool.config import parse_baselines

    assert parse_baselines(text) == expected  # 'NONE' was accepted while 'SWA' was an unknown baseline
