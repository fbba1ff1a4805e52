"""``run_average``: the whole ``twa average`` job as a list of named steps. Returns a result, prints nothing.

Steps: select checkpoints -> build the model -> stream the checkpoints once (validate, orthonormal
basis, float64 mean) -> data -> baselines (last, best, swa; BN re-estimated for each) -> TWA
(projected SGD from the start point, BN re-estimated) -> coefficients -> write outputs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import resource
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from . import SCHEMA_VERSION, __version__
from .checkpoints import (
    CheckpointFile,
    FlatFile,
    HeaderInfo,
    HeaderMemo,
    ZipLayout,
    check_allow_globals,
    column_file,
    discover,
    load_checkpoint,
    no_checkpoints,
    raise_if_refused,
    read_header,
    same_weights,
    sha256_file,
    zip_layout,
)
from .config import MIN_RANK_RTOL, AverageConfig, SoupConfig
from .data import DataSplits, build_data, download_note, for_workers, split_holdout
from .distributed import Dist, EmptyAwareCollate, RankBatches, RankStride, Shard
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    MissingData,
    ModelError,
    NumericalError,
    UnsafeInputError,
    exclude_hint,
)
from .models import (
    MODEL_ARGS_METADATA_KEY,
    MODEL_METADATA_KEY,
    batch_statistics_in_eval,
    build_model,
    check_compatible,
    check_data_fits,
    check_finite,
    flatten,
    frozen_names,
    key_problems,
    load_state,
    recorded_spec_problem,
    spec_from_metadata,
    tied_keys,
    trainable_names,
)
from .plots import PLOT_FILES, plots_installed, render_plots
from .report import markdown_report
from .selection import Chosen, mixed_dtypes, order_conflict, select, unplaced_warning
from .subspace import (
    QUANT_BLOCK,
    STORAGE_DTYPES,
    Basis,
    BasisBuilder,
    NonFiniteVector,
    Subspace,
    build_by_columns,
    column_block,
    compiled_projection_failure,
    compiled_projection_fallbacks,
    distance_from_identity,
    gram_and_coordinates,
)
from .trainer import (
    Metrics,
    StepInfo,
    drop_single_last,
    evaluate,
    has_batchnorm,
    recalibrate_bn,
    train_projected,
)
from .writer import (
    HUMAN_REPORT_FILE,
    REPORT_FILE,
    StagedOutput,
    cast_state,
    check_output,
    planned_model,
    prepare_output_dir,
    side_file_names,
    write_model,
)

#: Checkpoints prepared together on the worker thread (differences, streamed Gram matrix), and the block
#: size of the fallback orthogonalisation (BCGS2 + CholQR2); all in the basis buffer: no extra memory.
BASIS_BLOCK = 16
#: Basis storage formats built by column passes over the files (``stream_by_columns``): the float32
#: basis is never held, so the peak is the narrower basis. A float32 basis is built in one read.
COLUMN_BUILD_STORAGE = ("bf16", "int8")
T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """Progress reported to the caller: a phase starting, an item done, a training step, a warning."""

    kind: str  # "phase" | "advance" | "step" | "warning"
    message: str = ""
    total: int = 0
    step: StepInfo | None = None


EventSink = Callable[[Event], None]


def _ignore(_: Event) -> None:
    return None


@dataclass
class Stream:
    """What one pass over the checkpoints yields."""

    subspace: Subspace
    mean_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    sha256: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    shard: Shard | None = None  # under torchrun: this rank's columns of the basis (``subspace`` holds them)
    build: str = "rows"  # "columns": by column passes over the files (``stream_by_columns``)
    not_by_columns: str | None = None  # why a bf16/int8 basis was built the float32 way


@dataclass(frozen=True)
class AverageResult:
    report: dict
    model_path: Path
    report_path: Path
    warnings: tuple[str, ...]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; explicit names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # torch also parses meta, xla, xpu...
        raise ConfigError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them, or cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


def _stored_metric(name: str, config: AverageConfig) -> Callable[[CheckpointFile], float | None]:
    """``--by NAME`` of a checkpoint, read with the run's options (``--weights``, ``--allow-global``,
    ``--trust-pickle``), as ``twa inspect`` reads it."""
    memo = HeaderMemo()

    def metric_of(entry: CheckpointFile) -> float | None:
        return read_header(entry.path, weights=config.weights, trust_pickle=config.trust_pickle,
                           allow_globals=config.allow_globals, memo=memo).metrics.get(name)

    return metric_of


def same_weights_as_read(config: AverageConfig | SoupConfig) -> Callable[[Path, Path], bool]:
    """Whether two files hold the same weights, read as the run reads them (``same_weights``)."""
    return partial(same_weights, weights=config.weights, trust_pickle=config.trust_pickle,
                   strip_prefix=config.strip_prefix, allow_globals=config.allow_globals)


def select_checkpoints(config: AverageConfig) -> Chosen:
    files = discover(config.checkpoint_dir)
    if not files:
        raise no_checkpoints(config.checkpoint_dir)
    by = config.selection.by
    chosen = select(files, config.selection, _stored_metric(by, config) if by else None,
                    same_weights_as_read(config))
    for entry in chosen.files:
        raise_if_refused(entry.path)
    too_few = chosen.too_few(config.checkpoint_dir, len(files))
    if too_few is not None:
        raise too_few
    return chosen


def resolve_model_spec(config: AverageConfig | SoupConfig,
                       first: CheckpointFile) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``--model``/``--model-arg``, or the architecture the first checkpoint records, with its recorded
    constructor arguments updated by any ``--model-arg`` (which adds a key or replaces its value)."""
    if config.model:
        return config.model, config.model_args
    header = read_header(first.path, weights=config.weights, trust_pickle=config.trust_pickle,
                         allow_globals=config.allow_globals)
    metadata = header.metadata
    try:
        found = spec_from_metadata(metadata)
    except ModelError as err:
        raise ModelError(f"{first.path}: {err}") from None
    if found is None:
        raise ModelError(f"{first.path}: the checkpoint does not record its architecture; pass --model "
                         f"(e.g. --model torchvision:resnet18 --model-arg num_classes=10, or file.py:function)")
    spec, args = found
    given = {k for k, _ in config.model_args}
    problem = recorded_spec_problem(spec, tuple((k, v) for k, v in args if k not in given))
    if problem is not None:  # a checkpoint is data: it never names code for twa to run
        raise UnsafeInputError(f"{first.path}: {problem}")
    merged = tuple({**dict(args), **dict(config.model_args)}.items())
    _check_recorded_size(spec, merged, header.tensors, first.path)
    return spec, merged


def _check_recorded_size(spec: str, args: tuple[tuple[str, str], ...],
                         tensors: dict[str, tuple[tuple[int, ...], str]], path: Path) -> None:
    """A model recorded in a file is built on the meta device first (no memory) and refused when it has more
    state values than the file holds: its tensors could never match, and a file's metadata must not make
    twa allocate an arbitrarily large model. A model that cannot be built on meta is left to the real build."""
    try:
        with torch.device("meta"):
            probe = build_model(spec, args)
    except ModelError:
        return
    unique = {id(v): v for v in probe.state_dict(keep_vars=True).values()}  # tied weights once: files omit them
    needed = sum(v.numel() for v in unique.values())
    held = sum(math.prod(shape) for shape, _ in tensors.values())
    if needed > held:
        shown = ", ".join(f"{k}={v}" for k, v in args)
        raise CheckpointError(f"{path}: the model it records ({spec}{f' {shown}' if shown else ''}) has {needed:,} "
                              f"values but the file holds {held:,}; pass --model and --model-arg")


def build_run_model(config: AverageConfig | SoupConfig,
                    first: CheckpointFile) -> tuple[str, tuple[tuple[str, str], ...], nn.Module]:
    """(spec, arguments, model) for the run: ``resolve_model_spec``, built. When the spec came from the first
    checkpoint and cannot be built, the error says so, not ``--model ...`` the user never passed (timm's
    ``CheckpointSaver`` without ``args`` records the model's class name, ``resnet``, ``visiontransformer``...,
    as ``arch``, which is no timm model name)."""
    spec, model_args = resolve_model_spec(config, first)
    try:
        model = build_model(spec, model_args)
    except ModelError as err:
        if config.model:
            raise
        detail = str(err).removeprefix(f"--model {spec}: ").removesuffix("; check --model and --model-arg")
        raise ModelError(f"{first.path}: the architecture it records, {spec}, cannot be built ({detail}); pass "
                         f"--model yourself (e.g. --model timm:resnet50 --model-arg num_classes=10, or "
                         f"file.py:function)") from None
    if not any(p.numel() for p in model.parameters() if p.requires_grad):
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        if any(p.requires_grad for p in model.parameters()):  # only size-0 parameters train
            what = "its trainable parameters hold no values (size 0)" + \
                (f"; {frozen} values have requires_grad=False" if frozen else "")
        else:
            what = f"all {frozen} parameter values have requires_grad=False" if frozen else "it has none"
        raise ModelError(f"--model {spec}: no trainable parameters ({what}); the coefficients mix the trainable "
                         f"parameters only: leave requires_grad=True on those to average")
    return spec, model_args, model


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same view of the same memory (a tied weight as ``torch.load`` returns it)."""
    return (a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr()
            and a.stride() == b.stride())


@dataclass(frozen=True)
class Reader:
    """Loads checkpoints with the run's options: raw/EMA weights, prefixes matched to the model, pickle trust."""

    weights: str
    strip_prefix: str | None
    trust_pickle: bool
    allow_globals: tuple[str, ...]
    model_keys: frozenset[str]
    tied: tuple[tuple[str, str], ...] = ()  # (alias, key): tied weights a file may store once (``tied_keys``)
    headers: HeaderMemo = field(default_factory=HeaderMemo, compare=False, repr=False)  # one run's headers

    @classmethod
    def for_run(cls, config: AverageConfig | SoupConfig, model: nn.Module) -> Reader:
        return cls(config.weights, config.strip_prefix, config.trust_pickle, config.allow_globals,
                   frozenset(model.state_dict()), tuple(tied_keys(model).items()))

    def _options(self) -> dict:
        return {"weights": self.weights, "trust_pickle": self.trust_pickle, "strip_prefix": self.strip_prefix,
                "allow_globals": self.allow_globals, "model_keys": set(self.model_keys)}

    def _untie(self, entries: dict) -> dict:
        """A tied weight the file stored once (safetensors, ``save_pretrained``) is given under its other key too:
        under the alias, or under the model's first name when the file kept the alias (``safetensors.torch.save_model``
        keeps the alphabetically first name, e.g. ``emb.weight`` before ``out.weight``)."""
        for alias, key in self.tied:
            if alias not in entries and key in entries:
                entries[alias] = entries[key]
            elif key not in entries and alias in entries:
                entries[key] = entries[alias]
        return entries

    def load(self, path: Path, crc_checked: bool = False, mapped: bool = True) -> dict[str, torch.Tensor]:
        """``mapped=False`` for a state kept to the end of the run (see ``load_checkpoint``)."""
        state = self._untie(load_checkpoint(path, **self._options(), crc_checked=crc_checked, mapped=mapped).state)
        self.check_tied(state, str(path))
        return state

    def check_tied(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A weight the model ties (one Parameter under two keys) must hold one value in the file: else the file
        comes from a model without the tie, and loading it would keep one of the two silently."""
        for alias, key in self.tied:
            a, b = state.get(alias), state.get(key)
            if a is None or b is None or a is b or a.shape != b.shape or _same_memory(a, b):
                continue  # torch.save keeps a tie: two tensors over the same storage, not compared value by value
            if not torch.equal(a, b):
                raise CheckpointError(f"{source}: {alias} and {key} are one tied parameter of the model but hold "
                                      f"different values in this checkpoint (saved from a model without the tie); "
                                      f"use the --model and --model-arg it was trained with")

    def header(self, path: Path) -> HeaderInfo:
        header = read_header(path, **self._options(), memo=self.headers)
        return replace(header, tensors=self._untie(dict(header.tensors)))

    def as_stored(self, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """``state`` with the keys the file ``path`` stores: a tied alias it stored once is left out again,
        so the output has the input's keys (and not a second copy of, e.g., a tied embedding)."""
        if not self.tied:
            return state
        stored = read_header(path, **self._options(), memo=self.headers).tensors
        omit = {alias for alias, key in self.tied if alias not in stored and key in stored}
        omit |= {key for alias, key in self.tied if key not in stored and alias in stored}
        return {k: v for k, v in state.items() if k not in omit}


def validate_headers(files: list[CheckpointFile], model: nn.Module, reader: Reader,
                     spec: str, trajectory: bool = True) -> tuple[list[str], dict[str, HeaderInfo]]:
    """Keys and shapes of every selected checkpoint against the model, from headers, before heavy work.

    Returns warnings (name order against stored steps/epochs when the files are one run's ``trajectory``, not
    ``twa soup``'s fine-tunes; mixed dtypes) and the headers by name.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rows: list[tuple[str, ...]] = []
    bad_files = set()
    headers = {entry.name: reader.header(entry.path) for entry in files}
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    for entry in files:
        tensors = headers[entry.name].tensors
        problems = key_problems(expected, {k: tuple(shape) for k, (shape, _) in tensors.items()})
        problems += [(k, f"dtype {dtype}", "model floating point") for k, (_, dtype) in tensors.items()  # truncated
                     if k in floating and not dtype.startswith(("float", "bfloat"))]
        rows += [(entry.name, *p) for p in problems]
        if problems:
            bad_files.add(entry.name)
    if rows:
        first = next(f.name for f in files if f.name in bad_files)  # the run's order, as the table
        raise CheckpointError(f"{len(bad_files)} of {len(files)} checkpoints do not match the model {spec} "
                              f"(first: {first}); check --model/--model-arg, or --strip-prefix",
                              details=[("file", "key", "checkpoint", "model")] + group_rows(rows)[:20])
    names = [f.name for f in files]
    order = (order_conflict(names, [headers[n].step for n in names], "step")
             or order_conflict(names, [headers[n].epoch for n in names], "epoch")) if trajectory else None
    notes = [order, mixed_dtypes({n: headers[n].tensors for n in names})]
    return [note for note in notes if note], headers


def group_rows(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """One row per (key, problem) with the files that share it: ``0.pt .. 10.pt (11 files)``."""
    grouped: dict[tuple[str, ...], list[str]] = {}
    for file, *problem in rows:
        grouped.setdefault(tuple(problem), []).append(file)
    out = []
    for problem, names in grouped.items():
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} files)"
        out.append((label, *problem))
    return out


def _work_dtype(state: dict[str, torch.Tensor], names: list[str]) -> torch.dtype:
    """Build the basis in float32 unless the checkpoints carry float64 parameters (then in float64)."""
    return torch.float64 if any(state[n].dtype == torch.float64 for n in names) else torch.float32


def _column_parts(parts: list[torch.Tensor], columns: slice | None) -> list[torch.Tensor]:
    """The entries ``columns`` of the concatenation of the flattened ``parts``, as views (no copy)."""
    if columns is None:
        return parts
    out, offset = [], 0
    for t in parts:
        flat = t.reshape(-1)
        lo, hi = max(columns.start, offset), min(columns.stop, offset + flat.numel())
        if lo < hi:
            out.append(flat[lo - offset:hi - offset])
        offset += flat.numel()
    return out or [parts[0].reshape(-1)[:0]]


def stream_checkpoints(files: list[CheckpointFile], model: nn.Module, names: list[str], rtol: float,
                       reader: Reader, on_event: EventSink, block: int = BASIS_BLOCK,
                       storage: str = "float32", dist: Dist | None = None) -> Stream:
    """Read each checkpoint once: validate it, add it to the basis, accumulate the float64 mean.

    Each checkpoint's parameters land straight in their row of the basis buffer, and rows are prepared
    ``block`` at a time (BLAS-3), so memory is the basis plus one loaded checkpoint. The float64 mean of
    the parameters comes from the same rows; floating buffers (BN statistics) are summed from the states.

    The first file is loaded safely (``load_checkpoint``) and its layout taken (``zip_layout``); a later
    torch zip that shares it (the same pickle bytes and member table) is read straight into its row, its
    pickle compared, never run, and its members' CRCs checked on the bytes just read. The last file, and
    any file that differs, is loaded safely too (its CRCs checked before torch opens it). A second thread
    reads every file once for its SHA-256 (hashlib releases the GIL); a third prepares each full block
    while the next one is being read.

    Under torchrun (``dist``) each rank pushes only its columns of every checkpoint and the builder
    sums its inner products over the ranks: each rank ends with its column shard of the one basis.
    """
    dist = dist or Dist()
    reason = None
    if storage in COLUMN_BUILD_STORAGE and not dist.active:
        stream = stream_by_columns(files, model, names, rtol, reader, on_event, storage)
        if isinstance(stream, Stream):
            return stream
        reason = stream
    d = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    columns = dist.columns(d) if dist.active else None
    reduce = _reducer(dist) if dist.active else None
    builder: BasisBuilder | None = None
    sums: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    trainable = set(names)
    layout: ZipLayout | None = None
    on_event(Event("phase", "reading checkpoints", total=len(files)))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="twa-sha256") as hasher:
        digests = [hasher.submit(sha256_file, entry.path) for entry in files]
        try:
            for index, entry in enumerate(files):
                members = layout.matches(entry.path) if layout is not None and index < len(files) - 1 else None
                if members is not None:  # the first file's layout: read straight into the row, no unpickling
                    assert builder is not None
                    state = _read_direct(entry.path, layout, members, builder, names)  # CRCs checked on the way
                else:
                    # the zip CRCs are checked before torch opens the file; the last file's state is kept to the
                    # end of the run: read, not a mapping of the file
                    state = reader.load(entry.path, mapped=index < len(files) - 1)
                    check_compatible(model, state, str(entry.path))
                check_finite({k: v for k, v in state.items() if k not in trainable}, str(entry.path))
                if builder is None:
                    builder = BasisBuilder(capacity=len(files), rtol=rtol, dtype=_work_dtype(state, names),
                                           block=block, track_mean=True, reduce=reduce,
                                           background=not dist.active)  # collectives stay on this thread
                    if columns is None and not reader.trust_pickle and all(state[n].dtype == builder.dtype
                                                                           for n in names):
                        layout = zip_layout(entry.path, state)
                if members is None:
                    builder.push(_column_parts([state[n] for n in names], columns))
                _add_buffers(sums, state, trainable)
                last = state
                on_event(Event("advance"))
            assert builder is not None
            builder.flush()
        except BaseException as err:
            abandon(digests)
            if builder is not None:
                builder.close()
            if isinstance(err, NonFiniteVector):
                raise _non_finite(err, files, reader) from None
            raise
        sha256 = [future.result() for future in digests]
    _check_rank(len(builder.kept), len(files), rtol)
    mean = builder.mean()
    if columns is not None:
        mean = dist.gather_columns(mean.to(dist.comm_device), d).cpu()
    mean_state = _mean_state(last, sums, len(files), mean, names, reader.tied)
    subspace = builder.finish(storage)
    shard = Shard(subspace, columns, d, dist) if columns is not None else None
    return Stream(subspace=subspace, mean_state=mean_state, last_state=last, sha256=sha256, shard=shard,
                  not_by_columns=reason)


def _by_own_layout(path: Path, names: list[str], first: dict[str, torch.Tensor],
                   reader: Reader) -> tuple[FlatFile, Callable[[], dict[str, torch.Tensor]]] | None:
    """``column_file`` for a torch zip laid out unlike the first file: trainers store an epoch, a step or a
    metric in each file's pickle (Lightning, timm), so no two pickles are alike. Its own layout comes from a
    safe memory-mapped load of that file (the weights-only unpickler; the data is compared, not kept); None
    when that does not place its tensors, or its parameters are not float32 (the caller then says why not).
    The CRCs are the hashing thread's, as for every file read in place."""
    if not path.is_file() or not zipfile.is_zipfile(path):  # nothing else has places to read from
        return None
    try:
        state = reader.load(path, crc_checked=True)
    except CheckpointError:
        return None  # loaded again the usual way, which names the problem
    if any(n not in state or state[n].dtype != torch.float32 for n in names):
        return None
    own = zip_layout(path, state)
    del state  # the mapping goes; only the places stay
    return column_file(path, names, first, own) if own is not None else None


def stream_by_columns(files: list[CheckpointFile], model: nn.Module, names: list[str], rtol: float,
                      reader: Reader, on_event: EventSink, storage: str) -> Stream | str:
    """``stream_checkpoints`` for a bf16/int8 basis: never holds the float32 basis (``build_by_columns``).

    The first and the last file are loaded safely and kept; every file between must be a torch zip (sharing
    the first one's layout, ``ZipLayout``, or else placed by its own, ``_by_own_layout``) or a safetensors file
    with the first one's keys (``column_file``), and is then read a column block at a time, straight from the
    file, two or three times (the page cache serves the later passes). The buffers of those files are read
    once, for the mean; the CRCs of a zip are checked in the hashing thread's single read. Peak memory is the
    basis in its storage format, two loaded checkpoints and a block of rows per thread, instead of the float32
    basis.

    Returns why not, instead of a stream, having read little, when the files do not qualify (pickle
    trusted, a layout that differs, non-float32 parameters), or after the first pass when the Gram matrix
    cannot decide a checkpoint (``BasisBuilder``'s general path needs the rows): the caller then streams
    them the usual way.
    """
    if reader.trust_pickle:
        return "--trust-pickle: every file is loaded through pickle"
    first = reader.load(files[0].path)
    check_compatible(model, first, str(files[0].path))
    if any(first[n].dtype != torch.float32 for n in names):
        return f"{files[0].name}: the parameters are not all float32"
    layout = zip_layout(files[0].path, first) if len(files) > 2 else None
    found = [column_file(entry.path, names, first, layout) or _by_own_layout(entry.path, names, first, reader)
             for entry in files[1:-1]]
    middle = [m for m in found if m is not None]
    if len(middle) < len(found):
        other = next(entry for entry, m in zip(files[1:-1], found) if m is None)
        if other.path.is_dir():
            return f"{other.name} is a sharded folder, which is read whole"
        return (f"{other.name} cannot be read in place: not a torch zip laid out as {files[0].name} (its pickle "
                f"differs, e.g. a stored epoch or metric), nor a safetensors file with its keys and float32 "
                f"parameters")
    trainable = set(names)
    on_event(Event("phase", "reading checkpoints (buffers; weights read by column blocks)", total=len(files)))
    sums: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="twa-sha256") as hasher:
        digests = [hasher.submit(sha256_file, entry.path, verify_zip_crc=0 < i < len(files) - 1)
                   for i, entry in enumerate(files)]
        try:
            last = first
            for index, entry in enumerate(files):
                if index == 0:
                    state = first
                elif index == len(files) - 1:  # kept to the end of the run: not a mapping of the file
                    state = last = reader.load(entry.path, mapped=False)
                    check_compatible(model, state, str(entry.path))
                else:
                    state = middle[index - 1][1]()  # the buffers; a zip's CRCs: the hasher checks them
                check_finite({k: v for k, v in state.items() if k not in trainable}, str(entry.path))
                _add_buffers(sums, state, trainable)
                on_event(Event("advance"))
            if any(last[n].dtype != torch.float32 for n in names):
                abandon(digests)
                return f"{files[-1].name}: the parameters are not all float32"
            flat = [m[0] for m in middle]
            ends = [[first[n] for n in names], [last[n] for n in names]]

            def read(index: int, cols: slice, out: torch.Tensor) -> None:
                if 0 < index < len(files) - 1:
                    flat[index - 1].read(cols, out)
                else:
                    torch.cat(_column_parts(ends[index > 0], cols), out=out)

            passes = 3
            on_event(Event("phase", f"building the {storage} basis (column passes over the files)", total=passes))

            def on_pass(_: str) -> None:
                nonlocal passes
                passes -= 1
                on_event(Event("advance"))

            d = sum(first[n].numel() for n in names)
            try:
                build = build_by_columns(len(files), d, read, storage=storage, rtol=rtol, on_pass=on_pass)
            except NonFiniteVector as err:
                raise _non_finite(err, files, reader) from None
            if build is None:
                abandon(digests)
                return ("checkpoints too close to each other for the Gram matrix to decide their rank (block "
                        "Gram-Schmidt over the rows needed)")
            for _ in range(passes):
                on_event(Event("advance"))
            for file in flat:  # read two or three times: the same bytes each time
                file.check_unchanged()
        except BaseException:
            abandon(digests)
            raise
        sha256 = [future.result() for future in digests]  # a corrupt file (CRC mismatch) raises here
    _check_rank(build.subspace.rank, len(files), rtol)
    mean_state = _mean_state(last, sums, len(files), build.mean, names, reader.tied)
    return Stream(subspace=build.subspace, mean_state=mean_state, last_state=last, sha256=sha256, build="columns")


def _add_buffers(sums: dict[str, torch.Tensor], state: dict[str, torch.Tensor], trainable: set[str]) -> None:
    """Add a checkpoint's floating buffers (not trainable: BN statistics) to their float64 sums."""
    for key, value in state.items():
        if value.is_floating_point() and key not in trainable:
            sums[key] = sums[key] + value.double() if key in sums else value.double()


def _mean_state(last: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], count: int, mean: torch.Tensor,
                names: list[str], tied: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
    """The SWA state: the float64 ``mean`` of the flat parameters ``names``, the mean of the floating
    buffers, the last checkpoint's other entries; each in the last checkpoint's dtype.

    A tied alias (``Reader.tied``) is summed like a buffer: its mean must be its twin's, else some checkpoint read
    in place (never through ``Reader.load``, which checks each file) holds two values under one tied parameter."""
    state = {k: (sums[k] / count).to(v.dtype) if k in sums else v.clone() for k, v in last.items()}
    offset, means = 0, {}
    for name in names:
        n = last[name].numel()
        means[name] = mean[offset:offset + n].view(last[name].shape)
        state[name] = means[name].to(last[name].dtype)
        offset += n
    for alias, key in tied:
        if alias in sums and key in means and means[key].numel():
            # the two float64 means add the same float32 values in other orders (the basis builder by blocks): a
            # coordinate whose mean nearly cancels can differ in its last bits, so the tolerance has the weight's
            # scale; a checkpoint saved without the tie differs by far more
            mean = means[key].double()
            if not torch.allclose(sums[alias] / count, mean, rtol=1e-6, atol=1e-6 * float(mean.abs().max())):
                raise CheckpointError(f"{alias} and {key} are one tied parameter of the model but the checkpoints "
                                      f"hold different values under them (saved from a model without the tie); use "
                                      f"the --model and --model-arg they were trained with")
            state[alias] = state[key]
    return state


def _check_rank(rank: int, total: int, rtol: float) -> None:
    if rank < 2:
        hint = (f"; if they differ by less than {rtol:g} of their norm, lower --rank-rtol (down to "
                f"{MIN_RANK_RTOL:g})" if rank and total > 1 and rtol > MIN_RANK_RTOL else "")
        raise NumericalError(f"only {rank} linearly independent checkpoint(s) among {total} (within --rank-rtol "
                             f"{rtol:g}); TWA needs at least 2 distinct checkpoints{hint}")


def _non_finite(err: NonFiniteVector, files: list[CheckpointFile], reader: Reader) -> NumericalError:
    """The error for a builder's ``NonFiniteVector``: naming the file, and the tensor when a safe load finds it
    (``check_finite`` raises that one itself)."""
    index = err.index
    # the last file unmapped, as the streaming read reads it: a trainer may be rewriting it (SIGBUS on a mapping)
    check_finite(reader.load(files[index].path, mapped=index < len(files) - 1), str(files[index].path))
    return NumericalError(f"{files[index].path}: the parameters' norm overflows float32; the checkpoint is "
                          f"corrupt or diverged, leave it out with {exclude_hint(files[index].name)}")


def abandon(digests: list[Future]) -> None:
    """Do not hash the files not hashed yet (the executor would wait for them on the way out)."""
    for future in digests:
        future.cancel()


def _read_direct(path: Path, layout: ZipLayout, members: dict[str, tuple[int, int]], builder: BasisBuilder,
                 names: list[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint that shares ``layout``: its parameters straight into the builder's next row, its
    other tensors (buffers) into fresh tensors, which are returned. Keys and shapes are the layout's,
    i.e. those of the file already checked against the model."""
    state = {k: torch.empty(shape, dtype=dtype) for k in layout.tensors if k not in set(names)
             for dtype, shape in [layout.spec(k)]}
    sizes = [math.prod(layout.spec(n)[1]) for n in names]

    def fill(row: torch.Tensor) -> None:
        offsets = [0, *itertools.accumulate(sizes)]
        targets = {n: row[lo:hi] for n, lo, hi in zip(names, offsets[:-1], offsets[1:])}
        layout.read_into(path, members, {**targets, **state})

    builder.push_with(sum(sizes), fill)
    return state


def _reducer(dist: Dist) -> Callable[[torch.Tensor], torch.Tensor]:
    """The builder's hook: sum a small float64 matrix over the ranks (on the backend's device)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        return dist.sum(t.to(dist.comm_device)).to(t.device)

    return reduce


def _loader(dataset: Dataset, config: AverageConfig, shuffle: bool, seed: int, dist: Dist | None = None,
            train_mode: bool = False) -> DataLoader:
    """Batches of ``--batch-size``. Under torchrun, every rank walks the same global batches (same seeded
    order as one process): a shuffled (training) loader yields this rank's part of each batch, an ordered
    one (evaluation, BN) every N-th whole batch. A ``train_mode`` pass (training, BN) drops a last batch of
    a single example (``drop_single_last``)."""
    generator = torch.Generator().manual_seed(seed)
    drop = train_mode and drop_single_last(len(dataset), config.train.batch_size)  # type: ignore[arg-type]
    dataset = for_workers(dataset, config.num_workers)
    if dist is None or not dist.active:
        return DataLoader(dataset, batch_size=config.train.batch_size, shuffle=shuffle,
                          num_workers=config.num_workers, generator=generator,
                          worker_init_fn=None, drop_last=drop)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, config.train.batch_size, drop_last=drop)
    if shuffle:
        return DataLoader(dataset, batch_sampler=RankBatches(batches, dist), num_workers=config.num_workers,
                          generator=generator, collate_fn=EmptyAwareCollate(dataset[0]))
    return DataLoader(dataset, batch_sampler=RankStride(batches, dist), num_workers=config.num_workers,
                      generator=generator)


@dataclass
class Evaluator:
    """Evaluates a state dict: load, re-estimate BN on the fit data, score on the eval split."""

    model: nn.Module
    reader: Reader
    bn_data: Dataset
    eval_loader: DataLoader
    config: AverageConfig
    device: torch.device
    dist: Dist = field(default_factory=Dist)

    def bn_pass(self) -> None:
        torch.manual_seed(self.config.seed)  # same augmentation draws for every model
        loader = _loader(self.bn_data, self.config, shuffle=False, seed=self.config.seed, dist=self.dist,
                         train_mode=True)
        recalibrate_bn(self.model, loader, self.device, self.dist if self.dist.active else None)

    def recalibrated(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state with BN statistics re-estimated, as it was evaluated (for writing a baseline)."""
        load_state(self.model, state)
        self.bn_pass()
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def __call__(self, state: dict[str, torch.Tensor]) -> Metrics:
        load_state(self.model, state)
        self.bn_pass()
        return evaluate(self.model, self.eval_loader, self.device, self.config.amp, self.dist)


def checkpoint_state(entry: CheckpointFile, files: list[CheckpointFile], stream: Stream,
                     reader: Reader) -> dict[str, torch.Tensor]:
    """One selected checkpoint's state for a short use (an evaluation, a start point, a fallback). The last one is the
    stream's copy in memory (``Stream.last_state``), never its file again: mapped, a trainer rewriting ``last.ckpt``
    meanwhile would kill the run (SIGBUS), and reading it twice gains nothing. The others are mapped (no copy)."""
    return stream.last_state if entry is files[-1] else reader.load(entry.path)


def run_baselines(config: AverageConfig, files: list[CheckpointFile], stream: Stream, evaluator: Evaluator,
                  on_event: EventSink) -> tuple[dict[str, dict], dict[str, dict]]:
    """Metrics of the baselines the user asked for, and of every checkpoint when ``best`` is asked."""
    metrics: dict[str, dict] = {}
    per_checkpoint: dict[str, dict] = {}
    if "best" in config.baselines:
        on_event(Event("phase", "evaluating every checkpoint (best baseline)", total=len(files)))
        for entry in files:
            per_checkpoint[entry.name] = evaluator(checkpoint_state(entry, files, stream, evaluator.reader)).as_dict()
            on_event(Event("advance"))
        best_name = max(reversed(list(per_checkpoint)), key=lambda n: per_checkpoint[n]["accuracy"])
        metrics["best"] = {**per_checkpoint[best_name], "checkpoint": best_name, "selected_on": "eval"}
    if "last" in config.baselines:
        on_event(Event("phase", "evaluating the last checkpoint", total=1))
        last_name = files[-1].name
        values = per_checkpoint.get(last_name) or evaluator(stream.last_state).as_dict()
        metrics["last"] = {**values, "checkpoint": last_name}
        on_event(Event("advance"))
    if "swa" in config.baselines:
        on_event(Event("phase", "evaluating swa (uniform mean)", total=1))
        metrics["swa"] = evaluator(stream.mean_state).as_dict()
        on_event(Event("advance"))
    return metrics, per_checkpoint


def start_state(config: AverageConfig, files: list[CheckpointFile], stream: Stream,
                reader: Reader) -> tuple[str, dict]:
    if config.start == "mean":
        return "mean", stream.mean_state
    if config.start == "last":
        return files[-1].name, stream.last_state
    index = start_index(config.start, len(files))
    state = checkpoint_state(files[index], files, stream, reader)
    # Integer buffers are the last checkpoint's whatever the start point (as for --start mean|last);
    # BatchNorm's num_batches_tracked is then set by the BN re-estimation.
    last = stream.last_state
    return files[index].name, {k: v if v.is_floating_point() else last.get(k, v).clone() for k, v in state.items()}


def start_index(start: str, count: int) -> int:
    """``--start INDEX`` checked against the ``count`` selected checkpoints (before any heavy work too)."""
    index = int(start)
    if not -count <= index < count:
        raise ConfigError(f"--start {index}: only {count} checkpoints are selected (indices 0..{count - 1})")
    return index


def place_basis(basis: Basis, device: torch.device, inject_oom: bool, on_event: EventSink) -> Basis:
    """Move the basis to the device; when it does not fit, keep it in host memory and project there."""
    try:
        if inject_oom:
            raise torch.OutOfMemoryError("injected by --fault oom-basis")
        return basis.to(device)
    except torch.OutOfMemoryError:
        size = basis.nbytes
        on_event(Event("warning", f"the basis ({size / 2**20:.0f} MiB) does not fit on {device}; keeping it in host "
                                  f"memory and projecting there (slower)"))
        return basis


def run_twa(config: AverageConfig, files: list[CheckpointFile], stream: Stream, evaluator: Evaluator,
            fit_data: Dataset, names: list[str], on_event: EventSink) -> tuple[dict, dict, torch.Tensor]:
    """Projected SGD from the start point; returns metrics, training summary and the flat weights."""
    model, device = evaluator.model, evaluator.device
    start_name, state = start_state(config, files, stream, evaluator.reader)
    load_state(model, state)
    basis = place_basis(stream.subspace.basis, device, "oom-basis" in config.faults, on_event)
    if stream.shard is not None:
        basis = replace(stream.shard, subspace=replace(stream.subspace, basis=basis))
    dist = evaluator.dist
    loader = _loader(fit_data, config, shuffle=True, seed=config.seed, dist=dist, train_mode=True)
    epochs = f"{config.train.epochs} epoch{'' if config.train.epochs == 1 else 's'}"
    on_event(Event("phase", f"training coefficients ({epochs})", total=config.train.epochs * len(loader)))
    torch.manual_seed(config.seed)

    def on_step(info: StepInfo) -> None:
        if "kill-rank1" in config.faults and dist.rank == 1 and info.step == 1:
            os._exit(13)  # fault injection for tests: a worker dies mid-training
        on_event(Event("step", step=info))

    result = train_projected(model, names, basis, loader, config.train, device, config.amp, on_step=on_step)
    del basis
    weights = flatten({n: p.detach().cpu() for n, p in model.named_parameters()}, names)  # float64: not on mps
    if not torch.isfinite(weights).all():
        raise NumericalError(f"TWA weights became non-finite (lr {config.train.lr:g}); lower --lr")
    on_event(Event("phase", "evaluating twa", total=1))
    evaluator.bn_pass()
    metrics = evaluate(model, evaluator.eval_loader, device, config.amp, dist).as_dict()
    on_event(Event("advance"))
    train = {"start": start_name, "steps": result.steps, "epoch_losses": list(result.epoch_losses)}
    return metrics, train, weights


def planned_outputs(config: AverageConfig,
                    tensors: dict[str, tuple[tuple[int, ...], str]]) -> tuple[tuple[str, ...], int]:
    """Names of the files this run will write and their total size (from shapes and dtypes, no data read)."""
    model_files, size = planned_model(tensors, config.out_dtype, config.max_shard_size)
    return (*model_files, REPORT_FILE, HUMAN_REPORT_FILE, *PLOT_FILES), size


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def process_bytes() -> int:
    """What this process holds before any checkpoint is read, as a run's does: its peak RSS so far (torch and
    twa imported, the model built, the data loaded) after one step of torch's SGD on a one-element parameter.
    The optimizer's first step imports torch's compiler stack (``torch._dynamo``, sympy: about 160 MiB with
    torch 2.x on Linux), which every run loads when it fits coefficients and a dry run otherwise never does."""
    weight = nn.Parameter(torch.zeros(1))
    weight.grad = torch.zeros(1)
    with torch.random.fork_rng(devices=[]):
        torch.optim.SGD([weight], lr=0.0, momentum=0.9, weight_decay=1e-5).step()
    return peak_rss_bytes()


def memory_estimate(model: nn.Module, k: int, ranks: int = 1, storage: str = "float32",
                    threads: int | None = None, process: int = 0) -> dict[str, int]:
    """Peak host memory of the whole run, by part (bytes): ``process`` (what the process already holds: torch,
    the model, the data; ``process_bytes``, measured by a dry run), then the model, its gradients and momentum,
    the float64 mean, the loaded checkpoints and the basis, and at the end the TWA weights and their projection
    on the basis, float64 (the report's span residual, while the basis is still held: the run's peak).

    float32 (and any basis under torchrun, ``ranks`` > 1: per rank, with its shard): the float32 build buffer
    that becomes the basis, plus the previous checkpoint the build differences against. bf16/int8: the basis
    in that format (``stream_by_columns``; an estimate for files that share one layout, else the float32
    one applies) plus, per thread, four float32 blocks of K rows and as many columns as ``column_block`` gives
    (at most D). The parts are summed as if they were all held at once, so the total is an upper bound of what
    is on top of ``process`` (resnet18 and resnet50, K = 8-30: 1.02-1.16 times the run's peak RSS; README)."""
    full = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = -(-full // ranks)
    state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    common = {"mean_float64": floats * 8, "model_grads_momentum": state + 2 * full * 4,
              "weights_float64": 2 * full * 8}  # run_facts: the TWA weights and their projection on the basis
    if storage in COLUMN_BUILD_STORAGE and ranks == 1:
        size = torch.tensor([], dtype=STORAGE_DTYPES[storage]).element_size()
        scales = k * -(-d // QUANT_BLOCK) * 4 if storage == "int8" else 0
        width = min(column_block(k), d)  # build_by_columns' buffers: a block, or all D columns when fewer
        blocks = 4 * k * width * 4 * max(2, threads or torch.get_num_threads())  # rows, Q1, Q, rounding
        parts = {f"basis_{storage}": k * d * size + scales, "column_blocks": blocks,
                 "first_and_last_checkpoint": 2 * state, **common}
    else:
        parts = {"basis_float32": k * d * 4, "previous_float32": d * 4, "one_checkpoint": state, **common}
    parts = {"torch_model_data": process, **parts}
    return {**parts, "total": sum(parts.values())}


def check_train_mode_sizes(model: nn.Module, config: AverageConfig, train: int, fit: int) -> None:
    """With BatchNorm, the train-mode passes (BN re-estimation on the train split, fitting on the fit split) need
    2 examples: one alone is an error in training mode on one process, and normalised to zero variance under
    torchrun (whose BN uses the global batch), so the two disagreed; refused before any checkpoint is read."""
    if not has_batchnorm(model):
        return
    splits = [("--data's train split", train, "")]
    if config.fit_on == "holdout":
        splits.append(("the held-out split (--fit-on holdout)", fit, ", or raise --holdout-fraction"))
    for what, size, fix in splits:
        if size < 2:
            raise DataError(f"{what} has {size} example; the model's BatchNorm layers need at least 2 in training "
                            f"mode: use more data{fix}")


def check_amp_parameters(model: nn.Module, names: list[str], amp: str) -> None:
    """``--amp fp16`` scales the loss (``GradScaler``), which refuses to unscale float16 gradients: a trainable
    float16 parameter failed at the first training step, after every checkpoint was read, as an unexpected error
    (exit 1). Refused before any checkpoint is read instead."""
    if amp != "fp16":
        return
    named = dict(model.named_parameters())
    half = [n for n in names if named[n].dtype == torch.float16]
    if half:
        more = f" and {len(half) - 3} more" if len(half) > 3 else ""
        raise ConfigError(f"--amp fp16: the model's parameter{'s' if len(half) > 1 else ''} {', '.join(half[:3])}"
                          f"{more} {'are' if len(half) > 1 else 'is'} float16, and fp16 gradient scaling cannot "
                          f"unscale float16 gradients; use --amp bf16 or --amp off, or float32 parameters")


def check_batch_of_one(model: nn.Module, config: AverageConfig | SoupConfig, dataset: Dataset) -> None:
    """``--batch-size 1``: every train-mode batch (fitting, BN re-estimation) holds one example, which a BatchNorm
    layer that sees one value per channel (``BatchNorm1d`` after a linear layer) cannot normalise. One example
    goes through the model in training mode before any checkpoint is read, so that is a usage error naming the
    flag, not an unexpected error after all of them; the model's weights and statistics are put back."""
    if config.train.batch_size != 1 or not has_batchnorm(model) or not len(dataset):  # type: ignore[arg-type]
        return
    from torch.utils.data import default_collate

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # a random transform or dropout leaves the
            inputs = default_collate([dataset[0]])[0]               # run's random stream as it was
            model.train()
            model(inputs)
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise ConfigError("--batch-size 1: the model's BatchNorm layers cannot normalise a batch of one example in "
                          "training mode (one value per channel); use --batch-size 2 or more") from None
    finally:
        model.load_state_dict(saved)
        model.train(was_training)


def check_eval_batches(model: nn.Module, batch_size: int, splits: list[tuple[str, Dataset]]) -> None:
    """A BatchNorm layer without running statistics (``track_running_stats=False``) normalises with the batch's
    statistics in eval mode too, so an evaluation batch of one example fails there as in training mode (one value
    per channel). When a split would end in such a batch, one example goes through the model in eval mode before
    any checkpoint is read (no state changes), and a failure is a usage error naming ``--batch-size``."""
    if not batch_statistics_in_eval(model):
        return
    from torch.utils.data import default_collate

    for what, dataset in splits:
        size = len(dataset)  # type: ignore[arg-type]
        if not size or (batch_size != 1 and size % batch_size != 1):
            continue
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                model.eval()
                model(default_collate([dataset[0]])[0])
        except ValueError as err:
            if "more than 1 value per channel" not in str(err):
                raise
            ends = "every batch holds" if batch_size == 1 else "its last batch holds"
            raise ConfigError(f"--batch-size {batch_size}: {what} has {size} examples and {ends} one, which the "
                              f"model's BatchNorm layers without running statistics (track_running_stats=False) "
                              f"cannot normalise, in eval mode too; pick a --batch-size that leaves no batch of one"
                              ) from None
        finally:
            model.train(was_training)


def download_plan(spec: str, missing: MissingData) -> dict:
    """A dry run's ``data`` when its files are missing and ``--download`` would fetch them: where to."""
    return {"spec": spec, "would_download": True, "download_into": str(missing.download_into)}


def planned_data(config: AverageConfig, model: nn.Module, spec: str) -> dict:
    """``--dry-run``'s check of ``--data``: the datasets built without downloading, the holdout split
    made, and one example through the model, as the run would do before reading any checkpoint. Files
    that ``--download`` would fetch are reported (``would_download``), not fetched."""
    try:
        data = build_data(config.data, root=config.data_root, download=False)
    except MissingData as err:
        if not config.download:
            raise
        return download_plan(config.data, err)
    check_data_fits(model, (data.train, data.eval), data.num_classes, spec, config.data)
    fit = len(data.train)
    if config.fit_on == "holdout":
        fit = len(split_holdout(data.train, config.holdout_fraction, config.seed)[1])
    check_train_mode_sizes(model, config, len(data.train), fit)
    check_batch_of_one(model, config, data.train)
    check_eval_batches(model, config.train.batch_size, [("--data's eval split", data.eval)])
    return {"spec": config.data, "name": data.name, "num_classes": data.num_classes, "fit_on": config.fit_on,
            "fit_examples": fit, "bn_examples": len(data.train), "eval_examples": len(data.eval),
            "would_download": False,
            "notes": [*data.notes, *([note] if config.download and (note := download_note(config.data)) else [])]}


def dry_run_result(config: AverageConfig, files: list[CheckpointFile], chosen: Chosen, spec: str,
                   model_args: tuple[tuple[str, str], ...], model: nn.Module, output_names: tuple[str, ...],
                   output_bytes: int, warnings: list[str], data: dict, ranks: int = 1) -> AverageResult:
    """What a run would do: the selection, the data, a memory estimate (per rank under torchrun) and the
    files it would write; nothing touched."""
    report = {
        "schema_version": SCHEMA_VERSION, "tool": "twa", "version": __version__, "command": "average",
        "dry_run": True,
        "checkpoints": [f.name for f in files],
        "inputs": [{"name": f.name, "path": str(f.path)} for f in files],
        "excluded": [{"name": d.name, "reason": d.reason} for d in chosen.dropped],
        "model": {"spec": spec, "args": dict(model_args),
                  "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "data": data,
        "memory_estimate_bytes": memory_estimate(model, len(files), ranks, config.basis_dtype,
                                                 process=process_bytes()),
        "threads": torch.get_num_threads(),  # what the run would use: --threads, else torch's default
        "would_write": [str(config.out_dir / n) for n in output_names if n not in PLOT_FILES or plots_installed()],
        "output_bytes": output_bytes,
        "config": _config_dict(config),
        "warnings": warnings,
    }
    return AverageResult(report=report, model_path=config.out_dir / output_names[0],
                         report_path=config.out_dir / REPORT_FILE, warnings=tuple(warnings))


#: A --tolerance from this fraction on (10 points) is most likely meant in points: it gets a warning.
TOLERANCE_NOTE_FROM = 0.1


def tolerance_note(config: AverageConfig) -> str | None:
    """A warning for a gate tolerance so large that it was probably written in points (``--tolerance 0.5`` for
    half a point lets TWA lose 50): the gate would then pass almost anything."""
    tolerance = config.tolerance
    if config.fail_if_worse_than is None or tolerance < TOLERANCE_NOTE_FROM:
        return None
    return (f"--tolerance {tolerance:g} is a fraction of accuracy: the gate lets TWA lose {100 * tolerance:g} points "
            f"against {config.fail_if_worse_than}; for {tolerance:g} points write --tolerance {tolerance / 100:g}")


def quality_gate(config: AverageConfig, metrics: dict[str, dict]) -> dict | None:
    """``--fail-if-worse-than``: does TWA reach the baseline's eval accuracy (minus the tolerance)?"""
    if config.fail_if_worse_than is None:
        return None
    baseline = metrics[config.fail_if_worse_than]["accuracy"]
    result = metrics["twa"]["accuracy"]
    # "below by more than the tolerance": a shortfall of exactly the tolerance passes, whatever the rounding of
    # the fractions (0.018 >= 0.02 - 0.002 is False in floating point); 1e-9 is far below any accuracy's step
    passed = baseline - result <= config.tolerance + 1e-9
    return {"against": config.fail_if_worse_than, "tolerance": config.tolerance, "twa_accuracy": result,
            "baseline_accuracy": baseline, "passed": passed,
            "on_worse": config.on_worse}


#: How far (accuracy as a fraction) TWA may end below SWA before the run suggests a lower --lr.
LR_HINT_GAP = 0.005


def below_swa_hint(config: AverageConfig, metrics: dict[str, dict]) -> str | None:
    """A warning when the trained coefficients end clearly below SWA (more than ``LR_HINT_GAP``): on a converged
    tail the P-SGD step (the reference's head-stage ``--lr 2`` by default) can overshoot, and the fix is a flag."""
    swa, twa = metrics.get("swa"), metrics.get("twa")
    if swa is None or twa is None or config.train.epochs == 0 or swa["accuracy"] - twa["accuracy"] <= LR_HINT_GAP:
        return None
    lr = config.train.lr
    gate = ("" if config.on_worse == "fallback" and config.fail_if_worse_than is not None else
            "; --fail-if-worse-than swa --on-worse fallback would write SWA instead")  # no advice to set what is set
    return (f"TWA ended {100 * (swa['accuracy'] - twa['accuracy']):.2f} points below SWA ({twa['accuracy']:.2%} vs "
            f"{swa['accuracy']:.2%}) with --lr {lr:g}: on checkpoints near convergence a lower --lr (e.g. {lr / 10:g}) "
            f"usually keeps TWA at or above SWA{gate}")


def written_coefficients(method: str, twa: list[float], files: list[CheckpointFile],
                         metrics: dict[str, dict]) -> list[float]:
    """Coefficients over the checkpoints of the model actually written."""
    if method == "twa":
        return twa
    if method == "swa":
        return [1 / len(files)] * len(files)
    names = [f.name for f in files]
    return [1.0 if n == metrics[method]["checkpoint"] else 0.0 for n in names]


def fallback_state(name: str, files: list[CheckpointFile], stream: Stream, metrics: dict[str, dict],
                   evaluator: Evaluator) -> dict[str, torch.Tensor]:
    """The weights of a baseline, BN re-estimated exactly as when it was evaluated."""
    if name == "swa":
        return evaluator.recalibrated(stream.mean_state)
    checkpoint = metrics[name]["checkpoint"]
    entry = next(f for f in files if f.name == checkpoint)
    return evaluator.recalibrated(checkpoint_state(entry, files, stream, evaluator.reader))


def hf_folder(entry: CheckpointFile, root: Path) -> Path | None:
    """The Hugging Face folder a checkpoint came from (to copy its config/tokenizer files), if any."""
    folder = entry.path if entry.path.is_dir() else entry.path.parent
    return folder if folder.resolve() != root.resolve() and (folder / "config.json").is_file() else None


def _config_dict(config: AverageConfig) -> dict:
    raw = asdict(config)
    return json.loads(json.dumps(raw, default=str))


def _output_state(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with each tensor in the dtype the input checkpoints used."""
    return _output_state_from(model.state_dict(), reference)


def _output_state_from(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", reference[k].dtype) for k, v in state.items()}


def run_average(config: AverageConfig, on_event: EventSink = _ignore, dist: Dist | None = None) -> AverageResult:
    """Run ``twa average`` end to end and write the model, ``report.json`` and ``report.md``.

    Under torchrun every rank calls this with its ``dist``: the basis is sharded over the ranks, the
    data split between them, and only rank 0 writes (the others return the same report).
    """
    dist = dist or Dist()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        on_event(Event("warning", message))

    check_same_run(dist, config)
    check_allow_globals(config.allow_globals)
    torch.manual_seed(config.seed)
    device = dist.device(resolve_device(config.device))
    chosen = select_checkpoints(config)
    files = list(chosen.files)
    check_same_files(dist, files)
    for dropped in chosen.dropped:
        if dropped.alias_of is not None:
            warn(f"{dropped.name}: {dropped.reason}; counted once")
        if dropped.unplaced:
            warn(unplaced_warning(dropped.name))
    if (note := tolerance_note(config)) is not None:
        warn(note)
    if config.start not in ("mean", "last"):
        start_index(config.start, len(files))  # a dry run catches it too
    spec, model_args, model = build_run_model(config, files[0])
    names = trainable_names(model)
    check_amp_parameters(model, names, config.amp)
    reader = Reader.for_run(config, model)
    notes, headers = validate_headers(files, model, reader, spec)
    for message in notes:
        warn(message)
    output_names, output_bytes = planned_outputs(config, headers[files[-1].name].tensors)
    output_names += side_file_names(hf_folder(files[-1], config.checkpoint_dir))  # copied HF config/tokenizer
    inputs = tuple(f.path for f in files)
    if config.dry_run:
        check_output(config.out_dir, output_names, config.overwrite, inputs, output_bytes,
                     config.checkpoint_dir)
        data_plan = planned_data(config, model, spec)
        for message in data_plan.pop("notes", ()):
            warn(message)
        return dry_run_result(config, files, chosen, spec, model_args, model, output_names, output_bytes, warnings,
                              data_plan, dist.world_size)
    data_clock = time.perf_counter()
    data = build_data_once(config, dist)
    for message in data.notes:
        warn(message)
    check_data_fits(model, (data.train, data.eval), data.num_classes, spec,
                    config.data)  # before any checkpoint is read
    fit_data: Dataset = data.train
    if config.fit_on == "holdout":
        _, fit_data = split_holdout(data.train, config.holdout_fraction, config.seed)
    check_train_mode_sizes(model, config, len(data.train), len(fit_data))
    check_batch_of_one(model, config, data.train)
    check_eval_batches(model, config.train.batch_size, [("--data's eval split", data.eval)])
    timings["data_s"] = time.perf_counter() - data_clock
    claim = together(dist, lambda: prepare_output_dir(config.out_dir, output_names, config.overwrite, inputs,
                                                      output_bytes, config.checkpoint_dir) if dist.is_main else None)
    with claim or nullcontext():  # --out locked for this run; a failed run leaves no empty --out behind
        stream = stream_checkpoints(files, model, names, config.rank_rtol, reader, on_event,
                                    storage=config.basis_dtype, dist=dist)
        check_same_files(dist, files, stream.sha256)
        if stream.not_by_columns is not None:
            warn(f"--basis-dtype {config.basis_dtype}: built through a float32 basis, so the peak memory is that of "
                 f"float32 ({stream.not_by_columns})")
        for index in stream.subspace.dropped:
            warn(f"{files[index].name}: linearly dependent on the checkpoints before it (duplicate or combination, "
                 f"within --rank-rtol {config.rank_rtol:g} of its norm); dropped from the basis")
        timings["load_and_basis_s"] = time.perf_counter() - clock - timings["data_s"]

        model.to(device)
        eval_loader = _loader(data.eval, config, shuffle=False, seed=config.seed, dist=dist)
        evaluator = Evaluator(model=model, reader=reader, bn_data=data.train, eval_loader=eval_loader, config=config,
                              device=device, dist=dist)

        clock = time.perf_counter()
        metrics, per_checkpoint = run_baselines(config, files, stream, evaluator, on_event)
        timings["baselines_s"] = time.perf_counter() - clock
        clock, fallbacks = time.perf_counter(), compiled_projection_fallbacks()
        metrics["twa"], train_summary, weights = run_twa(config, files, stream, evaluator, fit_data, names, on_event)
        timings["twa_s"] = time.perf_counter() - clock
        if (hint := below_swa_hint(config, metrics)) is not None:
            warn(hint)
        if compiled_projection_fallbacks() > fallbacks and (failure := compiled_projection_failure()) is not None:
            warn(f"projection: {failure}; training took the chunked passes (the same projection, slower on a GPU)")

        report = {
            **run_facts(config, files, chosen, stream, weights, spec, model_args),
            "metrics": metrics,
            "checkpoint_metrics": per_checkpoint,
            "train": train_summary,
            "data": {"spec": config.data, "name": data.name, "num_classes": data.num_classes, "fit_on": config.fit_on,
                     "fit_examples": len(fit_data), "bn_examples": len(data.train), "eval_examples": len(data.eval)},
            "device": str(device),
            "timings": timings,
            "warnings": warnings,
        }
        report["model"]["frozen"] = frozen_names(model)  # not trained: kept at the start point
        if dist.active:
            report["distributed"] = distributed_facts(dist, stream)
        written_method, state = choose_output(config, report, files, stream, evaluator)
        state = reader.as_stored(state, files[-1].path)  # the input's keys (a tied weight stored once)
        if not dist.active:
            return write_outputs(config, report, files, state, written_method)
        written = together(dist, lambda: write_outputs(config, report, files, state, written_method)
                           if dist.is_main else None)
        return written or AverageResult(report=report, model_path=config.out_dir / output_names[0],
                                        report_path=config.out_dir / REPORT_FILE, warnings=tuple(warnings))


#: Settings that may differ between torchrun ranks: where each node keeps the files, and per-process ones.
PER_RANK_SETTINGS = ("checkpoint_dir", "out_dir", "data_root", "num_workers", "dist_timeout")


def check_same_run(dist: Dist, config: AverageConfig) -> None:
    """Under torchrun, every rank must run the same job: a rank started with another seed or lr silently walked
    other batches or took other steps (rank 0 wrote its own result), another --range or --epochs broke or hung
    a collective. Every rank compares all the settings (but the folders), so all refuse together."""
    if not dist.active:
        return
    flat = {}
    for key, value in _config_dict(config).items():
        if key not in PER_RANK_SETTINGS:
            flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    ranks = dist.gather_objects(flat)
    for rank, other in enumerate(ranks[1:], start=1):
        differs = [f"{k} {other.get(k)!r} vs {v!r}" for k, v in ranks[0].items() if other.get(k) != v]
        if differs:
            raise ConfigError(f"torchrun rank {rank} was started with other settings than rank 0 "
                              f"({', '.join(differs[:3])}); start every rank with the same flags")


def check_same_files(dist: Dist, files: list[CheckpointFile], digests: list[str] | None = None) -> None:
    """Under torchrun, every rank must read the same checkpoints: the same selection (names and sizes), and
    once read, the same bytes (sha256). A rank that saw another file built its basis shard from it."""
    if not dist.active:
        return
    mine = [(f.name, f.path.stat().st_size if digests is None else digests[i]) for i, f in enumerate(files)]
    ranks = dist.gather_objects(mine)
    for rank, other in enumerate(ranks[1:], start=1):
        if other == ranks[0]:
            continue
        first = next(i for i, (a, b) in enumerate(itertools.zip_longest(ranks[0], other)) if a != b)
        ours, theirs = (r[first] if first < len(r) else None for r in (ranks[0], other))
        if digests is not None and ours is not None and theirs is not None and ours[0] == theirs[0]:
            raise CheckpointError(f"torchrun rank {rank} read other bytes for {ours[0]} than rank 0 (sha256 "
                                  f"{theirs[1][:12]} vs {ours[1][:12]}); every rank must see the same checkpoint "
                                  f"files")

        def described(entry: tuple | None) -> str:
            return "none" if entry is None else f"{entry[0]} of {entry[1]} bytes" if digests is None else entry[0]

        raise CheckpointError(f"torchrun rank {rank} selected other checkpoints than rank 0 ({len(other)} vs "
                              f"{len(ranks[0])}; number {first + 1}: {described(theirs)} vs {described(ours)}); "
                              f"every rank must see the same checkpoint files")


def together(dist: Dist, step: Callable[[], T | None]) -> T | None:
    """Run a step that only some ranks do (rank 0's checks and writes), then agree: when it failed on any
    rank, the others fail too, at once, instead of waiting in the next collective until the timeout."""
    try:
        out = step()
    except BaseException:
        dist.all_ok(False)
        raise
    if not dist.all_ok(True):
        raise DistributedError("rank 0 failed (see its error); nothing was written")
    return out


def build_data_once(config: AverageConfig, dist: Dist) -> DataSplits:
    """The datasets; with ``--download`` under torchrun rank 0 downloads first, the others then read."""
    if not (config.download and dist.active):
        return build_data(config.data, root=config.data_root, download=config.download)
    data = together(dist, lambda: build_data(config.data, root=config.data_root, download=True)
                    if dist.is_main else None)
    return data or build_data(config.data, root=config.data_root, download=False)


def distributed_facts(dist: Dist, stream: Stream) -> dict:
    """The report's ``distributed`` section: the group and each rank's share of the basis."""
    assert stream.shard is not None
    columns = stream.shard.columns
    return {"world_size": dist.world_size, "backend": dist.backend,
            "basis_bytes_per_rank": [int(v) for v in dist.gather_values(stream.subspace.basis.nbytes)],
            "columns_per_rank": [int(v) for v in dist.gather_values(columns.stop - columns.start)],
            "dim": stream.shard.dim}


def run_facts(config: AverageConfig, files: list[CheckpointFile], chosen: Chosen, stream: Stream,
              weights: torch.Tensor, spec: str, model_args: tuple[tuple[str, str], ...]) -> dict:
    """The report's record of inputs, selection, coefficients and basis quality."""
    subspace = stream.subspace
    if stream.shard is not None:  # sharded: every product is local and summed over the ranks
        gram, beta = stream.shard.gram_and_coordinates(weights)  # one pass over the basis for both
        coefficients = subspace.coefficients_at(beta)
        span_residual = stream.shard.span_residual(weights, beta)
        orthonormality = distance_from_identity(gram)
        basis_bytes = int(sum(stream.shard.dist.gather_values(subspace.basis.nbytes)))
    else:
        gram, beta = gram_and_coordinates(subspace.basis, weights)  # one pass over the basis for both
        assert beta is not None
        coefficients = subspace.coefficients_at(beta)
        projected = subspace.basis.combine(beta)
        span_residual = (torch.linalg.vector_norm(weights.double() - projected) /
                         torch.linalg.vector_norm(weights.double())).item()
        orthonormality, basis_bytes = distance_from_identity(gram), subspace.basis.nbytes
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "twa",
        "version": __version__,
        "command": "average",
        "checkpoints": [f.name for f in files],
        "coefficients": coefficients.tolist(),
        "coefficients_sum": float(coefficients.sum()),
        "dropped": [files[i].name for i in subspace.dropped],
        "excluded": [{"name": d.name, "reason": d.reason} for d in chosen.dropped],
        "basis": {"rank": subspace.rank, "orthonormality_error": orthonormality,
                  "span_residual": span_residual, "storage": subspace.basis.storage,
                  "bytes": basis_bytes, "build": stream.build},
        "model": {"spec": spec, "args": dict(model_args), "parameters": int(weights.numel())},
        "config": _config_dict(config),
        "inputs": [{"name": f.name, "path": str(f.path), "sha256": h} for f, h in zip(files, stream.sha256)],
        "versions": {"twa": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),  # CPU results are byte-identical for the same seed and count
    }


def choose_output(config: AverageConfig, report: dict, files: list[CheckpointFile], stream: Stream,
                  evaluator: Evaluator) -> tuple[str, dict[str, torch.Tensor]]:
    """Apply the quality gate: the TWA model, or with ``--on-worse fallback`` the best baseline's weights."""
    metrics = report["metrics"]
    gate = quality_gate(config, metrics)
    written_method = "twa"
    state = _output_state(evaluator.model, stream.last_state)
    if gate is not None and not gate["passed"] and config.on_worse == "fallback":
        written_method = max((m for m in metrics if m != "twa"), key=lambda m: metrics[m]["accuracy"])
        state = _output_state_from(fallback_state(written_method, files, stream, metrics, evaluator), stream.last_state)
    if gate is not None:
        report["quality_gate"] = {**gate, "written": written_method}
    report["written_method"] = written_method
    report["written_coefficients"] = written_coefficients(written_method, report["coefficients"], files, metrics)
    return written_method, state


def write_outputs(config: AverageConfig, report: dict, files: list[CheckpointFile], state: dict[str, torch.Tensor],
                  written_method: str) -> AverageResult:
    """Write the model (with provenance metadata), report.json and report.md."""
    metadata = {
        "twa.version": __version__,
        "twa.method": written_method,
        MODEL_METADATA_KEY: report["model"]["spec"],
        MODEL_ARGS_METADATA_KEY: json.dumps(report["model"]["args"]),
        "twa.coefficients": json.dumps(report["written_coefficients"]),
        "twa.sources": json.dumps([{"name": s["name"], "sha256": s["sha256"]} for s in report["inputs"]]),
        "twa.seed": str(config.seed),
    }
    report_path = config.out_dir / REPORT_FILE
    with StagedOutput(config.out_dir) as staged:  # every file to a temp first; renamed together, or none
        written = write_model(staged, cast_state(state, config.out_dtype), metadata, config.max_shard_size,
                              hf_folder(files[-1], config.checkpoint_dir))
        report["outputs"] = written.outputs(report_path)
        figures, note = render_plots(report)
        report["outputs"]["human"] = [str(config.out_dir / name) for name in (HUMAN_REPORT_FILE, *figures)]
        staged.save_json(REPORT_FILE, report)
        for name, png in figures.items():
            staged.write_bytes(name, png)
        staged.write_bytes(HUMAN_REPORT_FILE, markdown_report(report, list(figures), note).encode())
        staged.commit(pause_before_rename_s=60.0 if "pause-write" in config.faults else 0.0)
    return AverageResult(report=report, model_path=written.main, report_path=report_path,
                         warnings=tuple(report["warnings"]))


