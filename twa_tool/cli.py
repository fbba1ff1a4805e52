"""The ``twa`` command line: options -> frozen config -> one pipeline call -> rendering and exit code.

The only module that talks to the user. Human output goes to stderr (rich), machine output
(``--json``) to stdout. Errors are one line naming the file or flag and the fix; ``-v`` adds the
traceback. Exit codes: 0 ok, 1 unexpected, 2 usage, 3 quality gate, 4 bad input, 5 unsafe input, 6 numerical
failure, 7 output failure, 8 another torchrun rank failed, 9 out of memory, 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .config import (
    MAX_NUM_WORKERS,
    AverageConfig,
    CoefficientTrainConfig,
    Selection,
    SoupConfig,
    TrainConfig,
    parse_baselines,
    parse_key_values,
    parse_range,
)
from .errors import (
    CheckpointError,
    ConfigError,
    DistributedError,
    OutOfMemory,
    OutputError,
    QualityGateFailed,
    TwaError,
    UnsafeInputError,
    address_space_limit,
    is_out_of_threads,
    memory_failure,
)
from .signals import signals_deferred

if TYPE_CHECKING:  # torch loads inside the commands, where Ctrl-C and errors are handled
    from .pipeline import Event

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 unexpected failure, 2 usage error, 3 quality gate failed,
4 invalid or incompatible input, 5 unsafe input refused, 6 numerical failure,
7 cannot write output, 8 another torchrun rank failed, 9 out of memory,
130 interrupted, 143 terminated."""


class Terminated(BaseException):
    """Raised from the SIGTERM handler so cleanup (temp files) runs before exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class OutDir(click.Path):
    """``--out``: a folder; an empty value (which ``Path`` would read as the current directory) is refused."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, readable=False)  # twa's own checks say what is wrong (exit 7)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; pass the output folder (e.g. runs/twa)", param, ctx)
        return super().convert(value, param, ctx)


OUT_DIR = OutDir()
# A path to read (CHECKPOINT_DIR, FINETUNES_DIR, --base, --data-root). click's own check of a path it cannot read
# was a usage error (exit 2) where a missing one is invalid input (exit 4): twa's checks report both, naming the fix.
INPUT_PATH = click.Path(path_type=Path, readable=False)


#: The most ``--threads`` takes: torch's OpenMP pool starts them all at its first operation, and one that cannot
#: ends the process ('libgomp: Thread creation failed', exit 1, measured at 16384; a segmentation fault at 32768),
#: where Python cannot report it. Far above any CPU count a run needs, low enough to stay under the usual limits.
MAX_THREADS = 1024


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads (a process-wide setting, so the CLI owns it)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: must be at least 1")
        if threads > MAX_THREADS:
            raise ConfigError(f"--threads {threads}: must be at most {MAX_THREADS} (this machine has "
                              f"{os.cpu_count()} CPUs: more threads than CPUs only slow torch down, and far more end "
                              f"the process when they cannot all start)")
        import torch

        torch.set_num_threads(threads)


def parse_size(text: str) -> int:
    """``--max-shard-size`` (the writer's parser, imported late: it loads torch)."""
    from .writer import parse_size as parse

    return parse(text)


LOG_WIDTH = 400  # stderr when it is not a terminal and COLUMNS is not set (rich: 80); tables take their content's width


def make_console(quiet: bool) -> Console:
    no_color = bool(os.environ.get("NO_COLOR"))
    # emoji off: rich would turn a user's ":x:" or "data.py:train:" into emoji (user text is also escaped);
    # NO_COLOR: no escape codes at all (rich's no_color keeps bold and dim), and plain progress lines
    console = Console(stderr=True, quiet=quiet, no_color=no_color, color_system=None if no_color else "auto",
                      highlight=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a CI log: tables not squeezed to 80 columns
        console.width = LOG_WIDTH
    return console


class ProgressSink:
    """Turns pipeline events into rich progress bars on a terminal, or plain periodic lines otherwise.

    While it is open, SIGINT and SIGTERM raise ``KeyboardInterrupt``/``Terminated`` at once and stay
    latched: a signal that lands where Python drops exceptions (a ``__del__`` or garbage-collector
    callback) raises again at the next progress event, so the run still stops with 130/143.
    """

    def __init__(self, console: Console, interval_s: float = 5.0) -> None:
        self.console = console
        # bars need cursor codes: not without a terminal, nor under NO_COLOR or TERM=dumb (no colour system)
        self.interactive = console.is_terminal and not console.quiet and console.color_system is not None
        self.interval_s = interval_s
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.done = 0
        self.total = 0
        self.phase = ""
        self.last_line = 0.0
        self.started = 0.0
        self.signalled: type[BaseException] | None = None
        self._handlers: dict[int, object] = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = KeyboardInterrupt if signum == signal.SIGINT else Terminated
        raise self.signalled()

    def __enter__(self) -> ProgressSink:
        if _main_thread():
            self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.interactive:
            self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: Event) -> None:
        if self.signalled is not None:  # the signal's first raise was dropped
            raise self.signalled()
        if event.kind == "warning":
            self.console.print(f"[yellow]warning:[/yellow] {escape(event.message)}", soft_wrap=True)
        elif event.kind == "phase":
            self.phase, self.total, self.done = event.message, event.total, 0
            if self.progress is not None:
                self.task = self.progress.add_task(event.message, total=event.total)
            else:
                self.console.print(f"{event.message} ...", markup=False)
                self.last_line = time.monotonic()
            self.started = time.monotonic()
        else:
            self.done += 1
            description = self.phase
            if event.step is not None:
                s = event.step
                description = f"epoch {s.epoch + 1}/{s.epochs} lr {s.lr:.3g} loss {s.loss:.4f}"
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, advance=1, description=description)
            elif time.monotonic() - self.last_line >= self.interval_s or self.done == self.total:
                elapsed = time.monotonic() - self.started
                eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
                detail = f" {description}" if event.step else ""
                self.console.print(f"  {self.phase}: {self.done}/{self.total} [{elapsed:.0f}s elapsed, "
                                   f"~{eta:.0f}s left]{detail}", soft_wrap=True, markup=False)
                self.last_line = time.monotonic()


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 otherwise): ranks other than 0 stay quiet."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


# Flags that only act beside another: (parameter, flag, whether the run uses it, what it needs). Typed on the
# command line without what it needs, the flag would be ignored without a word: a usage error instead (from a
# TWA_* variable, set for every run of a CI file, it stays ignored).
DependentFlag = tuple[str, str, Callable[[Any], bool], str]
AVERAGE_DEPENDENT_FLAGS: tuple[DependentFlag, ...] = (
    ("tolerance", "--tolerance", lambda c: c.fail_if_worse_than is not None, "--fail-if-worse-than BASELINE"),
    ("on_worse", "--on-worse", lambda c: c.fail_if_worse_than is not None, "--fail-if-worse-than BASELINE"),
    ("holdout_fraction", "--holdout-fraction", lambda c: c.fit_on == "holdout", "--fit-on holdout"),
)
SOUP_DEPENDENT_FLAGS: tuple[DependentFlag, ...] = (
    ("momentum", "--momentum", lambda c: c.train.optimizer == "sgd", "--optimizer sgd"),
)


def check_dependent_flags(config: Any, flags: tuple[DependentFlag, ...]) -> None:
    """Refuse a flag typed without the one it acts beside (``AVERAGE_DEPENDENT_FLAGS``)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for name, flag, used, needs in flags:
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE and not used(config):
            raise ConfigError(f"{flag} {ctx.params[name]} has no effect without {needs}: add it, or drop {flag}")


def single_process_only(command: str) -> None:
    """``twa soup`` and ``twa demo`` run on one process: under torchrun every rank would run the whole job, print
    it and write the same output folder, so they refuse (only ``twa average`` shares its work between ranks)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"twa {command} runs on one process, not under torchrun (only twa average shares its "
                          f"work between ranks); run it without torchrun")


def _record_for_torchrun(err: BaseException, verbose: bool) -> None:
    """Under torchrun, leave the error where its failure summary shows it as the root cause: the one line, and
    the traceback only with ``-v`` (torchrun prints what the file holds)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if verbose:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(err)
        return
    message = {"message": f"{type(err).__name__}: {err}", "extraInfo": {"timestamp": str(int(time.time()))}}
    Path(path).write_text(json.dumps({"message": message}))


def _interrupted(word: str, err: BaseException, written: list[Path]) -> str:
    """The line for a stopped run: whether its output had already been written (complete) or not at all."""
    done = getattr(err, "twa_output_complete", None) or (written[-1] if written else None)
    if done is not None:
        return f"[red]{word}[/red] after the output was written: {escape(str(done))} is complete"
    return f"[red]{word}[/red]: no partial output was left"


# What a command that ran out of memory can lower: on the device, mostly the activations (a basis that does
# not fit there stays in host memory); on the host, mostly the basis and the checkpoints.
MEMORY_FIXES: dict[tuple[str, str], str] = {
    ("average", "device"): "lower --batch-size or use --amp bf16",
    ("average", "host"): "store the basis as --basis-dtype int8 (a quarter of float32) or bf16, select fewer "
                         "checkpoints (--last N, --every K) or lower --batch-size; --dry-run prints the memory "
                         "estimate",
    ("soup", "device"): "lower --batch-size or use --amp bf16",
    ("soup", "host"): "store the basis as --basis-dtype int8 (a quarter of float32) or bf16, use fewer "
                      "ingredients (--exclude) or lower --batch-size; --dry-run prints the memory estimate",
}
MEMORY_FIX_ELSE = "free memory or run on a machine with more"
# What a command that could not start a thread can lower: torch's threads (--threads) and the DataLoader's
# worker processes (--num-workers), which count against the same limit.
THREAD_FIXES: dict[str, str] = {
    "average": "lower --threads (e.g. --threads 1) and --num-workers, or raise the limit",
    "soup": "lower --threads (e.g. --threads 1) and --num-workers, or raise the limit",
    "demo": "lower --threads (e.g. --threads 1), or raise the limit",
}
THREAD_FIX_ELSE = "raise the limit, or stop other processes of this user"


def out_of_memory(err: BaseException, command: str | None) -> OutOfMemory | None:
    """A memory failure (``memory_failure``: ``err`` or the one an input error wraps) as one line that says where
    and what to lower; None for any other error."""
    found = memory_failure(err)
    if found is None:
        return None
    err = found
    if is_out_of_threads(err):
        return OutOfMemory("out of threads: a new thread could not be started (the limit on threads and processes, "
                           "ulimit -u or a container's pids limit, or on memory, ulimit -v, is reached): "
                           + THREAD_FIXES.get(command or "", THREAD_FIX_ELSE))
    limit = address_space_limit()
    if isinstance(err, ImportError) and limit is not None:  # torch's libraries do not fit under `ulimit -v`
        library = str(err).split(":")[0]
        return OutOfMemory(f"out of host memory loading {library}: this process's memory limit ({limit // 1024} KiB, "
                           f"ulimit -v or -d) is below what torch maps (a few GiB of address space); raise or remove "
                           f"the limit")
    text, torch = str(err), sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):  # "CUDA out of memory. Tried to ..."
        where = "device"
        backend = text.split(" out of memory")[0].strip() if " out of memory" in text else "device"
        gpu = re.search(r"\bGPU (\d+)", text)
        place = f"{backend} out of memory" + (f" (GPU {gpu[1]})" if gpu else "")
    else:
        where, place = "host", "out of host memory"
    size = re.search(r"(?:allocate|mmap) (\d+(?:\.\d+)? ?(?:[KMGTP]i?B|bytes))", text, re.IGNORECASE)
    amount = size[1] if size else None
    if amount and amount.endswith("bytes"):  # in the largest unit that keeps it at least 1 (0.00 GiB said nothing)
        count = int(amount.split()[0])
        unit = next((u for u in range(3, 0, -1) if count >= 2 ** (10 * u)), 0)
        amount = f"{count / 2 ** (10 * unit):.2f} {('bytes', 'KiB', 'MiB', 'GiB')[unit]}" if unit else f"{count} bytes"
    fix = MEMORY_FIXES.get((command or "", where), MEMORY_FIX_ELSE)
    return OutOfMemory(f"{place}{f' allocating {amount}' if amount else ''}: {fix}")


def run_reported(verbose: bool, console: Console, body: Callable[[], None], written: list[Path] | None = None) -> None:
    """Run a command body, mapping failures to one line and the documented exit code. ``written``: the body
    appends the output folder once its output is in place, so a late Ctrl-C is not reported as nothing written.

    Errors are printed even with ``-q`` (on a console of their own). Under torchrun, rank 0 prints; the
    other ranks only print errors that are their own (unexpected ones and broken process groups, with
    their rank), since every rank meets the same input errors.
    """
    rank = torchrun_rank()
    console = make_console(quiet=False) if console.quiet else console
    if rank:
        console = make_console(quiet=not verbose)
    prefix = f"rank {rank}: " if rank else ""
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    final = False  # under torchrun, once this rank failed: signals ignored until it exits
    try:
        try:
            with signals_deferred():  # raised inside torch's C++ start-up, a signal aborts or is lost
                import torch  # noqa: F401  (every command needs it; the heavy part of the start)
            body()
        except BaseException as err:
            final = _final_under_torchrun()
            context = click.get_current_context(silent=True)
            memory = out_of_memory(err, context.info_name if context else None)
            if memory is not None:
                raise memory from err
            raise
    except TwaError as err:
        if rank and err.exit_code == DistributedError.exit_code:
            console = make_console(quiet=False)
        verbose = verbose and err.traceback_with_verbose  # a failed gate is a result: its line, never a traceback
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        message = str(err)
        # a flag's value may come from a TWA_* variable the user forgot: a usage error names it for any flag it
        # names; another error for the flags in its statement of the problem ("--base missing: not found",
        # "--model M: bad --model-arg"), before the fix (after ";") or the detail (in parentheses)
        problem = message if isinstance(err, ConfigError) else message.split(";")[0].split("(")[0]
        named = re.findall(r"--[a-z][a-z0-9-]*", problem)
        note = environment_note(click.get_current_context(silent=True), named)
        message += f" ({note})" if note else ""
        console.print(f"[red]{prefix}error:[/red] {escape(message)}", soft_wrap=True)
        if err.details:
            console.print(details_text(err.details), soft_wrap=True, markup=False, highlight=False)
        _record_for_torchrun(err, verbose)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        console.print(_interrupted("interrupted", err, written or []), soft_wrap=True)
        sys.exit(130)
    except Terminated as err:
        console.print(_interrupted("terminated", err, written or []), soft_wrap=True)
        sys.exit(143)
    except Exception as err:  # unexpected: still one line, traceback with -v
        console = make_console(quiet=False)
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        console.print(f"[red]{prefix}unexpected error:[/red] {type(err).__name__}: {escape(str(err))} (rerun with -v "
                      f"for the traceback)", soft_wrap=True)
        _record_for_torchrun(err, verbose)
        sys.exit(1)
    finally:
        if previous is not None and not final:
            signal.signal(signal.SIGTERM, previous)


def _final_under_torchrun() -> bool:
    """Under torchrun, a rank that failed has its line and exit code: from now on SIGTERM and SIGINT are ignored
    (torchrun sends SIGTERM to every rank as soon as one fails; raised while this one reports or exits, it
    printed a second line, 'terminated: nothing was written', and turned the code into 143 or a kill).
    Returns whether it did (never on a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not _main_thread():
        return False
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return True


def details_text(rows: list[tuple[str, ...]]) -> str:
    """Rows as aligned plain text (never wrapped or folded, so logs keep one line per row)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def user_prints_to_stderr() -> AbstractContextManager:
    """Around a run, which calls the user's code (``--model``/``--data`` files, datasets, models): whatever it
    prints goes to stderr, so stdout holds nothing but the ``--json`` document."""
    return redirect_stdout(sys.stderr)


def emit(report: dict, as_json: bool, console: Console, render: Callable[[dict, Console], None]) -> None:
    if as_json:
        write_json_document(report)
    render(report, console)


def write_json_document(document: dict) -> None:
    """The ``--json`` document on stdout, flushed. A stdout that is closed or cannot take it (a full disk, a
    reader that went away) is an output error (exit 7): a CI step must not pass on a document that was lost
    (click's echo skipped a closed stdout, exit 0)."""
    stream = sys.stdout
    advice = "the command's own files, if it writes any, are in place; redirect stdout to a file, or drop --json"
    if stream is None:
        raise OutputError(f"--json: stdout is closed, so the document has nowhere to go; {advice}")
    try:
        stream.write(json.dumps(document, indent=2) + "\n")
        stream.flush()
    except OSError as err:
        raise OutputError(f"--json: writing the document to stdout failed ({err.strerror or err}); {advice}") from None


class TwaGroup(click.Group):
    """Click's group with twa's error contract in standalone mode (the ``twa`` command, ``CliRunner``): a usage
    error is one line ``error: ...`` and exit 2 (not click's Usage/Try/Error block), and Ctrl-C or SIGTERM
    before a command's own handling (argument parsing, imports) is one line and exit 130/143."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            sys.exit(report_usage_error(err))
        except (click.Abort, KeyboardInterrupt, Terminated) as err:
            sys.exit(report_interrupt(err))
        sys.exit(code if isinstance(code, int) else 0)


def report_usage_error(err: click.ClickException) -> int:
    """Print a click error as one line (``error: ... (see 'twa average --help')``); return its exit code."""
    message = err.format_message().rstrip(".")
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        param = getattr(err, "param", None)
        note = environment_note(ctx, param.opts if param is not None else [])
        message += f" ({note}; see '{ctx.command_path} --help')" if note else f" (see '{ctx.command_path} --help')"
    make_console(quiet=False).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return err.exit_code


def environment_note(ctx: click.Context | None, flags: list[str]) -> str:
    """``from the environment: TWA_AVERAGE_RANGE=bad`` when any of ``flags`` took its value from a variable (one
    set in a shell profile or a CI file is easily forgotten: the error names a flag the command line lacks)."""
    from click.core import ParameterSource

    found = []
    for param in ctx.command.params if ctx is not None else []:
        if param.name is None or not set(flags) & set(param.opts):
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
            continue
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        if ctx.auto_envvar_prefix:  # click's own name, from the parameter (TWA_AVERAGE_AS_JSON)
            names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
        found += [f"{name}={os.environ[name]}" for name in names if name in os.environ][:1]
    return f"from the environment: {', '.join(found)}" if found else ""


def report_interrupt(err: BaseException) -> int:
    """Ctrl-C (click wraps it in ``Abort``) or SIGTERM before a command started writing: one line, 130 or 143.
    A signal is the user's stop, not a crash: no traceback, ``-v`` or not (as once the command runs)."""
    console = make_console(quiet=False)
    word, code = ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)
    console.print(f"[red]{word}[/red]: nothing was written")
    return code


@click.group(cls=TwaGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="twa")
def cli() -> None:
    """Trainable Weight Averaging: turn a folder of checkpoints into one better model."""


def switch(flag: str, help: str, dest: str | None = None, short: str | None = None) -> Callable:
    """A boolean flag, off by default, with its ``--no-`` form: a ``TWA_<COMMAND>_<FLAG>=1`` set for every run (a
    CI file, a shell profile) is switched off again on one command line (``--json`` ... ``--no-json``)."""
    name = flag.removeprefix("--")
    decls = [*([short] if short else []), f"--{name}/--no-{name}", *([dest] if dest else [])]
    return click.option(*decls, default=False, show_default=False, help=help)


def common_output_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--out-dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                     show_default=True,
                     help="dtype of floating tensors in the output (auto: each tensor's dtype in the last input "
                          "checkpoint)."),
        click.option("--max-shard-size", default=None, metavar="SIZE",
                     help="Shard the output above this size (e.g. 5GB), with a model.safetensors.index.json."),
        switch("--json", "Also print the report as JSON on stdout.", dest="as_json"),
        switch("--overwrite", "Replace existing output files."),
        switch("--quiet", "No human output except errors.", short="-q"),
        switch("--verbose", "Tracebacks on errors.", short="-v"),
    ]):
        fn = option(fn)
    return fn


def train_options(fn: Callable) -> Callable:
    defaults = TrainConfig()
    for option in reversed([
        click.option("--lr", type=float, default=defaults.lr, show_default=True, help="Learning rate of P-SGD."),
        click.option("--wd", type=float, default=defaults.weight_decay, show_default=True, help="Weight decay λ."),
        click.option("--momentum", type=float, default=defaults.momentum, show_default=True),
        click.option("--epochs", type=int, default=defaults.epochs, show_default=True, help="TWA epochs."),
        click.option("--batch-size", type=int, default=defaults.batch_size, show_default=True),
        click.option("--schedule", type=click.Choice(["step", "linear", "constant", "cosine"]),
                     default=defaults.schedule, show_default=True,
                     help="step: x0.1 at floor(0.5E) and floor(0.75E+0.9), as the reference."),
    ]):
        fn = option(fn)
    return fn


def selection_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Only names matching (repeatable); one that names an unnumbered file exactly keeps it "
                          "beside numbered ones."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Drop names matching (repeatable)."),
        click.option("--range", "range_", default=None, metavar="A:B",
                     help="Checkpoints A..B-1 of the numeric order (Python slice)."),
        click.option("--every", type=int, default=None, metavar="K",
                     help="Every K-th checkpoint, counted back from the last one."),
        click.option("--last", type=int, default=None, metavar="N", help="Only the last N selected checkpoints."),
        click.option("--top-k", type=int, default=None, metavar="K",
                     help="The K best by a metric the trainer stored (needs --by and --mode)."),
        click.option("--by", default=None, metavar="METRIC",
                     help="Stored metric for --top-k (the metrics column of `twa inspect`)."),
        click.option("--mode", type=click.Choice(["min", "max"]), default=None, help="Direction for --top-k."),
    ]):
        fn = option(fn)
    return fn


def reader_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--weights", default="raw", show_default=True, metavar="raw|ema|KEY",
                     help="Raw weights, the EMA/averaged copy a trainer stored (never mixed), or the dict of "
                          "tensors under this top-level KEY of the checkpoint dicts (DINO's teacher, a GAN's netG)."),
        click.option("--strip-prefix", default=None, metavar="PREFIX",
                     help="Remove this key prefix (e.g. model.) from every checkpoint key (Lightning files: "
                          "keep the keys under it, the LightningModule's attribute that holds the model)."),
        click.option("--allow-global", "allow_globals", multiple=True, metavar="MODULE.NAME",
                     help="Allow one more class in pickle checkpoints (repeatable), e.g. the one a refusal names."),
        switch("--trust-pickle", "Allow arbitrary code in pickle checkpoints. Only for files you trust."),
    ]):
        fn = option(fn)
    return fn


def make_selection(include: tuple[str, ...], exclude: tuple[str, ...], range_: str | None, every: int | None,
                   last: int | None, top_k: int | None, by: str | None, mode: str | None) -> Selection:
    start, stop = parse_range(range_) if range_ else (None, None)
    return Selection(start=start, stop=stop, last=last, every=every, include=include, exclude=exclude,
                     top_k=top_k, by=by, mode=mode)


def model_options(fn: Callable) -> Callable:
    """--model and --model-arg, shared by the commands that build a model."""
    fn = click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                      help="Keyword argument for the model constructor (repeatable).")(fn)
    return click.option("--model", "model", default=None,
                        help="torchvision:NAME, timm:NAME, twa:cnn, twa:mlp, module:function or file.py:function. "
                             "Optional when the checkpoints record their architecture.")(fn)


def run_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--data", "data", required=True,
                     help="cifar10, cifar100, mnist, fashion-mnist, svhn, imagenet, imagefolder:PATH, synthetic, "
                          "or module:function / file.py:function returning (fit_dataset, eval_dataset)."),
        click.option("--data-root", type=INPUT_PATH, default=None,
                     help="Where the dataset files are."),
        switch("--download", "Allow downloading the dataset (off: offline by default)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
                     help="Autocast the forward passes in bf16 or fp16 (fp16 with gradient scaling)."),
        click.option("--num-workers", type=int, default=0, show_default=True,
                     help=f"DataLoader worker processes, 0 to {MAX_NUM_WORKERS} (0: load in the main process)."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Same seed and --threads on CPU give bit-identical output."),
        click.option("--basis-dtype", type=click.Choice(["float32", "bf16", "int8"]), default="float32",
                     show_default=True, help="Storage of the basis (twa soup: of the ingredients' directions): bf16 "
                                             "halves it, int8 quarters it (one scale per row and 4096 columns; twa "
                                             "soup: per ingredient and tensor); for twa average the build's peak "
                                             "memory too."),
    ]):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint_dir", type=INPUT_PATH)
@click.option("--out", "out_dir", type=OUT_DIR, required=True,
              help="Output folder for model.safetensors, report.json and report.md.")
@model_options
@reader_options
@run_options
@selection_options
@click.option("--start", default="mean", show_default=True, help="Start point: mean, last, or a checkpoint index.")
@train_options
@click.option("--fit-on", type=click.Choice(["train", "holdout"]), default="train", show_default=True,
              help="Fit coefficients on the train split (TWA-t) or a held-out part of it (TWA-v).")
@click.option("--holdout-fraction", type=float, default=0.1, show_default=True,
              help="Share of the train split held out (seeded by --seed) for --fit-on holdout.")
@click.option("--baselines", default="last,best,swa", show_default=True,
              help="Comma-separated subset of last,best,swa, or none.")
@click.option("--rank-rtol", type=float, default=AverageConfig.rank_rtol, show_default=True,
              help="A checkpoint within this fraction of its norm of the span of the earlier ones is dropped from "
                   "the basis (from 1e-6, float32 rounding, to below 1).")
@click.option("--fail-if-worse-than", type=click.Choice(["last", "best", "swa"]), default=None,
              help="Quality gate: exit 3 when TWA's eval accuracy is below this baseline's (the output is still "
                   "written, so it can be inspected).")
@click.option("--tolerance", type=float, default=0.0, show_default=True,
              help="Accuracy (fraction) TWA may lose against the gate's baseline and still pass.")
@click.option("--on-worse", type=click.Choice(["keep", "fallback"]), default="keep", show_default=True,
              help="When the gate fails: keep the TWA model, or write the best baseline instead.")
@click.option("--fault", "faults", multiple=True, hidden=True,
              help="Fault injection for tests: oom-basis, pause-write, kill-rank1.")
@click.option("--dist-timeout", type=float, default=300.0, show_default=True, metavar="SECONDS",
              help="Under torchrun: how long a rank waits for the others in a collective before the run fails.")
@switch("--dry-run", "Check the checkpoints, data and output folder; print the selection, a memory estimate and "
                     "what would be written; touch nothing.")
@common_output_options
def average(checkpoint_dir: Path, out_dir: Path, model: str | None, model_args: tuple[str, ...], weights: str,
            strip_prefix: str | None, allow_globals: tuple[str, ...], trust_pickle: bool, data: str,
            data_root: Path | None, download: bool, device: str, amp: str, num_workers: int, threads: int | None,
            seed: int, include: tuple[str, ...], exclude: tuple[str, ...], range_: str | None, every: int | None,
            last: int | None, top_k: int | None, by: str | None, mode: str | None, start: str, lr: float,
            wd: float, momentum: float, epochs: int, batch_size: int, schedule: str, fit_on: str,
            holdout_fraction: float, baselines: str, rank_rtol: float, fail_if_worse_than: str | None,
            tolerance: float,
            on_worse: str, faults: tuple[str, ...], dist_timeout: float, dry_run: bool, basis_dtype: str,
            out_dtype: str, max_shard_size: str | None, as_json: bool, overwrite: bool, quiet: bool,
            verbose: bool) -> None:
    """Average the checkpoints in CHECKPOINT_DIR with trainable coefficients (TWA).

    Writes OUT/model.safetensors and OUT/report.json, and compares the result with the last
    checkpoint, the best single checkpoint and SWA on the evaluation split. Under torchrun
    (`torchrun --nproc-per-node N -m twa_tool average ...`) the ranks share the data and the basis.
    """
    console = make_console(quiet or torchrun_rank() != 0)

    written: list[Path] = []  # the output folder, once its output is in place
    def body() -> None:
        set_threads(threads)
        from .checkpoints import excludable
        from .pipeline import run_average
        from .report import render_average, render_dry_run

        config = AverageConfig(
            checkpoint_dir=checkpoint_dir, out_dir=out_dir, data=data, model=model,
            model_args=parse_key_values(model_args), data_root=data_root, download=download,
            selection=make_selection(include, exclude, range_, every, last, top_k, by, mode), start=start,
            train=TrainConfig(lr=lr, momentum=momentum, weight_decay=wd, epochs=epochs, batch_size=batch_size,
                              schedule=schedule),
            fit_on=fit_on, holdout_fraction=holdout_fraction, baselines=parse_baselines(baselines), rank_rtol=rank_rtol,
            device=device, amp=amp, num_workers=num_workers, seed=seed, overwrite=overwrite,
            weights=weights, strip_prefix=strip_prefix, trust_pickle=trust_pickle, allow_globals=allow_globals,
            out_dtype=out_dtype, basis_dtype=basis_dtype,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
            fail_if_worse_than=fail_if_worse_than, tolerance=tolerance, on_worse=on_worse, dry_run=dry_run,
            dist_timeout=dist_timeout, faults=faults)
        check_dependent_flags(config, AVERAGE_DEPENDENT_FLAGS)
        if trust_pickle:
            console.print("[yellow]warning:[/yellow] --trust-pickle: pickle checkpoints may run code while loading")
        with process_group(device, config.dist_timeout) as dist, ProgressSink(console) as sink, \
                user_prints_to_stderr(), excludable(checkpoint_dir):
            result = run_average(config, on_event=sink, dist=dist)
            if not dry_run:
                written.append(config.out_dir)
        if dist.is_main:
            emit(result.report, as_json, console, render_dry_run if dry_run else render_average)
        gate = result.report.get("quality_gate")
        if gate is not None and not gate["passed"]:
            from .report import gate_failure

            raise QualityGateFailed(gate_failure(gate, result.model_path))

    run_reported(verbose, console, body, written)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint_dir", type=INPUT_PATH)
@reader_options
@selection_options
@switch("--json", "Print the listing as JSON on stdout.", dest="as_json")
@switch("--quiet", "No human output except errors.", short="-q")
@switch("--verbose", "Tracebacks on errors.", short="-v")
def inspect(checkpoint_dir: Path, weights: str, strip_prefix: str | None, allow_globals: tuple[str, ...],
            trust_pickle: bool,
            include: tuple[str, ...], exclude: tuple[str, ...], range_: str | None,
            every: int | None, last: int | None, top_k: int | None, by: str | None, mode: str | None,
            as_json: bool, quiet: bool, verbose: bool) -> None:
    """List the checkpoints in CHECKPOINT_DIR (from headers) and the selection `twa average` would use.

    `--json` gives a `checkpoints` list in selection order, each with `path`, `epoch` and `step`.
    """
    console = make_console(quiet)

    def body() -> None:
        from .catalog import inspect_directory
        from .checkpoints import no_checkpoints
        from .report import render_inspect

        selection = make_selection(include, exclude, range_, every, last, top_k, by, mode)
        catalog = inspect_directory(checkpoint_dir, selection, weights, strip_prefix, trust_pickle,
                                    allow_globals).as_dict()
        emit(catalog, as_json, console, render_inspect)
        if not catalog["checkpoints"] and not catalog["not_selected"]:  # as `twa average` fails on it
            raise no_checkpoints(checkpoint_dir)
        unreadable = [c for c in catalog["checkpoints"] if c["error"]]
        if unreadable:  # listed above; a CI pre-check must not pass on a folder `twa average` would fail on
            all_fail = len(unreadable) == len(catalog["checkpoints"])  # a reading flag (--weights KEY...), not files
            fix = ("change what the error names (a reading flag applies to every file)" if all_fail else
                   "replace them, or leave them out with --exclude")
            # the exit code twa average gives: that of the first file it fails on, the one named here (5 for a
            # file refused as unsafe, 4 for one that is invalid or corrupt)
            unsafe = unreadable[0]["error_exit_code"] == UnsafeInputError.exit_code
            raise (UnsafeInputError if unsafe else CheckpointError)(
                f"{len(unreadable)} of the {len(catalog['checkpoints'])} selected checkpoints cannot be read (first: "
                f"{unreadable[0]['error']}); twa average would fail on them: {fix}")
        if catalog["refusal"]:  # fewer than 2 distinct selected: as `twa average` refuses it
            raise CheckpointError(catalog["refusal"])

    run_reported(verbose, console, body)


def soup_train_options(fn: Callable) -> Callable:
    defaults = CoefficientTrainConfig()
    for option in reversed([
        click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=defaults.optimizer, show_default=True,
                     help="Optimizer over the coefficients."),
        click.option("--lr", type=float, default=defaults.lr, show_default=True,
                     help="Learning rate of the coefficients."),
        click.option("--wd", type=float, default=defaults.weight_decay, show_default=True,
                     help="Weight decay on the coefficients (pulls them toward 0)."),
        click.option("--momentum", type=float, default=defaults.momentum, show_default=True, help="SGD only."),
        click.option("--epochs", type=int, default=defaults.epochs, show_default=True,
                     help="Epochs over the held-out split (0: no fitting, TWA = uniform)."),
        click.option("--batch-size", type=int, default=defaults.batch_size, show_default=True),
        click.option("--schedule", type=click.Choice(["step", "linear", "constant", "cosine"]),
                     default=defaults.schedule, show_default=True),
        click.option("--warmup", type=float, default=defaults.warmup, show_default=True,
                     help="Linear warm-up over this fraction of the steps."),
    ]):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("finetunes_dir", type=INPUT_PATH)
@click.option("--out", "out_dir", type=OUT_DIR, required=True,
              help="Output folder for model.safetensors, report.json and report.md.")
@model_options
@click.option("--base", type=INPUT_PATH, default=None,
              help="The pretrained model the ingredients were fine-tuned from: TWA then mixes task vectors "
                   "w_i - base.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only ingredients matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Drop ingredients matching (repeatable).")
@reader_options
@run_options
@click.option("--holdout", default=None, metavar="SPEC",
              help="Data spec whose evaluation split is the held-out split (default: carve it from --data's "
                   "fit split).")
@click.option("--holdout-fraction", type=float, default=0.1, show_default=True,
              help="Share of the fit split held out (seeded by --seed) when --holdout is not given.")
@click.option("--method", type=click.Choice(["best", "uniform", "greedy", "twa"]), default="best",
              show_default=True, help="The soup written; best: the best held-out accuracy.")
@click.option("--granularity", type=click.Choice(["model", "layer"]), default="model", show_default=True,
              help="TWA: one coefficient per ingredient, or per ingredient and parameter tensor.")
@soup_train_options
@switch("--dry-run", "Check the fine-tunes, data and output folder; print the ingredients, a memory estimate and "
                     "what would be written; touch nothing.")
@common_output_options
def soup(finetunes_dir: Path, out_dir: Path, model: str | None, model_args: tuple[str, ...], base: Path | None,
         include: tuple[str, ...], exclude: tuple[str, ...], weights: str, strip_prefix: str | None,
         allow_globals: tuple[str, ...], trust_pickle: bool, data: str, data_root: Path | None, download: bool,
         device: str, amp: str, num_workers: int, threads: int | None, seed: int, holdout: str | None,
         holdout_fraction: float, method: str, granularity: str, optimizer: str, lr: float, wd: float,
         momentum: float, epochs: int, batch_size: int, schedule: str, warmup: float, basis_dtype: str,
         dry_run: bool, out_dtype: str, max_shard_size: str | None, as_json: bool, overwrite: bool, quiet: bool,
         verbose: bool) -> None:
    """Uniform, greedy and TWA soups of the fine-tunes in FINETUNES_DIR, side by side; writes one.

    Every ingredient and soup is scored on a held-out split (which chooses: greedy's ranking and
    acceptance, TWA's coefficients, the written soup) and on the evaluation split (reported only).
    """
    console = make_console(quiet)
    fraction_typed = click.get_current_context().get_parameter_source("holdout_fraction") \
        is click.core.ParameterSource.COMMANDLINE

    written: list[Path] = []  # the output folder, once its output is in place
    def body() -> None:
        single_process_only("soup")
        if holdout is not None and fraction_typed:
            raise ConfigError(f"--holdout-fraction {holdout_fraction} has no effect with --holdout (its evaluation "
                              "split is the held-out split): drop one of the two")
        set_threads(threads)
        from .checkpoints import excludable
        from .report import render_soup, render_soup_dry_run
        from .soup import run_soup

        config = SoupConfig(
            finetunes_dir=finetunes_dir, out_dir=out_dir, data=data, model=model,
            model_args=parse_key_values(model_args), data_root=data_root, download=download, base=base,
            include=include, exclude=exclude, holdout=holdout, holdout_fraction=holdout_fraction, method=method,
            granularity=granularity,
            train=CoefficientTrainConfig(optimizer=optimizer, lr=lr, weight_decay=wd, momentum=momentum,
                                         epochs=epochs, batch_size=batch_size, schedule=schedule, warmup=warmup),
            basis_dtype=basis_dtype, device=device, amp=amp, num_workers=num_workers, seed=seed,
            overwrite=overwrite, weights=weights, strip_prefix=strip_prefix, trust_pickle=trust_pickle,
            allow_globals=allow_globals, out_dtype=out_dtype,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None, dry_run=dry_run)
        check_dependent_flags(config, SOUP_DEPENDENT_FLAGS)
        if trust_pickle:
            console.print("[yellow]warning:[/yellow] --trust-pickle: pickle checkpoints may run code while loading")
        with ProgressSink(console) as sink, user_prints_to_stderr(), excludable(finetunes_dir, besides=base):
            result = run_soup(config, on_event=sink)
            if not dry_run:
                written.append(config.out_dir)
        emit(result.report, as_json, console, render_soup_dry_run if dry_run else render_soup)

    run_reported(verbose, console, body, written)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--out", "out_dir", type=OUT_DIR, default=Path("runs/demo"), show_default=True,
              help="Folder for ckpts/ (the training run) and twa/ (the averaged model).")
@click.option("--data", default="synthetic", show_default=True,
              help="Dataset for the demo run (synthetic needs no files; fashion-mnist reads the Debian package).")
@click.option("--data-root", type=INPUT_PATH, default=None, help="Where the dataset files are.")
@switch("--download", "Allow downloading the dataset (off: offline by default).")
@click.option("--train-epochs", type=int, default=8, show_default=True, help="Epochs of the plain SGD run.")
@click.option("--epochs", type=int, default=4, show_default=True, help="TWA epochs.")
@click.option("--lr", type=float, default=2.0, show_default=True, help="TWA learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine).")
@common_output_options
def demo(out_dir: Path, data: str, data_root: Path | None, download: bool, train_epochs: int, epochs: int, lr: float,
         seed: int, threads: int | None, out_dtype: str, max_shard_size: str | None, as_json: bool, overwrite: bool,
         quiet: bool, verbose: bool) -> None:
    """Offline end-to-end demo: train a small CNN saving a checkpoint per epoch, then run TWA on them.

    Equivalent to a short training script followed by
    `twa average OUT/ckpts --data DATA --epochs EPOCHS --lr LR --seed SEED --out OUT/twa` (4 TWA epochs by
    default, where twa average has 10). Every flag is checked before training; a failed or interrupted demo
    removes the checkpoints and folders it created.
    """
    console = make_console(quiet)

    written: list[Path] = []  # the output folder, once its output is in place
    def body() -> None:
        single_process_only("demo")
        from .demo import DemoTrainConfig, missing_folders, remove_partial, train_checkpoints
        from .pipeline import run_average
        from .report import render_average
        from .writer import MODEL_FILE, check_output

        set_threads(threads)
        with user_prints_to_stderr():  # what --data code prints: stdout holds the --json document alone
            train_config = DemoTrainConfig(out_dir=out_dir / "ckpts", data=data, data_root=data_root, download=download,
                                           epochs=train_epochs, seed=seed, overwrite=overwrite)
            # every flag of both steps is checked before training, so a typo costs no run and leaves no ckpts/
            config = AverageConfig(checkpoint_dir=train_config.out_dir, out_dir=out_dir / "twa", data=data,
                                   data_root=data_root, download=download, train=TrainConfig(lr=lr, epochs=epochs),
                                   seed=seed,
                                   overwrite=overwrite, out_dtype=out_dtype,
                                   max_shard_size=parse_size(max_shard_size) if max_shard_size else None)
            check_output(config.out_dir, (MODEL_FILE, "report.json"), overwrite)
            epochs_text = f"{train_epochs} epoch{'' if train_epochs == 1 else 's'}"
            created = missing_folders(train_config.out_dir, config.out_dir)
            checkpoints = train_checkpoints(  # says it trains once the data and model are built: not before an error
                train_config, on_epoch=lambda e, loss: console.print(f"  epoch {e}: train loss {loss:.4f}"),
                on_start=lambda: console.print(f"training {train_config.model} on {data} for {epochs_text} -> "
                                               f"{train_config.out_dir}", markup=False))
            console.print(demo_average_command(config, max_shard_size, threads), markup=False)
            try:
                with ProgressSink(console) as sink:
                    result = run_average(config, on_event=sink)
                    written.append(config.out_dir)
            except BaseException as err:  # a failed or interrupted demo leaves nothing: the rerun starts clean
                if getattr(err, "twa_output_complete", None) is None:  # (unless its output is already whole)
                    remove_partial(checkpoints, created)
                raise
        emit(result.report, as_json, console, render_average)

    run_reported(verbose, console, body, written)


def demo_average_command(config: AverageConfig, max_shard_size: str | None, threads: int | None) -> str:
    """The ``twa average`` command line the demo runs, ready for a shell: ``--epochs``, ``--lr`` and ``--seed``
    always, and every other flag the demo passes on when it is not twa average's default, so the line run again
    gives the same model."""
    args = ["twa", "average", str(config.checkpoint_dir), "--data", config.data]
    if config.data_root is not None:
        args += ["--data-root", str(config.data_root)]
    if config.download:
        args.append("--download")
    args += ["--epochs", str(config.train.epochs), "--lr", str(config.train.lr), "--seed", str(config.seed)]
    if threads is not None:
        args += ["--threads", str(threads)]
    if config.out_dtype != "auto":
        args += ["--out-dtype", config.out_dtype]
    if max_shard_size:
        args += ["--max-shard-size", max_shard_size]
    if config.overwrite:
        args.append("--overwrite")
    return shlex.join([*args, "--out", str(config.out_dir)])


def add_flag_envvars(group: click.Group, prefix: str = "TWA") -> None:
    """Give every visible option of every command the variable its long flag names: ``--range`` of ``average``
    reads ``TWA_AVERAGE_RANGE``, ``--allow-global`` ``TWA_AVERAGE_ALLOW_GLOBAL``. Click's own name, from the
    parameter (``TWA_AVERAGE_RANGE_``, ``TWA_AVERAGE_AS_JSON``), still works under ``auto_envvar_prefix``."""
    for command_name, command in group.commands.items():
        for param in command.params:
            longs = [opt for opt in param.opts if opt.startswith("--")]
            if isinstance(param, click.Option) and not param.hidden and param.envvar is None and longs:
                flag = longs[0][2:].replace("-", "_").upper()
                param.envvar = f"{prefix}_{command_name.upper()}_{flag}"


BACKEND_WORDS = ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset")


def _first_sentence(message: str) -> str:
    """A backend's error without its source location and advice: ``Read error ...: Connection reset by peer``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", message.strip().splitlines()[0] if message.strip() else "no detail")
    return text.split(". ")[0].rstrip(".")


@contextmanager
def process_group(device: str, timeout_s: float) -> Iterator:
    """The torchrun process group for one run (a single-process ``Dist`` outside torchrun); a broken group
    (a peer died, a collective timed out, a rank that never joined) becomes a ``DistributedError``."""
    import torch.distributed as tdist

    from .distributed import init, shutdown
    from .pipeline import resolve_device

    dist = None
    try:
        dist = init(resolve_device(device), timeout_s)  # waits for every rank to join, up to the timeout
        yield dist
        shutdown(dist)
    except RuntimeError as err:  # DistError (a RuntimeError) and the backends' own errors
        active = dist is None or dist.active
        if isinstance(err, tdist.DistError) or (active and any(word in str(err) for word in BACKEND_WORDS)):
            raise DistributedError(f"the torchrun process group failed ({_first_sentence(str(err))}); another "
                                   f"rank died or timed out (--dist-timeout {timeout_s:g}s)") from None
        _leave(dist)
        raise
    except BaseException:
        _leave(dist)
        raise


def _leave(dist: object) -> None:
    """A failed rank whose group still works (every rank refused the same input) leaves it at once: torn down
    later, at exit, after a peer closed its side, gloo aborted the process (SIGABRT instead of the exit code)."""
    import torch.distributed as tdist

    from .distributed import destroy_process_group

    if getattr(dist, "active", False) and tdist.is_initialized():
        destroy_process_group()


add_flag_envvars(cli)


def main() -> None:
    """Console-script entry point; ``TWA_*`` environment variables provide option defaults.

    SIGTERM raises ``Terminated`` from here on (commands report it as exit 143, as ``TwaGroup`` does before
    them); this module imports only click and rich, so an early Ctrl-C also lands in ``TwaGroup``. Under a
    multi-process torchrun the process ends here with its exit code (``end_rank_now``), not by ``SystemExit``.
    """
    if _main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(auto_envvar_prefix="TWA")
    except SystemExit as done:
        if _main_thread() and _joined_a_process_group():
            end_rank_now(done.code)
        raise
    finally:
        if _main_thread():
            exit_at_once_on_signal()


def _joined_a_process_group() -> bool:
    """Is this a rank of a multi-process torchrun whose command loaded the distributed code?"""
    module = sys.modules.get(f"{__package__}.distributed")
    return module is not None and module.launched_by_torchrun()


def end_rank_now(code: object) -> None:
    """A torchrun rank whose command has ended (process group destroyed, outputs in place, its line printed)
    exits here, streams flushed, without the interpreter's teardown: there, gloo objects that outlive
    ``destroy_process_group`` are destroyed with their threads still joinable, and C++ aborts the process
    ('terminate called without an active exception', SIGABRT; measured: 3 of 55 two-rank runs on a loaded
    2-core machine, at the same rate on older twa code, always after 'destroyed' was printed), which torchrun
    reports as the whole job failing."""
    exit_code = 0 if code is None else code if isinstance(code, int) else 1
    if not isinstance(code, (int, type(None))):
        sys.stderr.write(f"{code}\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(exit_code)


def exit_at_once_on_signal() -> None:
    """Once the command has ended (its result printed, its exit code chosen), the interpreter still shuts down
    (torch's teardown takes a second or more): a SIGINT/SIGTERM then ends the process at once with 130/143 and
    one line, with stdout flushed (the ``--json`` document stays whole). Raised into an atexit callback as
    before, it printed a traceback ('Exception ignored in atexit callback') and the process exited 0. (After the
    exit handlers Python puts back the default actions, no Python code runs again, and the signal ends the process
    itself; shells report that as 130/143 too.) An ignored signal (a failed torchrun rank's,
    ``_final_under_torchrun``) stays ignored."""

    def on_signal(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, RuntimeError):  # closed, broken pipe, a write the signal interrupted
                pass
        word = "interrupted" if signum == signal.SIGINT else "terminated"
        try:
            os.write(2, f"{word} while exiting, after the command had finished (see above)\n".encode())
        except OSError:
            pass
        os._exit(130 if signum == signal.SIGINT else 143)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, on_signal)
