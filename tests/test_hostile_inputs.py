"""Hostile or malformed files against twa's own parsers: each one is a one-line error with the documented exit
code, never code run, a hang or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from twa_tool.cli import cli


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=generator), "fc.bias": torch.randn(3, generator=generator)}


def twa(*args: str) -> object:
    return CliRunner().invoke(cli, [*map(str, args)])


def one_error(result: object) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("recorded", ["module", "file", "loading-arg"])
def test_a_model_spec_recorded_in_a_checkpoint_never_runs_code(tmp_path: Path, recorded: str) -> None:
    """Without --model the architecture comes from the first checkpoint's ``twa.model`` metadata. Before, a
    file recording ``os:mkdir`` (any ``module:function``) or ``evil.py:build`` had twa import and call it,
    even for --dry-run; now only the registered builders are taken from a file, and arguments that load
    weights (timm's ``checkpoint_path`` unpickles a file) are not: exit 5, nothing runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import os\nos.mkdir({str(marker)!r})\ndef build():\n    return None\n")
    spec, args = {"module": ("os:mkdir", {"path": str(marker)}),
                  "file": (f"{evil}:build", {}),
                  "loading-arg": ("timm:resnet18", {"checkpoint_path": str(tmp_path / "evil.pt")})}[recorded]
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(3):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors",
                  metadata={"twa.model": spec, "twa.model_args": json.dumps(args)})
    result = twa("average", ckpts, "--data", "synthetic", "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 5, result.output
    assert "0.safetensors" in one_error(result) and "--model" in one_error(result)
    assert not marker.exists()
    result = twa("soup", ckpts, "--data", "synthetic", "--out", tmp_path / "out")
    assert result.exit_code == 5, result.output
    assert not marker.exists()
