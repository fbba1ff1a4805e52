"""The CLI's usage contract: environment defaults, flag validation, one-line errors, signals, demo hygiene."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from twa_tool.cli import ProgressSink, cli, make_console
from twa_tool.pipeline import Event

FAST = ["--data", "synthetic", "--epochs", "1", "--threads", "1"]
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="twa")


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result, code: int, *texts: str, progress: bool = False) -> None:
    """Exit ``code`` and one stderr line, ``error: ...`` with ``texts`` (``progress``: other lines may precede it)."""
    assert result.exit_code == code, result.output
    lines = error_lines(result)
    if progress:
        assert not any(line.startswith(("Usage:", "Try ", "Error:")) for line in lines), result.stderr
        lines = [line for line in lines if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(text in lines[0] for text in texts), lines[0]
    assert "Traceback" not in result.output


# --- 1. every option reads TWA_<COMMAND>_<FLAG> -------------------------------------------------------------------

def _sample(param: click.Option) -> tuple[str, object]:
    """An environment value for the option and what click should parse it to (never the default)."""
    if param.is_flag:
        return "1", True
    if isinstance(param.type, click.Choice):
        choice = next(c for c in reversed(param.type.choices) if c != param.default)
        return choice, choice
    if param.type is click.INT:
        return "7", 7
    if param.type is click.FLOAT:
        return "0.25", 0.25
    if isinstance(param.type, click.Path):
        return "some/where", Path("some/where")
    return "x:y", "x:y"


@pytest.mark.parametrize("command_name", ["average", "soup", "inspect", "demo"])
def test_every_option_reads_its_flag_named_variable(command_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    command = cli.commands[command_name]
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    arguments = ["ck"] * sum(isinstance(p, click.Argument) for p in command.params)
    for name in [k for k in os.environ if k.startswith("TWA_")]:
        monkeypatch.delenv(name)
    for param in options:
        flag = max(param.opts, key=len)
        variable = f"TWA_{command_name.upper()}_{flag[2:].replace('-', '_').upper()}"
        text, expected = _sample(param)
        if param.multiple:
            text, expected = f"{text} {text}", (expected, expected)
        required = [a for p in options if p.required and p is not param for a in (p.opts[0], "x")]
        monkeypatch.setenv(variable, text)
        ctx = command.make_context(command_name, [*arguments, *required])
        monkeypatch.delenv(variable)
        assert ctx.params[param.name] == expected, (variable, ctx.params[param.name])


SWITCHES = [(name, p) for name in ("average", "soup", "inspect", "demo") for p in cli.commands[name].params
            if isinstance(p, click.Option) and p.is_flag and not p.hidden]


def test_the_boolean_flags_are_the_ones_expected() -> None:
    names = {(c, max(p.opts, key=len)) for c, p in SWITCHES}
    assert {("average", f) for f in ("--json", "--overwrite", "--quiet", "--verbose", "--trust-pickle", "--download",
                                     "--dry-run")} <= names
    assert {("inspect", "--json"), ("demo", "--download"), ("soup", "--trust-pickle")} <= names


@pytest.mark.parametrize("command_name, param", SWITCHES, ids=[f"{c} {max(p.opts, key=len)}" for c, p in SWITCHES])
def test_a_flag_switched_on_by_its_variable_is_switched_off_by_its_no_form(command_name: str, param: click.Option,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """TWA_AVERAGE_JSON=1 (a CI file's) could not be undone on one command line: every boolean flag has --no-FLAG,
    and its old spellings (--json, -q, -v) still switch it on."""
    command = cli.commands[command_name]
    arguments = ["ck"] * sum(isinstance(p, click.Argument) for p in command.params)
    required = [a for p in command.params if isinstance(p, click.Option) and p.required for a in (p.opts[0], "x")]
    for name in [k for k in os.environ if k.startswith("TWA_")]:
        monkeypatch.delenv(name)
    flag = max(param.opts, key=len)
    monkeypatch.setenv(f"TWA_{command_name.upper()}_{flag[2:].replace('-', '_').upper()}", "1")
    assert param.secondary_opts == [f"--no-{flag[2:]}"]
    assert command.make_context(command_name, [*arguments, *required]).params[param.name] is True
    off = command.make_context(command_name, [*arguments, *required, f"--no-{flag[2:]}"])
    assert off.params[param.name] is False
    monkeypatch.delenv(f"TWA_{command_name.upper()}_{flag[2:].replace('-', '_').upper()}")
    for spelling in param.opts:
        assert command.make_context(command_name, [*arguments, *required, spelling]).params[param.name] is True
    assert command.make_context(command_name, [*arguments, *required]).params[param.name] is False


def test_no_json_silences_stdout_that_the_environment_asked_for(demo_ckpts: Path) -> None:
    assert json.loads(invoke("inspect", demo_ckpts, env={"TWA_INSPECT_JSON": "1"}).stdout)["checkpoints"]
    result = invoke("inspect", demo_ckpts, "--no-json", env={"TWA_INSPECT_JSON": "1"})
    assert result.exit_code == 0 and result.stdout == "", result.output


def test_environment_values_are_validated_like_flags(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke("average", demo_ckpts, *FAST, "--out", tmp_path / "o", env={"TWA_AVERAGE_RANGE": "bad"})
    assert_one_line_error(result, 2, "--range bad: expected A:B")
    result = invoke("inspect", demo_ckpts, env={"TWA_INSPECT_RANGE": "1:x"})
    assert_one_line_error(result, 2, "--range 1:x")


def test_a_usage_error_names_the_variable_that_set_the_flag(demo_ckpts: Path, tmp_path: Path) -> None:
    """A value from a TWA_* variable (set once in a profile or CI file, then forgotten) is named in the error, which
    otherwise blames a flag the command line does not have; a flag given on the command line is not."""
    out = ["--out", tmp_path / "o"]
    result = invoke("average", demo_ckpts, *FAST, *out, env={"TWA_AVERAGE_BASIS_DTYPE": "int9"})
    assert_one_line_error(result, 2, "'--basis-dtype': 'int9' is not one of",
                          "(from the environment: TWA_AVERAGE_BASIS_DTYPE=int9; see 'twa average --help')")
    result = invoke("demo", "--out", tmp_path / "d", env={"TWA_DEMO_THREADS": "0"})
    assert_one_line_error(result, 2, "--threads 0: must be at least 1 (from the environment: TWA_DEMO_THREADS=0)")
    assert not (tmp_path / "d").exists()
    result = invoke("average", demo_ckpts, *FAST, *out, "--fail-if-worse-than", "best",
                    env={"TWA_AVERAGE_BASELINES": "swa"})
    assert_one_line_error(result, 2, "add it to --baselines (from the environment: TWA_AVERAGE_BASELINES=swa)")
    result = invoke("average", demo_ckpts, *FAST, *out, "--basis-dtype", "int9",
                    env={"TWA_AVERAGE_BASIS_DTYPE": "int8"})
    assert_one_line_error(result, 2, "'--basis-dtype': 'int9'")
    assert "environment" not in result.stderr
    result = CliRunner().invoke(cli, ["inspect", str(demo_ckpts)], env={"TWA_INSPECT_RANGE_": "bad"},
                                auto_envvar_prefix="TWA")  # click's own name for the parameter
    assert_one_line_error(result, 2, "--range bad", "(from the environment: TWA_INSPECT_RANGE_=bad)")


def test_an_input_error_names_the_variable_of_the_flag_it_blames(finetunes: Path, tmp_path: Path) -> None:
    """'--base missing: not found' (exit 4) from TWA_SOUP_BASE did not say where --base came from; an input error
    names the variables of the flags in its statement of the problem, not of the flags its fix mentions."""
    args = ["soup", finetunes, "--data", "synthetic", "--out", tmp_path / "o"]
    result = CliRunner().invoke(cli, list(map(str, args)), env={"TWA_SOUP_BASE": "missing"})
    assert_one_line_error(result, 4, "--base missing: not found", "(from the environment: TWA_SOUP_BASE=missing)")
    result = CliRunner().invoke(cli, list(map(str, args)), env={"TWA_SOUP_EXCLUDE": "*"})
    assert result.exit_code == 4 and "environment" not in result.stderr, result.output
    result = CliRunner().invoke(cli, list(map(str, [*args, "--model", "twa:cnn"])),
                                env={"TWA_SOUP_MODEL_ARG": "width=abc"})
    assert_one_line_error(result, 4, "bad --model-arg", "(from the environment: TWA_SOUP_MODEL_ARG=width=abc)")


def test_click_parameter_names_still_work_under_the_prefix(demo_ckpts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(demo_ckpts)], env={"TWA_INSPECT_RANGE_": "bad"},
                                auto_envvar_prefix="TWA")
    assert_one_line_error(result, 2, "--range bad")


# --- 2. float flags: nan and inf are usage errors ------------------------------------------------------------------

FLOAT_FLAGS = [(name, max(p.opts, key=len)) for name in ("average", "soup") for p in cli.commands[name].params
               if isinstance(p, click.Option) and p.type is click.FLOAT]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command_name, flag", FLOAT_FLAGS)
def test_non_finite_floats_are_one_line_usage_errors(command_name: str, flag: str, value: str,
                                                     tmp_path: Path) -> None:
    result = invoke(command_name, tmp_path / "nowhere", *FAST, flag, value, "--out", tmp_path / "o")
    assert_one_line_error(result, 2, f"{flag} {value}:")


@pytest.mark.parametrize("args, text", [
    (["--wd", "nan"], "--wd nan: must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--dist-timeout", "0"], "--dist-timeout 0.0: must be a finite number > 0"),
    (["--dist-timeout", "-5"], "--dist-timeout -5.0: must be a finite number > 0"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_bad_numbers_name_the_flag(args: list[str], text: str, tmp_path: Path) -> None:
    assert_one_line_error(invoke("average", tmp_path / "nowhere", *FAST, *args, "--out", tmp_path / "o"), 2, text)


# --- 3. user text is printed as written (no emoji codes, no markup) ------------------------------------------------

def test_user_text_is_not_turned_into_emoji_or_markup(demo_ckpts: Path, tmp_path: Path) -> None:
    result = invoke("inspect", demo_ckpts, "--range", "1:x:")
    assert_one_line_error(result, 2, "--range 1:x::")
    result = invoke("inspect", demo_ckpts, "--range", "[bold]1:x")
    assert_one_line_error(result, 2, "--range [bold]1:x:")
    result = invoke("soup", demo_ckpts, *FAST, "--holdout", "data.py:train:", "--out", tmp_path / "o")
    assert result.exit_code in (2, 4) and "data.py:train:" in result.stderr, result.stderr


def test_progress_warnings_and_phases_print_user_text_as_written() -> None:
    console = make_console(quiet=False)
    console.file = __import__("io").StringIO()
    with ProgressSink(console) as sink:
        sink(Event("warning", "ck/[red]:train:.pt: skipped"))
        sink(Event("phase", "reading :x: [bold]", total=1))
    text = console.file.getvalue()
    assert "ck/[red]:train:.pt: skipped" in text and "reading :x: [bold]" in text


def test_file_and_folder_names_are_not_read_as_markup(demo_ckpts: Path, tmp_path: Path) -> None:
    import shutil

    ckpts = tmp_path / "a[/b]" / "c[bold]"
    ckpts.mkdir(parents=True)
    for i in range(2):
        shutil.copy(demo_ckpts / f"{i}.safetensors", ckpts / f"{i}[bold]:x:.safetensors")
    result = invoke("inspect", ckpts, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert str(ckpts) in result.stderr and "1[bold]:x:.safetensors" in result.stderr


# --- 4. signals before the command's body, and usage errors, are one line --------------------------------------

def _wait_for_torch(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Until the process has started loading torch's shared library (mid-import)."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.005)
    pytest.fail("torch never loaded")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_torch_imports_is_one_line(demo_ckpts: Path, tmp_path: Path, signum: int, code: int,
                                                  word: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "twa_tool", "average", str(demo_ckpts), *FAST, "--out",
                                str(tmp_path / "o")], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_torch(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(word), stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("entry", ["twa", "-m"])
def test_a_ctrl_c_while_the_cli_itself_loads_is_one_line(entry: str) -> None:
    """The window before click and rich are loaded: a KeyboardInterrupt raised by that import (as a Ctrl-C
    there would) is one line and exit 130 through the console script's entry and ``python -m twa_tool``."""
    start = ("from twa_tool.entry import main; main()" if entry == "twa"
             else "import runpy; runpy.run_module('twa_tool', run_name='__main__')")
    program = ("import sys\n"
               "class Interrupt:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'click':\n"
               "            raise KeyboardInterrupt\n"
               "sys.meta_path.insert(0, Interrupt())\n"
               "sys.argv = ['twa', '--help']\n" + start + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted: nothing was written\n"
    assert 'twa = "twa_tool.entry:main"' in (ROOT / "pyproject.toml").read_text()  # what the script runs


def test_usage_errors_are_one_line_and_help_still_works(tmp_path: Path) -> None:
    result = invoke("average", tmp_path, "--data", "synthetic", "--nope")
    assert_one_line_error(result, 2, "--nope", "twa average --help")
    result = invoke("average", tmp_path, "--data", "synthetic")
    assert_one_line_error(result, 2, "--out")
    result = invoke("average", tmp_path, "--out", tmp_path / "o", "--data", "synthetic", "--epochs", "x")
    assert_one_line_error(result, 2, "--epochs")
    result = invoke("bogus")
    assert_one_line_error(result, 2, "bogus")
    result = invoke("average", "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout and "--dist-timeout" in result.stdout
    assert invoke("--version").exit_code == 0


def test_demo_help_gives_the_average_command_it_runs() -> None:
    """The demo's help called `twa average OUT/ckpts --data DATA --out OUT/twa` its equivalent, which trains 10 TWA
    epochs: the demo trains --epochs (4) at --lr with --seed."""
    text = " ".join(invoke("demo", "--help").stdout.split())
    assert "twa average OUT/ckpts --data DATA --epochs EPOCHS --lr LR --seed SEED --out OUT/twa" in text, text


def test_out_dtype_help_says_which_input_auto_follows() -> None:
    """README: --out-dtype auto writes each tensor in the last checkpoint's dtype (mixed inputs: not "as the
    inputs", which the help said)."""
    for command in ("average", "soup", "demo"):
        text = " ".join(invoke(command, "--help").stdout.split())
        assert "auto: each tensor's dtype in the last input checkpoint" in text, text


# --- 5. a dangling symlink among the checkpoints -------------------------------------------------------------------

def test_a_dangling_symlink_is_an_input_error_naming_the_fix(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(3):
        (ckpts / f"{i}.safetensors").symlink_to(demo_ckpts / f"{i}.safetensors")
    (ckpts / "9.safetensors").symlink_to("gone.safetensors")
    for command in (["inspect", ckpts], ["average", ckpts, *FAST, "--out", tmp_path / "o"]):
        result = invoke(*command)  # inspect: after its table, where the link is a row with this error
        assert_one_line_error(result, 4, "9.safetensors: a symlink to gone.safetensors, which does not exist",
                              "--exclude 9.safetensors", progress=command[0] == "inspect")
    assert invoke("inspect", ckpts, "--exclude", "9.safetensors").exit_code == 0


# --- 6. twa demo checks every flag before training and leaves nothing when it fails ------------------------------

@pytest.mark.parametrize("args, text", [
    (["--train-epochs", "-1"], "--train-epochs -1: must be at least 1"),
    (["--train-epochs", "0"], "--train-epochs 0: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lr", "nan"], "--lr nan"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--data", "bogus"], "--data bogus"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_demo_checks_flags_before_training(args: list[str], text: str, tmp_path: Path) -> None:
    result = invoke("demo", "--out", tmp_path / "d", *args)
    assert_one_line_error(result, 2, text, progress=True)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["average", "soup", "demo"])
def test_threads_beyond_what_torch_can_start_are_a_usage_error(demo_ckpts: Path, tmp_path: Path,
                                                               command: str) -> None:
    """`--threads 100000` reached torch.set_num_threads: at the first operation OpenMP could not start them and ended
    the process with a segmentation fault (exit 139, no line of twa's; 'libgomp: Thread creation failed', exit 1, at
    16384). Run in a subprocess, since the crash would end the test run. Now a usage error, before any work."""
    import subprocess
    import sys

    args = {"average": [demo_ckpts, "--dry-run"], "soup": [demo_ckpts, "--dry-run"], "demo": []}[command]
    proc = subprocess.run([sys.executable, "-m", "twa_tool", command, *map(str, args), "--data", "synthetic",
                           "--threads", "100000", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --threads 100000: must be at most 1024 (this machine "
                                                     "has "), proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["average", "soup"])
@pytest.mark.parametrize("value, text", [
    ("100000", "--num-workers 100000: must be at most 256 (this machine has "),
    ("257", "--num-workers 257: must be at most 256"),
    ("-1", "--num-workers -1: must be at least 0 (0 loads the data in the main process)"),
])
def test_num_workers_is_bounded_as_threads_is(demo_ckpts: Path, tmp_path: Path, command: str, value: str,
                                              text: str) -> None:
    """`--num-workers 100000` was taken as it was (a dry run passed, exit 0): the run would start that many DataLoader
    worker processes at every pass over the data, exhausting the machine's processes (200 already turned a 1 s fit
    into 17 s on 2 CPUs). Now a usage error before any work, as --threads above 1024 is; -1 named no fix."""
    result = invoke(command, demo_ckpts, "--data", "synthetic", "--threads", "1", "--num-workers", value, "--dry-run",
                    "--out", tmp_path / "o")
    assert_one_line_error(result, 2, text)
    assert not (tmp_path / "o").exists()


def test_num_workers_takes_0_to_256() -> None:
    from twa_tool.config import MAX_NUM_WORKERS, AverageConfig, SoupConfig
    from twa_tool.errors import ConfigError

    assert MAX_NUM_WORKERS == 256
    for make in (AverageConfig, SoupConfig):
        for ok in (0, 256):
            make(Path("c"), Path("o"), "synthetic", num_workers=ok)
        with pytest.raises(ConfigError, match="must be at most 256"):
            make(Path("c"), Path("o"), "synthetic", num_workers=257)


def test_demo_threads_reach_the_run(tmp_path: Path) -> None:
    result = invoke("demo", "--out", tmp_path / "d", "--train-epochs", "2", "--epochs", "1", "--threads", "1", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "twa" / "report.json").read_text())["threads"] == 1


def test_demo_prints_the_average_command_it_runs(tmp_path: Path) -> None:
    """The printed `twa average` line carries the demo's non-default flags: run again, it writes the same model."""
    result = invoke("demo", "--out", tmp_path / "d d", "--train-epochs", "2", "--epochs", "1", "--lr", "1.5",
                    "--seed", "3", "--threads", "1", "--out-dtype", "float16")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("twa average "))
    args = shlex.split(line)
    assert args[:3] == ["twa", "average", str(tmp_path / "d d" / "ckpts")], line
    for flag, value in [("--epochs", "1"), ("--lr", "1.5"), ("--seed", "3"), ("--threads", "1"),
                        ("--out-dtype", "float16"), ("--out", str(tmp_path / "d d" / "twa"))]:
        assert args[args.index(flag) + 1] == value, line
    args[-1] = str(tmp_path / "again")
    again = invoke(*args[1:], "-q")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "d d" / "twa" / "model.safetensors").read_bytes()


def test_demo_refuses_an_existing_average_output_before_training(tmp_path: Path) -> None:
    (tmp_path / "d" / "twa").mkdir(parents=True)
    (tmp_path / "d" / "twa" / "report.json").write_text("{}")
    result = invoke("demo", "--out", tmp_path / "d", "--train-epochs", "1")
    assert_one_line_error(result, 7, "report.json already exists; pass --overwrite")
    assert not (tmp_path / "d" / "ckpts").exists()


@pytest.mark.parametrize("during", ["training", "averaging"])
def test_an_interrupted_demo_leaves_nothing(during: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import twa_tool.demo
    import twa_tool.pipeline

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if during == "training":
        real = twa_tool.demo.save_safetensors
        calls = []

        def save_then_interrupt(*args: object, **kwargs: object) -> None:
            real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                interrupt()

        monkeypatch.setattr(twa_tool.demo, "save_safetensors", save_then_interrupt)
    else:
        monkeypatch.setattr(twa_tool.pipeline, "run_average", interrupt)
    (tmp_path / "keep").mkdir()
    result = invoke("demo", "--out", tmp_path / "keep" / "new" / "d", "--train-epochs", "2")
    assert result.exit_code == 130, result.output
    assert "interrupted: no partial output was left" in result.stderr
    assert list((tmp_path / "keep").iterdir()) == []


def test_demo_takes_the_download_its_missing_data_error_advises(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`twa demo --data cifar10` without the files says "pass --data-root DIR ..., or --download": the demo takes
    --download (it had no such option: exit 2) and hands it to the dataset (a stand-in download writes tiny files)."""
    import numpy as np

    import twa_tool.data
    from tests.test_data import write_cifar10

    calls = []

    def download(name: str, class_name: str, root: Path, **kwargs: object) -> None:
        calls.append(name)
        write_cifar10(root, np.random.default_rng(0))

    monkeypatch.setattr(twa_tool.data, "_torchvision_download", download)
    args = ["demo", "--data", "cifar10", "--data-root", tmp_path / "data", "--out", tmp_path / "d", "--train-epochs",
            "1", "--epochs", "1", "--threads", "1"]
    assert_one_line_error(invoke(*args), 4, "no CIFAR-10 files", "or --download", progress=True)
    assert calls == [] and not (tmp_path / "d").exists()
    result = invoke(*args, "--download")
    assert result.exit_code == 0, result.output
    assert calls == ["cifar10"] and (tmp_path / "d" / "twa" / "model.safetensors").is_file()


def test_demo_cnn_takes_its_channels_and_classes_from_the_data(tmp_path: Path) -> None:
    """`twa demo --data cifar100` trained a 10-class CNN on labels up to 99 ("unexpected error: IndexError: Target
    89 is out of bounds", exit 1); the CNN's in_channels and num_classes now follow the data, and are recorded."""
    import numpy as np
    from safetensors import safe_open

    from tests.test_data import random_rows, write_cifar_batch

    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-100-python"
    write_cifar_batch(folder / "train", random_rows(rng, 8), [0, 99, 50, 7, 3, 98, 1, 2], "fine_labels")
    write_cifar_batch(folder / "test", random_rows(rng, 4), [98, 1, 5, 6], "fine_labels")
    result = invoke("demo", "--data", "cifar100", "--data-root", tmp_path / "data", "--out", tmp_path / "d",
                    "--train-epochs", "1", "--epochs", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "d" / "ckpts" / "0.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["twa.model_args"]) == {"in_channels": "3", "num_classes": "100", "width": "8"}


# --- 7. benchmarks/soup_memory.py passes names twa soup accepts ---------------------------------------------------

def test_soup_memory_default_dtypes_are_basis_dtypes() -> None:
    spec = importlib.util.spec_from_file_location("soup_memory", ROOT / "benchmarks" / "soup_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    choices = next(p for p in cli.commands["soup"].params if p.name == "basis_dtype").type.choices
    assert set(module.DTYPES) == set(choices)


@pytest.mark.parametrize("data", ["nope", "cifar10"])
def test_demo_says_it_trains_only_once_data_and_model_are_built(tmp_path: Path, data: str) -> None:
    """`twa demo --data nope` printed 'training twa:cnn on nope for 8 epochs -> ...' before its exit-2 error, and
    a dataset missing from disk the same before its exit-4 one: no training ever started. The line now comes once
    the data and the model are built, right before the first epoch."""
    result = invoke("demo", "--data", data, "--data-root", tmp_path / "data", "--out", tmp_path / "d",
                    "--train-epochs", "1", "--epochs", "1", "--threads", "1")
    assert result.exit_code in (2, 4), result.output
    assert "training" not in result.stdout and "training" not in result.stderr, result.output
    assert not (tmp_path / "d").exists()
