"""``twa inspect``: what a checkpoint folder holds and what ``twa average`` would select, from headers only."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import SCHEMA_VERSION, __version__
from .checkpoints import (
    CheckpointFile,
    HeaderInfo,
    HeaderMemo,
    check_allow_globals,
    discover,
    folder_weight_files,
    read_header,
    same_weights,
)
from .config import Selection
from .errors import CheckpointError, ConfigError, TwaError, memory_failure
from .selection import filtered_out, missing_target, mixed_dtypes, order_conflict, select, unplaced_warning


@dataclass(frozen=True)
class Entry:
    """One discovered checkpoint and its fate under the selection."""

    name: str
    path: str
    header: HeaderInfo | None
    status: str  # "selected" or the reason it was left out
    error: str | None = None
    error_exit_code: int | None = None  # the exit code `twa average` gives for ``error``: 4, or 5 for an unsafe file

    @property
    def tensor_values(self) -> int | None:
        """Every value of the file's tensors, parameters and buffers (integer counters too): not the trainable
        parameters D the reports count (``model.parameters``). None when the file cannot be read."""
        if self.header is None:
            return None
        total = 0
        for shape, _ in self.header.tensors.values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total

    @property
    def parameters(self) -> int:
        """``tensor_values`` under its first name (0 when unreadable), kept for the scripts that read it."""
        return self.tensor_values or 0

    @property
    def dtypes(self) -> list[str]:
        return sorted({dtype for _, dtype in self.header.tensors.values()}) if self.header else []

    def as_dict(self) -> dict:
        h = self.header
        return {
            "name": self.name, "path": self.path, "status": self.status, "error": self.error,
            "error_exit_code": self.error_exit_code,
            "producer": h.producer if h else None, "container": h.container if h else None,
            "prefix": h.prefix if h else None, "weights": h.weights if h else None,
            "epoch": h.epoch if h else None, "step": h.step if h else None,
            "metrics": dict(h.metrics) if h else {}, "dtypes": self.dtypes, "parameters": self.parameters,
            "tensor_values": self.tensor_values,
        }


@dataclass(frozen=True)
class Catalog:
    directory: Path
    selected: tuple[Entry, ...]
    others: tuple[Entry, ...]
    ignored: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())
    refusal: str | None = None  # why `twa average` would refuse this selection (fewer than 2 distinct checkpoints)

    def as_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "tool": "twa", "version": __version__, "command": "inspect",
            "directory": str(self.directory),
            "checkpoints": [e.as_dict() for e in self.selected],
            "not_selected": [e.as_dict() for e in self.others],
            "ignored_files": list(self.ignored),
            "warnings": list(self.warnings),
            "refusal": self.refusal,
        }


def _header(entry: CheckpointFile, options: dict) -> tuple[HeaderInfo | None, str | None, int | None]:
    """The header, or why it cannot be read and the exit code `twa average` gives for that (4, or 5 for a file
    that is refused as unsafe)."""
    try:
        return read_header(entry.path, **options), None, None
    except ConfigError:  # a flag's fault (--allow-global), not the file's: a usage error, as in `twa average`
        raise
    except TwaError as err:
        if memory_failure(err) is not None:  # memory ran out while it was read: not the file's fault (exit 9)
            raise
        return None, str(err), err.exit_code


def inspect_directory(directory: Path, selection: Selection, weights: str = "raw", strip_prefix: str | None = None,
                      trust_pickle: bool = False, allow_globals: tuple[str, ...] = ()) -> Catalog:
    """Read every candidate's header once and apply the selection ``twa average`` would apply."""
    check_allow_globals(allow_globals)
    files = discover(directory)
    options = {"weights": weights, "strip_prefix": strip_prefix, "trust_pickle": trust_pickle,
               "allow_globals": allow_globals, "memo": HeaderMemo()}
    # a symlink to nothing: listed with its error (selected where --include/--exclude keep it, so the exit is 4,
    # as `twa average` refuses the folder), the others selected as if it were not there
    missing = {f.name: message for f in files if (message := missing_target(f))}
    headers = {f.name: (None, missing[f.name], CheckpointError.exit_code) if f.name in missing else _header(f, options)
               for f in files}

    def metric_of(entry: CheckpointFile) -> float | None:
        header = headers[entry.name][0]
        return header.metrics.get(selection.by) if header is not None and selection.by else None

    same = partial(same_weights, weights=weights, trust_pickle=trust_pickle, strip_prefix=strip_prefix,
                   allow_globals=allow_globals)
    chosen = select([f for f in files if f.name not in missing], selection, metric_of if selection.by else None,
                    same)
    reasons = {d.name: d.reason for d in chosen.dropped} | {n: filtered_out(n, selection) for n in missing}
    selected_names = {f.name for f in chosen.files} | {n for n in missing if reasons[n] is None}
    entries = {f.name: Entry(name=f.name, path=str(f.path), header=headers[f.name][0],
                             status="selected" if f.name in selected_names else reasons.get(f.name, "not selected"),
                             error=headers[f.name][1], error_exit_code=headers[f.name][2]) for f in files}
    weight_paths = {f.path for f in files} | {f.path.parent for f in files}
    if any(f.path == directory for f in files):  # a sharded model saved in the folder itself: one entry
        weight_paths |= set(folder_weight_files(directory))
    ignored = sorted(p.name for p in directory.iterdir() if p not in weight_paths and not p.name.startswith("."))
    readable = [f.name for f in chosen.files if headers[f.name][0] is not None]
    found = {n: headers[n][0] for n in readable}
    notes = [order_conflict(readable, [found[n].step for n in readable], "step")
             or order_conflict(readable, [found[n].epoch for n in readable], "epoch"),
             mixed_dtypes({n: found[n].tensors for n in readable})]
    notes += [unplaced_warning(d.name) for d in chosen.dropped if d.unplaced]
    too_few = chosen.too_few(directory, len(files)) if files else None  # what `twa average` would refuse
    return Catalog(directory=directory, selected=tuple(entries[f.name] for f in files if f.name in selected_names),
                   others=tuple(e for e in entries.values() if e.status != "selected"), ignored=tuple(ignored),
                   warnings=tuple(n for n in notes if n), refusal=str(too_few) if too_few else None)
