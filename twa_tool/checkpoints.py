"""Checkpoint files: discovery, numeric ordering, safe loading, and the atomic output writer.

Loading is safe by default: safetensors is read as data; torch pickle files go through
``torch.load(weights_only=True)`` (always passed explicitly, so an inherited
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot weaken it) with a tiny allow-list. Anything else is
refused with the offending globals named, unless the caller opts in with ``trust_pickle``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, OutputError, UnsafeInputError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
#: Files trainers leave beside the weights that are not weights (and must never be unpickled).
NON_WEIGHT_STEMS = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)$")
#: Files inside a Hugging Face style ``checkpoint-<step>/`` folder, in order of preference.
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Keys under which trainers nest the state dict, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: Wrapper prefixes always stripped: DDP / AveragedModel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SAFE_GLOBALS = [argparse.Namespace]
MIN_TORCH_FOR_PICKLE = (2, 6)


@dataclass(frozen=True)
class CheckpointFile:
    """One selected checkpoint: ``name`` as shown to the user, ``path`` the weight file read."""

    name: str
    path: Path

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", self.name))


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A state dict with what the file said about itself."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _strip_suffix(name: str) -> str:
    for suffix in sorted(WEIGHT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def order_key(entry: CheckpointFile) -> tuple:
    """Numeric order by the numbers in the name (``2.pt`` < ``10.pt``); unnumbered names last."""
    nums = entry.numbers
    return (0 if nums else 1, nums, entry.name)


def discover(directory: Path) -> list[CheckpointFile]:
    """List the weight files in ``directory`` in numeric order.

    Accepts plain weight files and ``checkpoint-<step>/`` style folders that hold a
    ``model.safetensors`` or ``pytorch_model.bin``. Optimizer/scheduler/RNG files are ignored.
    """
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory; pass the folder that holds the checkpoints")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the folder that holds the checkpoints")
    found: list[CheckpointFile] = []
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            inner = next((entry / f for f in FOLDER_WEIGHT_FILES if (entry / f).is_file()), None)
            if inner is not None:
                found.append(CheckpointFile(name=entry.name, path=inner))
            continue
        if not entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        if NON_WEIGHT_STEMS.match(_strip_suffix(entry.name)):
            continue
        found.append(CheckpointFile(name=entry.name, path=entry))
    return sorted(found, key=order_key)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}); re-save or remove it") from None
    return LoadedCheckpoint(state=state, metadata=metadata)


def _load_pickle(path: Path, trust_pickle: bool) -> LoadedCheckpoint:
    if _torch_version() < MIN_TORCH_FOR_PICKLE:
        raise UnsafeInputError(f"{path}: loading pickle checkpoints safely needs torch >= 2.6 "
                               f"(installed {torch.__version__}); upgrade torch or convert to safetensors")
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeInputError(
                f"{path}: refused to unpickle code objects ({', '.join(unsafe[:5])}); convert the file to "
                f"safetensors, or pass --trust-pickle if you trust its origin") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({first}); the file may be truncated "
                              f"or not a checkpoint, re-save or remove it") from None
    return _as_loaded(path, obj)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def _as_loaded(path: Path, obj: object) -> LoadedCheckpoint:
    """Find the state dict inside a loaded object (plain dict, or nested under a known key)."""
    metadata: dict[str, str] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str):
        metadata["arch"] = obj["arch"]
    state = obj
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        state = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if not isinstance(state, Mapping) or not state or not _all_tensors(state):
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, or one under "
                              f"{', '.join(CONTAINER_KEYS)}); save model.state_dict()")
    return LoadedCheckpoint(state=dict(state), metadata=metadata)


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP/AveragedModel ``module.`` and torch.compile ``_orig_mod.`` prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    state.pop("n_averaged", None)
    return state


def load_checkpoint(path: Path, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Load one checkpoint file into a CPU state dict, safely."""
    try:
        kind = _sniff(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open ({err.strerror})") from None
    if kind == "safetensors":
        loaded = _load_safetensors(path)
    elif kind in ("torch-zip", "torch-legacy"):
        loaded = _load_pickle(path, trust_pickle)
    else:
        raise CheckpointError(f"{path}: unknown file format (not safetensors nor a torch checkpoint); "
                              f"remove it from the folder or select around it with --range")
    return LoadedCheckpoint(state=strip_wrapper_prefixes(loaded.state), metadata=loaded.metadata)


def read_metadata(path: Path) -> dict[str, str]:
    """Header metadata of a safetensors file without reading its tensors ({} for other formats)."""
    if _sniff(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


# ----------------------------------------------------------------------------------------------
# Writing: temp file in the target directory, fsync, os.replace. Never a partial output.


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it is renamed onto ``final``, else removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".twa-tmp-{final.name}-", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def prepare_output_dir(out_dir: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Create ``out_dir``; refuse when any output file already exists and ``overwrite`` is off."""
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise OutputError(f"{out_dir / existing[0]} already exists; pass --overwrite or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot create output directory ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"{out_dir}: not writable; choose another --out")


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    """Serialise to the safetensors format deterministically (same tensors + metadata = same bytes).

    ``safetensors.torch.save_file`` writes its metadata map in hash order, which differs from run to
    run; here header keys are sorted and tensors laid out by (alignment, name), so a seeded CPU run
    reproduces its output file byte for byte. Tied tensors are written once per name.
    """
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


def save_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write a state dict atomically as safetensors with string metadata; return its sha256.

    Tied tensors are written under every name, so the key set equals the model's state dict and
    loads with ``load_state_dict(strict=True)``.
    """
    meta = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
    try:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror}); check free space and permissions") from None
    return sha256_file(path)


def save_json(path: Path, document: object) -> None:
    """Write JSON atomically."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror}); check free space and permissions") from None
