"""Output safety: every output is all or nothing (staged to temps, renamed together with signals deferred)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import model_flags, snapshot
from safetensors.torch import load_file

from twa_tool.cli import cli
from twa_tool.errors import OutputError
from twa_tool.writer import TEMP_PREFIX, StagedOutput, prepare_output_dir, signals_deferred

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--baselines", "none", "--threads", "1"]
FALLBACK = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--threads", "1", "--lr", "1000",
            "--schedule", "constant", "--fail-if-worse-than", "best", "--on-worse", "fallback"]


def average(ckpts: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["average", str(ckpts), *extra, "--out", str(out)])


def soup(ckpts: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["soup", str(ckpts), *model_flags(), "--data", "synthetic", "--epochs", "1",
                                    "--batch-size", "256", "--threads", "1", "--method", "uniform", *extra,
                                    "--out", str(out)])


def previous_output(out: Path) -> dict[str, tuple[str, int]]:
    """A folder holding an earlier run's files (their content does not matter); its snapshot."""
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model")
    (out / "report.json").write_text("{}")
    (out / "report.md").write_text("old report")
    return snapshot(out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fail_when_staging(monkeypatch: pytest.MonkeyPatch, suffix: str, error: BaseException) -> None:
    """Make the write of the staged file whose name ends with ``suffix`` fail part-way."""
    original = pathlib.Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name.startswith(TEMP_PREFIX) and f"-{suffix}-" in self.name:
            original(self, data[: len(data) // 2])
            raise error
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("flags", [FAST, FALLBACK], ids=["twa", "gate-fallback"])
def test_interrupt_before_the_last_file_leaves_the_previous_output(demo_ckpts: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   flags: list[str]) -> None:
    """SIGINT while report.md is written: the model and report.json are not in place either."""
    out = tmp_path / "o"
    before = previous_output(out)
    fail_when_staging(monkeypatch, "report.md", KeyboardInterrupt())
    result = average(demo_ckpts, out, *flags, "--overwrite")
    assert result.exit_code == 130, result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("png", [False, True])
def test_disk_full_leaves_the_previous_output(demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              png: bool) -> None:
    out = tmp_path / "o"
    before = previous_output(out)
    if png:  # the figures, written after the model and report.json (no matplotlib needed)
        monkeypatch.setattr("twa_tool.pipeline.render_plots", lambda report: ({"accuracy.png": b"\x89PNG"}, None))
    fail_when_staging(monkeypatch, "accuracy.png" if png else "report.md",
                      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = average(demo_ckpts, out, *FAST, "--overwrite")
    assert result.exit_code == 7, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cannot write (No space left on device)" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_renames_is_handled_after_them(demo_ckpts: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, sig: int, code: int) -> None:
    """A signal between two renames waits for the last one: the output is the new one, whole and consistent."""
    out = tmp_path / "o"
    previous_output(out)
    original = os.replace
    sent = []

    def replace(src, dst) -> None:
        original(src, dst)
        if Path(dst).parent == out and not sent:
            sent.append(dst)
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(os, "replace", replace)
    result = average(demo_ckpts, out, *FAST, "--overwrite")
    assert result.exit_code == code, result.output
    assert sent, "the run never reached the renames"
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["model"]["sha256"] == sha(out / "model.safetensors")
    assert (out / "report.md").read_text() != "old report"
    assert not list(out.glob(f"{TEMP_PREFIX}*"))
    assert f"after the output was written: {out} is complete" in result.stderr, result.stderr


def test_ctrl_c_after_the_output_is_written_says_it_is_complete(demo_ckpts: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while printing the summary: the output is whole, and the message must not say nothing was written."""
    import twa_tool.report as report

    def render(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_average", render)
    out = tmp_path / "o"
    result = average(demo_ckpts, out, *FAST)
    assert result.exit_code == 130, result.output
    assert f"interrupted after the output was written: {out} is complete" in result.stderr, result.stderr
    assert json.loads((out / "report.json").read_text())["outputs"]["model"]["sha256"] == sha(out / "model.safetensors")


EXITING = """
import atexit, sys, time
def slow_exit():  # registered before torch: runs after its atexit callbacks, as the interpreter's teardown goes on
    sys.stderr.write("EXITING\\n"); sys.stderr.flush(); time.sleep(20)
atexit.register(slow_exit)
sys.argv = ["twa", *sys.argv[1:]]
from twa_tool.entry import main
main()
"""


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_the_interpreter_exits_ends_it_at_once(demo_ckpts: Path, sig: int, code: int,
                                                             word: str) -> None:
    """After a command has finished, Python's shutdown (torch's teardown: 1-2 s measured) still runs: a signal
    then raised into an atexit callback, printed 'Exception ignored ... Traceback' and the process exited 0.
    It now exits at once with 130/143 and one line, stdout (the --json document) flushed first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", EXITING, "inspect", str(demo_ckpts), "--json"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.strip() == "EXITING":
            process.send_signal(sig)
            break
    out, err = process.communicate(timeout=15)
    err = "".join(lines) + err
    assert process.returncode == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert f"{word} while exiting, after the command had finished" in err
    assert len(json.loads(out)["checkpoints"]) == 5


def test_soup_interrupt_or_disk_full_leaves_the_previous_output(demo_ckpts: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    before = previous_output(out)
    with monkeypatch.context() as patch:
        fail_when_staging(patch, "report.md", KeyboardInterrupt())
        interrupted = soup(demo_ckpts, out, "--overwrite")
    assert interrupted.exit_code == 130, interrupted.output
    assert snapshot(out) == before
    fail_when_staging(monkeypatch, "report.json", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    full = soup(demo_ckpts, out, "--overwrite")
    assert full.exit_code == 7 and "No space left on device" in full.stderr, full.output
    assert snapshot(out) == before


def test_a_failed_rename_phase_puts_everything_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    original = os.replace

    def replace(src, dst) -> None:
        if Path(dst).name == "c" and Path(src).name.startswith(TEMP_PREFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="c: cannot put the output in place .*the previous output was kept"):
        with StagedOutput(tmp_path) as staged:
            for name in ("a", "new", "c", "b"):
                staged.write_bytes(name, f"new {name}".encode())
            staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"


def test_staged_files_appear_only_on_commit(tmp_path: Path) -> None:
    with StagedOutput(tmp_path) as staged:
        digest = staged.write_bytes("x", b"data")
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(TEMP_PREFIX)] == []
        assert staged.commit() == (tmp_path / "x",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and digest == sha(tmp_path / "x")
    with StagedOutput(tmp_path) as staged:
        staged.write_bytes("y", b"never committed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_signals_are_deferred_to_the_end_of_the_block() -> None:
    before = signal.getsignal(signal.SIGINT)
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached = True
    assert reached and signal.getsignal(signal.SIGINT) == before


def test_safetensors_output_loads(demo_ckpts: Path, tmp_path: Path) -> None:
    result = average(demo_ckpts, tmp_path / "o", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["outputs"]["model"]["sha256"] == sha(tmp_path / "o" / "model.safetensors")
    load_file(tmp_path / "o" / "model.safetensors")


# ------------------------------------------------------------------ a rerun leaves no stale output


def names_in(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_overwrite_switching_layout_removes_the_other_layouts_files(demo_ckpts: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsharded then sharded then unsharded again: a loader never finds the previous layout's model."""
    monkeypatch.setattr("twa_tool.pipeline.render_plots", lambda report: ({}, "no plots"))
    out = tmp_path / "o"
    first = average(demo_ckpts, out, *FAST)
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")  # not a twa output: never touched
    sharded = average(demo_ckpts, out, *FAST, "--overwrite", "--max-shard-size", "1KB")
    assert sharded.exit_code == 0, sharded.output
    shards = [n for n in names_in(out) if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors" not in names_in(out)
    assert names_in(out) == sorted([*shards, "model.safetensors.index.json", "notes.txt", "report.json", "report.md"])
    again = average(demo_ckpts, out, *FAST, "--overwrite")
    assert again.exit_code == 0, again.output
    assert names_in(out) == ["model.safetensors", "notes.txt", "report.json", "report.md"]
    assert (out / "notes.txt").read_text() == "mine"


def test_figures_not_drawn_this_time_are_removed(demo_ckpts: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    previous_output(out)
    for name in ("coefficients.png", "accuracy.png"):
        (out / name).write_bytes(b"an earlier run's figure")
    monkeypatch.setattr("twa_tool.plots._pyplot", lambda: None)  # matplotlib missing this time
    result = average(demo_ckpts, out, *FAST, "--overwrite")
    assert result.exit_code == 0, result.output
    assert names_in(out) == ["model.safetensors", "report.json", "report.md"]


def test_any_earlier_output_needs_overwrite(demo_ckpts: Path, tmp_path: Path) -> None:
    """A sharded run into a folder holding only an earlier model.safetensors would remove it: refused."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model")
    before = snapshot(out)
    result = average(demo_ckpts, out, *FAST, "--max-shard-size", "1KB")
    assert result.exit_code == 7, result.output
    assert "model.safetensors already exists; pass --overwrite" in result.stderr
    assert snapshot(out) == before


def test_soup_over_an_average_output_keeps_only_the_soup(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    previous_output(out)
    for name in ("coefficients.png", "accuracy.png", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_bytes(b"an earlier run's file")
    result = soup(demo_ckpts, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert names_in(out) == ["model.safetensors", "report.json", "report.md"]


def test_an_input_is_never_removed_as_an_earlier_output(demo_ckpts: Path, tmp_path: Path) -> None:
    """soup's --base kept as model.safetensors where the output goes: a sharded run would remove it as the
    unsharded layout's stale file after writing its shards (it did, with --overwrite); refused before any work."""
    out = tmp_path / "o"
    out.mkdir()
    base = out / "model.safetensors"
    base.write_bytes((demo_ckpts / "0.safetensors").read_bytes())
    before = snapshot(out)
    result = soup(demo_ckpts, out, "--base", str(base), "--overwrite", "--max-shard-size", "1KB")
    assert result.exit_code == 7, result.output
    assert f"would remove (as an earlier run's output) the input {base}" in result.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["average", "soup"])
def test_a_folder_named_as_an_output_file_is_refused_before_work(command: str, demo_ckpts: Path,
                                                                 tmp_path: Path) -> None:
    """No rename can replace a folder: this failed only at the commit, after the whole run (wrongly blaming
    permissions); now it is refused before any checkpoint is read, and nothing changes."""
    out = tmp_path / "o"
    (out / "report.md").mkdir(parents=True)
    before = snapshot(out)
    run = average(demo_ckpts, out, *FAST, "--overwrite") if command == "average" else soup(demo_ckpts, out,
                                                                                            "--overwrite")
    assert run.exit_code == 7, run.output
    assert f"{out / 'report.md'}: is a folder where the output writes a file" in run.stderr
    assert "reading" not in run.stderr
    assert snapshot(out) == before and names_in(out) == ["report.md"]


def test_a_shorter_demo_replaces_the_longer_ones_checkpoints(tmp_path: Path) -> None:
    """twa demo --overwrite --train-epochs 1 after a 2-epoch demo left the earlier run's 2.safetensors beside the
    new 0 and 1, and averaged all three (two runs mixed); now the earlier run's numbered checkpoints go with
    --overwrite and are refused without it. Other files stay."""
    from twa_tool.demo import DemoTrainConfig, train_checkpoints

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "2.safetensors").write_bytes(b"an earlier, longer demo's last checkpoint")
    (ckpts / "notes.txt").write_text("mine")
    before = snapshot(ckpts)
    config = DemoTrainConfig(out_dir=ckpts, epochs=1, model_args=(("in_channels", "1"), ("num_classes", "10"),
                                                                  ("width", "2")), batch_size=512)
    with pytest.raises(OutputError, match=r"2.safetensors already exists \(an earlier run's checkpoint"):
        train_checkpoints(config)
    assert snapshot(ckpts) == before
    written = train_checkpoints(DemoTrainConfig(**{**config.__dict__, "overwrite": True}))
    assert [p.name for p in written] == ["0.safetensors", "1.safetensors"]
    assert names_in(ckpts) == ["0.safetensors", "1.safetensors", "notes.txt"]


# ------------------------------------------------------------------ a failed run leaves no empty folder


def test_a_failed_run_removes_the_folders_it_created(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "o"
    result = average(demo_ckpts, out, *FAST, "--lr", "1e30", "--schedule", "constant")
    assert result.exit_code == 6, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (OSError(errno.EIO, "I/O error"), 1)])
def test_an_interrupted_run_removes_the_folder_it_created(demo_ckpts: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, error: BaseException,
                                                          code: int) -> None:
    def train(*args, **kwargs):
        assert (tmp_path / "o").is_dir()  # created before the heavy work
        raise error

    monkeypatch.setattr("twa_tool.pipeline.train_projected", train)
    result = average(demo_ckpts, tmp_path / "o", *FAST)
    assert result.exit_code == code, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_folder_the_run_did_not_create_or_that_holds_files_stays(demo_ckpts: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = average(demo_ckpts, tmp_path / "empty", *FAST, "--lr", "1e30", "--schedule", "constant")
    assert result.exit_code == 6 and (tmp_path / "empty").is_dir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = average(demo_ckpts, tmp_path / "busy", *FAST, "--lr", "1e30", "--schedule", "constant")
    assert result.exit_code == 6 and names_in(tmp_path / "busy") == ["notes.txt"]


def test_a_failed_soup_removes_the_folder_it_created(demo_ckpts: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from twa_tool.errors import NumericalError

    def greedy(*args, **kwargs):
        assert (tmp_path / "o").is_dir()
        raise NumericalError("greedy: non-finite loss")

    monkeypatch.setattr("twa_tool.soup.run_greedy", greedy)
    result = soup(demo_ckpts, tmp_path / "o")
    assert result.exit_code == 6, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_a_claimed_output_folder_fails_at_once(tmp_path: Path) -> None:
    """Two runs with one --out would mix one's model with the other's report: the folder is locked per run."""
    out = tmp_path / "o"
    with prepare_output_dir(out, ("model.safetensors", "report.json"), overwrite=False):
        with pytest.raises(OutputError, match=r"--out .*o: another twa run is writing there; wait for it"):
            prepare_output_dir(out, ("model.safetensors", "report.json"), overwrite=True)
        assert out.is_dir()  # the refused run takes nothing away from the holder
    with prepare_output_dir(out, ("model.safetensors", "report.json"), overwrite=False):
        pass  # released: the next run gets it


def test_outputs_written_while_waiting_for_the_lock_need_overwrite(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that finished between this run's check and its lock has left its outputs: they are checked again."""
    import twa_tool.writer as writer

    out = tmp_path / "o"
    out.mkdir()
    take = writer._lock_folder

    def other_run_finishes_first(folder: Path):
        (folder / "report.json").write_text("{}\n")
        return take(folder)

    monkeypatch.setattr(writer, "_lock_folder", other_run_finishes_first)
    with pytest.raises(OutputError, match="report.json already exists; pass --overwrite"):
        prepare_output_dir(out, ("model.safetensors", "report.json"), overwrite=False)
    monkeypatch.setattr(writer, "_lock_folder", take)
    with prepare_output_dir(out, ("model.safetensors", "report.json"), overwrite=True):
        pass  # the refusal released the lock


def test_a_run_on_an_output_folder_another_run_is_writing_exits_7(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = [sys.executable, "-m", "twa_tool", "average", str(demo_ckpts), *FAST, "--out", str(out)]
    first = subprocess.Popen([*args, "--fault", "pause-write"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob(f"{TEMP_PREFIX}*")) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert list(out.glob(f"{TEMP_PREFIX}*")), "the first run never reached its write"
        second = average(demo_ckpts, out, *FAST, "--overwrite")
        assert second.exit_code == 7, second.output
        assert second.stderr.strip().endswith("another twa run is writing there; wait for it to finish or choose "
                                              "another --out")
        assert list(out.glob(f"{TEMP_PREFIX}*")), "the refused run touched the first run's files"
    finally:
        first.kill()
        first.wait(timeout=30)


def test_recorded_copies_are_only_config_and_tokenizer_names_inside_the_folder(tmp_path: Path) -> None:
    """Only the Hugging Face config/tokenizer names a report.json lists are taken, always inside --out (its paths
    may predate a move of the folder), and removed only while unchanged: a listed model file, or a path that
    names no such file, is never removed."""
    from twa_tool.writer import recorded_side_files, remove_unchanged_copies

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("a")
    (tmp_path / "model.safetensors").write_text("m")
    digest = hashlib.sha256(b"{}").hexdigest()
    outside = tmp_path.parent / "outside-config" / "vocab.txt"
    entries = [{"path": str(tmp_path / "config.json"), "sha256": digest},
               {"path": str(tmp_path / "model.safetensors"), "sha256": hashlib.sha256(b"m").hexdigest()},
               {"path": str(outside), "sha256": hashlib.sha256(b"a").hexdigest()},
               {"path": "../../etc/passwd", "sha256": "x"}]
    (tmp_path / "report.json").write_text(json.dumps({"outputs": {"side_files": entries}}))
    copies = recorded_side_files(tmp_path)
    assert copies == {"config.json": digest, "vocab.txt": hashlib.sha256(b"a").hexdigest()}
    assert remove_unchanged_copies(tmp_path, copies, ("model.safetensors", "report.json")) == ["config.json",
                                                                                              "vocab.txt"]
    assert (tmp_path / "model.safetensors").is_file()
    (tmp_path / "report.json").write_text("not json")
    assert recorded_side_files(tmp_path) == {}


def test_a_run_that_meets_anothers_lock_leaves_the_folder_to_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs start on a missing --out: both see it missing, both mkdir it, one locks it. The other stops
    (exit 7), and must not remove the folder as one it created: the first run's writes would then fail
    ('model.safetensors: cannot write (No such file or directory)'; seen 1 in ~10 concurrent runs)."""
    import fcntl

    from twa_tool import writer

    out = tmp_path / "new" / "o"
    real = writer._lock_folder
    holder: list[int] = []

    def other_run_locks_first(folder: Path) -> int | None:
        fd = os.open(folder, os.O_RDONLY)  # another open file description: its flock excludes ours
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.append(fd)
        return real(folder)

    monkeypatch.setattr(writer, "_lock_folder", other_run_locks_first)
    try:
        with pytest.raises(OutputError, match="another twa run is writing there"):
            prepare_output_dir(out, ("model.safetensors",), overwrite=False)
        assert out.is_dir()  # still there for the run that holds it
    finally:
        for fd in holder:
            os.close(fd)
