"""Checkpoint files: discovery, numeric ordering, framework-aware safe loading, header-only reads.

Reading
-------
``load_checkpoint`` turns one checkpoint (a file, or a Hugging Face ``checkpoint-<step>/`` folder)
into a CPU state dict plus what the file says about itself: the producer (safetensors, torch,
huggingface, lightning, timm, fairseq, averaged-model), the container key the weights were found
under, the key prefix stripped, raw or averaged weights, epoch / step and the metrics the trainer
stored. ``read_header`` returns the same description with shapes and dtypes only, reading headers
(safetensors, index JSON) or memory-mapping torch zips, so a folder can be validated before any
weights are read.

Safety
------
* safetensors is read as data; duplicate tensor names in its header are refused.
* torch pickles go through ``torch.load(weights_only=True)`` (always passed explicitly, so an
  inherited ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot weaken it) inside
  ``torch.serialization.safe_globals`` with a small allow-list (``argparse.Namespace``, numpy scalars
  and dtypes, Lightning's ``AttributeDict`` rebuilt as a plain ``dict``). Anything else is refused with
  the offending globals named, unless the caller opts in with ``trust_pickle``; there is never a
  silent fallback. Pickles are refused outright on torch < 2.6.
* torch zip archives are checked with ``zipfile`` first: the archive opens, every member is
  ``ZIP_STORED`` (torch never compresses; a compressed member is a zip-bomb risk), member names are
  plain, declared sizes fit the file, CRCs are valid; TorchScript archives (code) are refused.
* Shard names in an index file must be weight files (never optimizer, training_args...) inside the checkpoint
  folder.
* PEFT adapter-only, DeepSpeed ZeRO and FSDP sharded checkpoints are refused with the command that
  converts them (see ``refusal_reason``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import itertools
import json
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import WEIGHT_KINDS, check_weights
from .errors import (
    TOO_LONG,
    CheckpointError,
    ConfigError,
    TwaError,
    UnreadableCheckpoint,
    UnsafeInputError,
    exclude_hint,
    name_too_long,
)
from .usercode import pythonpath_hint

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
#: Files trainers leave beside the weights that are not weights (and must never be unpickled).
NON_WEIGHT_STEMS = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)$")
#: Single weight files inside a Hugging Face style ``checkpoint-<step>/`` folder, in order of preference.
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Index files of sharded Hugging Face checkpoints (tried after the single files, as transformers does).
FOLDER_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Keys under which trainers nest the (raw) state dict, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: Keys under which trainers keep EMA weights; only tried when EMA weights are asked for.
EMA_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "ema")
#: Wrapper prefixes always stripped: DDP / AveragedModel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PRODUCERS = ("safetensors", "torch", "huggingface", "lightning", "timm", "fairseq", "averaged-model")
MIN_TORCH_FOR_PICKLE = (2, 6)
#: safetensors' own cap on its JSON header (``MAX_HEADER_SIZE``).
MAX_SAFETENSORS_HEADER = 100_000_000
#: Cap on the JSON side files read (index, trainer state): a bigger one is not a genuine file.
MAX_JSON_BYTES = 64 << 20
#: Spellings under which Lightning's ``AttributeDict`` (a dict subclass) appears in old ``.ckpt`` files.
ATTRIBUTE_DICT_NAMES = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)


@functools.lru_cache(maxsize=1)
def _safe_globals() -> tuple:
    """The allow-list for ``weights_only`` loads. Each entry is a decision this project owns.

    * ``argparse.Namespace`` (timm / fairseq ``args``): a plain attribute bag.
    * numpy ``scalar`` under both module spellings, ``numpy.dtype`` and the concrete dtype classes:
      rebuild numpy scalars such as timm's ``metric`` (``np.float64``); no code is run.
    * Lightning's ``AttributeDict`` mapped to plain ``dict`` (torch only allows SETITEMS on dict), so
      Lightning need not be installed and no Lightning code runs.
    """
    allowed: list = [argparse.Namespace, *((dict, name) for name in ATTRIBUTE_DICT_NAMES)]
    try:
        import numpy as np
    except ImportError:  # numpy is optional: without it numpy payloads are refused like any other global
        return tuple(allowed)
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)
    return tuple(allowed)


@dataclass(frozen=True)
class PickleTrust:
    """What the user allowed beyond the built-in allow-list: everything (``--trust-pickle``) or named
    globals (``--allow-global module.Name``, imported only when a file needs it)."""

    full: bool = False
    allow: tuple[str, ...] = ()

    def extra_globals(self) -> list:
        return [_resolve_global(name) for name in self.allow]


#: The fix for a pickle that holds a class of the script that saved it (``__main__``): no other program can
#: import that class, so neither --allow-global nor --trust-pickle can load the file.
MAIN_CLASS_FIX = ("a class defined in the script that saved the file (__main__) cannot be imported by any other "
                  "program, so neither --allow-global nor --trust-pickle can load it: load it where that class "
                  "is defined (the training script) and save the state dict alone (torch.save or safetensors)")


def _never_allowed(names: list[str]) -> list[str]:
    """The names whose module torch's safe unpickler refuses whatever is allowed (``os``, ``posix``, ``sys``,
    ``nt``: calls into the operating system, which no checkpoint needs unless it was made to run code)."""
    from torch import _weights_only_unpickler

    blocked = set(getattr(_weights_only_unpickler, "_blocklisted_modules", ("sys", "os", "posix", "nt")))
    return [name for name in names if name.split(".")[0] in blocked]


#: The fix for a pickle that calls into a module torch never allows: there is none that keeps the safety.
NEVER_ALLOWED_FIX = ("no checkpoint needs these unless it was made to run code when loaded: do not load it "
                     "(--trust-pickle would run them; --allow-global cannot allow them)")


def check_allow_globals(names: tuple[str, ...]) -> None:
    """Refuse at the start of a run the ``--allow-global`` names no file can use (a ``__main__`` class, a module
    torch's safe unpickler never allows), whatever the checkpoints' format: before, they were only refused when a
    pickle file was read, and accepted without a word over safetensors. The others are imported only when a file
    needs them."""
    for name in names:
        if name.rpartition(".")[0] == "__main__":
            raise ConfigError(f"--allow-global {name}: {MAIN_CLASS_FIX}")
        if _never_allowed([name]):
            raise ConfigError(f"--allow-global {name}: torch's safe unpickler never allows the {name.split('.')[0]} "
                              f"module, whatever is allowed; {NEVER_ALLOWED_FIX}")


def _resolve_global(name: str) -> object:
    module, _, attr = name.rpartition(".")
    check_allow_globals((name,))
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        raise ConfigError(f"--allow-global {name}: cannot import it ({err}); {pythonpath_hint(err.name)}, or give "
                          f"the full module path, e.g. torch.nn.modules.loss.MSELoss") from None
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"--allow-global {name}: cannot import it; give the full module path, e.g. "
                          f"torch.nn.modules.loss.MSELoss") from None


@dataclass(frozen=True)
class CheckpointFile:
    """One selected checkpoint: ``name`` as shown to the user, ``path`` what ``load_checkpoint`` reads.

    ``path`` is the weight file, or the ``checkpoint-<step>/`` folder itself when the weights are
    sharded or the folder is a layout ``load_checkpoint`` refuses with an explanation.
    """

    name: str
    path: Path

    @property
    def numbers(self) -> tuple[int, ...]:
        """The numbers in the name, in order; none for Lightning's versioned rolling save (``last-v1.ckpt``, written
        when ``last.ckpt`` is there already: its number is a version, not an epoch or step)."""
        if _LIGHTNING_LAST_VERSION.fullmatch(self.name):
            return ()
        return tuple(int(n) for n in re.findall(r"\d+", self.name))


#: Lightning's ``ModelCheckpoint.CHECKPOINT_NAME_LAST`` with its version suffix (``last-v1.ckpt``).
_LIGHTNING_LAST_VERSION = re.compile(r"last-v\d+\.ckpt")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A state dict with what the checkpoint said about itself.

    ``producer``: one of ``PRODUCERS``. ``container``: the key the state dict was found under (None
    for a bare state dict or safetensors). ``prefix``: the key prefix stripped (e.g. ``"module."``,
    ``"model."``), None if none. ``weights``: ``"raw"``, ``"ema"`` (averaged weights: EMA / SWA), or the
    top-level key ``--weights KEY`` named.
    ``epoch`` / ``step``: as the trainer recorded them. ``metrics``: what the trainer stored for this
    checkpoint (timm ``metric``, Lightning ``ModelCheckpoint`` scores by monitor name, HF
    ``log_history`` entries at this step).
    """

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    producer: str = "torch"
    container: str | None = None
    prefix: str | None = None
    weights: str = "raw"
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HeaderInfo:
    """What ``read_header`` learns without reading weights: key -> (shape, dtype name) and the rest.

    Dtype names are torch's without the ``torch.`` prefix (``"float32"``, ``"bfloat16"``, ``"int64"``).
    Keys are prefix-stripped exactly as ``load_checkpoint`` would strip them.
    """

    tensors: dict[str, tuple[tuple[int, ...], str]]
    metadata: dict[str, str]
    producer: str = "torch"
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    container: str | None = None
    weights: str = "raw"
    prefix: str | None = None


@dataclass
class _Found:
    """A reader's result before prefix stripping. ``entries`` holds tensors, or (shape, dtype) specs."""

    entries: dict
    metadata: dict[str, str]
    producer: str
    container: str | None = None
    weights: str = "raw"
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    from_data: bool = False  # its trainer info depends on more than the pickle (``_reads_tensor_data``)


def _strip_suffix(name: str) -> str:
    for suffix in sorted(WEIGHT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def order_key(entry: CheckpointFile) -> tuple:
    """Numeric order by the numbers in the name (``2.pt`` < ``10.pt``); unnumbered names last."""
    nums = entry.numbers
    return (0 if nums else 1, nums, entry.name)


# ----------------------------------------------------------------------------------------------
# Layouts we refuse, with the command that converts them.

_DEEPSPEED_FILE = re.compile(r"^((bf16|fp32)_)?zero_pp_rank_\d+_mp_rank_\d+_(model|optim)_states\.pt$"
                             r"|^mp_rank_\d+_model_states\.pt$|^layer_\d+-model_\d+-model_states\.pt$")
_DEEPSPEED_DIR = re.compile(r"^global_step\d+$")
_FSDP_DIR = re.compile(r"^pytorch_model_fsdp(_\d+)?$")
_FSDP_FILE = re.compile(r"\.distcp$|^pytorch_model_fsdp(_\d+)?_rank\d+\.bin$")
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _peft_message(path: Path) -> str:
    return (f"{path}: PEFT adapter-only checkpoint (adapter_model / adapter_config.json), not full model weights; "
            f"merge the adapter into its base model first (peft: model.merge_and_unload(), then "
            f"save_pretrained) and average the merged checkpoints")


def _deepspeed_message(path: Path) -> str:
    return (f"{path}: DeepSpeed ZeRO checkpoint (sharded *_model_states.pt / zero_pp_rank_* files), not a state "
            f"dict; consolidate it first with the zero_to_fp32.py script DeepSpeed writes beside it "
            f"(python zero_to_fp32.py <checkpoint_dir> <output>)")


def _fsdp_message(path: Path) -> str:
    return (f"{path}: FSDP sharded checkpoint (torch.distributed.checkpoint *.distcp shards), not a state dict; "
            f"consolidate it first with torch.distributed.checkpoint.format_utils.dcp_to_torch_save(<dir>, "
            f"<out.pt>) (or `accelerate merge-weights`)")


def _torchscript_message(path: Path) -> str:
    return (f"{path}: TorchScript archive (contains code), not a state dict; in the training script save "
            f"model.state_dict() (torch.save or safetensors) instead")


def _is_deepspeed_shard_dir(folder: Path) -> bool:
    try:
        return any(_DEEPSPEED_FILE.search(p.name) for p in folder.iterdir() if p.is_file())
    except OSError:
        return False


def _folder_refusal(folder: Path) -> tuple[type[TwaError], str] | None:
    """Why a folder without full weights is refused (None when it is not a known sharded layout)."""
    try:
        children = list(folder.iterdir())
    except OSError:
        return None
    names = {p.name for p in children}
    if any(n in names for n in _PEFT_FILES):
        return CheckpointError, _peft_message(folder)
    if (_DEEPSPEED_DIR.match(folder.name) and _is_deepspeed_shard_dir(folder)) or (folder / "latest").is_file() \
            or any(_DEEPSPEED_FILE.search(n) for n in names) \
            or any(p.is_dir() and _DEEPSPEED_DIR.match(p.name) and _is_deepspeed_shard_dir(p) for p in children):
        return CheckpointError, _deepspeed_message(folder)
    if _FSDP_DIR.match(folder.name) or ".metadata" in names or any(_FSDP_FILE.search(n) for n in names) \
            or any(p.is_dir() and _FSDP_DIR.match(p.name) for p in children):
        return CheckpointError, _fsdp_message(folder)
    return None


def _file_refusal(path: Path) -> tuple[type[TwaError], str] | None:
    """Refusals decided by a file's name, or for zips by their member list (TorchScript)."""
    name = path.name
    if name.startswith("adapter_model."):
        return CheckpointError, _peft_message(path)
    if _DEEPSPEED_FILE.search(name):
        return CheckpointError, _deepspeed_message(path)
    if _FSDP_FILE.search(name) or name == ".metadata":
        return CheckpointError, _fsdp_message(path)
    if path.exists() and not path.is_file():  # opening a FIFO waits for a writer; a device never ends
        return CheckpointError, (f"{path}: not a regular file (a FIFO, socket or device), so not a checkpoint; "
                                 f"remove it from the folder or leave it out with {exclude_hint(name)}")
    try:
        if _sniff(path) == "torch-zip":
            with zipfile.ZipFile(path) as zf:
                if _is_torchscript(zf.namelist()):
                    return UnsafeInputError, _torchscript_message(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return None


def _refusal(path: Path) -> tuple[type[TwaError], str] | None:
    if path.is_dir():
        return None if _hf_layout(path) is not None else _folder_refusal(path)
    return _file_refusal(path)


def raise_if_refused(path: Path) -> None:
    """Raise the refusal for ``path`` (CheckpointError, or UnsafeInputError for code) if it has one."""
    found = _refusal(Path(path))
    if found is not None:
        raise found[0](found[1])


def refusal_reason(path: Path) -> str | None:
    """One-line explanation of why ``path`` cannot be averaged as is, with the fix; None if it can.

    Refused: PEFT adapter-only folders/files (merge the adapter first), DeepSpeed ZeRO shards
    (run ``zero_to_fp32.py``), FSDP ``torch.distributed.checkpoint`` shards (``dcp_to_torch_save``)
    and TorchScript archives (save ``model.state_dict()`` instead). A folder that also holds full
    weights (``model.safetensors`` etc.) is not refused: those weights are read.
    """
    found = _refusal(Path(path))
    return found[1] if found else None


# ----------------------------------------------------------------------------------------------
# Discovery.


def _hf_layout(folder: Path) -> tuple[str, Path] | None:
    """The weights of a ``checkpoint-<step>/`` style folder: ("file", weight file) or ("index", index)."""
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return "file", folder / name
    for name in FOLDER_INDEX_FILES:
        if (folder / name).is_file():
            return "index", folder / name
    return None


def weights_path(path: Path) -> Path:
    """The path ``discover`` lists for ``path``: a folder's single weight file (``save_pretrained``,
    ``checkpoint-<step>/``), else ``path`` itself (a file, or a sharded folder)."""
    layout = _hf_layout(path) if path.is_dir() else None
    return layout[1] if layout is not None and layout[0] == "file" else path


def no_checkpoints(directory: Path) -> CheckpointError:
    """The error for a folder where ``discover`` found nothing, naming everything it looks for."""
    patterns = ", ".join(f"*{suffix}" for suffix in WEIGHT_SUFFIXES)
    nested = _nested_weight_files(directory)
    fix = "check the path"
    if nested:
        more = f" and {len(nested) - 2} more" if len(nested) > 2 else ""
        fix = (f"its subfolders hold {', '.join(str(p.relative_to(directory)) for p in nested[:2])}{more}, but twa "
               f"reads the files of one folder: gather them in one (symlinks will do, named by epoch)")
    return CheckpointError(f"{directory}: no checkpoints found (looked for {patterns} and checkpoint-<step>/ "
                           f"folders); {fix}")


def _nested_weight_files(directory: Path) -> list[Path]:
    """The weight files one level down (``epoch_1/checkpoint.pth``), in numeric order; [] when none or unreadable."""
    try:
        found = [f for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".")
                 for f in d.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
                 and not NON_WEIGHT_STEMS.match(_strip_suffix(f.name))]
    except OSError:
        return []
    return sorted(found, key=lambda p: order_key(CheckpointFile(name=str(p.relative_to(directory)), path=p)))


def discover(directory: Path) -> list[CheckpointFile]:
    """List the checkpoints in ``directory`` in numeric order.

    Entries: plain weight files (``*.safetensors``, ``*.pt``, ``*.pth``, ``*.pth.tar``, ``*.bin``,
    ``*.ckpt``) and ``checkpoint-<step>/`` style folders. For a folder holding ``model.safetensors``
    or ``pytorch_model.bin`` the entry's path is that file; for sharded weights (an index JSON) it
    is the folder. Optimizer/scheduler/RNG/training-args files are ignored.

    Refused layouts (PEFT adapters, DeepSpeed ZeRO ``global_step*/``, FSDP shards) are *listed*, not
    skipped, so that loading them raises the explanation and the fix: silently skipping would turn
    "your checkpoints need converting" into "no checkpoints found" or, worse, average a subset. Only
    files that are not weight candidates at all (``latest``, ``zero_to_fp32.py``, ``*.distcp``,
    ``.metadata``) are skipped. When nothing is found and ``directory`` itself is a refused layout
    (e.g. an FSDP shard folder), the explanation is raised here.
    """
    try:
        exists = directory.exists()
    except OSError as err:
        if not name_too_long(err):
            raise
        raise CheckpointError(f"{directory}: {TOO_LONG}; pass the folder that holds the checkpoints") from None
    if not exists:
        raise CheckpointError(f"{directory}: no such directory; pass the folder that holds the checkpoints")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the folder that holds the checkpoints")
    found: list[CheckpointFile] = []
    try:
        entries = list(directory.iterdir())
    except PermissionError:
        raise CheckpointError(f"{directory}: permission denied listing the folder; make it readable (chmod a+rx) or "
                              f"run as a user who can read it") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            try:
                layout = _hf_layout(entry)
            except PermissionError:  # a folder this user may not read: listed when named like a checkpoint
                if any(c.isdigit() for c in entry.name):  # (checkpoint-500), so reading it says what is wrong;
                    found.append(CheckpointFile(name=entry.name, path=entry))  # another (lost+found) is no weights
                continue
            if layout is not None:
                found.append(CheckpointFile(name=entry.name, path=layout[1] if layout[0] == "file" else entry))
            elif _folder_refusal(entry) is not None:
                found.append(CheckpointFile(name=entry.name, path=entry))
            continue
        if not entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        if NON_WEIGHT_STEMS.match(_strip_suffix(entry.name)):
            continue
        found.append(CheckpointFile(name=entry.name, path=entry))
    found = _group_top_level_shards(directory, found)
    if not found:
        refused = _folder_refusal(directory)
        if refused is not None:
            raise refused[0](refused[1])
    return sorted(found, key=order_key)


def _group_top_level_shards(directory: Path, found: list[CheckpointFile]) -> list[CheckpointFile]:
    """A sharded model saved in ``directory`` itself (``Trainer.save_model`` writes the final model beside the
    ``checkpoint-<step>/`` folders) is one checkpoint, listed under its index's name, not one per shard."""
    layout = _hf_layout(directory)
    if layout is None or layout[0] != "index":
        return found
    try:
        shards = {shard.resolve() for shard in _index_shards(layout[1])}
    except (CheckpointError, OSError):
        return found  # a broken index: its shards stay listed, and reading them says what is wrong
    kept = [entry for entry in found if entry.path.resolve() not in shards]
    return kept + [CheckpointFile(name=layout[1].name, path=directory)]


@contextmanager
def excludable(directory: Path, besides: Path | None = None) -> Iterator[None]:
    """Around the reads of a command that filters the checkpoints of ``directory`` with ``--exclude``: a file of one
    of them that cannot be read (``UnreadableCheckpoint``) is reported with that way out too, ``--exclude NAME``
    for the entry that holds it. ``besides``: an input that is not one of them wherever it lies (``twa soup
    --base``), whose errors are left as they are."""
    try:
        yield
    except UnreadableCheckpoint as err:
        entry = _entry_holding(directory, Path(err.path), besides)
        if entry is None:
            raise
        raise err.leaving_out(entry.name).with_traceback(err.__traceback__) from None


def _entry_holding(directory: Path, path: Path, besides: Path | None) -> CheckpointFile | None:
    """The entry of ``discover(directory)`` whose reading reads ``path``: the file itself, a file inside its
    ``checkpoint-<step>/`` folder, or a shard of the sharded model saved in ``directory`` itself (listed under its
    index's name). None for any other path, and for one that is or lies inside ``besides``."""
    def plain(p: Path) -> Path:
        return Path(os.path.abspath(p))

    target = plain(path)
    if besides is not None and (target == plain(besides) or plain(besides) in target.parents):
        return None
    try:
        entries = discover(directory)
        for entry in entries:
            own = plain(directory / entry.name)  # the file, or the entry's folder
            if target in (plain(entry.path), own) or own in target.parents:
                return entry
            if plain(entry.path) == plain(directory) and target in map(plain, folder_weight_files(directory)):
                return entry
    except (TwaError, OSError):  # the folder changed since it was read: the error stands as it is
        return None
    return None


def sha256_file(path: Path, chunk: int = 1 << 20, verify_zip_crc: bool = False) -> str:
    """SHA-256 of a file. For a sharded checkpoint folder: of its index and shard files' digests.

    The folder digest is the SHA-256 of ``name\\0sha256\\n`` lines over the index file and every
    shard it names, sorted by name, so it changes whenever any weight byte does.

    ``verify_zip_crc``: in the same single read, check the CRC-32 of every member of a torch zip
    checkpoint against its central directory (a ``CheckpointError`` on a mismatch, as
    ``load_checkpoint`` raises), so a caller that hashes anyway need not pay for a second read.
    """
    path = Path(path)
    if path.is_dir():
        files = folder_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no model weights in this folder to hash")
        digest = hashlib.sha256()
        for file in sorted(files, key=lambda p: p.name):
            digest.update(f"{file.name}\0{sha256_file(file, chunk, verify_zip_crc)}\n".encode())
        return digest.hexdigest()
    members = _zip_member_ranges(path) if verify_zip_crc and _sniff(path) == "torch-zip" else []
    crcs = [0] * len(members)
    digest = hashlib.sha256()
    size = path.stat().st_size
    # read, not mapped: a file truncated while a mapping is read kills the process (SIGBUS); in cache-sized
    # pieces the CRCs read while in cache
    with open(path, "rb") as f, memoryview(bytearray(min(chunk, size))) as buffer:
        for position in range(0, size, chunk):
            with buffer[:min(chunk, size - position)] as view:
                _pread_exactly(f.fileno(), view, position, path, "changed while it was read (now shorter)")
                digest.update(view)
                for i, (_, start, end, _) in enumerate(members):
                    lo, hi = max(start, position), min(end, position + len(view))
                    if lo < hi:
                        crcs[i] = zlib.crc32(view[lo - position:hi - position], crcs[i])
    for (name, _, _, expected), crc in zip(members, crcs):
        _check_crc(path, name, crc, expected)
    return digest.hexdigest()


def _zip_member_ranges(path: Path) -> list[tuple[str, int, int, int]]:
    """(name, data start, data end, CRC-32) of each member of a stored (uncompressed) zip."""
    _check_zip(path, verify_crc=False)  # structure first: stored members, sane names and sizes
    ranges, spans = [], []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for info in zf.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise UnreadableCheckpoint(path, f"zip member {info.filename} has no local header",
                                           "the file is corrupt, re-copy or remove it")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            name = f.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", errors="replace")
            start = info.header_offset + 30 + name_len + extra_len
            if name != info.orig_filename or start + info.compress_size > size:
                raise UnreadableCheckpoint(path, f"zip member {info.filename}'s local header disagrees with the "
                                                 f"central directory or its data runs past the end",
                                           "the file is corrupt or hostile, re-copy or remove it")
            ranges.append((info.filename, start, start + info.compress_size, info.CRC))
            spans.append((info.header_offset, start + info.compress_size, info.filename))
    spans.sort()
    if spans and spans[0][0] != 0:  # torch.save starts with its first member; zipfile would skip what precedes it
        raise UnreadableCheckpoint(path, f"{spans[0][0]} bytes before the zip's first member",
                                   "the file is corrupt or hostile, re-copy or remove it")
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:  # torch.save writes each member once, one after the other
            raise UnreadableCheckpoint(path, f"zip members {name} and {other} overlap",
                                       "the file is corrupt or hostile, re-copy or remove it")
    return ranges



# ----------------------------------------------------------------------------------------------
# Direct reads: the files of one trajectory share one layout.

#: Zip members whose bytes differ between files of one layout by design (a random id per save).
_VOLATILE_MEMBERS = (".data/serialization_id",)


def _member_suffix(name: str) -> str:
    """A member's name without the archive folder (``torch.save`` names that folder after the file)."""
    return name.split("/", 1)[1] if "/" in name else name


def _is_storage_member(suffix: str) -> bool:
    return suffix.startswith("data/")


ZipSignature = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, bytes], ...]]


def _zip_signature(path: Path, ranges: Sequence[tuple[str, int, int, int]]) -> ZipSignature:
    """What decides everything but the tensor bytes of a torch zip whose ``ranges`` are known: its member
    table (suffix and size, in file order) and the bytes of its non-storage members (the pickle, byte order,
    versions), the volatile ones left out."""
    with open(path, "rb", buffering=0) as f:
        fixed = tuple((_member_suffix(n), os.pread(f.fileno(), end - start, start)) for n, start, end, _ in ranges
                      if not _is_storage_member(_member_suffix(n)) and _member_suffix(n) not in _VOLATILE_MEMBERS)
    return tuple((_member_suffix(n), end - start) for n, start, end, _ in ranges), fixed


class HeaderMemo:
    """Headers of torch zip checkpoints read so far, by what decides them: files with the same
    ``_zip_signature`` (one ``torch.save`` call site, one model: the same pickle bytes and member sizes)
    unpickle to the same keys, dtypes, shapes and trainer info, so only the first is unpickled; the others
    get the structural zip checks and a byte comparison. Never shared: Lightning files (their scores are
    looked up by the file's own name) and files whose epoch, step or metric is a tensor (its value lies in the
    storage bytes, which the signature leaves out). One memo per run (``read_header(memo=...)``)."""

    def __init__(self) -> None:
        self._found: dict[tuple, _Found] = {}

    def get(self, key: tuple) -> _Found | None:
        found = self._found.get(key)
        return None if found is None else self._copy(found)

    def put(self, key: tuple, found: _Found) -> None:
        if not found.from_data:  # Lightning's included (``_reads_tensor_data``)
            self._found[key] = self._copy(found)

    @staticmethod
    def _copy(found: _Found) -> _Found:
        """A copy whose dicts a caller may change without reaching the memo."""
        return replace(found, entries=dict(found.entries), metadata=dict(found.metadata), metrics=dict(found.metrics))


@dataclass(frozen=True)
class ZipLayout:
    """Where the tensors of a loaded torch zip checkpoint lie in its file, and what another file must share
    with it to hold its tensors at the same places: its member table (names and sizes) and the bytes of its
    pickle and other non-storage members.

    Files that one ``torch.save`` call site writes for one model differ only in their tensor bytes: their
    ``data.pkl`` is byte-identical, so unpickling them would give the same keys, dtypes, shapes and storage
    offsets. ``read_into`` reads such a file's tensors straight into caller-owned memory (one ``preadv``
    per tensor): no unpickling, no page faults on a mapping, no intermediate copy. The pickle of the other
    file is compared byte for byte, never run.
    """

    sizes: tuple[tuple[str, int], ...]  # (member suffix, size) in file order
    fixed: tuple[tuple[str, bytes], ...]  # the non-storage members' bytes (pickle, byteorder, versions)
    tensors: Mapping[str, tuple[str, int, torch.dtype, tuple[int, ...]]]  # key -> (member, offset in it, dtype, shape)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of tensor ``key``."""
        _, _, dtype, shape = self.tensors[key]
        return dtype, shape

    def offsets(self, members: Mapping[str, tuple[int, int]], keys: Sequence[str]) -> list[int]:
        """Where in the file, whose ``members`` ``matches`` returned, the bytes of each tensor of ``keys`` start."""
        return [members[self.tensors[k][0]][0] + self.tensors[k][1] for k in keys]

    def matches(self, path: Path) -> dict[str, tuple[int, int]] | None:
        """``path``'s members (suffix -> (data start, CRC-32)) when it shares this layout, else None. Runs
        the structural zip checks (a ``CheckpointError`` for a corrupt archive) and compares the bytes of
        the non-storage members with this layout's file. Another format (safetensors, a legacy pickle, a
        sharded folder) is None: ``load_checkpoint`` reads it."""
        if not Path(path).is_file() or _sniff(path) != "torch-zip":
            return None
        ranges = _zip_member_ranges(path)
        if tuple((_member_suffix(n), end - start) for n, start, end, _ in ranges) != self.sizes:
            return None
        members = {_member_suffix(n): (start, crc) for n, start, _, crc in ranges}
        with open(path, "rb", buffering=0) as f:
            for suffix, blob in self.fixed:
                if os.pread(f.fileno(), len(blob), members[suffix][0]) != blob:
                    return None
        return members

    def read_into(self, path: Path, members: Mapping[str, tuple[int, int]],
                  targets: Mapping[str, torch.Tensor], check_crc: bool = True) -> None:
        """Read tensors ``targets`` (key -> contiguous CPU tensor of the key's dtype and size) of ``path``,
        whose ``members`` ``matches`` returned, straight into those tensors, and check the CRC-32 of every
        storage member (a ``CheckpointError`` on a mismatch: the file is corrupt).

        A member one target fills whole is checked on the bytes just read (still in cache); any other
        storage member is read once more for its check. Without ``check_crc`` nothing is checked: for a
        caller that checks the whole file another way (``sha256_file(path, verify_zip_crc=True)``)."""
        whole, sizes = set(), dict(self.sizes)
        fd = os.open(path, os.O_RDONLY)
        try:
            for key, out in targets.items():
                member, offset, dtype, shape = self.tensors[key]
                if out.dtype != dtype or out.numel() != _numel(shape) or not out.is_contiguous():
                    raise ValueError(f"target for {key} is not a contiguous {dtype} tensor of {_numel(shape)} entries")
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
                _pread_exactly(fd, view, members[member][0] + offset, path, f"ends inside tensor {key}")
                if check_crc and offset == 0 and len(view) == sizes[member]:
                    whole.add(member)
                    _check_crc(path, member, zlib.crc32(view), members[member][1])
            for member, size in self.sizes:
                if check_crc and _is_storage_member(member) and member not in whole:
                    _check_crc(path, member, zlib.crc32(os.pread(fd, size, members[member][0])), members[member][1])
        finally:
            os.close(fd)


@dataclass(frozen=True)
class FlatFile:
    """Some tensors of a checkpoint file (torch zip or safetensors) as one flat vector (their flattened
    concatenation), read a range of entries at a time straight from the file (``pread``): the file stays
    in the page cache, not in the process. Safe to read from several threads at once. The caller checks
    the file's integrity (a zip's CRCs)."""

    path: Path
    starts: tuple[int, ...]  # entry of the vector where each tensor starts (and the vector's size, last)
    positions: tuple[int, ...]  # byte of the file where each tensor starts
    itemsize: int
    stamp: tuple[int, int, int] = (0, 0, 0)  # the file's (inode, size, mtime in ns) when it was planned

    @staticmethod
    def stamp_of(path: Path) -> tuple[int, int, int]:
        info = os.stat(path)
        return info.st_ino, info.st_size, info.st_mtime_ns

    def check_unchanged(self) -> None:
        """A ``CheckpointError`` when the file was replaced or rewritten since it was planned: its reads,
        spread over several passes, may then mix two versions."""
        if self.stamp_of(self.path) != self.stamp:
            raise CheckpointError(f"{self.path}: changed while it was being read; wait until the checkpoints "
                                  f"are written, then rerun")

    @classmethod
    def at(cls, path: Path, sizes: Sequence[int], positions: Sequence[int], itemsize: int) -> FlatFile:
        """Tensors of ``sizes`` entries each, starting at byte ``positions`` of ``path``, stamped now."""
        return cls(Path(path), (0, *itertools.accumulate(sizes)), tuple(positions), itemsize, cls.stamp_of(path))

    @classmethod
    def of(cls, path: Path, layout: ZipLayout, members: Mapping[str, tuple[int, int]], keys: Sequence[str]) -> FlatFile:
        """Tensors ``keys`` of a torch zip that shares ``layout`` (``members`` from ``layout.matches``)."""
        itemsize = torch.tensor([], dtype=layout.spec(keys[0])[0]).element_size() if keys else 4
        return cls.at(path, [_numel(layout.spec(k)[1]) for k in keys], layout.offsets(members, keys), itemsize)

    def read(self, cols: slice, out: torch.Tensor) -> None:
        """Entries ``cols`` of the vector into ``out`` (contiguous, the tensors' dtype, ``cols``' length)."""
        view = memoryview(out.view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, position in enumerate(self.positions):
                lo, hi = max(cols.start, self.starts[i]), min(cols.stop, self.starts[i + 1])
                if lo >= hi:
                    continue
                _pread_exactly(fd, view[(lo - cols.start) * self.itemsize:(hi - cols.start) * self.itemsize],
                               position + (lo - self.starts[i]) * self.itemsize, self.path,
                               "ends inside a tensor (or was changed while being read)")
        finally:
            os.close(fd)


def column_file(path: Path, names: Sequence[str], first: Mapping[str, torch.Tensor],
                layout: ZipLayout | None) -> tuple[FlatFile, Callable[[], dict[str, torch.Tensor]]] | None:
    """``path``'s tensors ``names`` as a ``FlatFile``, and a function reading its other tensors, when the file
    holds what the safely loaded first file ``first`` holds at places known without loading it: a torch zip
    sharing the first file's ``layout`` (its pickle compared, never run), or a safetensors file whose header
    names exactly ``first``'s keys, with ``names`` as float32 of ``first``'s shapes. None otherwise (the
    caller loads it the usual way). The zip's CRCs are left to the caller (``sha256_file(...,
    verify_zip_crc=True)``); the other tensors of a safetensors file are read through ``safe_open``, which
    validates the file."""
    others = [k for k in first if k not in set(names)]
    kind = _sniff(path) if Path(path).is_file() else "folder"  # a sharded folder is loaded the usual way
    if kind == "torch-zip" and layout is not None:
        members = layout.matches(path)
        if members is None:
            return None

        def read_zip() -> dict[str, torch.Tensor]:
            state = {k: torch.empty(shape, dtype=dtype) for k in others for dtype, shape in [layout.spec(k)]}
            layout.read_into(path, members, state, check_crc=False)
            return state

        return FlatFile.of(path, layout, members, names), read_zip
    if kind != "safetensors":
        return None
    _refuse_non_utf8_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu"):  # offsets, sizes, coverage: as for a load
            header = _safetensors_header(path)
    except (SafetensorError, OSError) as err:
        raise UnreadableCheckpoint(path, f"unreadable safetensors file ({err})", "re-save or remove it") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(entries) != set(first):
        return None
    with open(path, "rb") as f:
        data = 8 + struct.unpack("<Q", f.read(8))[0]
    positions = []
    for name in names:
        entry, numel = entries[name], first[name].numel()
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            fits = entry["dtype"] == "F32" and tuple(int(x) for x in entry["shape"]) == tuple(first[name].shape)
        except (KeyError, TypeError, ValueError):
            return None
        if not fits or first[name].dtype != torch.float32 or end - begin != 4 * numel:
            return None
        positions.append(data + begin)
    flat = FlatFile.at(path, [first[n].numel() for n in names], positions, 4)
    if any(at + 4 * (hi - lo) > flat.stamp[1] for at, lo, hi in zip(positions, flat.starts, flat.starts[1:])):
        return None  # a tensor past the end of the file

    def read_safetensors() -> dict[str, torch.Tensor]:
        return _read_safetensors(path, header_only=False, keys=set(others))[0] if others else {}

    return flat, read_safetensors


def _pread_exactly(fd: int, view: memoryview, position: int, path: Path, what: str) -> None:
    """Fill ``view`` from ``fd`` (the file ``path``) at byte ``position`` (``preadv``, no intermediate copy); a
    truncated file is an ``UnreadableCheckpoint`` saying ``what`` of it."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], position + done)
        if n == 0:
            raise UnreadableCheckpoint(path, what, "the file is truncated, re-copy or remove it")
        done += n


def _check_crc(path: Path, member: str, crc: int, expected: int) -> None:
    if crc != expected:
        raise _crc_mismatch(path, member)


def _crc_mismatch(path: Path, member: str) -> UnreadableCheckpoint:
    return UnreadableCheckpoint(path, f"CRC mismatch in zip member {member}",
                                "the file is corrupt (bit rot or a partial copy), re-copy or remove it")


def zip_layout(path: Path, state: Mapping[str, torch.Tensor]) -> ZipLayout | None:
    """The layout of ``state`` as ``torch.load(mmap=True)`` just loaded it from the torch zip ``path``; None
    when its tensors cannot be placed in the file (not memory-mapped from it, not contiguous).

    A memory-mapped load maps the whole file once, so every storage starts at the mapping's base plus its
    member's data offset: the base is the one shift that sends every storage pointer to a member start.
    Each tensor's bytes are then checked against the file at the place found, so a loader that maps
    differently gives None, never a wrong layout.
    """
    if not Path(path).is_file() or _sniff(path) != "torch-zip":
        return None
    ranges = _zip_member_ranges(path)
    storage_starts = {start: _member_suffix(n) for n, start, _, _ in ranges if _is_storage_member(_member_suffix(n))}
    ends = {_member_suffix(n): end - start for n, start, end, _ in ranges}
    tensors = {k: t for k, t in state.items() if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
    if len(tensors) != len(state) or not storage_starts:
        return None
    pointers = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
    if not pointers:
        return None
    lowest = min(pointers)
    base = next((lowest - s for s in sorted(storage_starts) if all(p - (lowest - s) in storage_starts
                                                                   for p in pointers)), None)
    if base is None:
        return None
    placed: dict[str, tuple[str, int, torch.dtype, tuple[int, ...]]] = {}
    with open(path, "rb", buffering=0) as f:
        for key, t in tensors.items():
            if not t.is_contiguous():
                return None
            start = t.untyped_storage().data_ptr() - base if t.numel() else min(storage_starts)
            member = storage_starts[start]
            offset, nbytes = t.storage_offset() * t.element_size(), t.numel() * t.element_size()
            if offset + nbytes > ends[member]:
                return None
            stored = os.pread(f.fileno(), nbytes, start + offset) if nbytes else b""
            if stored != t.reshape(-1).view(torch.uint8).numpy().tobytes():
                return None
            placed[key] = (member, offset, t.dtype, tuple(t.shape))
    sizes, fixed = _zip_signature(path, ranges)
    return ZipLayout(sizes=sizes, fixed=fixed, tensors=placed)

# ----------------------------------------------------------------------------------------------
# Low-level readers.


def zip_contents_key(path: Path) -> tuple | None:
    """For a torch zip checkpoint: its members as (name without the archive folder, size, CRC-32), from the
    central directory only; None for any other file or an unreadable zip.

    ``torch.save`` names the archive folder after the file, so saving one object to two names (torchvision's
    reference scripts write ``model_<epoch>.pth`` and ``checkpoint.pth``) gives files whose bytes differ
    only there: equal keys mark candidates, ``zip_contents_digest`` confirms."""
    try:
        if _sniff(path) != "torch-zip":
            return None
        with zipfile.ZipFile(path) as zf:
            return tuple(sorted((_member_suffix(i.filename), i.file_size, i.CRC) for i in zf.infolist()
                                if _member_suffix(i.filename) not in _VOLATILE_MEMBERS))
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None


def zip_contents_digest(path: Path) -> str | None:
    """SHA-256 over every member's name (without the archive folder) and bytes, volatile ones left out: equal
    for two saves of the same object under different file names. None when the zip is not a sane torch zip
    (its load reports why)."""
    try:
        ranges = _zip_member_ranges(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for name, start, end, _ in sorted(ranges, key=lambda r: _member_suffix(r[0])):
                suffix = _member_suffix(name)
                if suffix in _VOLATILE_MEMBERS:
                    continue
                digest.update(suffix.encode() + b"\0" + str(end - start).encode() + b"\0")
                f.seek(start)
                left = end - start
                while left:
                    block = f.read(min(left, 1 << 22))
                    if not block:
                        return None
                    digest.update(block)
                    left -= len(block)
        return digest.hexdigest()
    except (TwaError, OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None


def _sniff(path: Path) -> str:
    """Detect the container from its first bytes, not its extension."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _safetensors_header(path: Path) -> dict:
    """The raw JSON header (after safe_open validated the file), refusing duplicate tensor names."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(min(length, MAX_SAFETENSORS_HEADER + 1))  # never an allocation a header asks for
    try:
        if len(raw) != length or length > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header length {length}, the file holds {len(raw)} bytes after it (limit "
                             f"{MAX_SAFETENSORS_HEADER})")
        return json.loads(raw, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise UnreadableCheckpoint(path, "invalid safetensors header (nested too deeply)",
                                   "re-save or remove it") from None
    except ValueError as err:
        raise UnreadableCheckpoint(path, f"invalid safetensors header ({err})", "re-save or remove it") from None


def _refuse_non_utf8_path(path: Path, library: str = "safetensors") -> None:
    """The safetensors library and ``torch.load`` open a path only when it is valid UTF-8: a name in another
    encoding (bytes a Python path holds as surrogates) failed as 'unreadable safetensors file (Path ... is not valid
    UTF-8); re-save or remove it' or 'cannot read torch checkpoint (... surrogates not allowed); the file may be
    truncated', advice for a damaged file. The file is fine; its name is what to change."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: its path is not valid UTF-8, which the {library} library cannot open; "
                              f"rename the file (or the folder holding it) to a UTF-8 name") from None


def _read_safetensors(path: Path, header_only: bool, keys: set[str] | None = None) -> tuple[dict, dict[str, str]]:
    """Tensors (or specs) and metadata of one safetensors file; ``keys`` restricts what is read."""
    _refuse_non_utf8_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            header = _safetensors_header(path)
            names = [k for k in header if k != "__metadata__"]
            if keys is not None:
                missing = sorted(keys - set(names))
                if missing:
                    raise CheckpointError(f"{path}: lacks {len(missing)} tensor(s) its index assigns to it "
                                          f"(e.g. {missing[0]}); the checkpoint is incomplete")
                names = [k for k in names if k in keys]
            if header_only:
                entries: dict = {k: (tuple(int(d) for d in header[k]["shape"]), _ST_DTYPE_NAMES.get(
                    header[k]["dtype"], str(header[k]["dtype"]).lower())) for k in names}
            else:
                entries = _pread_tensors(path, header, {k: f.get_tensor(k) for k in names})
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise UnreadableCheckpoint(path, f"unreadable safetensors file ({err})", "re-save or remove it") from None
    return entries, metadata


def _pread_tensors(path: Path, header: dict, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``safe_open``'s tensors read with ``pread``: its tensors map the file, and a file truncated while
    they are alive (a trainer rewriting it) kills the process with SIGBUS at the next access, where a short
    read here is a ``CheckpointError``. Changes to the file after this call no longer reach the tensors."""
    out = {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", os.pread(f.fileno(), 8, 0))
        for name, view in views.items():
            tensor = torch.empty_like(view, memory_format=torch.contiguous_format)
            if tensor.numel():
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                _pread_exactly(f.fileno(), memoryview(raw), 8 + length + int(header[name]["data_offsets"][0]),
                               path, f"tensor {name} ends past the end of the file")
            out[name] = tensor
    return out


def _is_torchscript(names: list[str]) -> bool:
    return any(len(parts) >= 2 and parts[1] in ("constants.pkl", "code")
               for parts in (n.split("/") for n in names))


def _check_zip(path: Path, verify_crc: bool) -> None:
    """Validate a torch zip with the stdlib before torch touches it."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UnreadableCheckpoint(path, f"corrupt torch checkpoint (not a readable zip archive: {err})",
                                   "the file may be truncated, re-save or remove it") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if _is_torchscript(names):
            raise UnsafeInputError(_torchscript_message(path))
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnreadableCheckpoint(path, f"zip member {info.filename} is compressed",
                                           "torch.save never compresses, so this is not a torch checkpoint (or a "
                                           "zip bomb): remove it from the folder")
            parts = info.filename.replace("\\", "/").split("/")
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise UnreadableCheckpoint(path, f"zip member name {info.filename!r} is not a plain relative name",
                                           "not a torch checkpoint: remove it from the folder")
        if len({n.split("/", 1)[0] for n in names}) != 1:
            raise UnreadableCheckpoint(path, "zip members do not share one archive folder",
                                       "not a torch checkpoint: remove it from the folder")
        if sum(i.file_size for i in infos) > path.stat().st_size:
            raise UnreadableCheckpoint(path, "zip members declare more bytes than the file holds",
                                       "the file is corrupt or hostile: remove it from the folder")
        if verify_crc:
            try:
                bad = zf.testzip()
            except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as err:
                raise UnreadableCheckpoint(path, f"corrupt torch checkpoint ({err})", "re-copy or remove it") from None
            if bad is not None:
                raise _crc_mismatch(path, bad)


def _weights_only_detail(err: Exception) -> str:
    """The unpickler's own reason from torch's long weights_only message, on one line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.rsplit("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed") and "\n\n" in text:  # torch's advice to load unsafely: not ours
        text = text.split("\n\n", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(err).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return line if len(line) <= 200 else line[:197] + "..."


#: A global the weights-only unpickler refused, as its message names it (legacy pickles, which
#: ``get_unsafe_globals_in_checkpoint`` cannot scan): not allow-listed, or in a module torch always blocks.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")
_POLICY_REFUSAL = re.compile(r"allowlist|allowed global|Can only|unrecognized function|is blocked|not an allowed")


def _torch_load(path: Path, trust_pickle: PickleTrust, header_only: bool, crc_checked: bool = False,
                mapped: bool = True) -> object:
    """``torch.load`` a pickle checkpoint safely (zip pre-checks, explicit weights_only, allow-list).

    ``mapped``: a torch zip's tensors map the file (``mmap=True``: no copy, but a file truncated while the
    mapping lives kills the process with SIGBUS at the next access); without it they are read into memory."""
    _refuse_non_utf8_path(path, "torch")
    if _torch_version() < MIN_TORCH_FOR_PICKLE:
        raise UnsafeInputError(f"{path}: loading pickle checkpoints safely needs torch >= 2.6 "
                               f"(installed {torch.__version__}); upgrade torch or convert to safetensors")
    is_zip = _sniff(path) == "torch-zip"
    mmap = is_zip and (mapped or header_only)
    if is_zip:
        _check_zip(path, verify_crc=not (header_only or crc_checked))
    try:
        if trust_pickle.full:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap)
            except (ModuleNotFoundError, AttributeError) as err:  # a class it pickled cannot be found here
                if any(name.startswith("__main__.") for name in _unsafe_globals(path)):
                    raise CheckpointError(f"{path}: {MAIN_CLASS_FIX}") from None
                hint = pythonpath_hint(err.name if isinstance(err, ModuleNotFoundError) else None)
                raise CheckpointError(
                    f"{path}: unpickling it needs code that is not importable here ({type(err).__name__}: {err}); "
                    f"{hint or 'run twa where that code is importable (its project environment)'}, or convert the "
                    f"file to safetensors") from None
        with torch.serialization.safe_globals([*_safe_globals(), *trust_pickle.extra_globals()]):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as err:  # classified below, inside the allow-list context
                unsafe = _unsafe_globals(path) or _REFUSED_GLOBAL.findall(str(err))
                if unsafe:  # every name, in a stable order: each is what --allow-global needs
                    never = _never_allowed(unsafe)
                    fix = (MAIN_CLASS_FIX if any(name.startswith("__main__.") for name in unsafe) else
                           f"{', '.join(sorted(set(never)))} call into the operating system; {NEVER_ALLOWED_FIX}"
                           if never else
                           "convert the file to safetensors, allow each with --allow-global NAME, or pass "
                           "--trust-pickle if you trust its origin")
                    raise UnsafeInputError(f"{path}: refused to unpickle code objects "
                                           f"({', '.join(sorted(set(unsafe)))}); {fix}") from None
                detail = _weights_only_detail(err)
                if isinstance(err, pickle.UnpicklingError) and _POLICY_REFUSAL.search(detail):
                    raise UnsafeInputError(
                        f"{path}: refused by the safe unpickler ({detail}); convert the file to safetensors, or "
                        f"pass --trust-pickle if you trust its origin") from None
                raise
    except TwaError:
        raise
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        detail = _weights_only_detail(err) if str(err).strip() else type(err).__name__
        raise UnreadableCheckpoint(path, f"cannot read torch checkpoint ({detail})",
                                   "the file may be truncated or not a checkpoint, re-save or remove it") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def _read_json(path: Path) -> object:
    """A JSON side file (index, trainer state): size-capped, duplicate keys refused, never pickle."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, over the {MAX_JSON_BYTES >> 20} MiB limit for checkpoint "
                                  f"JSON files; not a genuine index/trainer-state file")
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates)
    except RecursionError:  # [[[[...: nested deeper than Python's JSON decoder recurses
        raise UnreadableCheckpoint(path, "unreadable JSON (nested too deeply)",
                                   "not a genuine index/trainer-state file, re-save or remove it") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UnreadableCheckpoint(path, f"unreadable JSON ({err})", "re-save or remove it") from None


# ----------------------------------------------------------------------------------------------
# Interpreting a loaded torch object: producer, container, epoch/step/metrics.


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _as_int(value.item())
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range (a hostile trainer_state.json or pickle)
            return None
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _as_float(value.item())
    return None


def _as_state(value: object) -> dict | None:
    """A non-empty dict of tensors (an nn.Module, only loadable with --trust-pickle, gives its state_dict)."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return dict(value)
    return None


def _is_averaged_model(state: Mapping) -> bool:
    """A torch.optim.swa_utils.AveragedModel state dict: ``n_averaged`` plus ``module.``-prefixed keys."""
    return "n_averaged" in state and len(state) > 1 and all(k.startswith("module.") for k in state if k != "n_averaged")


def _detect_producer(obj: Mapping) -> str:
    keys = set(obj)
    if "pytorch-lightning_version" in keys or {"state_dict", "epoch", "global_step"} <= keys:
        return "lightning"
    if isinstance(obj.get("arch"), str) and ("state_dict" in keys or "state_dict_ema" in keys):
        return "timm"
    # fairseq's save_state always writes optimizer_history and extra_state (cfg since the hydra configs); an
    # ``args`` namespace beside ``model`` alone is torchvision's reference scripts, whose epoch is top-level.
    if "model" in keys and keys & {"cfg", "optimizer_history", "extra_state"}:
        return "fairseq"
    return "torch"


def _basename(p: object) -> str:
    return re.split(r"[\\/]", str(p))[-1]


def _lightning_metrics(obj: Mapping, path: Path) -> dict[str, float]:
    """Scores ``ModelCheckpoint`` callbacks recorded for this file, keyed by their ``monitor`` name."""
    callbacks = obj.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return {}
    names = {path.name}
    try:
        names.add(path.resolve().name)  # last.ckpt saved as a link to the epoch file
    except OSError:
        pass
    metrics: dict[str, float] = {}
    for key, state in callbacks.items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, Mapping):
            continue
        monitor = state.get("monitor")
        if not isinstance(monitor, str) or not monitor:
            continue
        score = None
        best_k = state.get("best_k_models")
        if isinstance(best_k, Mapping):
            score = next((_as_float(v) for k, v in best_k.items() if _basename(k) in names), None)
        if score is None and _basename(state.get("best_model_path") or "") in names:
            score = _as_float(state.get("best_model_score"))
        if score is not None:
            metrics[monitor] = score
    return metrics


def _trainer_values(obj: Mapping, producer: str) -> tuple[object, object, dict[str, object]]:
    """The raw epoch, step and ``{metric name: value}`` each producer records (Lightning's scores, looked up by
    file name, aside): numbers, or tensors whose values lie in the file's storage bytes."""
    if producer == "lightning":
        return obj.get("epoch"), obj.get("global_step"), {}
    if producer == "timm":
        name = getattr(obj.get("args"), "eval_metric", None)
        names = ["metric", *([name] if isinstance(name, str) and name else [])]
        return obj.get("epoch"), None, {**_float_entries(obj), **{n: obj.get("metric") for n in names}}
    if producer == "fairseq":
        extra = obj.get("extra_state") if isinstance(obj.get("extra_state"), Mapping) else {}
        iterator = extra.get("train_iterator") if isinstance(extra.get("train_iterator"), Mapping) else {}
        history = obj.get("optimizer_history")
        last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], Mapping) else {}
        return iterator.get("epoch"), last.get("num_updates"), {"val_loss": extra.get("val_loss")}
    return obj.get("epoch"), obj.get("global_step") if "global_step" in obj else obj.get("step"), _float_entries(obj)


#: Top-level entries of a plain torch checkpoint that count training progress, never metrics.
_COUNTER_KEYS = frozenset({"epoch", "step", "global_step"})


def _float_entries(obj: Mapping) -> dict[str, object]:
    """The top-level floating point numbers a training script saved beside its weights (``'best_acc': 0.91``,
    PyTorch's ImageNet example's ``best_acc1`` tensor): its metrics, by their keys."""
    return {str(k): v for k, v in obj.items() if k not in _COUNTER_KEYS and _is_float_scalar(v)}


def _is_float_scalar(value: object) -> bool:
    """A floating point number a plain training script stores beside its weights (``'val_acc': 0.91``, a numpy
    float, a one-element float tensor); ints (seeds, counters) and bools are not metrics."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, float) or (type(value).__module__ == "numpy" and "float" in type(value).__name__)


def _reads_tensor_data(obj: Mapping, producer: str) -> bool:
    """Whether ``_trainer_info`` depends on more than the pickle: a number stored as a tensor (its value lies in
    the storage bytes, so two files with equal pickles, one save site saving ``torch.tensor(epoch)``, differ),
    or Lightning's scores (looked up by the file's name)."""
    epoch, step, metrics = _trainer_values(obj, producer)
    return producer == "lightning" or any(isinstance(v, torch.Tensor) for v in (epoch, step, *metrics.values()))


def _trainer_info(obj: Mapping, producer: str, path: Path) -> tuple[int | None, int | None, dict[str, float]]:
    """(epoch, step, metrics) as each producer records them (``_trainer_values``)."""
    epoch, step, raw = _trainer_values(obj, producer)
    if producer == "lightning":
        metrics = _lightning_metrics(obj, path)
    else:
        metrics = {name: value for name, value in ((n, _as_float(v)) for n, v in raw.items()) if value is not None}
    return _as_int(epoch), _as_int(step), metrics


def _select_key(obj: object, path: Path, key: str) -> tuple[dict, str, str | None, Mapping | None]:
    """``--weights KEY``: the dict of tensors under the top-level ``key``, whatever the key's name says."""
    if not isinstance(obj, Mapping) or _as_state(obj) is not None:
        what = "a bare state dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: --weights {key}: the file holds {what}, no top-level key to choose; leave "
                              f"it out with {exclude_hint(path.name)}, or use --weights raw if no file has the key")
    state = _as_state(obj.get(key))
    if state is None:
        raw, ema = _own_states(obj)
        found = ", ".join(k for _, k in raw + ema) or "none of its keys"
        what = "not a dict of tensors under" if key in obj else "no key"
        raise CheckpointError(f"{path}: --weights {key}: {what} {key!r} in this file; it holds dicts of tensors "
                              f"under {found}")
    producer = _detect_producer(obj)
    if producer == "torch" and _is_averaged_model(state):
        producer = "averaged-model"
    return state, producer, key, obj


def _select(obj: object, path: Path, weights: str) -> tuple[dict, str, str | None, Mapping | None]:
    """(state, producer, container, top-level dict or None) for the requested kind of weights (``WEIGHT_KINDS``)
    or the top-level key ``weights`` names; never mixes."""
    if weights not in WEIGHT_KINDS:
        return _select_key(obj, path, weights)
    whole = _as_state(obj)
    if not isinstance(obj, Mapping) or whole is not None:
        if whole is None:
            raise UnreadableCheckpoint(path, f"no state dict found (the file holds a {type(obj).__name__}, "
                                             f"expected a dict of tensors)", "save model.state_dict()")
        producer = "averaged-model" if _is_averaged_model(whole) else "torch"
        choices = {"raw": None, "ema": None}
        choices["ema" if producer == "averaged-model" else "raw"] = (whole, None)
        top = None
    else:
        top = obj
        producer = _detect_producer(obj)
        raw = ema = None
        if producer == "lightning" and _as_state(obj.get("current_model_state")) is not None:
            # Lightning WeightAveraging / EMAWeightAveraging: state_dict is the average, raw weights moved.
            raw = (_as_state(obj["current_model_state"]), "current_model_state")
            averaged = _as_state(obj.get("state_dict"))
            ema = (averaged, "state_dict") if averaged is not None else None
        else:
            raw = next(((s, k) for k in CONTAINER_KEYS if (s := _as_state(obj.get(k))) is not None), None)
            ema = next(((s, k) for k in EMA_CONTAINER_KEYS if (s := _as_state(obj.get(k))) is not None), None)
            if ema is None and producer == "lightning":
                ema = _lightning_swa_state(obj)
            if raw is None or ema is None:  # a script's own key for the kind not found under a known one
                own_raw, own_ema = _only_states(obj)
                raw, ema = raw or own_raw, ema or own_ema
            if raw is not None and _is_averaged_model(raw[0]):
                if producer == "torch":
                    producer = "averaged-model"
                ema, raw = ema or raw, None
        choices = {"raw": raw, "ema": ema}
    chosen = choices[weights]
    if chosen is None:
        if weights == "ema":
            raise CheckpointError(f"{path}: no EMA/averaged weights in this file (looked for "
                                  f"{', '.join(EMA_CONTAINER_KEYS)}, Lightning WeightAveraging/SWA state, an "
                                  f"AveragedModel dump); use --weights raw, or select files that hold EMA weights")
        several = [key for _, key in _own_states(top)[0]] if top is not None else []
        if len(several) > 1:
            raise CheckpointError(f"{path}: dicts of tensors under {', '.join(several)}, none under "
                                  f"{', '.join(CONTAINER_KEYS)}; twa cannot tell which holds the model: name it "
                                  f"with --weights KEY (e.g. --weights {several[0]})")
        other = choices["ema"]
        if other is not None:
            holder = f"under {other[1]}" if other[1] else "at the top level"
            if _is_averaged_model(other[0]):
                holder += " (a torch.optim.swa_utils.AveragedModel state dict: module. keys + n_averaged)"
            raise CheckpointError(f"{path}: holds only averaged/EMA weights {holder}, no raw weights; pass "
                                  f"--weights ema to average those instead")
        if top is not None and {"state", "param_groups"} <= set(top):
            raise CheckpointError(f"{path}: an optimizer's state_dict (state, param_groups), not model weights; "
                                  f"move it out of the folder or pass {exclude_hint(path.name)}")
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, or one under "
                              f"{', '.join(CONTAINER_KEYS)}); save model.state_dict(), or, if it is not a "
                              f"checkpoint, pass {exclude_hint(path.name)}")
    return chosen[0], producer, chosen[1], top


#: Words of a top-level key that name averaged weights (``ema_state_dict``, ``model_ema_state``, ``swa_model``,
#: ``modelEma``); a word, not a substring: ``remap``, ``demand`` or ``swav`` name nothing averaged.
_AVERAGED_WORDS = frozenset({"ema", "swa", "average", "averaged"})


def name_words(text: str) -> set[str]:
    """The lower-case words of a key or file name, split at non-alphanumerics and at camelCase humps
    (``modelEma`` -> model, ema; ``model_final.pth`` -> model, final, pth)."""
    return set(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text).lower())) - {""}


def _names_averaged(key: str) -> bool:
    """Whether a top-level key names averaged weights: one of its words (``name_words``) is in
    ``_AVERAGED_WORDS``."""
    return not _AVERAGED_WORDS.isdisjoint(name_words(key))


def _own_states(obj: Mapping) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]]]:
    """The top-level dicts of tensors with their keys: those whose key does not name averaged weights, and those
    whose key does."""
    states = [(state, str(k)) for k, v in obj.items() if (state := _as_state(v)) is not None]
    return [s for s in states if not _names_averaged(s[1])], [s for s in states if _names_averaged(s[1])]


def _only_states(obj: Mapping) -> tuple[tuple[dict, str] | None, tuple[dict, str] | None]:
    """(raw, averaged) for a script's own container keys (``{'net': sd, 'ema_state_dict': ...}``): the one
    top-level dict of tensors whose key does not name averaged weights, and the one whose key does; None for a
    kind with no such key or more than one (which of them is the model is the file's to say)."""
    raw, ema = _own_states(obj)
    return (raw[0] if len(raw) == 1 else None), (ema[0] if len(ema) == 1 else None)


def _lightning_swa_state(obj: Mapping) -> tuple[dict, str] | None:
    """The average kept by Lightning's StochasticWeightAveraging callback, if the file has one."""
    callbacks = obj.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for key, state in callbacks.items():
        if str(key).startswith("StochasticWeightAveraging") and isinstance(state, Mapping):
            found = _as_state(state.get("average_model_state"))
            if found is not None:
                return found, f"callbacks[{key}].average_model_state"
    return None


def _recorded_timm_args(args: object) -> dict[str, str]:
    """The constructor arguments a timm run's ``args`` (an ``argparse.Namespace`` or a dict) record beyond the
    ``arch``: ``num_classes`` (``train.py --num-classes``) and ``in_chans`` (``--in-chans``, else the first
    of ``--input-size C H W``, as ``train.py`` builds its model), each when it is a positive int."""
    def get(name: str) -> object:
        return args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)

    def positive(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    size = get("input_size")
    channels = get("in_chans")
    if channels is None and isinstance(size, (list, tuple)) and len(size) == 3:
        channels = size[0]
    found = {"num_classes": get("num_classes"), "in_chans": channels}
    return {name: str(value) for name, value in found.items() if positive(value)}


def _read_torch(path: Path, trust_pickle: PickleTrust, weights: str, header_only: bool,
               crc_checked: bool = False, memo: HeaderMemo | None = None, mapped: bool = True) -> _Found:
    if memo is not None and header_only and not trust_pickle.full and _sniff(path) == "torch-zip":
        key = (_zip_signature(path, _zip_member_ranges(path)), trust_pickle, weights)  # structural checks first
        found = memo.get(key)
        if found is None:
            found = _read_torch(path, trust_pickle, weights, header_only)
            memo.put(key, found)
        return found
    obj = _torch_load(path, trust_pickle, header_only, crc_checked, mapped)
    state, producer, container, top = _select(obj, path, weights)
    metadata: dict[str, str] = {}
    epoch = step = None
    metrics: dict[str, float] = {}
    from_data = False
    if top is not None:
        if isinstance(top.get("arch"), str):
            metadata["arch"] = top["arch"]
            metadata.update(_recorded_timm_args(top.get("args")))
        trainer = "torch" if producer == "averaged-model" else producer
        epoch, step, metrics = _trainer_info(top, trainer, path)
        from_data = _reads_tensor_data(top, trainer)
    entries = {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in state.items()} if header_only else state
    return _Found(entries=entries, metadata=metadata, producer=producer, container=container, weights=weights,
                  epoch=epoch, step=step, metrics=metrics, from_data=from_data)


# ----------------------------------------------------------------------------------------------
# Hugging Face folders.


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """A shard named by an index: a plain file name that resolves inside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name) or "\0" in name:
        raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name inside the checkpoint folder "
                              f"(path traversal?); refusing to read it")
    if not name.endswith(WEIGHT_SUFFIXES) or NON_WEIGHT_STEMS.match(_strip_suffix(name)):
        raise CheckpointError(f"{index}: shard name {name!r} is not a weight file (optimizer, scheduler, RNG and "
                              f"training_args files are never read, let alone unpickled); re-save the checkpoint")
    root = folder.resolve()
    target = (folder / name).resolve()
    if target.parent != root and root not in target.parents:
        raise CheckpointError(f"{index}: shard {name!r} resolves outside the checkpoint folder ({target}); "
                              f"refusing to follow it")
    if not target.is_file():
        raise CheckpointError(f"{index}: shard {name!r} is missing; the checkpoint is incomplete")
    return folder / name


def _index_shards(index: Path) -> dict[Path, set[str]]:
    """Shard file -> tensor names, from a ``*.index.json`` whose every shard stays inside its folder."""
    document = _read_json(index)
    weight_map = document.get("weight_map") if isinstance(document, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map in the index; re-save the checkpoint")
    shards: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        shards.setdefault(_shard_path(index.parent, index, name), set()).add(key)
    return shards


def folder_weight_files(folder: Path) -> list[Path]:
    """The weight files of a ``checkpoint-<step>/`` style folder: its weight file, or its index and shards."""
    layout = _hf_layout(folder)
    if layout is None:
        return []
    if layout[0] == "file":
        return [layout[1]]
    return [layout[1], *_index_shards(layout[1])]


def _is_hf_weight_file(path: Path) -> bool:
    folder = path.parent
    return path.name in FOLDER_WEIGHT_FILES + FOLDER_INDEX_FILES and (
        (folder / "trainer_state.json").is_file() or (folder / "config.json").is_file()
        or re.match(r"^checkpoint-\d+$", folder.name) is not None)


#: safetensors metadata keys that record a checkpoint's place in training, most specific first: twa's own
#: (``twa demo`` writes ``twa.epoch``), then the plain names some trainers write (``global_step`` over ``step``,
#: as in a torch checkpoint dict).
EPOCH_METADATA_KEYS = ("twa.epoch", "epoch")
STEP_METADATA_KEYS = ("twa.step", "global_step", "step")


def metadata_counters(metadata: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(epoch, step) from a safetensors file's string metadata: the first key of ``EPOCH_METADATA_KEYS`` /
    ``STEP_METADATA_KEYS`` present, when its value is a whole number written in decimal digits (``"3"``; not
    ``"3.5"``, ``"-1"`` or ``" 3"``, which say something else than a position); None otherwise."""
    def first(keys: tuple[str, ...]) -> int | None:
        value = next((metadata[k] for k in keys if k in metadata), None)
        return int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value) else None

    return first(EPOCH_METADATA_KEYS), first(STEP_METADATA_KEYS)


def _trainer_state(folder: Path) -> tuple[int | None, int | None, dict[str, float]]:
    """(epoch, global_step, metrics logged at that step) from ``trainer_state.json`` (JSON, never pickle)."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None, None, {}
    state = _read_json(path)
    if not isinstance(state, Mapping):
        return None, None, {}
    step = _as_int(state.get("global_step"))
    metrics: dict[str, float] = {}
    history = state.get("log_history")
    if step is not None and isinstance(history, list):
        for entry in history:
            if isinstance(entry, Mapping) and _as_int(entry.get("step")) == step:
                for key, value in entry.items():
                    number = _as_float(value)
                    if key not in ("step", "epoch") and number is not None:
                        metrics[str(key)] = number
    return _as_int(state.get("epoch")), step, metrics


def _read_hf(folder: Path, weight_file: Path, trust_pickle: PickleTrust, weights: str, header_only: bool,
             crc_checked: bool = False, mapped: bool = True) -> _Found:
    """A ``checkpoint-<step>/`` folder: one weight file or an index with shards, plus trainer_state.json."""
    if weights != "raw":
        raise CheckpointError(f"{weight_file}: Hugging Face checkpoints hold one set of weights, "
                              f"{_no_other_set(weights)}; use --weights raw")
    if weight_file.name in FOLDER_INDEX_FILES:
        entries: dict = {}
        metadata: dict[str, str] = {}
        container = None
        for shard, keys in _index_shards(weight_file).items():
            if _sniff(shard) == "safetensors":
                part, meta = _read_safetensors(shard, header_only, keys)
            else:
                found = _read_torch(shard, trust_pickle, "raw", header_only, crc_checked, mapped=mapped)
                missing = sorted(keys - set(found.entries))
                if missing:
                    raise CheckpointError(f"{shard}: lacks {len(missing)} tensor(s) its index assigns to it "
                                          f"(e.g. {missing[0]}); the checkpoint is incomplete")
                part, meta, container = {k: found.entries[k] for k in keys}, found.metadata, found.container
            entries.update(part)
            for k, v in meta.items():
                metadata.setdefault(k, v)
        found = _Found(entries=entries, metadata=metadata, producer="huggingface", container=container)
    elif _sniff(weight_file) == "safetensors":
        entries, metadata = _read_safetensors(weight_file, header_only)
        found = _Found(entries=entries, metadata=metadata, producer="huggingface")
    else:
        found = _read_torch(weight_file, trust_pickle, "raw", header_only, crc_checked)
        found.producer = "huggingface"
    if not any((v.numel() if isinstance(v, torch.Tensor) else _numel(v[0])) for v in found.entries.values()):
        refused = _folder_refusal(folder)  # e.g. ZeRO-3 without gathering writes an empty model file
        if refused is not None:
            raise refused[0](refused[1])
    epoch, step, found.metrics = _trainer_state(folder)
    recorded = metadata_counters(found.metadata)  # a folder without trainer_state.json (save_pretrained's)
    found.epoch = epoch if epoch is not None else recorded[0]
    found.step = step if step is not None else recorded[1]
    return found


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# Prefixes.


def _strip_wrappers(state: dict) -> tuple[dict, str]:
    """Strip DDP/AveragedModel ``module.`` and torch.compile ``_orig_mod.``; drop ``n_averaged``."""
    stripped = ""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if any(k != "n_averaged" for k in state) and all(k.startswith(prefix) for k in state if k != "n_averaged"):
                state = {k[len(prefix):] if k != "n_averaged" else k: v for k, v in state.items()}
                stripped += prefix
                changed = True
    state.pop("n_averaged", None)
    return state, stripped


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP/AveragedModel ``module.`` and torch.compile ``_orig_mod.`` prefixes (and ``n_averaged``)."""
    return _strip_wrappers(dict(state))[0]


def _submodule_prefix(keys: list[str], model_keys: set[str]) -> str | None:
    """The one leading prefix under which ``keys`` hold exactly ``model_keys`` while other keys lie outside it: a
    LightningModule's ``self.model`` beside its other attributes with state (a loss's class ``weight``, a second
    network), which are not the model's. None when no prefix, or more than one, fits."""
    counts: dict[str, int] = {}
    for key in keys:
        for cut in (i + 1 for i, c in enumerate(key) if c == "."):
            if key[cut:] in model_keys:
                counts[key[:cut]] = counts.get(key[:cut], 0) + 1
    fits = [p for p, n in counts.items() if n == len(model_keys)
            and {k[len(p):] for k in keys if k.startswith(p)} == model_keys]
    return fits[0] if len(fits) == 1 else None


def _model_prefix(keys: list[str], model_keys: set[str], submodule: bool = False) -> str | None:
    """The one common leading prefix whose removal makes ``keys`` equal ``model_keys`` (None if none); with
    ``submodule`` (Lightning files), else the prefix of the model's keys among others (``_submodule_prefix``)."""
    if not keys or set(keys) == model_keys:
        return None
    common = _common_model_prefix(keys, model_keys)
    return common if common is not None or not submodule else _submodule_prefix(keys, model_keys)


def _common_model_prefix(keys: list[str], model_keys: set[str]) -> str | None:
    """The leading prefix every key has whose removal makes ``keys`` equal ``model_keys`` (None if none)."""
    parts = keys[0].split(".")
    for depth in range(1, len(parts)):
        candidate = ".".join(parts[:depth]) + "."
        if not all(k.startswith(candidate) for k in keys):
            return None
        if {k[len(candidate):] for k in keys} == model_keys:
            return candidate
    return None


def _apply_prefixes(found: _Found, path: Path, strip_prefix: str | None,
                    model_keys: object | None) -> tuple[dict, str | None]:
    entries, stripped = _strip_wrappers(found.entries)
    prefix = None
    if strip_prefix:
        keys = list(entries)
        dotted = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
        prefix = next((p for p in (dotted, strip_prefix) if all(k.startswith(p) for k in keys)), None)
        if prefix is None and found.producer == "lightning" and any(k.startswith(dotted) for k in keys):
            prefix = dotted  # the LightningModule's attribute that holds the model; its other attributes' state
        if prefix is None and dotted in WRAPPER_PREFIXES and dotted in stripped:
            pass  # DDP's module. / torch.compile's _orig_mod.: already stripped, as always
        elif prefix is None:
            example = next((k for k in keys if not k.startswith(strip_prefix)), "")
            raise CheckpointError(f"{path}: --strip-prefix {strip_prefix!r}: not every key starts with it "
                                  f"(e.g. {example!r})")
    elif model_keys is not None:
        prefix = _model_prefix(list(entries), set(model_keys), submodule=found.producer == "lightning")
    if prefix:
        entries = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
        entries, again = _strip_wrappers(entries)  # e.g. "model._orig_mod." inside a LightningModule
        stripped += prefix + again
    return entries, stripped or None


# ----------------------------------------------------------------------------------------------
# Public readers.


def _read(path: Path, trust_pickle: PickleTrust, weights: str, header_only: bool, crc_checked: bool = False,
          memo: HeaderMemo | None = None, mapped: bool = True) -> _Found:
    check_weights(weights)
    path = Path(path)
    if path.is_dir():
        layout = _hf_layout(path)
        if layout is None:
            refused = _folder_refusal(path)
            if refused is not None:
                raise refused[0](refused[1])
            raise CheckpointError(f"{path}: no model weights in this folder (looked for "
                                  f"{', '.join(FOLDER_WEIGHT_FILES + FOLDER_INDEX_FILES)})")
        return _read_hf(path, layout[1], trust_pickle, weights, header_only, crc_checked, mapped)
    refused = _file_refusal(path) if path.exists() else None
    if refused is not None:
        raise refused[0](refused[1])
    if path.name in FOLDER_INDEX_FILES or (path.name in FOLDER_WEIGHT_FILES and _is_hf_weight_file(path)):
        return _read_hf(path.parent, path, trust_pickle, weights, header_only, crc_checked, mapped)
    try:
        kind = _sniff(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open ({err.strerror})") from None
    if kind == "safetensors":
        if weights != "raw":
            raise CheckpointError(f"{path}: a safetensors file holds one set of weights, {_no_other_set(weights)}; "
                                  f"use --weights raw")
        entries, metadata = _read_safetensors(path, header_only)
        epoch, step = metadata_counters(metadata)
        return _Found(entries=entries, metadata=metadata, producer="safetensors", epoch=epoch, step=step)
    if kind in ("torch-zip", "torch-legacy"):
        return _read_torch(path, trust_pickle, weights, header_only, crc_checked, memo, mapped)
    raise CheckpointError(f"{path}: {_not_weights(path)}; remove it from the folder or leave it out with "
                          f"{exclude_hint(path.name)}")


def _no_other_set(weights: str) -> str:
    """What a file with one set of weights lacks, for ``--weights ema`` or ``--weights KEY``."""
    return "no EMA copy" if weights == "ema" else f"no keys to choose from (--weights {weights})"


#: The first bytes of a Git LFS pointer file (the weights were never fetched).
_LFS_POINTER = b"version https://git-lfs"


def _not_weights(path: Path) -> str:
    """Why a file named like a checkpoint holds none, as specific as its first bytes allow."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:
        head = b"?"
    if not head:
        return "empty file (0 bytes): the save was interrupted or the copy is incomplete"
    if head == _LFS_POINTER:
        return "a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
    return "unknown file format (not safetensors nor a torch checkpoint)"


def load_checkpoint(path: Path, trust_pickle: bool = False, *, weights: str = "raw", strip_prefix: str | None = None,
                    allow_globals: tuple[str, ...] = (), model_keys: object | None = None,
                    crc_checked: bool = False, mapped: bool = True) -> LoadedCheckpoint:
    """Load one checkpoint into a CPU state dict, safely, with what it says about itself.

    ``path``: a weight file, or a Hugging Face ``checkpoint-<step>/`` folder (``model.safetensors``,
    sharded ``model-*-of-*.safetensors`` + ``model.safetensors.index.json``, legacy
    ``pytorch_model.bin`` [+ index]); ``trainer_state.json`` beside the weights gives step and metrics.

    ``weights``: ``"raw"`` (what the optimizer trained) or ``"ema"`` (the averaged copy a trainer kept:
    ``state_dict_ema`` / ``model_ema`` / ``ema``, Lightning WeightAveraging or SWA state, a torch
    ``AveragedModel`` dump). Raw containers are tried in the order ``state_dict``, ``model``,
    ``model_state_dict``, ``module``, then the top-level dict if it holds only tensors. The two kinds are
    never mixed and never substituted: asking for a kind the file lacks is a ``CheckpointError``.
    Lightning ``WeightAveraging`` files keep the average in ``state_dict`` and the raw weights in
    ``current_model_state``: ``raw`` reads ``current_model_state``, ``ema`` reads ``state_dict``.
    An ``AveragedModel`` dump holds only averaged weights, so it needs ``weights="ema"``.

    Prefixes: DDP/AveragedModel ``module.`` and torch.compile ``_orig_mod.`` are always stripped.
    ``strip_prefix`` forces one more prefix off every key (an error if a key lacks it, except in a Lightning
    file: there the keys under it are the model and the LightningModule's other attributes are left out). Otherwise,
    given ``model_keys`` (the target model's state-dict keys), one common leading prefix such as
    Lightning's ``model.`` / ``net.`` is stripped when that makes the keys equal the model's.

    ``crc_checked``: the caller already verified the zip CRCs (``sha256_file(verify_zip_crc=True)``
    read the file for its digest anyway), so the CRC pass is skipped; the structural checks still run.

    ``mapped``: a torch zip's tensors may map the file (no copy; the default). Pass False for a state kept
    long (to the end of a run): a file truncated while its mapping lives (a trainer rewriting ``last.ckpt``
    in place) kills the process with SIGBUS at the next access, even during the load itself; read into
    memory, it is a ``CheckpointError`` at worst. Safetensors are always read into memory.
    """
    found = _read(path, PickleTrust(trust_pickle, tuple(allow_globals)), weights, header_only=False,
                  crc_checked=crc_checked, mapped=mapped)
    state, prefix = _apply_prefixes(found, Path(path), strip_prefix, model_keys)
    return LoadedCheckpoint(state=state, metadata=found.metadata, producer=found.producer, container=found.container,
                            prefix=prefix, weights=found.weights, epoch=found.epoch, step=found.step,
                            metrics=found.metrics)


def same_weights(path: Path, other: Path, *, weights: str = "raw", trust_pickle: bool = False,
                 strip_prefix: str | None = None, allow_globals: tuple[str, ...] = ()) -> bool:
    """Whether two checkpoints hold the same weights of the kind ``weights`` (the same keys, after the wrapper
    prefixes, and equal tensors), whatever else they store: ``torch.save(model.state_dict(), 'best.pth')``
    beside the epoch file that saved those weights with the optimizer. A file that cannot be read is not.
    Both are read into memory, never mapped: the unnumbered one is typically ``last.pth``, which a running trainer
    rewrites in place, and a mapping of a file truncated meanwhile kills the process (SIGBUS)."""
    options = {"weights": weights, "trust_pickle": trust_pickle, "strip_prefix": strip_prefix,
               "allow_globals": allow_globals, "mapped": False}
    try:
        first, second = load_checkpoint(path, **options).state, load_checkpoint(other, **options).state
    except TwaError:
        return False
    return first.keys() == second.keys() and all(
        first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)


def read_header(path: Path, *, weights: str = "raw", trust_pickle: bool = False, strip_prefix: str | None = None,
                allow_globals: tuple[str, ...] = (),
                model_keys: object | None = None, memo: HeaderMemo | None = None) -> HeaderInfo:
    """Shapes, dtypes and trainer info of a checkpoint without reading its weights.

    safetensors: the JSON header only (validated by ``safe_open``); HF folders: the index plus each
    shard's header; torch zips: ``torch.load(mmap=True, weights_only=True)``, which maps tensors lazily,
    with the structural zip checks but without the CRC pass ``load_checkpoint`` does; legacy
    (non-zip) pickles must be read whole. Same containers, refusals and prefix rules as
    ``load_checkpoint``. ``memo``: a ``HeaderMemo`` shared by the calls of one run, so a torch zip whose pickle
    and member sizes equal an earlier file's is not unpickled again.
    """
    found = _read(path, PickleTrust(trust_pickle, tuple(allow_globals)), weights, header_only=True, memo=memo)
    tensors, prefix = _apply_prefixes(found, Path(path), strip_prefix, model_keys)
    return HeaderInfo(tensors=tensors, metadata=found.metadata, producer=found.producer, epoch=found.epoch,
                      step=found.step, metrics=found.metrics, container=found.container, weights=found.weights,
                      prefix=prefix)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_DTYPE_NAMES = {
    **{code: _dtype_name(dtype) for dtype, code in SAFETENSORS_DTYPES.items()},
    **{code: _dtype_name(getattr(torch, name)) for code, name in (
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"), ("C128", "complex128"),
        ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, name)},
}
