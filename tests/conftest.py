"""Shared fixtures: tiny models and checkpoint folders made by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from twa_tool.demo import DemoTrainConfig, train_checkpoints
from twa_tool.subspace import Basis

TINY_ARGS = (("in_channels", "1"), ("num_classes", "10"), ("width", "4"))


class TinyBN(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: the smallest model with every part TWA touches."""

    def __init__(self, d_in: int = 6, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture(scope="session")
def demo_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five safetensors checkpoints (init + 4 epochs) of a tiny CNN on the synthetic data, with metadata."""
    out = tmp_path_factory.mktemp("run") / "ckpts"
    train_checkpoints(DemoTrainConfig(out_dir=out, epochs=4, model_args=TINY_ARGS, batch_size=128))
    return out


@pytest.fixture(scope="session")
def plain_pt_ckpts(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoints as plain torch.save state dicts (no architecture recorded)."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pt") / "ckpts"
    out.mkdir()
    for path in demo_ckpts.glob("*.safetensors"):
        torch.save(load_file(path), out / (path.stem + ".pt"))
    return out


def dequantized_projection(basis: Basis, g: torch.Tensor) -> torch.Tensor:
    """The float64 projection of ``g`` onto a stored basis's own (dequantized) rows."""
    dense = torch.cat([part for _, part in basis.column_chunks(torch.float64)], dim=1)
    return dense.T @ (dense @ g.double())


def model_flags() -> list[str]:
    return ["--model", "twa:cnn"] + [f for k, v in TINY_ARGS for f in ("--model-arg", f"{k}={v}")]


def read_json(text: str) -> dict:
    return json.loads(text)


class Payload:
    """Pickles to a call that creates the folder named by $TWA_TEST_MARKER: proof that code ran."""

    def __reduce__(self):
        import os

        return (os.mkdir, (os.environ["TWA_TEST_MARKER"],))


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every regular file under root."""
    import hashlib

    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_refused_cleanly(root: Path, tmp_path: Path, code: int, text: str, extra: list[str]) -> object:
    """Run `twa average` on a bad input with a pre-existing output and --overwrite; check the universal promise:
    the exit code, one error line naming the problem, no traceback, inputs and old output untouched, no temp
    leftovers, no payload ran (the caller points $TWA_TEST_MARKER at tmp_path / "pwned")."""
    from click.testing import CliRunner

    from twa_tool.cli import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model")
    (out / "report.json").write_text("{}")
    before_in, before_out = snapshot(root), snapshot(out)
    result = CliRunner().invoke(cli, ["average", str(root), *model_flags(), *extra, "--out", str(out), "--overwrite"])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(root) == before_in
    assert snapshot(out) == before_out
    assert not (tmp_path / "pwned").exists()
    return result


def trajectory(k: int, d: int, step: float = 1e-3, seed: int = 0) -> list[torch.Tensor]:
    """A highly correlated float32 'training trajectory': each vector a small step from the previous."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    out = []
    for _ in range(k):
        w = w + step * torch.randn(d, generator=g)
        out.append(w.clone())
    return out


@pytest.fixture(scope="session")
def finetunes(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four "fine-tunes" (epochs 1..4 of the demo run) and the init as the base, inside the folder."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("soup") / "finetunes"
    out.mkdir()
    for epoch in range(5):
        state = load_file(demo_ckpts / f"{epoch}.safetensors")
        name = "base.safetensors" if epoch == 0 else f"ft-{epoch}.safetensors"
        save_file(state, str(out / name))
    return out
