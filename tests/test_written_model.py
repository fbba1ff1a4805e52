"""The written model against the method: Σ aᵢ wᵢ with the reported coefficients, BN re-estimated, and
the documented handling of integer buffers (the last checkpoint's, whatever --start)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from twa_tool.cli import cli

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)
        self.register_buffer("version", torch.tensor(0, dtype=torch.int64))  # a non-BN integer buffer

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def build():
    return Net()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds
'''

NAMES = ("fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("written")
    (root / "net.py").write_text(MODEL)
    ckpts = root / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    spec = importlib.util.spec_from_file_location("net_for_test", root / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.build().state_dict()
    for i in range(4):
        state = {k: v + 0.1 * torch.randn_like(v) if k in NAMES else v.clone() for k, v in base.items()}
        state["version"] = torch.tensor(100 + i)
        state["bn.num_batches_tracked"] = torch.tensor(1000 + i)
        torch.save(state, ckpts / f"{i}.pt")
    return root


@pytest.mark.parametrize("start", ["mean", "last", "0", "1"])
def test_written_model_is_the_reported_combination_with_the_last_integer_buffers(run_dir: Path, tmp_path: Path,
                                                                                 start: str) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["average", str(run_dir / "ckpts"), "--model", f"{run_dir}/net.py:build",
                                      "--data", f"{run_dir}/net.py:data", "--epochs", "1", "--batch-size", "32",
                                      "--lr", "0.1", "--baselines", "none", "--threads", "1", "--start", start,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    written = load_file(out / "model.safetensors")
    states = [torch.load(run_dir / "ckpts" / f"{i}.pt") for i in range(4)]
    flat = torch.cat([written[n].reshape(-1).double() for n in NAMES])
    rows = torch.stack([torch.cat([s[n].reshape(-1).double() for n in NAMES]) for s in states])
    a = torch.tensor(report["coefficients"], dtype=torch.float64)
    assert (flat - a @ rows).abs().max() < 1e-5
    assert report["basis"]["span_residual"] < 1e-5
    assert int(written["version"]) == 103  # the last checkpoint's, never the start checkpoint's
    # BN statistics re-estimated on the train split (3 batches of 32, 32, 26), not any checkpoint's
    assert int(written["bn.num_batches_tracked"]) == 3
