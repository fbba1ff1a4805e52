"""The CI contract: quality gate, dry run, output safety, stale temps, signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import model_flags
from twa_tool.cli import cli
from twa_tool.writer import TEMP_PREFIX, save_safetensors

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512"]


def invoke(*args: object, env: dict | None = None):
    return CliRunner().invoke(cli, ["average", *map(str, args)], env=env)


def digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def gate_reports(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run with an impossible tolerance-free gate against best (lr so high TWA is ruined)."""
    out = tmp_path_factory.mktemp("gate")
    bad = invoke(demo_ckpts, *FAST, "--lr", "1000", "--schedule", "constant", "--fail-if-worse-than", "best",
                 "--out", out / "keep", "--json")
    fallback = invoke(demo_ckpts, *FAST, "--lr", "1000", "--schedule", "constant", "--fail-if-worse-than", "best",
                      "--on-worse", "fallback", "--out", out / "fallback", "--json")
    return {"keep": (bad, out / "keep"), "fallback": (fallback, out / "fallback")}


def test_gate_failure_exits_3_and_still_writes(gate_reports: dict) -> None:
    result, out = gate_reports["keep"]
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["quality_gate"]["passed"] is False and report["quality_gate"]["written"] == "twa"
    assert "quality gate failed: TWA accuracy" in result.stderr and "below best" in result.stderr
    assert (out / "model.safetensors").is_file() and json.loads((out / "report.json").read_text()) == report


def test_gate_fallback_writes_the_best_baseline(gate_reports: dict, demo_ckpts: Path) -> None:
    result, out = gate_reports["fallback"]
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    best_baseline = max((m for m in metrics if m != "twa"), key=lambda m: metrics[m]["accuracy"])
    assert report["quality_gate"]["written"] == report["written_method"] == best_baseline
    with safe_open(out / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["twa.method"] == best_baseline
    assert json.loads(meta["twa.coefficients"]) == report["written_coefficients"] != report["coefficients"]
    assert sum(report["written_coefficients"]) == pytest.approx(1.0)  # a checkpoint (one 1.0) or SWA's 1/K each
    saved = load_file(out / "model.safetensors")
    if best_baseline in ("best", "last"):
        source = load_file(demo_ckpts / metrics[best_baseline]["checkpoint"])
        assert torch.equal(saved["head.weight"], source["head.weight"])  # the checkpoint's weights, BN re-estimated
        assert json.loads(meta["twa.coefficients"]).count(1.0) == 1


def test_the_report_keeps_the_data_facts_its_dry_run_plan_gives(gate_reports: dict, demo_ckpts: Path,
                                                                 tmp_path: Path) -> None:
    """The plan's ``data`` promised ``num_classes``; the report dropped it."""
    report = json.loads(gate_reports["keep"][0].stdout)["data"]
    plan = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o", "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    assert report["num_classes"] == 10
    assert {k: v for k, v in json.loads(plan.stdout)["data"].items() if k != "would_download"} == report


def test_gate_passes_with_tolerance(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke(demo_ckpts, *FAST, "--baselines", "swa", "--fail-if-worse-than", "swa", "--tolerance", "1",
                    "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quality_gate"]["passed"] is True


def test_gate_needs_its_baseline(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke(demo_ckpts, *FAST, "--baselines", "last", "--fail-if-worse-than", "swa", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "add it to --baselines" in result.stderr


@pytest.mark.parametrize("plots", [True, False])
def test_dry_run_touches_nothing(demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 plots: bool) -> None:
    """The plan lists the files the run writes: the figures only where matplotlib is installed."""
    from twa_tool import pipeline

    monkeypatch.setattr(pipeline, "plots_installed", lambda: plots)
    before = digest(demo_ckpts)
    result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and len(plan["checkpoints"]) == 5
    names = ("model.safetensors", "report.json", "report.md") + (("coefficients.png", "accuracy.png") if plots else ())
    assert plan["would_write"] == [str(tmp_path / "o" / name) for name in names]
    assert plan["memory_estimate_bytes"]["total"] > plan["memory_estimate_bytes"]["basis_float32"] > 0
    assert not (tmp_path / "o").exists()
    assert digest(demo_ckpts) == before
    assert "nothing was written" in result.stderr


def test_output_over_an_input_is_refused(demo_ckpts: Path, tmp_path: Path) -> None:
    before = digest(demo_ckpts)
    result = invoke(demo_ckpts, *FAST, "--out", demo_ckpts, "--overwrite")
    assert result.exit_code == 7 and "is the checkpoint folder" in result.stderr
    assert digest(demo_ckpts) == before


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("through_link", [False, True])
def test_output_inside_the_checkpoint_folder_is_refused(demo_ckpts: Path, tmp_path: Path, dry_run: bool,
                                                         through_link: bool) -> None:
    """The next run would read ck/twa/ as a checkpoint: refused before any work, even through a symlink."""
    import shutil

    ckpts = tmp_path / "ckpts"
    shutil.copytree(demo_ckpts, ckpts)
    before = digest(ckpts)
    if through_link:
        (tmp_path / "link").symlink_to(ckpts)
    out = (tmp_path / "link" if through_link else ckpts) / "twa"
    result = invoke(ckpts, *FAST, "--out", out, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 7, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --out ") and "is inside the input folder" in line and "choose an --out" in line
    assert "reading checkpoints" not in result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(digest(demo_ckpts)) and digest(ckpts) == before


def test_output_file_that_is_an_input_is_refused(tmp_path: Path) -> None:
    from twa_tool.errors import OutputError
    from twa_tool.writer import check_output

    (tmp_path / "ckpts").mkdir()
    inputs = (tmp_path / "ckpts" / "model.safetensors",)
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output(tmp_path / "ckpts", ("model.safetensors", "report.json"), True, inputs)


def test_not_enough_space_fails_before_work(demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("twa_tool.writer.shutil.disk_usage", lambda p: usage(10, 10, 1000))
    result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 7 and "not enough free space" in result.stderr
    assert not (tmp_path / "o").exists()


def test_reserved_metadata_key_is_refused(tmp_path: Path) -> None:
    from twa_tool.errors import CheckpointError

    with pytest.raises(CheckpointError, match="__metadata__"):
        save_safetensors(tmp_path / "m.safetensors", {"__metadata__": torch.zeros(1)}, {})
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_runs_are_removed(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f"{TEMP_PREFIX}{dead.pid}-model.safetensors-abc"
    stale.write_bytes(b"partial")
    live = out / f"{TEMP_PREFIX}{os.getpid()}-model.safetensors-xyz"
    live.write_bytes(b"someone else's run")
    result = invoke(demo_ckpts, *FAST, "--baselines", "none", "--out", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()


def run_twa(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "twa_tool", "average", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_leaves_no_output(demo_ckpts: Path, tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "o"
    proc = run_twa([str(demo_ckpts), "--data", "synthetic", "--epochs", "200", "--batch-size", "32",
                    "--baselines", "none", "--out", str(out)])
    deadline = time.monotonic() + 120
    while proc.poll() is None and not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the output folder appears once checkpoints are validated, before the heavy work
    time.sleep(3)  # well into reading, baselines or training: 200 epochs take minutes
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "no partial output" in stderr and "Traceback" not in stderr
    assert not out.exists() or [p.name for p in out.iterdir()] == []


def test_concurrent_runs_never_interleave(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = [str(demo_ckpts), *FAST, "--baselines", "none", "--out", str(out), "--overwrite"]
    procs = [run_twa(args) for _ in range(2)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert 0 in [p.returncode for p in procs], errors
    for proc, stderr in zip(procs, errors):  # a run that met the other one's lock stops at once, naming it
        assert proc.returncode == 0 or (proc.returncode == 7 and "another twa run is writing there" in stderr), stderr
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "coefficients.png", "model.safetensors",
                                                     "report.json", "report.md"]
    load_file(out / "model.safetensors")  # a valid file, not an interleaving
    report = json.loads((out / "report.json").read_text())  # and the report of that model, not of the other run's
    assert report["outputs"]["model"]["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_human_report_with_and_without_matplotlib(demo_ckpts: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "a" / "report.md").read_text()
    assert "| SWA (uniform mean + BN) |" in text and "![accuracy.png](accuracy.png)" in text
    assert (tmp_path / "a" / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr("twa_tool.plots._pyplot", lambda: None)
    result = invoke(demo_ckpts, *FAST, "--baselines", "none", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "plots skipped: matplotlib is not installed" in (tmp_path / "b" / "report.md").read_text()
    assert not (tmp_path / "b" / "accuracy.png").exists()


def test_diverging_training_exits_6_naming_step_and_lr(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke(demo_ckpts, *FAST, "--baselines", "none", "--lr", "1e30", "--schedule", "constant",
                    "--out", tmp_path / "o")
    assert result.exit_code == 6, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "at epoch 1 step" in line and "(lr 1e+30); lower --lr" in line
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_no_ansi_codes_when_not_a_terminal(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 0 and "\x1b[" not in result.output
    assert "training coefficients" in result.stderr  # plain progress lines instead of bars


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, "Terminated")])
def test_a_dropped_signal_raises_again_at_the_next_progress_event(sig: int, raised) -> None:
    """A signal's exception raised where Python drops it (a __del__, a GC callback) must not be lost."""
    from rich.console import Console

    from twa_tool import cli as cli_module
    from twa_tool.pipeline import Event

    raised = getattr(cli_module, raised) if isinstance(raised, str) else raised
    before = signal.getsignal(sig)
    with cli_module.ProgressSink(Console(quiet=True)) as sink:
        assert signal.getsignal(sig) == sink._on_signal
        try:
            sink._on_signal(sig, None)  # as the handler would, then the exception is swallowed
        except BaseException as err:  # noqa: BLE001 - the point of the test
            assert isinstance(err, raised)
        with pytest.raises(raised):
            sink(Event("advance"))
    assert signal.getsignal(sig) == before


def test_dry_run_checks_start_against_the_selection(demo_ckpts: Path, tmp_path: Path) -> None:
    for extra in (["--start", "99"], ["--start", "2", "--last", "2"]):
        result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o", "--dry-run", *extra)
        assert result.exit_code == 2, result.output
        assert "checkpoints are selected (indices 0.." in result.stderr
    assert invoke(demo_ckpts, *FAST, "--out", tmp_path / "o", "--dry-run", "--start", "-1").exit_code == 0


@pytest.mark.parametrize("extra, text", [
    (["--out", ""], "Invalid value for '--out': is empty"),
    (["--out", "o", "--tolerance", "2"], "--tolerance 2.0: must be a number from 0 to 1"),
])
def test_values_that_would_silently_mislead_are_refused(demo_ckpts: Path, tmp_path: Path, monkeypatch,
                                                        extra: list[str], text: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(demo_ckpts, *FAST, "--fail-if-worse-than", "last", *extra)
    assert result.exit_code == 2 and text in result.stderr, result.output
    assert not list(tmp_path.iterdir())  # nothing written into the working directory


def test_space_message_names_the_margin_when_free_exceeds_the_output(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """More free space than the output's size, less than size + margin: the message must say why that fails."""
    from twa_tool.errors import OutputError
    from twa_tool.writer import check_output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("twa_tool.writer.shutil.disk_usage", lambda p: usage(0, 0, 110 << 20))
    with pytest.raises(OutputError, match=r"110 MiB free, the output needs about 100 MiB plus a 16 MiB margin"):
        check_output(tmp_path / "o", ("model.safetensors",), False, needed_bytes=100 << 20)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_on_a_virtual_filesystem_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc reports 0 bytes free: "not enough free space … free space" sent users hunting for space to free
    from twa_tool.errors import OutputError
    from twa_tool.writer import check_output

    monkeypatch.setattr("twa_tool.writer.os.access", lambda path, mode: True)  # as root (not root: "not writable")

    with pytest.raises(OutputError, match=r"^/proc: reports no storage at all \(a virtual filesystem"):
        check_output(Path("/proc/twa-out"), ("model.safetensors",), False, needed_bytes=1 << 20)
    check_output(tmp_path / "o", ("model.safetensors",), False, needed_bytes=1 << 20)  # a real disk: no error


def test_an_output_beside_a_file_read_from_outside_the_input_folder_is_allowed(tmp_path: Path) -> None:
    """soup's --base in folder B, --out B: B is not read as an ingredient folder; the base itself is protected."""
    from twa_tool.errors import OutputError
    from twa_tool.writer import check_output

    finetunes, models = tmp_path / "finetunes", tmp_path / "models"
    inputs = (finetunes / "ft-0.safetensors", models / "base.safetensors")
    check_output(models, ("model.safetensors", "report.json"), False, inputs, input_dir=finetunes)
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output(models, ("base.safetensors",), True, inputs, input_dir=finetunes)
    with pytest.raises(OutputError, match="is the checkpoint folder"):
        check_output(finetunes, ("model.safetensors",), False, inputs, input_dir=finetunes)
    with pytest.raises(OutputError, match="is the checkpoint folder"):
        check_output(models, ("model.safetensors",), False, inputs)  # no input folder given: every input's


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "3.06 MiB is free. Including non-PyTorch memory, this process has 79.18 GiB memory in use.")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error, text", [
    (torch.OutOfMemoryError(CUDA_OOM), "error: CUDA out of memory (GPU 0) allocating 2.00 GiB: lower --batch-size"),
    (RuntimeError(CPU_OOM), "error: out of host memory allocating 4.00 GiB: store the basis as --basis-dtype int8"),
    (MemoryError("Unable to allocate 72.8 TiB for an array with shape (10000000000000,) and data type float64"),
     "error: out of host memory allocating 72.8 TiB: store the basis as --basis-dtype int8"),
])
def test_out_of_memory_is_exit_9_with_what_to_lower(demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    error: BaseException, text: str) -> None:
    """Running out of memory was 'unexpected error' (exit 1: 'a bug, report it') with torch's message of several
    sentences; it is the machine's limit, so a code of its own and the flags that lower what ran out."""
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("twa_tool.pipeline.train_projected", fail)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model")
    result = invoke(demo_ckpts, *FAST, "--out", out, "--overwrite")
    assert result.exit_code == 9, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith(text), result.stderr
    assert "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the previous model"
    verbose = invoke(demo_ckpts, *FAST, "--out", out, "--overwrite", "-v")
    assert verbose.exit_code == 9 and "Traceback" in verbose.output  # -v still shows where it ran out


MMAP_OOM = "unable to mmap 44801035 bytes from file <ckpts/epoch_0.pt>: Cannot allocate memory (12)"


@pytest.mark.parametrize("where", ["model", "checkpoint", "checkpoint-mmap", "data"])
def test_out_of_memory_inside_an_input_handler_is_exit_9(plain_pt_ckpts: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Memory that ran out while the model was built, a checkpoint loaded or the data function ran was reported
    as that input's fault (exit 4): "building the model failed ... check --model and --model-arg" (seen under
    `ulimit -v`), "cannot read torch checkpoint ...; the file may be truncated", "the function raised MemoryError".
    It is exit 9 with what to lower, wherever the input handlers wrapped it."""
    from twa_tool import models

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(CPU_OOM)

    data = ["--data", "synthetic"]
    if where == "model":
        monkeypatch.setitem(models.MODEL_FACTORIES, "twa", fail)
    elif where == "checkpoint":
        monkeypatch.setattr(torch, "load", fail)
    elif where == "checkpoint-mmap":  # torch.load(mmap=True) under `ulimit -v`: was "the file may be truncated"
        monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(MMAP_OOM)))
    else:
        (tmp_path / "bigdata.py").write_text("def data():\n    raise MemoryError('Unable to allocate 8.00 GiB')\n")
        data = ["--data", f"{tmp_path / 'bigdata.py'}:data"]
    result = invoke(plain_pt_ckpts, *model_flags(), *data, "--epochs", "1", "--out", tmp_path / "o")
    assert result.exit_code == 9, result.output
    assert result.stderr.startswith("error: out of host memory allocating "), result.stderr
    assert "--basis-dtype int8" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_out_of_memory_fix_names_each_commands_flags() -> None:
    from twa_tool.cli import MEMORY_FIX_ELSE, out_of_memory

    soup = out_of_memory(torch.OutOfMemoryError("MPS backend out of memory (MPS allocated: 9 GB)"), "soup")
    assert soup is not None and soup.exit_code == 9
    assert str(soup) == "MPS backend out of memory: lower --batch-size or use --amp bf16"
    assert "--exclude" in str(out_of_memory(MemoryError(), "soup"))
    for command in ("average", "soup"):  # the dry run's estimate is where to see what a smaller run would need
        assert str(out_of_memory(MemoryError(), command)).endswith("; --dry-run prints the memory estimate")
    assert "--last N, --every K" in str(out_of_memory(MemoryError(), "average"))
    assert str(out_of_memory(MemoryError(), "inspect")) == f"out of host memory: {MEMORY_FIX_ELSE}"
    mapping = OSError(12, "Cannot allocate memory")  # mmap of the basis under a memory limit (ulimit -v)
    assert str(out_of_memory(mapping, "average")).startswith("out of host memory: store the basis as --basis-dtype")
    assert out_of_memory(OSError(2, "No such file or directory"), "average") is None
    assert out_of_memory(RuntimeError("shape mismatch"), "average") is None
    assert out_of_memory(KeyboardInterrupt(), "average") is None


def test_only_an_input_error_raised_from_a_memory_failure_is_one() -> None:
    """An input error (exit 4) raised from a memory failure is exit 9; any other error keeps its own exit code
    whatever it was raised while handling, and an input error of its own stays one."""
    from twa_tool.cli import memory_failure, out_of_memory
    from twa_tool.errors import CheckpointError, NumericalError

    def raised(error: BaseException, cause: BaseException, suppress: bool) -> BaseException:
        try:
            try:
                raise cause
            except BaseException as inner:
                if suppress:
                    raise error from None  # the handlers' "from None" keeps the original as the context
                raise error from inner
        except BaseException as outer:
            return outer

    oom = RuntimeError(CPU_OOM)
    for suppress in (True, False):
        wrapped = raised(CheckpointError("x.pt: cannot read torch checkpoint"), oom, suppress)
        assert memory_failure(wrapped) is oom
        assert str(out_of_memory(wrapped, "average")).startswith("out of host memory allocating 4.00 GiB: ")
        assert memory_failure(raised(NumericalError("non-finite"), MemoryError(), suppress)) is None
        assert memory_failure(raised(KeyboardInterrupt(), MemoryError(), suppress)) is None
        assert memory_failure(raised(CheckpointError("bad"), ValueError("bad zip"), suppress)) is None
    assert memory_failure(CheckpointError("x.pt: truncated")) is None
    mapped = RuntimeError(MMAP_OOM)
    assert str(out_of_memory(mapped, "average")).startswith("out of host memory allocating 42.73 MiB: ")
    assert out_of_memory(RuntimeError("unable to open file <a.pt>: No such file or directory (2)"), "average") is None
    small = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 524288 bytes.")
    assert str(out_of_memory(small, "average")).startswith("out of host memory allocating 512.00 KiB: ")  # 0.00 GiB


NO_THREAD_SCRIPT = """
import sys, threading
if sys.argv[1] == "stack":  # every new thread fails as under a pids limit: its stack cannot be allocated
    threading.stack_size(1 << 50)
else:  # the second of the basis threads fails, after the first started
    start, count = threading.Thread.start, []
    def failing_start(self):
        if self.name.startswith("twa-basis"):
            count.append(self.name)
            if len(count) == 2:
                raise RuntimeError("can't start new thread")
        return start(self)
    threading.Thread.start = failing_start
sys.argv = ["twa", "average", *sys.argv[2:]]
from twa_tool.entry import main
main()
"""


@pytest.mark.parametrize("where", ["stack", "second basis thread"])
def test_a_thread_that_cannot_start_is_exit_9_naming_threads(demo_ckpts: Path, tmp_path: Path, where: str) -> None:
    """'RuntimeError: can't start new thread' (ulimit -u, a container's pids limit, or ulimit -v: seen at ulimit -v
    3300000 starting the basis threads) was 'unexpected error' (exit 1, 'a bug'). It is exit 9, naming what ran out
    and what to lower; and when it was not the first of the basis threads, the run hung at exit, joining a thread
    that waited for the others to start."""
    out = tmp_path / "o"
    args = [str(demo_ckpts), *model_flags(), *FAST, "--threads", "4", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", NO_THREAD_SCRIPT, where.split()[0], *args], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 9, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["error: out of threads: a new thread could not be started (the limit on threads and processes, "
                      "ulimit -u or a container's pids limit, or on memory, ulimit -v, is reached): lower --threads "
                      "(e.g. --threads 1) and --num-workers, or raise the limit"], proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout and not out.exists()


@pytest.mark.parametrize("failure, text", [
    ("raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))", "error: out of host memory: "),  # an mmap's
    ("numpy.empty(1 << 50)", "error: out of host memory allocating 8.00 PiB: "),
    ("raise RuntimeError(\"can't start new thread\")", "error: out of threads: "),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_memory_or_threads_running_out_in_a_dataloader_worker_is_exit_9(plain_pt_ckpts: Path, tmp_path: Path,
                                                                         failure: str, text: str,
                                                                         workers: int) -> None:
    """An example read in a DataLoader worker that ran out of memory ('OSError: [Errno 12] Cannot allocate memory'
    from an mmap, numpy's allocation) was 'reading a batch of --data failed' (exit 4: torch raises it again in the
    main process without its errno, or as a RuntimeError), and a thread that could not start was exit 4 with or
    without workers. Each is exit 9, with or without workers."""
    (tmp_path / "oomdata.py").write_text(f"""
import errno, os
import numpy
import torch
from torch.utils.data import Dataset

class Examples(Dataset):
    def __init__(self, fail):
        self.fail = fail
    def __len__(self):
        return 64
    def __getitem__(self, index):
        if self.fail and index > 0:  # the first example is checked before any work
            {failure}
        return torch.zeros(1, 16, 16), index % 10

def data():
    return Examples(True), Examples(False)
""")
    result = invoke(plain_pt_ckpts, *model_flags(), "--data", f"{tmp_path / 'oomdata.py'}:data", "--epochs", "1",
                    "--num-workers", workers, "--out", tmp_path / "o")
    assert result.exit_code == 9, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(text), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_torch_that_cannot_be_mapped_under_a_memory_limit_is_exit_9(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `ulimit -v` below what torch maps, importing it failed with 'ImportError: libtorch_cpu.so: failed to map
    segment from shared object': 'unexpected error' (exit 1). It is exit 9 naming the limit. The same ImportError
    without a limit (a file system mounted noexec says so too) stays what it was."""
    import resource

    from twa_tool import cli as cli_module
    from twa_tool import errors

    limit = 256 * 2 ** 20  # Python with click and rich fits (about 25 MiB); torch's libraries do not
    proc = subprocess.run([sys.executable, "-m", "twa_tool", "inspect", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 9, proc.stderr
    errors_seen = proc.stderr.strip().splitlines()
    assert len(errors_seen) == 1 and errors_seen[0].startswith("error: out of host memory"), proc.stderr
    unmapped = ImportError("libtorch_cpu.so: failed to map segment from shared object")
    monkeypatch.setattr(errors, "address_space_limit", lambda: None)
    monkeypatch.setattr(cli_module, "address_space_limit", lambda: None)
    assert cli_module.out_of_memory(unmapped, "average") is None  # no limit: not memory (noexec, say)
    monkeypatch.setattr(errors, "address_space_limit", lambda: limit)
    monkeypatch.setattr(cli_module, "address_space_limit", lambda: limit)
    assert str(cli_module.out_of_memory(unmapped, "average")) == (
        "out of host memory loading libtorch_cpu.so: this process's memory limit (262144 KiB, ulimit -v or -d) is "
        "below what torch maps (a few GiB of address space); raise or remove the limit")


@pytest.mark.parametrize("extra, text", [
    (["--tolerance", "0.01"], "--tolerance 0.01 has no effect without --fail-if-worse-than BASELINE"),
    (["--on-worse", "fallback"], "--on-worse fallback has no effect without --fail-if-worse-than BASELINE"),
    (["--holdout-fraction", "0.2"], "--holdout-fraction 0.2 has no effect without --fit-on holdout"),
])
def test_a_flag_typed_without_the_one_it_acts_beside_is_a_usage_error(demo_ckpts: Path, tmp_path: Path,
                                                                        extra: list[str], text: str) -> None:
    """Each of these was ignored without a word: a CI step that typed --tolerance but forgot the gate ran ungated."""
    result = invoke(demo_ckpts, *FAST, *extra, "--out", tmp_path / "o", "--dry-run")
    assert result.exit_code == 2 and f"error: {text}: add it, or drop" in result.stderr, result.output
    assert not (tmp_path / "o").exists()
    with_gate = invoke(demo_ckpts, *FAST, *extra, "--fail-if-worse-than", "swa", "--fit-on", "holdout",
                       "--out", tmp_path / "o", "--dry-run")
    assert with_gate.exit_code == 0, with_gate.output
    from_environment = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o", "--dry-run",
                              env={"TWA_AVERAGE_TOLERANCE": "0.01", "TWA_AVERAGE_HOLDOUT_FRACTION": "0.2"})
    assert from_environment.exit_code == 0, from_environment.output  # a CI file's defaults for every run


def test_every_exit_code_is_documented_in_the_readme_and_the_help() -> None:
    """Exit 9 (out of memory) came without a row in the README's table or a word in --help: each code an error
    class carries is listed in both."""
    import re

    from twa_tool import errors
    from twa_tool.cli import EXIT_CODES_HELP

    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.TwaError)}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = {int(code) for code in re.findall(r"^\| (\d+) \|", readme, re.MULTILINE)}
    assert codes <= table, sorted(codes - table)
    listed = {int(code) for code in re.findall(r"(\d+) [a-z]", EXIT_CODES_HELP)}
    assert codes | {0} <= listed, sorted((codes | {0}) - listed)


def test_no_color_means_no_escape_codes_even_on_a_terminal(demo_ckpts: Path, tmp_path: Path) -> None:
    """Issue 5: 'no ANSI codes when not a terminal or with NO_COLOR'. On a terminal, NO_COLOR dropped the colours
    but kept bold, dim and the progress bars' cursor codes; now it gives plain text and plain progress lines."""
    args = [demo_ckpts, "--data", "synthetic", "--epochs", "1", "--baselines", "none", "--out", tmp_path / "o",
            "--overwrite"]
    terminal = invoke(*args, env={"FORCE_COLOR": "1", "NO_COLOR": None})  # rich: FORCE_COLOR means a terminal
    assert terminal.exit_code == 0 and "\x1b[" in terminal.stderr, terminal.output
    plain = invoke(*args, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.exit_code == 0 and "\x1b" not in plain.stderr, plain.output
    assert "training coefficients" in plain.stderr and "TWA" in plain.stderr


def test_every_file_written_is_listed_in_the_report_and_on_the_console(demo_ckpts: Path, tmp_path: Path) -> None:
    # report.md and the figures were written but neither listed in report.json's outputs nor in the "wrote" lines
    result = invoke(demo_ckpts, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    outputs = json.loads((tmp_path / "o" / "report.json").read_text())["outputs"]
    listed = {outputs["report"]["path"], *outputs["human"], *(f["path"] for f in outputs["files"])}
    assert listed == {str(p) for p in (tmp_path / "o").iterdir()}
    assert outputs["human"][0] == str(tmp_path / "o" / "report.md")
    printed = {line.split()[1] for line in result.stderr.splitlines() if line.startswith("wrote ")}
    assert printed == listed


def test_a_json_document_that_cannot_reach_stdout_is_exit_7(demo_ckpts: Path, tmp_path: Path) -> None:
    """`--json` into a full disk was exit 1 ('unexpected error'), and into a closed stdout exit 0 with the document
    lost (click's echo skips a closed stream): a CI step would pass on nothing. Both are now exit 7, one line."""
    command = [sys.executable, "-m", "twa_tool", "inspect", str(demo_ckpts), "--json"]
    if Path("/dev/full").exists():  # Linux: every write fails with ENOSPC
        with open("/dev/full", "w") as full:
            out = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        assert out.returncode == 7, out.stderr
        assert "No space left on device" in out.stderr and "Traceback" not in out.stderr
    closed = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=300,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 7, closed.stderr
    lines = closed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --json: stdout is closed") and "Traceback" not in closed.stderr
    whole = subprocess.run(command, capture_output=True, text=True, timeout=300)  # an open stdout: unchanged
    assert whole.returncode == 0 and json.loads(whole.stdout)["checkpoints"]
