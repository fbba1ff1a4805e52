"""Domain errors. Each carries the process exit code the CLI maps it to.

Library code raises these with a message that names the file or flag at fault and the fix; the CLI
prints that one line (no traceback unless ``-v``) and exits with ``exit_code``.
"""

from __future__ import annotations

import errno
import glob
import os
import shlex
import sys
from pathlib import Path


class TwaError(Exception):
    """Base class of every error twa reports to the user. Exit code 1 unless a subclass says otherwise.

    ``details`` optionally carries rows (tuples of strings, first row the header) that the CLI shows
    as a compact table under the one-line message.
    """

    exit_code: int = 1
    #: whether ``-v`` adds the traceback: not for an outcome the run reports on purpose (a failed quality gate)
    traceback_with_verbose: bool = True

    def __init__(self, message: str, details: list[tuple[str, ...]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class ConfigError(TwaError):
    """A flag or option value is wrong (usage error)."""

    exit_code = 2


class QualityGateFailed(TwaError):
    """The result is worse than the baseline named by --fail-if-worse-than (the output is still written).

    A result, not a crash: one line and exit 3 even under ``-v``."""

    exit_code = 3
    traceback_with_verbose = False


class InputError(TwaError):
    """Invalid, corrupt or incompatible input: checkpoints, model spec, data."""

    exit_code = 4


class CheckpointError(InputError):
    """A checkpoint file cannot be read, or checkpoints disagree with each other or with the model."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read as one: truncated, corrupt (a CRC mismatch), not a checkpoint at all.
    The message is ``path: problem; fix``. A command that filters its inputs with ``--exclude`` offers that way out
    too (``leaving_out``)."""

    def __init__(self, path: os.PathLike | str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.path, self.problem, self.fix = path, problem, fix

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.problem, self.fix)

    def leaving_out(self, name: str) -> UnreadableCheckpoint:
        """The same error, its fix ending with ``--exclude NAME``: ``name`` is the entry of the folder that holds the
        file (the file itself, its ``checkpoint-<step>/`` folder, or the index of a sharded model)."""
        it = "it" if name == os.path.basename(self.path) else name
        return UnreadableCheckpoint(self.path, self.problem, f"{self.fix}, or leave {it} out with {exclude_hint(name)}")


class DataError(InputError):
    """A dataset cannot be found or read."""


class MissingData(DataError):
    """A dataset's files are not on disk (``--download`` could fetch them). ``download_into``: the folder a
    ``--download`` would fetch them into."""

    def __init__(self, message: str, download_into: Path) -> None:
        super().__init__(message)
        self.download_into = download_into


class ModelError(InputError):
    """The model cannot be built from its spec."""


class ModelSpecError(ConfigError, ModelError):
    """``--model`` names nothing there: a malformed spec, an unknown model name, a missing file, module or function.
    A usage error (exit 2), as the same mistakes in ``--data`` are; a ``ModelError`` too, so a spec a checkpoint
    records is reported as that file's (exit 4). Code that is there but fails (a syntax error, an import inside it,
    the function raising) stays a ``ModelError`` (exit 4)."""

    exit_code = 2


class UnsafeInputError(TwaError):
    """An input would need unpickling of arbitrary code; refused unless the user opts in."""

    exit_code = 5


class NumericalError(TwaError):
    """Non-finite weights or loss, or too few independent checkpoints."""

    exit_code = 6


class OutputError(TwaError):
    """The output cannot be written (exists without --overwrite, no permission, no space)."""

    exit_code = 7


class DistributedError(TwaError):
    """Another rank of a torchrun job failed, or the process group broke (a peer died or timed out)."""

    exit_code = 8


class OutOfMemory(TwaError):
    """The host or the device ran out of memory: not a bug, a run too big for the machine."""

    exit_code = 9


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the machine running out of memory: torch's ``OutOfMemoryError`` (a device), the
    RuntimeError of torch's CPU allocator ("can't allocate memory") or of its mapped reads (``torch.load(...,
    mmap=True)``: "unable to mmap N bytes from file <...>: Cannot allocate memory (12)"), a MemoryError
    (Python, numpy) or ENOMEM (a mapping), any of these in a DataLoader worker (``worker_error_line``), or a
    shared library (torch's) that could not be mapped under an address-space limit (``ulimit -v``). Handlers that
    turn a failure of the data or the model into an input error let these through: the run was too big, the input
    is not at fault."""
    torch = sys.modules.get("torch")
    line = worker_error_line(err)
    if line is not None:  # raised again in the main process as its type with the worker's traceback as text
        kind = line.split(":", 1)[0].rpartition(".")[2]  # numpy's "numpy.core._exceptions._ArrayMemoryError"
        return (kind.endswith("MemoryError") or f"[Errno {errno.ENOMEM}]" in line
                or any(text in line for text in ENOMEM_TEXTS))
    return (isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))
            or (isinstance(err, RuntimeError) and any(text in str(err) for text in ENOMEM_TEXTS))
            or (isinstance(err, OSError) and err.errno == errno.ENOMEM)
            or (isinstance(err, ImportError) and UNMAPPED_LIBRARY in str(err) and address_space_limit() is not None))


def is_out_of_threads(err: BaseException) -> bool:
    """Whether ``err`` is a thread that could not be started: Python's RuntimeError "can't start new thread"
    (pthread_create failed: the limit on threads and processes, ``ulimit -u`` or a container's pids limit, or
    the memory for its stack, ``ulimit -v``), also from a DataLoader worker. Not a bug: a limit of the machine."""
    line = worker_error_line(err)
    text = line.partition(": ")[2] if line is not None else str(err)
    return isinstance(err, RuntimeError) and text.startswith(NO_THREAD_TEXT)


def worker_error_line(err: BaseException) -> str | None:
    """The original error's last line (``Type: message``) when ``err`` is a DataLoader worker's failure raised
    again in the main process: torch gives it the worker's traceback as its text ("Caught OSError in DataLoader
    worker process 0." ...) and the worker's type, without its attributes (an OSError loses its errno), or
    RuntimeError when that type cannot be made from a text (numpy's ``_ArrayMemoryError``). None otherwise."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and " in DataLoader worker process" in lines[0]:
        return lines[-1]
    return None


def address_space_limit() -> int | None:
    """The soft limit on this process's address space or data (``ulimit -v``/``-d``) in bytes; None without one."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    limits = [resource.getrlimit(kind)[0] for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA)]
    finite = [limit for limit in limits if limit != resource.RLIM_INFINITY]
    return min(finite) if finite else None


#: Python's words for a thread that could not be started.
NO_THREAD_TEXT = "can't start new thread"
#: The dynamic loader's words for a library whose segments could not be mapped (ENOMEM under ``ulimit -v``; also a
#: file system mounted noexec, which is why it counts as memory only under an address-space limit).
UNMAPPED_LIBRARY = "failed to map segment from shared object"


def memory_failure(err: BaseException) -> BaseException | None:
    """``err`` when it is a memory failure (``is_out_of_memory``) or a thread that could not be started
    (``is_out_of_threads``), or the one an input error (exit 4) was raised from: the handlers that turn a failure
    of the model's constructor, a checkpoint's unpickler or the data's code into "building the model failed",
    "cannot read torch checkpoint", "the function raised" keep the original as the cause or context (``from err``,
    or ``from None``, which keeps it as the context)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if is_out_of_memory(current) or is_out_of_threads(current):
            return current
        if not isinstance(current, InputError):  # any other error's verdict stands, whatever it was raised from
            return None
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


#: How torch's CPU allocator and its file mappings word a failed allocation (the second: strerror(ENOMEM)).
ENOMEM_TEXTS = ("can't allocate memory", f"{os.strerror(errno.ENOMEM)} ({errno.ENOMEM})")


def name_too_long(err: BaseException) -> bool:
    """Whether ``err`` is the file system refusing a path with a name longer than it allows (ENAMETOOLONG): the
    path given is at fault (nothing of that name can exist), not a file's contents, and not a bug."""
    return isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG


#: Why a path ``name_too_long`` refused is wrong, for the one-line errors.
TOO_LONG = "a name in this path is longer than the file system allows (255 bytes on most)"


def exclude_hint(name: str) -> str:
    """``--exclude NAME`` as a user can paste it: glob characters escaped (``--exclude`` takes a pattern),
    quoted for the shell when needed."""
    return f"--exclude {shlex.quote(glob.escape(name))}"


def include_hint(name: str) -> str:
    """``--include NAME`` as a user can paste it (see ``exclude_hint``)."""
    return f"--include {shlex.quote(glob.escape(name))}"


def one_line(err: BaseException) -> str:
    """``Type: message`` of an exception on one line. A DataLoader worker's error (``Caught Type in DataLoader
    worker process N.`` and the worker's traceback) gives the traceback's last line, the original error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1]
    return f"{type(err).__name__}: {' '.join(lines)}" if lines else type(err).__name__
