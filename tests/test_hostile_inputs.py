"""Hostile or malformed files against twa's own parsers: each one is a one-line error with the documented exit
code, never code run, a hang or a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_named_like_a_checkpoint_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    """Before, a FIFO named ``2.pt`` made ``twa inspect`` and ``twa average`` wait forever for a writer (the
    format sniff opened it); now any non-regular file is a one-line error naming it, exit 4."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors")
    if kind == "fifo":
        os.mkfifo(ckpts / "2.pt")
    else:
        (ckpts / "2.pt").symlink_to("/dev/zero")
    for command in (["inspect", ckpts], ["average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run",
                                         "--out", tmp_path / "out"]):
        run = subprocess.run([sys.executable, "-m", "twa_tool", *map(str, command)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "COLUMNS": "300"})
        assert run.returncode == 4, run.stderr
        assert "2.pt: not a regular file" in run.stderr and "Traceback" not in run.stderr

