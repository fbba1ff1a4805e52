"""The scripts beside the tool (benchmarks/, examples/): bad arguments are one-line errors before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUMMARIZE = ROOT / "examples" / "fashion_mnist" / "summarize.py"


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("script", "args", "message"), [
    ("benchmarks/basis_bench.py", ["--k", "50", "1"], "--k 1: a basis needs at least 2 checkpoints"),
    ("benchmarks/basis_bench.py", ["--storage", "fp8"], "invalid choice: 'fp8'"),
    ("benchmarks/basis_bench.py", ["--threads", "0"], "--threads 0: must be a positive integer"),
    ("benchmarks/basis_bench.py", ["--repeat", "0"], "--repeat 0: must be at least 1"),
    ("benchmarks/basis_bench.py", ["--step-only", "--average"], "--step-only times the projected step alone"),
    ("benchmarks/basis_bench.py", ["--step", "--device", "gpu"], "--device gpu: the step is timed on cpu, cuda"),
    ("benchmarks/soup_memory.py", ["--k", "1"], "--k 1: a soup needs at least 2 fine-tunes"),
    ("benchmarks/inspect_speed.py", ["--count", "1"], "--count 1: twa inspect refuses fewer than 2"),
])
def test_benchmark_usage_errors(script: str, args: list[str], message: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    module = load_script(script)
    monkeypatch.setattr(sys, "argv", [script, *args, "--dir" if "soup" not in script else "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def summarize(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUMMARIZE), *map(str, args)], capture_output=True, text=True)


def report(names: list[str], start: str) -> dict:
    return {"checkpoints": names,
            "config": {"train": {"epochs": 2, "lr": 2.0, "weight_decay": 1e-5}},
            "train": {"start": start}, "data": {"fit_on": "train", "fit_examples": 60000},
            "metrics": {"last": {"accuracy": 0.9176}, "best": {"accuracy": 0.9182, "checkpoint": "9.pt"},
                        "swa": {"accuracy": 0.9217}, "twa": {"accuracy": 0.9226}},
            "timings": {"load_and_basis_s": 10.0, "twa_s": 50.0}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "ckpts").mkdir()
    history = {str(e): {"test_accuracy": 0.9 + e / 1000, "seconds": 1.0} for e in range(21)}
    (tmp_path / "ckpts" / "history.json").write_text(json.dumps(history))
    (tmp_path / "head.json").write_text(json.dumps(report([f"{i}.pt" for i in range(11)], "mean")))
    return tmp_path


def test_summarize_table(run_dir: Path) -> None:
    result = summarize(run_dir, f"head={run_dir / 'head.json'}")
    assert result.returncode == 0, result.stderr
    assert ("| head | 0.pt..10.pt (11) | 10 + 2 | lr 2, wd 1e-05, start mean | 91.76 | 91.82 (9.pt) | 92.17 "
            "| **92.26** | +0.09 | 92.00 (20 ep) |") in result.stdout
    assert "twa average time (load + baselines + TWA): head 60s." in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["{run}/nowhere"], "nowhere/ckpts/history.json: No such file or directory; it is written by"),
    (["{run}", "{run}/head.json"], "head.json: expected LABEL=REPORT.json"),
    (["{run}"], "tail.json: No such file or directory; it is the stdout of `twa average ... --json`"),
    (["{run}", "x={run}/empty.json"], "empty.json: not a JSON document"),
])
def test_summarize_errors_are_one_line(run_dir: Path, args: list[str], message: str) -> None:
    (run_dir / "empty.json").write_text("")  # what a failed `twa average --json > x.json` leaves
    result = summarize(*(a.format(run=run_dir) for a in args))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


SOUP_SUMMARIZE = ROOT / "examples" / "soup" / "summarize.py"


def soup_report() -> dict:
    return {"config": {"train": {"optimizer": "adamw", "lr": 0.01}, "granularity": "model", "basis_dtype": "float32"},
            "metrics": {name: {"heldout": {"accuracy": 0.8 + i / 100}, "eval": {"accuracy": 0.7 + i / 100}}
                        for i, name in enumerate(("best_single", "uniform", "greedy", "twa"))},
            "written_method": "twa", "timings": {"twa_s": 12.0}}


def test_soup_summarize_table_and_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text(json.dumps(soup_report()))
    ok = subprocess.run([sys.executable, str(SOUP_SUMMARIZE), str(tmp_path / "a" / "report.json")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| a | adamw | 0.01 | model | float32 | 80.00 / 70.00 | 81.00 / 71.00 | 82.00 / 72.00 | 83.00 / 73.00 " \
           "| twa | 12 |" in ok.stdout
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "other.json").write_text(json.dumps({"config": {}, "metrics": {"twa": {}}}))
    for name, message in [("empty.json", "empty.json: not a JSON document"), ("missing.json", "No such file"),
                          ("other.json", "other.json: not a `twa soup` report (no 'best_single')")]:
        bad = subprocess.run([sys.executable, str(SOUP_SUMMARIZE), str(tmp_path / "a" / "report.json"),
                              str(tmp_path / name)], capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stdout == "", bad.stderr
        assert bad.stderr.startswith("error: ") and message in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_summaries_end_quietly_when_the_reader_stops(run_dir: Path) -> None:
    """`summarize.py ... | head -1`: the reader is gone before the table is written; no traceback, exit 0."""
    (run_dir / "soup.json").write_text(json.dumps(soup_report()))
    for command in ([str(SUMMARIZE), str(run_dir), f"head={run_dir / 'head.json'}"],
                    [str(SOUP_SUMMARIZE), str(run_dir / "soup.json")]):
        read, write = os.pipe()
        os.close(read)  # no reader at all: the first write fails with EPIPE, deterministically
        try:
            proc = subprocess.run([sys.executable, *command], stdout=write, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def script_array(script: str, name: str, out: Path) -> list[str]:
    """The bash array ``name=(...)`` a script defines, expanded by bash with ``OUT=out``."""
    match = re.search(rf"^{name}=\(.*?\)", (ROOT / script).read_text(), re.M | re.S)
    assert match, f"{script} defines no {name}=(...)"
    expanded = subprocess.run(["bash", "-c", f'OUT={shlex.quote(str(out))}; {match.group(0)}; printf "%s\\0" '
                                             f'"${{{name}[@]}}"'], capture_output=True, text=True, check=True)
    return expanded.stdout.split("\0")[:-1]


@pytest.mark.parametrize("script", ["examples/soup/run.sh", "examples/soup/sweep.sh"])
def test_soup_example_commands_build_the_recorded_model(script: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's `twa soup` options on ingredients written as make_finetunes.py writes them (a file spec in
    twa.model, which twa never runs unless --model names it): the run gets past the model (it was refused, exit 5).
    Only --data/--holdout are replaced (tiny data: the real ones read 22k Fashion-MNIST images)."""
    import torch
    from click.testing import CliRunner

    from twa_tool.cli import cli
    from twa_tool.writer import save_safetensors

    spec = re.search(r'^MODEL_SPEC = "(.*)"', (ROOT / "examples/soup/make_finetunes.py").read_text(), re.M)[1]
    metadata = {"twa.model": spec, "twa.model_args": "{}"}  # as make_finetunes.py writes them
    cnn = load_script("examples/fashion_mnist/model.py").cnn
    (tmp_path / "finetunes").mkdir()
    for seed, name in enumerate(["pretrained.safetensors", "finetunes/ft-0.safetensors", "finetunes/ft-1.safetensors"]):
        torch.manual_seed(seed)
        save_safetensors(tmp_path / name, cnn().state_dict(), metadata)
    data = tmp_path / "tiny.py"
    data.write_text("import torch\nfrom torch.utils.data import TensorDataset\n\n\ndef make():\n"
                    "    g = torch.Generator().manual_seed(0)\n"
                    "    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)\n"
                    "    d = TensorDataset(x, y)\n"
                    "    return d, d\n")
    monkeypatch.chdir(ROOT)  # the scripts run from the repository root (relative model and data specs)
    args = ["soup", str(tmp_path / "finetunes"), *script_array(script, "common", tmp_path), "--out",
            str(tmp_path / "soup"), "--data", f"{data}:make", "--holdout", f"{data}:make", "--epochs", "1", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "soup" / "report.json").read_text())["model"]["spec"] == spec


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script does the real work")
def test_gpu_check_script_runs_and_fails_cleanly_without_a_gpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh, the one command for a GPU machine: without a GPU its tests are skipped, the step
    benchmark refuses --device cuda, each step's output is kept, and the script exits 1."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gc")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    device = (tmp_path / "gc" / "device.txt").read_text()
    assert "none visible" in device
    from importlib.metadata import version

    # the packages the tests depend on, with their versions: a GPU run that fails on an old click is told apart
    assert f"click {version('click')}" in device and "safetensors " in device and "TOO OLD" not in device
    assert "skipped" in (tmp_path / "gc" / "tests.txt").read_text()
    assert "--device cuda: no such CUDA device here" in (tmp_path / "gc" / "step.txt").read_text()


@pytest.mark.parametrize("script", ["examples/fashion_mnist/train.py", "examples/soup/make_finetunes.py"])
def test_training_scripts_without_data_fail_in_one_line(script: str, tmp_path: Path) -> None:
    """No Fashion-MNIST under --data-root: one line naming the folder, twa's exit code (4), nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / script), "--out", str(out), "--data-root", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"no Fashion-MNIST files under {tmp_path / 'no'}" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*/*.sh")
                                          if 'cd "$(dirname "${BASH_SOURCE[0]}")/../.."' in p.read_text()))
def test_example_scripts_that_cd_to_the_repository_use_its_venv(script: str) -> None:
    """A script that runs from the repository root finds the repository's .venv as run.sh does, so
    `bash examples/soup/sweep.sh` works without activating it like `bash examples/soup/run.sh`."""
    assert '[[ -x .venv/bin/twa ]] && export PATH="$PWD/.venv/bin:$PATH"' in (ROOT / script).read_text()


def test_lr_sweep_without_checkpoints_refuses_before_creating_anything(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "examples/fashion_mnist/lr_sweep.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "fm")}, timeout=60)
    assert proc.returncode == 2 and "ckpts/20.pt missing; run examples/fashion_mnist/run.sh first" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no empty lr_sweep/ folder left behind


def test_the_ci_example_runs_and_writes_what_the_workflow_uploads(tmp_path: Path) -> None:
    """README, Use in CI: examples/ci/post_train.sh trains briefly, dry-runs, averages with a quality gate and keeps
    the artifacts; examples/ci/github-actions.yml runs it as `bash examples/ci/post_train.sh runs/ci` from the
    repository root and uploads files by path. The script runs here as the workflow runs it (offline, CPU), and every
    path the workflow uploads is there afterwards."""
    workflow = (ROOT / "examples" / "ci" / "github-actions.yml").read_text()
    command = re.search(r"run: bash (examples/ci/post_train\.sh) (\S+)", workflow)
    assert command, "the workflow no longer runs post_train.sh"
    out = command.group(2)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TWA_AVERAGE_THREADS": "1", "NO_COLOR": "1"}
    proc = subprocess.run(["bash", str(ROOT / command.group(1)), out], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^(TWA passed the gate|TWA was worse than SWA: the \w+ baseline was written instead)",
                     proc.stdout, re.MULTILINE), proc.stdout
    report = json.loads((tmp_path / out / "twa.json").read_text())
    assert report["quality_gate"]["against"] == "swa" and report["written_method"] in ("twa", "best", "last", "swa")
    uploads = re.search(r"path: \|\n((?:[ \t]+\S.*\n?)+)", workflow).group(1).split()
    assert uploads and all(p.startswith(out + "/") for p in uploads), uploads
    drawn = any(path.endswith(".png") for path in report["outputs"]["human"])  # the figures need matplotlib
    missing = [p for p in uploads if not list(tmp_path.glob(p)) and (drawn or not p.endswith(".png"))]
    assert not missing, f"the workflow uploads paths post_train.sh does not write: {missing}"
