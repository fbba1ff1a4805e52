"""Writing outputs: one writer for every command. Never a partial file, never a silent overwrite.

Every file is written to a temp name in the target directory, fsync'ed and renamed into place.
The safetensors serialiser is deterministic (sorted header, fixed layout), so a seeded CPU run
reproduces its output byte for byte. Large models are sharded the Hugging Face way
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, the index written last),
and when the input was a Hugging Face folder its ``config.json`` and tokenizer files are copied so
``from_pretrained`` works on the output.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import SAFETENSORS_DTYPES, sha256_file
from .errors import TOO_LONG, CheckpointError, ConfigError, OutputError, name_too_long
from .plots import PLOT_FILES
from .signals import signals_deferred

TEMP_PREFIX = ".twa-tmp-"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "report.json"
HUMAN_REPORT_FILE = "report.md"
#: Every name twa writes as an output (besides shards): a rerun replaces all of them, never other files.
OUTPUT_FILES = (MODEL_FILE, INDEX_FILE, REPORT_FILE, HUMAN_REPORT_FILE, *PLOT_FILES)
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
#: Files copied from a Hugging Face input folder so ``from_pretrained`` works on the output.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                 "added_tokens.json", "preprocessor_config.json")
OUT_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Free space a run leaves on top of its outputs' size (a full disk breaks more than this run).
_SPACE_MARGIN = 16 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)

@contextmanager
def atomic_path(final: Path, pause_before_rename_s: float = 0.0) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it is renamed onto ``final``, else removed.

    ``pause_before_rename_s`` is a fault-injection hook for tests (a kill while the temp exists).
    """
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{final.name}-", dir=final.parent)
    os.fchmod(fd, _file_mode())  # mkstemp's 0600 would make outputs private: use the umask as open() does
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if pause_before_rename_s:
            time.sleep(pause_before_rename_s)
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (read once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Delete temp files left by killed twa runs (their pid is gone); a live run's temps are kept."""
    removed = []
    for path in out_dir.glob(f"{TEMP_PREFIX}*"):
        match = re.match(rf"{re.escape(TEMP_PREFIX)}(\d+)-", path.name)
        if match and not _pid_alive(int(match.group(1))) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def is_output_name(name: str) -> bool:
    """Is ``name`` one of the files twa writes as an output (model, shard, index, reports, figures)?"""
    return name in OUTPUT_FILES or _SHARD_FILE.match(name) is not None


def outputs_in(out_dir: Path) -> list[str]:
    """The names of twa output files (or links) already in ``out_dir``, e.g. an earlier run's."""
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if is_output_name(p.name) and (p.is_file() or p.is_symlink()))


def remove_stale_outputs(out_dir: Path, written: tuple[str, ...]) -> list[str]:
    """Remove the twa output files in ``out_dir`` that this run did not write (the other layout's model
    files, figures not drawn this time), so the folder holds one consistent output. Other files stay."""
    removed = []
    for name in outputs_in(out_dir):
        if name not in written:
            try:
                (out_dir / name).unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise OutputError(f"{out_dir / name}: an earlier run's output could not be removed ({err.strerror}); "
                                  f"remove it by hand") from None
            removed.append(name)
    return removed


def recorded_side_files(out_dir: Path) -> dict[str, str]:
    """The Hugging Face config/tokenizer copies (name -> sha256) that the twa report in ``out_dir`` says its run
    wrote (``outputs.side_files``); nothing when there is no such report or it cannot be read."""
    try:
        outputs = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8")).get("outputs", {})
        entries = outputs.get("side_files", [])
        return {Path(e["path"]).name: e["sha256"] for e in entries
                if Path(e["path"]).name in HF_SIDE_FILES and isinstance(e["sha256"], str)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def remove_unchanged_copies(out_dir: Path, copies: Mapping[str, str], written: tuple[str, ...]) -> list[str]:
    """Remove the config/tokenizer copies an earlier run wrote (``recorded_side_files``) that this run did not
    write again, where each is still byte for byte what that run wrote: a later model beside an earlier
    model's config.json would load wrongly. A file changed since (the user's) stays."""
    removed = []
    for name, digest in copies.items():
        path = out_dir / name
        if name in written or not path.is_file() or path.is_symlink():
            continue
        try:
            if sha256_file(path) == digest:
                path.unlink()
                removed.append(name)
        except OSError:
            continue  # still there: it is listed nowhere, as before
    return removed


def _refuse_unresolvable_link(out_dir: Path) -> None:
    """An ``out_dir`` that is, or lies under, a symlink to a missing folder or a symlink loop: no folder can be
    made there (mkdir says "File exists"), and resolving the path fails."""
    for link in (out_dir, *out_dir.parents):
        if not link.is_symlink():
            continue
        try:
            link.stat()
        except OSError as err:
            why = ("is a symlink loop (it leads back to itself); repoint or remove it" if err.errno == errno.ELOOP
                   else f"is a symlink to {os.readlink(link)}, which does not exist; create that folder")
            raise OutputError(f"--out {out_dir}: {link} {why}, or choose another --out") from None


def check_output(out_dir: Path, names: tuple[str, ...], overwrite: bool, inputs: tuple[Path, ...] = (),
                 needed_bytes: int = 0, input_dir: Path | None = None) -> None:
    """Everything about the output that can fail, checked before any heavy work, touching nothing.

    ``input_dir`` is the folder the inputs are discovered in: an output in it or anywhere under it
    would be read as a checkpoint by the next run, so it is refused (symlinks resolved). Without it, the
    folders of ``inputs`` are refused. Any ``inputs`` file itself is never overwritten, nor removed as an
    earlier run's output (e.g. soup's ``--base`` kept as ``model.safetensors`` where a sharded output goes).
    A folder on the way this user may not read or enter, or a name too long, is an output error too (exit 7).
    """
    try:
        _check_output(out_dir, names, overwrite, inputs, needed_bytes, input_dir)
    except PermissionError as err:
        raise OutputError(f"{err.filename or out_dir}: permission denied (this user may not read or enter it); "
                          f"choose another --out, or change its permissions") from None
    except OSError as err:
        if not name_too_long(err):
            raise
        raise OutputError(f"{err.filename or out_dir}: {TOO_LONG}; choose a shorter --out") from None


def _check_output(out_dir: Path, names: tuple[str, ...], overwrite: bool, inputs: tuple[Path, ...],
                  needed_bytes: int, input_dir: Path | None) -> None:
    """``check_output``'s checks."""
    _refuse_unresolvable_link(out_dir)  # first: resolve() below raises RuntimeError on a symlink loop
    replaced = set(names) | (set(outputs_in(out_dir)) if any(is_output_name(n) for n in names) else set())
    targets = {(out_dir / n).resolve(): n for n in replaced}
    clash = next((p for p in inputs if p.resolve() in targets), None)
    if clash is not None:
        verb = "overwrite" if targets[clash.resolve()] in names else "remove (as an earlier run's output)"
        raise OutputError(f"{out_dir}: writing there would {verb} the input {clash}; choose another --out")
    if input_dir is None:  # the inputs' own folders are the input folders
        folder = next((p.parent for p in inputs if p.resolve().parent == out_dir.resolve()), None)
    else:  # only ``input_dir`` is read again: e.g. soup's --base may live where the output goes
        folder = input_dir if out_dir.resolve() == input_dir.resolve() else None
    if folder is not None:
        raise OutputError(f"{out_dir}: is the checkpoint folder (the output would become an input of the next run); "
                          f"choose another --out")
    if input_dir is not None and input_dir.resolve() in out_dir.resolve().parents:
        raise OutputError(f"--out {out_dir}: is inside the input folder {input_dir} (the next run would read the "
                          f"output as a checkpoint); choose an --out outside {input_dir}")
    folder_named = next((n for n in names if (out_dir / n).is_dir() and not (out_dir / n).is_symlink()), None)
    if folder_named is not None:  # no rename can replace it: found now, not after the whole run
        raise OutputError(f"{out_dir / folder_named}: is a folder where the output writes a file; move it away or "
                          f"choose another --out")
    existing = [n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    if any(is_output_name(n) for n in names):  # a run replaces every earlier output there, not only its names
        existing += [n for n in outputs_in(out_dir) if n not in existing]
    if existing and not overwrite:
        raise OutputError(f"{out_dir / existing[0]} already exists; pass --overwrite or choose another --out")
    parent = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"{parent}: exists and is not a directory; choose another --out")
    if parent is not None and not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: not writable; choose another --out")
    if parent is not None and needed_bytes:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes + _SPACE_MARGIN and _no_storage(parent):
            raise OutputError(f"{parent}: reports no storage at all (a virtual filesystem such as /proc or /sys, or a "
                              f"mount that does not report its size); choose another --out")
        if free < needed_bytes + _SPACE_MARGIN:
            raise OutputError(f"{parent}: not enough free space ({free >> 20} MiB free, the output needs about "
                              f"{needed_bytes >> 20} MiB plus a {_SPACE_MARGIN >> 20} MiB margin); free space or "
                              f"choose another --out")


def _no_storage(folder: Path) -> bool:
    """Whether ``folder``'s filesystem has no blocks at all (``/proc``, ``/sys``): not a place for files."""
    try:
        return os.statvfs(folder).f_blocks == 0
    except (AttributeError, OSError):  # no statvfs (Windows) or not answerable: the usual free-space message
        return False


class ClaimedOutput:
    """An output folder a run has checked, created where it was missing, and locked for itself: a second
    twa run with the same ``--out`` fails at once (``OutputError``) instead of mixing its files with this
    run's. Use it as a context manager around the run: leaving it releases the lock, and on a failure or a
    signal first removes the folders the run created while they are still empty (``remove_empty_dirs``).

    The lock is ``flock`` on the folder itself (advisory, held by the open folder, so the kernel drops it
    when the process dies); where ``flock`` is missing or the file system refuses it, runs are unlocked.
    """

    def __init__(self, out_dir: Path, created: tuple[Path, ...], lock_fd: int | None) -> None:
        self.out_dir = out_dir
        self.created = created
        self._lock_fd = lock_fd

    def __enter__(self) -> ClaimedOutput:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is not None:
                remove_empty_dirs(self.created)
        finally:
            self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the folder drops its flock
            self._lock_fd = None


def _lock_folder(out_dir: Path) -> int | None:
    """Take ``out_dir``'s exclusive ``flock`` without waiting; return the open folder that holds it, or None
    where locking is not available. ``OutputError`` when another process (another twa run) holds it."""
    try:
        import fcntl
    except ImportError:  # not on POSIX
        return None
    try:
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"--out {out_dir}: another twa run is writing there; wait for it to finish or choose "
                          f"another --out") from None
    except OSError:  # a file system without flock: no lock, as before
        os.close(fd)
        return None
    return fd


def prepare_output_dir(out_dir: Path, names: tuple[str, ...], overwrite: bool, inputs: tuple[Path, ...] = (),
                       needed_bytes: int = 0, input_dir: Path | None = None) -> ClaimedOutput:
    """Check the output (see ``check_output``), create ``out_dir``, lock it for this run and clear stale temp
    files in it. The checks run again once the lock is held: a run that finished in between has left its
    outputs, which need ``--overwrite`` like any other.

    Returns the ``ClaimedOutput`` to hold around the run (it releases the lock and takes back the folders
    it created if the run fails).
    """
    check_output(out_dir, names, overwrite, inputs, needed_bytes, input_dir)
    created = tuple(p for p in (out_dir, *out_dir.parents) if not (p.exists() or p.is_symlink()))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_empty_dirs(created)
        raise OutputError(f"{out_dir}: cannot create output directory ({err.strerror})") from None
    with removed_if_empty(created):
        if not os.access(out_dir, os.W_OK):
            raise OutputError(f"{out_dir}: not writable; choose another --out")
    # Outside removed_if_empty: when another run holds the lock, the folder is that run's output now, even if
    # this run's mkdir made it (both started before either created it); removing it would pull it from under
    # that run, whose writes then fail.
    claim = ClaimedOutput(out_dir, created, _lock_folder(out_dir))
    with removed_if_empty(created):
        try:
            check_output(out_dir, names, overwrite, inputs, 0, input_dir)
            remove_stale_temps(out_dir)
        except BaseException:
            claim.release()
            raise
    return claim


def remove_empty_dirs(created: tuple[Path, ...]) -> None:
    """Remove the folders a run created (deepest first) while they are empty: a failed run leaves no empty
    --out behind. A folder that holds anything (another run's temp file, a user's file) stays."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def removed_if_empty(created: tuple[Path, ...]) -> Iterator[None]:
    """On any failure or signal in the block, ``remove_empty_dirs(created)``; then let it propagate."""
    try:
        yield
    except BaseException:
        remove_empty_dirs(created)
        raise


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    """Serialise to the safetensors format deterministically (same tensors + metadata = same bytes).

    ``safetensors.torch.save_file`` writes its metadata map in hash order, which differs from run to
    run; here header keys are sorted and tensors laid out by (alignment, name), so a seeded CPU run
    reproduces its output file byte for byte. Tied tensors are written once per name.
    """
    if "__metadata__" in tensors:
        raise CheckpointError("the state dict has a tensor named __metadata__, which safetensors reserves; rename "
                              "it in the model")
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def save_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                     pause_before_rename_s: float = 0.0) -> str:
    """Write a state dict atomically as safetensors with string metadata; return its sha256.

    Tied tensors are written under every name, so the key set equals the model's state dict and
    loads with ``load_state_dict(strict=True)``.
    """
    meta = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
    try:
        with atomic_path(path, pause_before_rename_s) as tmp:
            save_file(state, str(tmp), metadata=meta)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror}); check free space and permissions") from None
    return sha256_file(path)


def _backup(final: Path) -> Path | None:
    """A hard link to the file ``final`` (so a failed rename phase can put it back), or None when there is
    no file there or the file system has no hard links."""
    if not (final.is_file() or final.is_symlink()):
        return None
    backup = final.parent / f"{TEMP_PREFIX}{os.getpid()}-{final.name}-old-{secrets.token_hex(4)}"
    try:
        os.link(final, backup, follow_symlinks=False)
    except OSError:
        return None
    return backup


def _replace_all(out_dir: Path, temps: Mapping[str, Path]) -> None:
    """Rename every temp onto its name. On an error the renames already done are undone (a replaced file
    is restored from its hard-link backup, a new one removed) and OutputError names the file."""
    undo: list[tuple[Path, Path | None, bool]] = []  # (final, backup, existed before)
    try:
        for name, tmp in temps.items():
            final = out_dir / name
            existed = final.exists() or final.is_symlink()
            undo.append((final, _backup(final), existed))
            os.replace(tmp, final)
    except OSError as err:
        failed = undo[-1][0]
        for path, backup, existed in reversed(undo):
            try:
                if backup is not None:
                    os.replace(backup, path)
                elif not existed:
                    path.unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the error below is the one to report
        raise OutputError(f"{failed}: cannot put the output in place ({err.strerror}); the previous output was kept; "
                          f"check permissions on {out_dir}") from None
    finally:
        for _, backup, _ in undo:
            if backup is not None:
                backup.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable (not every platform can open a directory: best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedOutput:
    """The files of one output, all or nothing. Each file is written to a temp name in ``out_dir`` and
    fsync'ed; ``commit`` then renames them all into place in one short phase with SIGINT/SIGTERM deferred.
    Leaving the ``with`` block without a commit (an error, a signal) removes every temp: nothing changes.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._temps: dict[str, Path] = {}  # final name -> temp path, in write order

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._temps)

    def discard(self) -> None:
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._temps.clear()

    @contextmanager
    def _temp(self, name: str) -> Iterator[Path]:
        if name in self._temps:
            raise ValueError(f"{name}: staged twice")
        final = self.out_dir / name
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{name}-", dir=self.out_dir)
            os.fchmod(fd, _file_mode())
            os.close(fd)
            self._temps[name] = Path(tmp)
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as err:
            raise OutputError(f"{final}: cannot write ({err.strerror}); check free space and permissions") from None

    def write_bytes(self, name: str, data: bytes) -> str:
        """Stage a file with these bytes; return its sha256."""
        with self._temp(name) as tmp:
            tmp.write_bytes(data)
        return sha256_file(self._temps[name])

    def save_json(self, name: str, document: object) -> str:
        return self.write_bytes(name, (json.dumps(document, indent=2) + "\n").encode())

    def save_safetensors(self, name: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
        """Stage a state dict as safetensors with string metadata (see ``save_file``); return its sha256."""
        meta = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
        with self._temp(name) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return sha256_file(self._temps[name])

    def copy_file(self, name: str, source: Path) -> str:
        """Stage a copy of ``source``; return its sha256."""
        with self._temp(name) as tmp:
            shutil.copyfile(source, tmp)
        return sha256_file(self._temps[name])

    def commit(self, pause_before_rename_s: float = 0.0) -> tuple[Path, ...]:
        """Rename every staged file into place, all or none, then remove the twa outputs of an earlier run
        that this one did not write (``remove_stale_outputs``), and the config/tokenizer copies its report
        recorded that are still as it wrote them (``remove_unchanged_copies``); return the final paths.

        ``pause_before_rename_s`` is a fault-injection hook for tests (a kill while the temps exist).
        """
        if pause_before_rename_s:
            time.sleep(pause_before_rename_s)
        paths = tuple(self.out_dir / n for n in self._temps)
        copies = recorded_side_files(self.out_dir)  # before report.json is replaced
        committed = False
        try:
            with signals_deferred():
                try:
                    _replace_all(self.out_dir, self._temps)
                finally:
                    self.discard()  # after a failed phase: the temps left; after a commit: nothing
                committed = True
                remove_stale_outputs(self.out_dir, tuple(p.name for p in paths))
                remove_unchanged_copies(self.out_dir, copies, tuple(p.name for p in paths))
                _fsync_dir(self.out_dir)
        except BaseException as err:
            if committed:  # e.g. the signal held during the renames: the output is in place and whole
                err.twa_output_complete = self.out_dir  # type: ignore[attr-defined]
            raise
        return paths


def parse_size(text: str) -> int:
    """``--max-shard-size``: bytes from ``5GB``, ``500MB``, ``2GiB``, ``1000000``."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--max-shard-size {text}: expected a size like 5GB, 500MB or 2GiB")
    number, unit, suffix = match.groups()
    base = 1024 if suffix and suffix.lower() == "ib" else 1000
    value = int(float(number) * base ** "BKMGT".index(unit.upper() or "B"))
    if value <= 0:
        raise ConfigError(f"--max-shard-size {text}: must be positive")
    return value


def cast_state(state: Mapping[str, torch.Tensor], out_dtype: str) -> dict[str, torch.Tensor]:
    """``--out-dtype``: cast floating tensors (``auto`` keeps each tensor's dtype); integers never change."""
    if out_dtype not in OUT_DTYPES:
        raise ConfigError(f"--out-dtype {out_dtype}: choose one of {', '.join(OUT_DTYPES)}")
    dtype = OUT_DTYPES[out_dtype]
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def plan_shards(state: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Group keys (in sorted order) into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    keys = sorted(state)
    if max_bytes is None:
        return [keys]
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def model_file_names(shard_count: int) -> tuple[str, ...]:
    if shard_count == 1:
        return (MODEL_FILE,)
    return tuple(f"model-{i:05d}-of-{shard_count:05d}.safetensors" for i in range(1, shard_count + 1)) + (INDEX_FILE,)


def planned_model(tensors: Mapping[str, tuple[tuple[int, ...], str]], out_dtype: str,
                  max_bytes: int | None) -> tuple[tuple[str, ...], int]:
    """The model files ``write_model`` writes for tensors of these shapes and stored dtypes (a checkpoint's
    header), after ``--out-dtype`` and ``--max-shard-size``, and their total size in bytes; no data read."""
    meta = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in tensors.items()}
    cast = cast_state(meta, out_dtype)
    return (model_file_names(len(plan_shards(cast, max_bytes))),
            sum(v.numel() * v.element_size() for v in cast.values()))


@dataclass(frozen=True)
class WrittenModel:
    files: tuple[tuple[str, str], ...]  # (path, sha256), the index last when sharded
    side_files: tuple[tuple[str, str], ...] = ()  # (path, sha256) of the copied config/tokenizer files

    @property
    def main(self) -> Path:
        return Path(self.files[-1][0])

    def outputs(self, report_path: Path) -> dict:
        """The report's ``outputs``: the model, every model file and copy with its sha256, the report."""
        return {"model": {"path": str(self.main), "sha256": self.files[-1][1]},
                "files": [{"path": path, "sha256": digest} for path, digest in self.files],
                "side_files": [{"path": path, "sha256": digest} for path, digest in self.side_files],
                "report": {"path": str(report_path)}}


def write_model(staged: StagedOutput, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                max_shard_bytes: int | None = None, hf_source: Path | None = None) -> WrittenModel:
    """Stage the model (one file, or shards + index) and the HF side files; ``staged.commit`` puts them in place."""
    shards = plan_shards(state, max_shard_bytes)
    names = model_file_names(len(shards))
    written = []
    weight_map = {}
    for name, keys in zip(names, shards):
        digest = staged.save_safetensors(name, {k: state[k] for k in keys}, metadata)
        written.append((str(staged.out_dir / name), digest))
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total, **dict(metadata)}, "weight_map": dict(sorted(weight_map.items()))}
        written.append((str(staged.out_dir / INDEX_FILE), staged.save_json(INDEX_FILE, index)))
    copies = copy_side_files(hf_source, staged) if hf_source is not None else {}
    return WrittenModel(files=tuple(written),
                        side_files=tuple((str(staged.out_dir / name), digest) for name, digest in copies.items()))


def side_file_names(source: Path | None) -> tuple[str, ...]:
    """The config/tokenizer files of a Hugging Face folder that the output gets copies of (plain files only,
    never through symlinks); none without a folder."""
    if source is None:
        return ()
    return tuple(n for n in HF_SIDE_FILES if (source / n).is_file() and not (source / n).is_symlink())


def copy_side_files(source: Path, staged: StagedOutput) -> dict[str, str]:
    """Stage copies of the config/tokenizer files of a Hugging Face folder (``side_file_names``); name -> sha256."""
    return {name: staged.copy_file(name, source / name) for name in side_file_names(source)}
