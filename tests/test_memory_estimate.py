"""The dry run's memory estimate: known answers for a tiny model, and what its total covers.

Measured (README, Memory estimate of a dry run): without what the process itself holds (torch, the model, the
data), the estimate was 0.4-0.65 of `twa average`'s peak RSS for resnet18 with 8-30 checkpoints, printed as
"peak memory about"; with it, 1.02-1.16."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from tests.conftest import model_flags
from twa_tool import pipeline, subspace
from twa_tool.cli import cli
from twa_tool.report import render_dry_run, size_text

MiB = 2**20


def test_float32_estimate_of_a_tiny_model_by_hand() -> None:
    """Linear(4, 2): D = 10 trainable parameters, a state dict of 40 bytes; K = 3 checkpoints."""
    estimate = pipeline.memory_estimate(torch.nn.Linear(4, 2), 3, process=1000)
    assert estimate == {
        "torch_model_data": 1000,   # measured by the dry run: torch, the model, the data
        "basis_float32": 3 * 10 * 4,
        "previous_float32": 10 * 4,
        "one_checkpoint": 40,
        "mean_float64": 10 * 8,
        "model_grads_momentum": 40 + 2 * 10 * 4,
        "weights_float64": 2 * 10 * 8,  # the TWA weights and their projection, for the report
        "total": 1000 + 120 + 40 + 40 + 80 + 120 + 160,
    }


def test_int8_estimate_of_a_tiny_model_by_hand() -> None:
    """The column blocks are as wide as the vectors when those are narrower than ``column_block``."""
    estimate = pipeline.memory_estimate(torch.nn.Linear(4, 2), 3, storage="int8", threads=2, process=1000)
    assert estimate == {
        "torch_model_data": 1000,
        "basis_int8": 3 * 10 + 3 * 1 * 4,      # a byte per entry, a float32 scale per row and 4096 columns
        "column_blocks": 4 * 3 * 10 * 4 * 2,  # rows, Q1, Q, rounding: 3 x 10 float32 each, per thread
        "first_and_last_checkpoint": 2 * 40,
        "mean_float64": 80,
        "model_grads_momentum": 120,
        "weights_float64": 160,
        "total": 1000 + 42 + 960 + 80 + 80 + 120 + 160,
    }
    wide = torch.nn.Linear(3 * subspace.QUANT_BLOCK, 10 * subspace.QUANT_BLOCK, bias=False)  # D = 120M: capped
    assert pipeline.memory_estimate(wide, 3, storage="bf16", threads=2)["column_blocks"] == \
        4 * 3 * subspace.column_block(3) * 4 * 2


def test_the_dry_run_total_is_the_whole_process(demo_ckpts: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The total includes what the process holds before any checkpoint is read (``process_bytes``), and the
    line says that it is the whole process's peak."""
    monkeypatch.setattr(pipeline, "process_bytes", lambda: 500 * MiB)
    args = ["average", str(demo_ckpts), *model_flags(), "--data", "synthetic", "--out", str(tmp_path / "o"),
            "--dry-run"]
    plan = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    memory = plan["memory_estimate_bytes"]
    assert memory["torch_model_data"] == 500 * MiB
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total") > 500 * MiB
    human = CliRunner().invoke(cli, args)
    assert human.exit_code == 0, human.output
    assert f"peak memory about {memory['total'] / MiB:.1f} MiB for the whole process" in human.stderr
    assert "torch_model_data 500.0 MiB" in human.stderr


def test_the_plan_line_says_what_the_estimate_covers() -> None:
    report = {"checkpoints": ["a", "b"], "excluded": [], "would_write": [],
              "memory_estimate_bytes": {"torch_model_data": 3 * MiB, "basis_float32": MiB, "total": 4 * MiB},
              "model": {"spec": "twa:cnn", "parameters": 10},
              "data": {"spec": "cifar10", "would_download": True}}
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=400))
    line = next(x for x in out.getvalue().splitlines() if "peak memory" in x)
    assert line.startswith("model twa:cnn: 10 trainable parameters; peak memory about 4.0 MiB for the whole process "
                           "without the data (not on disk, so not loaded), its parts summed as if all were held at "
                           "once (torch_model_data 3.0 MiB, basis_float32 1.0 MiB;")


def test_process_bytes_loads_what_the_runs_optimizer_loads() -> None:
    """The optimizer's first step imports torch's compiler stack (about 160 MiB with torch 2.x), which a run
    loads and a dry run did not: after ``process_bytes`` an SGD step imports nothing more."""
    code = ("import sys, torch\n"
            "from twa_tool.pipeline import peak_rss_bytes, process_bytes\n"
            "before = peak_rss_bytes()\n"
            "assert process_bytes() >= before\n"
            "loaded = set(sys.modules)\n"
            "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)\n"
            "torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-5).step()\n"
            "print(sorted(set(sys.modules) - loaded))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_plans_give_the_threads_the_run_would_use(demo_ckpts: Path, tmp_path: Path) -> None:
    """The column blocks of a bf16/int8 basis are per thread, and the run's time and its bytes on CPU depend on the
    thread count, yet a plan did not say how many the run would use (`--threads`, else torch's default); the report
    has it as `threads`, the plans now too, and their human output."""
    before = torch.get_num_threads()
    try:
        args = ["average", str(demo_ckpts), *model_flags(), "--data", "synthetic", "--out", str(tmp_path / "o"),
                "--dry-run", "--basis-dtype", "int8"]
        for threads in (1, 3):
            plan = json.loads(CliRunner().invoke(cli, [*args, "--threads", str(threads), "--json"]).stdout)
            assert plan["threads"] == threads
            assert plan["memory_estimate_bytes"]["column_blocks"] % threads == 0
            human = CliRunner().invoke(cli, [*args, "--threads", str(threads)])
            assert human.exit_code == 0, human.output
            assert f"threads {threads} (torch's CPU threads, --threads)" in human.stderr, human.stderr
        torch.set_num_threads(2)  # torch's default here, as no --threads leaves it
        assert json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)["threads"] == 2
        soup = ["soup", str(demo_ckpts), *model_flags(), "--data", "synthetic", "--out", str(tmp_path / "s"),
                "--dry-run", "--threads", "3"]
        assert json.loads(CliRunner().invoke(cli, [*soup, "--json"]).stdout)["threads"] == 3
        human = CliRunner().invoke(cli, soup)
        assert human.exit_code == 0 and "threads 3 (torch's CPU threads, --threads)" in human.stderr, human.output
    finally:
        torch.set_num_threads(before)


def test_the_plan_gives_each_size_in_a_unit_that_shows_it() -> None:
    """Every part was printed in MiB with one decimal: the parts of a small model read "basis_float32 0.0 MiB"
    (a part that seemed not to be there), and a large run's total "12637.1 MiB". Each size is now in the largest
    unit that keeps it at least 1: bytes, KiB, MiB or GiB."""
    report = {"checkpoints": ["a", "b"], "excluded": [], "would_write": [], "threads": 1,
              "memory_estimate_bytes": {"torch_model_data": 700 * MiB, "basis_float32": 120, "one_checkpoint": 3072,
                                        "mean_float64": 12 * 2**30, "total": 12 * 2**30 + 700 * MiB + 3192},
              "model": {"spec": "twa:cnn", "parameters": 10},
              "data": {"spec": "cifar10", "would_download": True}}
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=400))
    line = next(x for x in out.getvalue().splitlines() if "peak memory" in x)
    assert "peak memory about 12.68 GiB for the whole process" in line, line
    assert "(torch_model_data 700.0 MiB, basis_float32 120 bytes, one_checkpoint 3.0 KiB, mean_float64 12.00 GiB;" \
        in line, line


@pytest.mark.parametrize("command", ["average", "soup"])
def test_the_plan_shows_the_size_of_the_model_it_would_write(command: str, demo_ckpts: Path, tmp_path: Path) -> None:
    """`--dry-run --json` has `output_bytes`, the written model's tensor data after --out-dtype, but the text plan
    never showed it: a user could not see how big the output would be without --json. Now one line says it, in a
    unit that shows it (a few KiB here, not 0.0 MiB)."""
    result = CliRunner().invoke(cli, [command, str(demo_ckpts), *model_flags(), "--data", "synthetic", "--threads", "1",
                                      "--out-dtype", "float16", "--dry-run", "--json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    size = json.loads(result.stdout)["output_bytes"]
    assert 1024 <= size < MiB
    lines = result.stderr.splitlines()
    line = f"output model: {size_text(size)} of tensor data (--out-dtype float16)"
    assert line in lines and lines.index(line) < min(i for i, x in enumerate(lines) if x.startswith("would write ")), \
        result.stderr
