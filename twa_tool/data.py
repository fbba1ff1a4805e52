"""Datasets for fitting TWA coefficients, re-estimating BatchNorm and evaluating the averaged model.

``build_data(spec)`` turns a ``--data`` value into a :class:`DataSplits`: a training split that
carries the standard training augmentation (used to fit coefficients and to re-estimate BatchNorm
statistics) and an evaluation split without augmentation. Accepted specs:

* a registry name (see :func:`list_data_names`): ``cifar10``, ``cifar100``, ``mnist``,
  ``fashion-mnist``, ``svhn``, ``imagenet`` and ``synthetic``;
* ``imagefolder:PATH`` — torchvision ``ImageFolder`` trees at ``PATH/train`` and ``PATH/val``;
* ``package.module:function`` or ``path/to/file.py:function`` — a user function returning
  ``(fit_dataset, eval_dataset)``.

Nothing is downloaded unless ``download=True``. CIFAR, (Fashion-)MNIST and SVHN files are read by the
small loaders here rather than by torchvision, which insists on the md5 sums of the official
files; torchvision is only used to fetch them.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import gzip
import importlib
import importlib.util
import inspect
import math
import os
import pickle
import shutil
import socket
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import TOO_LONG, ConfigError, DataError, MissingData, TwaError, name_too_long, one_line
from .usercode import (
    USER_MODULE_PREFIX,
    NotPythonSource,
    current_folder_hint,
    load_file,
    missing_file_fix,
    missing_function_fix,
    run_file,
)

Transform = Callable[[Any], Any]
Builder = Callable[[Path | None, bool], "DataSplits"]


@dataclass(frozen=True)
class DataSplits:
    """The datasets one ``--data`` spec stands for.

    Attributes:
        train: Training split with the standard training augmentation; used to fit the averaging
            coefficients and to re-estimate BatchNorm statistics.
        eval: Evaluation split, without augmentation.
        num_classes: Number of classes, or None when unknown (user-supplied datasets).
        name: Canonical name of the dataset, e.g. ``"cifar10"``.
        notes: What the user asked for that this spec does not use (``--data-root`` for
            ``imagefolder:PATH``, generated data, or a function without a ``root`` parameter), for the
            caller to warn about.
        train_plain: The training examples read as the evaluation split reads its own (no augmentation),
            index for index with ``train``: what a held-out part of ``train`` is scored on. ``train`` itself
            where it has no augmentation; None where that view is unknown (a user function's datasets).
    """

    train: Dataset
    eval: Dataset
    num_classes: int | None
    name: str
    notes: tuple[str, ...] = ()
    train_plain: Dataset | None = None


class ArrayImageDataset(Dataset):
    """In-memory uint8 images served as PIL images through a transform, like torchvision's loaders.

    Attributes:
        images: ``N x H x W`` (grayscale) or ``N x H x W x 3`` (RGB) uint8 array.
        targets: Class index of each image.
        transform: Applied to each PIL image.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Transform) -> None:
        """Wraps ``images`` and ``targets`` (same length) with ``transform``."""
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """The transformed image and class index of sample ``index``."""
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


class NormalizedGrayDataset(Dataset):
    """Grayscale uint8 images normalised once up front: ``ToTensor`` + ``Normalize`` without per-sample PIL.

    For sets without augmentation (MNIST, Fashion-MNIST) this gives the same values as
    ``ArrayImageDataset`` with ``_normalized`` (same float32 operations) at a fraction of the cost
    per pass, which matters because BN re-estimation and evaluation pass over the data many times.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, mean: float, std: float) -> None:
        pixels = torch.tensor(np.asarray(images), dtype=torch.uint8).unsqueeze(1).to(torch.float32).div_(255)
        self.images = pixels.sub_(mean).div_(std)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


# --------------------------------------------------------------------------- public API


def build_data(spec: str, *, root: Path | None = None, download: bool = False, eval_only: bool = False) -> DataSplits:
    """Builds the datasets for a ``--data`` spec.

    Args:
        spec: A registry name, ``imagefolder:PATH``, ``package.module:function`` or
            ``path/to/file.py:function``.
        root: Data root (``--data-root``); None means the per-dataset default
            (``~/.cache/twa/data``, plus the Debian package directory for Fashion-MNIST).
        download: Whether missing files may be downloaded (``--download``).
        eval_only: Only the evaluation split is used (``twa soup --holdout``): a user function's first
            dataset is passed through unchecked, so it may return ``(anything, heldout)``.

    Returns:
        The training and evaluation splits.

    Raises:
        ConfigError: The spec is not understood or names something that cannot be imported.
        DataError: The data files are missing or unreadable, or a user function returned
            something other than two datasets.
    """
    try:
        data = _build(spec, root, download, eval_only)
    except PermissionError as exc:  # a --data-root or imagefolder:PATH folder this user may not read or enter
        where = exc.filename or root
        raise DataError(f"--data {spec}: permission denied reading {where}; make it readable (chmod -R a+rX) or run "
                        f"as a user who can read it") from None
    except OSError as exc:
        if not name_too_long(exc):
            raise
        raise DataError(f"--data {spec}: {exc.filename or root}: {TOO_LONG}; pass a shorter path") from None
    return _noted(data, download_note(spec) if download else None)


def download_note(spec: str) -> str | None:
    """The note for ``--download`` beside a ``--data`` spec that never downloads (None for one that may): generated
    data, ``imagefolder:PATH``, ImageNet, a user function (twa passes it no ``download``)."""
    text = spec.strip()
    name = registry_name(text)
    if name is not None and name not in _GENERATED and name != "imagenet":
        return None
    if name in _GENERATED:
        reason = f"--data {name} is generated, not downloaded"
    elif name == "imagenet":
        reason = "--data imagenet cannot be downloaded automatically (its licence requires a manual download)"
    elif text.lower().startswith("imagefolder:"):
        reason = f"--data {text} reads the folders under its own PATH"
    else:
        reason = f"--data {text} is a function of yours, which gets no download flag from twa"
    return f"--download is not used: {reason}"


def _build(spec: str, root: Path | None, download: bool, eval_only: bool) -> DataSplits:
    """``build_data`` without its ``--download`` note."""
    text = spec.strip()
    data_root = Path(root).expanduser() if root is not None else None
    name = registry_name(text)
    unused = f"--data-root {root} is not used: " if root is not None else None
    if name is not None:
        data = _REGISTRY[name](data_root, download)
        return _noted(data, unused + f"--data {name} is generated, not read" if unused and name in _GENERATED else None)
    if text.lower().startswith("imagefolder:"):
        return _noted(_build_imagefolder_spec(text),
                      unused and unused + f"--data {text} reads the train/ and val/ folders under its own PATH")
    if _looks_like_function_spec(text):
        return _build_from_function(text, data_root, unused, eval_only)
    raise ConfigError(
        f"--data {spec}: unknown dataset{_unknown_hint(text)}; choose one of {', '.join(list_data_names())}, "
        "or imagefolder:PATH, package.module:function, path/to/file.py:function"
    )


def _noted(data: DataSplits, note: str | None) -> DataSplits:
    return replace(data, notes=(*data.notes, note)) if note else data


def registry_name(spec: str) -> str | None:
    """The registry name ``spec`` stands for, or None: case, dashes and underscores do not count
    (``CIFAR-10``, ``FashionMNIST`` and ``fashion_mnist`` are ``cifar10`` and ``fashion-mnist``)."""
    compact = spec.strip().lower().replace("_", "").replace("-", "")
    return next((name for name in _REGISTRY if name.replace("-", "") == compact), None)


def _registry_hint(spec: str) -> str:
    """For ``cifar10:/data`` or ``imagenet:PATH`` (a built-in name with a path, as ``imagefolder:PATH`` takes one), and
    ``torchvision:CIFAR10`` (as ``--model torchvision:NAME``): how to write the built-in dataset. Nothing for a
    ``file.py:function``: the user's own function, whatever its name (``mydata.py:cifar10``)."""
    head, _, tail = spec.strip().rpartition(":")
    if head.lower().endswith(".py"):
        return ""
    for part, rest in ((head, tail), (tail, None)):
        name = registry_name(part) if part else None
        if name is not None and name != "synthetic":
            where = f" --data-root {rest}" if rest and not rest.isidentifier() else " --data-root DIR"
            return f" (for the built-in dataset write --data {name}{where})"
    return ""


def _unknown_hint(text: str) -> str:
    """What an unknown spec probably meant: a .py file without its function, a folder of images, a typo, a built-in
    name with a path."""
    if hint := _registry_hint(text):
        return hint
    path = Path(text).expanduser()
    script = text if text.endswith(".py") else text.rpartition(":")[0]
    if script.endswith(".py"):
        return f" (to call a function in {script}, write {script}:FUNCTION, the function's name alone)"
    if path.is_dir():
        return f" (for train/CLASS/ and val/CLASS/ image folders under {text}, write imagefolder:{text})"
    compact = text.lower().replace("_", "").replace("-", "")
    names = {name.replace("-", ""): name for name in _REGISTRY}
    close = difflib.get_close_matches(compact, list(names), n=1, cutoff=0.75)
    return f" (did you mean {names[close[0]]}?)" if close else ""


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Splits ``dataset`` into (rest, holdout) by a seeded random permutation.

    Args:
        dataset: A map-style dataset.
        fraction: Share of samples to hold out, strictly between 0 and 1.
        seed: Seed of the ``torch.Generator`` that draws the permutation.

    Returns:
        ``(rest, holdout)``: disjoint subsets covering ``dataset``; the holdout has
        ``max(1, round(fraction * len(dataset)))`` samples. Indices are sorted within each subset.

    Raises:
        ConfigError: ``fraction`` is not strictly between 0 and 1.
        DataError: Either part would be empty.
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"--holdout-fraction {fraction}: must be strictly between 0 and 1")
    size = len(dataset)
    holdout_size = max(1, round(fraction * size))
    if size - holdout_size < 1:
        raise DataError(
            f"--holdout-fraction {fraction}: the dataset has only {size} samples, too few to hold "
            f"{holdout_size} out and keep any; lower --holdout-fraction or use a larger dataset"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    holdout = sorted(order[:holdout_size].tolist())
    rest = sorted(order[holdout_size:].tolist())
    return Subset(dataset, rest), Subset(dataset, holdout)


def list_data_names() -> list[str]:
    """The registry's dataset names (not the ``imagefolder:`` or function forms), for help text."""
    return list(_REGISTRY)


# --------------------------------------------------------------------------- shared helpers


def _default_root() -> Path:
    """Where datasets live when ``--data-root`` is not given."""
    return Path.home() / ".cache" / "twa" / "data"


def _missing_message(name: str, display: str, where: Path, expected: str, downloadable: bool,
                     found_in: Path | None = None, other: str | None = None) -> str:
    """The one-line message for data files that cannot be found; ``found_in``: a folder below ``where`` that
    holds them (``--data-root`` given one level too high); ``other``: the dataset whose files ``where`` holds
    instead (CIFAR-10's for ``--data cifar100``)."""
    if other is not None:
        return (f"--data {name}: no {display} files under {where} (expected {expected}), but it holds {other}'s; "
                f"use --data {other}, or pass --data-root DIR pointing at the {display} files")
    if found_in is not None:
        return (f"--data {name}: no {display} files under {where} (expected {expected}), but {found_in} holds them; "
                f"pass --data-root {found_in}")
    if where.is_file():
        return f"--data {name}: --data-root {where} is a file; pass --data-root DIR, the folder that holds the files"
    fix = "pass --data-root DIR pointing at them" + (", or --download" if downloadable else "")
    return f"--data {name}: no {display} files under {where} (expected {expected}); {fix}"


def _found_below(base: Path, candidates: Callable[[Path], Sequence[Path]], is_complete: Callable[[Path], bool],
                 ) -> Path | None:
    """The data root one level below ``base`` whose ``candidates`` hold complete files (a ``--data-root`` one level
    too high, e.g. ``~/data`` for ``~/data/cifar10/cifar-10-batches-py``), or None."""
    try:
        children = sorted(c for c in base.iterdir() if c.is_dir() and not c.name.startswith("."))[:200]
    except OSError:
        return None
    return next((c for c in children if _first_dir(candidates(c), is_complete) is not None), None)


def _transforms() -> Any:
    """``torchvision.transforms``, imported on first use to keep the CLI's start-up fast."""
    import torchvision.transforms as transforms

    return transforms


def _normalized(mean: Sequence[float], std: Sequence[float], *augment: Transform) -> Transform:
    """``augment`` steps, then ToTensor and Normalize(mean, std)."""
    t = _transforms()
    return t.Compose([*augment, t.ToTensor(), t.Normalize(mean, std)])


def _first_dir(candidates: Sequence[Path], is_complete: Callable[[Path], bool]) -> Path | None:
    """The first existing directory among ``candidates`` that ``is_complete`` accepts."""
    return next((d for d in candidates if d.is_dir() and is_complete(d)), None)


#: Seconds a download may wait for the network (to connect, or for the next bytes) before it fails.
DOWNLOAD_TIMEOUT_S = 60.0


@contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened meanwhile (torchvision's ``urlopen`` calls, which pass no timeout) give up after
    ``seconds`` without progress instead of waiting forever on a network that swallows packets."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_failed(name: str, root: Path, exc: BaseException) -> DataError:
    """The one-line error of a failed download."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, TimeoutError) or "timed out" in reason:
        reason = f"no answer from the network for {DOWNLOAD_TIMEOUT_S:g} s: {reason}"
    return DataError(
        f"--data {name}: download into {root} failed ({reason}); check the network, "
        "or fetch the files yourself and pass --data-root DIR"
    )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself or a parent) that does not exist, or None when ``path`` exists."""
    missing = None
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            return missing
        missing = folder
    return missing


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree that a failed download created (best effort: the error is what matters)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


@contextmanager
def _undone_if_failed(places: Sequence[Path]) -> Iterator[None]:
    """Around a download into ``places`` (the folders it writes to): if it fails or is interrupted, remove what it
    created there, and only that. A place that did not exist is removed with the parents it needed (torchvision
    creates them, and left them behind empty); from a place that existed, the entries that appeared (a partial
    archive); nothing that was there before is touched."""
    created = list(dict.fromkeys(m for m in map(_first_missing, places) if m is not None))
    before = {place: set(os.listdir(place)) for place in places if place.is_dir()}
    try:
        yield
    except BaseException:
        for place, names in before.items():
            for name in set(os.listdir(place)) - names if place.is_dir() else ():
                _remove(place / name)
        for folder in created:
            _remove(folder)
        raise


def _torchvision_download(name: str, class_name: str, root: Path, into: Path | None = None, **kwargs: Any) -> None:
    """Downloads a dataset with its torchvision class into ``root`` (contents are re-read by us); a failed download
    leaves ``root`` as it found it. ``into``: the folder below ``root`` the files go to, which a failure names (MNIST
    and Fashion-MNIST's ``root/<class>/raw``: torchvision's error names a file there, ``train-images-idx3-ubyte.gz``,
    without its folder)."""
    import torchvision.datasets as datasets

    try:
        # CIFAR writes into root, MNIST and Fashion-MNIST into root/<class>/raw
        with _undone_if_failed((root, root / class_name, root / class_name / "raw")), \
                _network_timeout(DOWNLOAD_TIMEOUT_S):
            getattr(datasets, class_name)(str(root), download=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise _download_failed(name, into or root, exc) from exc


def _integer_labels(values: Any) -> np.ndarray:
    """``values`` as int64 class indices; ValueError (or TypeError) when they are not integers: a float label such
    as 1.7 would otherwise be read as class 1 without a word."""
    raw = np.asarray(values)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or huge floats: refused below, not warned about
        labels = raw.astype(np.int64)
    if raw.dtype.kind not in "iub" and not np.array_equal(raw, labels):
        raise ValueError("labels are not integers")
    return labels


def _read_fix(exc: BaseException) -> str:
    """The fix for a data file that could not be opened: its permissions, when those refused it."""
    return "; check its permissions (the user running twa must be able to read it)" \
        if isinstance(exc, PermissionError) else ""


def _check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path, name: str) -> np.ndarray:
    """Validates that ``labels`` holds ``count`` class indices below ``num_classes``."""
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"--data {name}: {path} has {labels.size} labels for {count} images; the file is corrupt")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"--data {name}: {path} has labels outside 0..{num_classes - 1}; the file is corrupt or "
            "belongs to another dataset"
        )
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    """Where and how one CIFAR variant stores its pickled batches."""

    name: str
    display: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    torchvision_class: str
    archive: str
    binary_folder: str
    binary_file: str


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled numpy array needs.

    The official CIFAR batches are trusted numeric pickles (a dict of a uint8 array and label
    lists), but a file at a user-given path could be anything, and a plain ``pickle.load`` would
    run whatever code it names. Refusing every other global makes loading them safe.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Returns an allow-listed numpy/codecs global, refusing everything else."""
        reconstruct = np.zeros(1).__reduce__()[0]
        scalar = np.int64(0).__reduce__()[0]
        frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5, pickle's default from Python 3.14
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar,
            ("_codecs", "encode"): codecs.encode,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _unpickle_cifar_batch(path: Path, name: str) -> dict[Any, Any]:
    """Loads one pickled CIFAR batch with the numpy-only unpickler."""
    try:
        with path.open("rb") as handle:
            # encoding="latin1" decodes the Python 2 strings of the official files losslessly.
            batch = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"--data {name}: cannot read {path} ({exc.strerror or exc}){_read_fix(exc)}") from exc
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "not a batch"
        raise DataError(
            f"--data {name}: {path} is not a CIFAR batch ({type(exc).__name__}: {exc}); replace it with "
            "an intact copy of the official python-version files"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"--data {name}: {path} is not a CIFAR batch (holds a {type(batch).__name__}, not a dict)")
    return batch


def _batch_entry(batch: dict[Any, Any], key: str, path: Path, name: str) -> Any:
    """``batch[key]``, accepting str or bytes keys (Python 2 pickles load either way)."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"--data {name}: {path} is not a CIFAR batch (no '{key}' entry)")


def _read_cifar_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR batch as (``N x 32 x 32 x 3`` uint8 images, int64 labels)."""
    batch = _unpickle_cifar_batch(path, layout.name)
    data = _batch_entry(batch, "data", path, layout.name)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"--data {layout.name}: {path} is not a CIFAR batch ('data' is not an N x 3072 uint8 array)")
    not_integers = DataError(
        f"--data {layout.name}: {path} is not a CIFAR batch ('{layout.label_key}' is not a list of integers)"
    )
    try:
        labels = _integer_labels(_batch_entry(batch, layout.label_key, path, layout.name))
    except (TypeError, ValueError) as exc:
        raise not_integers from exc
    labels = _check_labels(labels, len(data), layout.num_classes, path, layout.name)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_split(directory: Path, files: Sequence[str], layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Reads and concatenates the batches ``files`` of one split (refused when they hold no images)."""
    parts = [_read_cifar_batch(directory / f, layout) for f in files]
    if not any(len(p[1]) for p in parts):
        raise DataError(f"--data {layout.name}: {directory / files[-1]} holds no images; replace it with an intact "
                        "copy of the official python-version files")
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return images, np.concatenate([p[1] for p in parts])


#: For each CIFAR variant, the other's folder, one of its files and its name: a --data-root holding the other.
_OTHER_CIFAR = {"cifar10": ("cifar-100-python", "train", "cifar100"),
                "cifar100": ("cifar-10-batches-py", "data_batch_1", "cifar10")}


def _build_cifar(layout: _CifarLayout, root: Path | None, download: bool) -> DataSplits:
    """Builds a CIFAR variant from ``root/<folder>`` (or ``root`` itself holding the batches)."""
    base = root if root is not None else _default_root()

    def complete(d: Path) -> bool:
        return all((d / f).is_file() for f in layout.train_files + layout.test_files)

    candidates = (base / layout.folder, base)
    directory = _first_dir(candidates, complete)
    if directory is None and download:
        _torchvision_download(layout.name, layout.torchvision_class, base, train=True)
        directory = _first_dir(candidates, complete)
    if directory is None:
        missing = next(f for f in layout.train_files + layout.test_files if not (base / layout.folder / f).is_file())
        expected = str(base / layout.folder / missing)
        archive = base / layout.archive
        binary = next((d for d in (base / layout.binary_folder, base) if (d / layout.binary_file).is_file()), None)
        if binary is not None:
            raise MissingData(f"--data {layout.name}: {binary} holds the binary version of {layout.display} "
                              f"({layout.binary_file}); twa reads the python version ({layout.folder}/, "
                              f"{layout.archive}): fetch that, or pass --download", download_into=base)
        if archive.is_file() and not (base / layout.folder).exists():
            raise MissingData(f"--data {layout.name}: {archive} is not extracted (expected {expected}); run "
                              f"tar -xzf {archive} -C {base}, or pass --download to check and extract it",
                              download_into=base)
        found = _found_below(base, lambda d: (d / layout.folder, d), complete)
        other_folder, other_file, other = _OTHER_CIFAR[layout.name]
        holds_other = any((d / other_file).is_file() for d in (base / other_folder, base))
        raise MissingData(_missing_message(layout.name, layout.display, base, expected, downloadable=True,
                                           found_in=found, other=other if holds_other else None),
                          download_into=base)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # as in the TWA reference code
    t = _transforms()
    train_tf = _normalized(mean, std, t.RandomCrop(32, padding=4), t.RandomHorizontalFlip())
    eval_tf = _normalized(mean, std)
    images, targets = _read_cifar_split(directory, layout.train_files, layout)
    train = ArrayImageDataset(images, targets, train_tf)
    plain = ArrayImageDataset(images, targets, eval_tf)  # the same arrays, not a copy
    test = ArrayImageDataset(*_read_cifar_split(directory, layout.test_files, layout), eval_tf)
    return DataSplits(train=train, eval=test, num_classes=layout.num_classes, name=layout.name, train_plain=plain)


def _build_cifar10(root: Path | None, download: bool) -> DataSplits:
    """CIFAR-10 from ``cifar-10-batches-py`` (``data_batch_1``..``5``, ``test_batch``)."""
    layout = _CifarLayout(
        name="cifar10",
        display="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        torchvision_class="CIFAR10",
        archive="cifar-10-python.tar.gz",
        binary_folder="cifar-10-batches-bin",
        binary_file="data_batch_1.bin",
    )
    return _build_cifar(layout, root, download)


def _build_cifar100(root: Path | None, download: bool) -> DataSplits:
    """CIFAR-100 (fine labels) from ``cifar-100-python`` (``train``, ``test``)."""
    layout = _CifarLayout(
        name="cifar100",
        display="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
        archive="cifar-100-python.tar.gz",
        binary_folder="cifar-100-binary",
        binary_file="train.bin",
    )
    return _build_cifar(layout, root, download)


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


@dataclass(frozen=True)
class _IdxLayout:
    """Names and search places of one MNIST-format dataset."""

    name: str
    display: str
    torchvision_class: str
    mean: float
    std: float
    extra_dirs: tuple[Path, ...] = ()


def _idx_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (uncompressed first); also under the
    dotted name some copies use (``train-images.idx3-ubyte``, as in the MNIST set on Kaggle)."""
    names = (stem, f"{stem}.gz", (dotted := stem.replace("-idx", ".idx")), f"{dotted}.gz")
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _idx_stems(split: str) -> tuple[str, str]:
    """The image and label file stems of ``split`` ("train" or "t10k")."""
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _has_idx_files(directory: Path) -> bool:
    """Whether ``directory`` holds all four IDX files."""
    return all(_idx_file(directory, s) is not None for split in ("train", "t10k") for s in _idx_stems(split))


def _read_idx(path: Path, magic: int, name: str) -> np.ndarray:
    """Reads an uint8 IDX file (gzipped or not) whose magic number must be ``magic``."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(f"--data {name}: cannot read {path} ({reason})"
                        f"{_read_fix(exc) or '; replace it with an intact copy'}") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic or len(raw) < header:
        shown = "none" if found is None else f"0x{found:08x}"
        raise DataError(
            f"--data {name}: {path} is not an IDX file of this kind (magic {shown}, expected 0x{magic:08x}); "
            "replace it with an intact copy"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"--data {name}: {path} is truncated or padded ({len(raw) - header} data bytes for dimensions "
            f"{'x'.join(map(str, dims))}); replace it with an intact copy"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_split(directory: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads (images, labels) of ``split`` ("train" or "t10k") from ``directory``."""
    image_stem, label_stem = _idx_stems(split)
    image_path, label_path = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
    assert image_path is not None and label_path is not None  # guaranteed by _has_idx_files
    images = _read_idx(image_path, 0x00000803, name)
    labels = _check_labels(_read_idx(label_path, 0x00000801, name), len(images), 10, label_path, name)
    if len(images) == 0:
        raise DataError(f"--data {name}: {image_path} holds no images; replace it with an intact copy")
    return images, labels


_MNIST = _IdxLayout(name="mnist", display="MNIST", torchvision_class="MNIST", mean=0.1307, std=0.3081)
_FASHION_MNIST = _IdxLayout(name="fashion-mnist", display="Fashion-MNIST", torchvision_class="FashionMNIST",
                            mean=0.2860, std=0.3530, extra_dirs=(Path("/usr/share/datasets/fashion-mnist"),))
#: For MNIST and Fashion-MNIST, the other one's layout: a --data-root holding the other, files that look like it.
_OTHER_IDX = {_MNIST.name: _FASHION_MNIST, _FASHION_MNIST.name: _MNIST}


def _build_idx(layout: _IdxLayout, root: Path | None, download: bool) -> DataSplits:
    """Builds an MNIST-format dataset from a flat directory or torchvision's ``<Class>/raw`` layout."""
    base = root if root is not None else _default_root()
    raw_dir = base / layout.torchvision_class / "raw"
    # --data-root given as torchvision's <Class>/ folder (MNIST/, FashionMNIST/), one level below the root it takes
    own_class_dir = (base / "raw",) if base.name == layout.torchvision_class else ()
    candidates = (base, raw_dir, base / layout.name, *own_class_dir) + (layout.extra_dirs if root is None else ())
    directory = _first_dir(candidates, _has_idx_files)
    if directory is None and download:
        _torchvision_download(layout.name, layout.torchvision_class, base, into=raw_dir, train=True)
        directory = _first_dir(candidates, _has_idx_files)
    if directory is None:
        stems = [stem for split in ("train", "t10k") for stem in _idx_stems(split)]
        partial = next((d for d in candidates if d.is_dir() and any(_idx_file(d, s) for s in stems)), None)
        if partial is not None:  # some of the four files are there: name the others
            absent = [f"{partial / s}[.gz]" for s in stems if _idx_file(partial, s) is None]
            raise MissingData(f"--data {layout.name}: {partial} holds only some of the {layout.display} files "
                              f"({', '.join(absent)} missing); add them, pass --data-root DIR pointing at all four, "
                              "or --download", download_into=raw_dir)
        expected = f"{base / _idx_stems('train')[0]}[.gz] and the other three IDX files, or the same in {raw_dir}"
        found = _found_below(base, lambda d: (d, d / layout.torchvision_class / "raw", d / layout.name,
                                              *((d / "raw",) if d.name == layout.torchvision_class else ())),
                             _has_idx_files)
        other_class = _OTHER_IDX[layout.name].torchvision_class
        holds_other = _has_idx_files(base / other_class / "raw") or (base.name == other_class and
                                                                    _has_idx_files(base / "raw"))
        raise MissingData(_missing_message(layout.name, layout.display, base, expected, downloadable=True,
                                           found_in=found, other=_OTHER_IDX[layout.name].name if holds_other
                                           else None), download_into=raw_dir)
    train_images, train_labels = _read_idx_split(directory, "train", layout.name)
    test_images, test_labels = _read_idx_split(directory, "t10k", layout.name)
    if train_images.shape[1:] != test_images.shape[1:]:  # a model fits one of them; the other would fail mid-run
        shown = {split: "x".join(map(str, images.shape[1:])) for split, images in
                 (("train", train_images), ("t10k", test_images))}
        raise DataError(
            f"--data {layout.name}: {directory} holds train images of {shown['train']} pixels and t10k images of "
            f"{shown['t10k']}; the files belong to different datasets, replace them with one set of four"
        )
    train = NormalizedGrayDataset(train_images, train_labels, layout.mean, layout.std)
    test = NormalizedGrayDataset(test_images, test_labels, layout.mean, layout.std)
    note = _other_idx_note(layout, directory, float(train_images.mean()) / 255)
    return DataSplits(train=train, eval=test, num_classes=10, name=layout.name, train_plain=train,
                      notes=(note,) if note else ())


#: How close a training set's mean pixel must come to the other dataset's to be taken for it.
_IDX_MEAN_MATCH = 0.01


def _other_idx_note(layout: _IdxLayout, directory: Path, mean: float) -> str | None:
    """A warning when the files of ``--data mnist`` look like Fashion-MNIST's or the reverse: both use the same
    four file names, so a flat folder of the other set loads silently, normalised with the wrong statistics and
    evaluating a model on the wrong images. Told apart by the training images' mean pixel (0.131 against 0.286);
    other MNIST-format sets (KMNIST 0.19, EMNIST 0.17) are not flagged."""
    other = _OTHER_IDX[layout.name]
    if abs(mean - other.mean) >= _IDX_MEAN_MATCH or abs(mean - layout.mean) < _IDX_MEAN_MATCH:
        return None
    return (f"--data {layout.name}: the training images in {directory} have a mean pixel of {mean:.3f} "
            f"({other.display}'s is {other.mean:.3f}, {layout.display}'s {layout.mean:.3f}): they look like "
            f"{other.display}; pass --data {other.name}, or --data-root pointing at {layout.display}'s files")


def _build_mnist(root: Path | None, download: bool) -> DataSplits:
    """MNIST; no augmentation."""
    return _build_idx(_MNIST, root, download)


def _build_fashion_mnist(root: Path | None, download: bool) -> DataSplits:
    """Fashion-MNIST; without ``root`` the Debian package ``dataset-fashion-mnist`` is a fallback."""
    return _build_idx(_FASHION_MNIST, root, download)


# --------------------------------------------------------------------------- SVHN


_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _svhn_download(base: Path, files: Sequence[str]) -> None:
    """Fetches the missing SVHN ``files`` into ``base`` (torchvision's URLs and md5 sums)."""
    import torchvision.datasets as datasets
    from torchvision.datasets.utils import download_url

    urls = {entry[1]: (entry[0], entry[2]) for entry in datasets.SVHN.split_list.values()}
    try:
        with _undone_if_failed((base,)), _network_timeout(DOWNLOAD_TIMEOUT_S):
            for filename in files:
                url, md5 = urls[filename]
                download_url(url, str(base), filename, md5)
    except (RuntimeError, OSError, ValueError) as exc:
        raise _download_failed("svhn", base, exc) from exc


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads an SVHN ``*_32x32.mat`` file: ``X`` (32 x 32 x 3 x N uint8) and ``y`` (N labels, 10 for the digit 0)
    as (``N x 32 x 32 x 3`` images, int64 labels with 0 for the digit 0, as torchvision's ``SVHN``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except OSError as exc:
        if exc.errno is None:  # scipy's "could not read bytes": a truncated file
            raise DataError(f"--data svhn: {path} is not an SVHN .mat file (truncated: {exc}); replace it with an "
                            "intact copy of the official file") from exc
        raise DataError(f"--data svhn: cannot read {path} ({exc.strerror or exc}){_read_fix(exc)}") from exc
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError... for what is not a v5 .mat
        raise DataError(
            f"--data svhn: {path} is not an SVHN .mat file ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            "replace it with an intact copy of the official file"
        ) from exc
    images, labels = mat.get("X"), mat.get("y")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[:3] == (32, 32, 3)):
        found = "none" if images is None else f"{getattr(images, 'dtype', type(images).__name__)} {np.shape(images)}"
        raise DataError(
            f"--data svhn: {path} is not an SVHN .mat file ('X' must be 32 x 32 x 3 x N uint8, found {found}); "
            "replace it with an intact copy of the official file"
        )
    try:
        labels = _integer_labels(labels).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"--data svhn: {path} is not an SVHN .mat file ('y' is not a list of integers)") from exc
    labels = _check_labels(labels, images.shape[3], 11, path, "svhn")
    if not len(labels):
        raise DataError(f"--data svhn: {path} holds no images; replace it with an intact copy of the official file")
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels


def _build_svhn(root: Path | None, download: bool) -> DataSplits:
    """SVHN (``train_32x32.mat``, ``test_32x32.mat``) read with scipy; no augmentation.

    Read here rather than by torchvision's ``SVHN``, which reports a file whose md5 sum is not the
    official one as missing."""
    if importlib.util.find_spec("scipy") is None:
        raise DataError("--data svhn: reading SVHN's .mat files needs scipy; pip install scipy")
    base = root if root is not None else _default_root()
    missing = [f for f in _SVHN_FILES if not (base / f).is_file()]
    if missing and download:
        _svhn_download(base, missing)
        missing = [f for f in _SVHN_FILES if not (base / f).is_file()]
    if missing:
        expected = " and ".join(str(base / f) for f in missing)
        found = _found_below(base, lambda d: (d,), lambda d: all((d / f).is_file() for f in _SVHN_FILES))
        raise MissingData(_missing_message("svhn", "SVHN", base, expected, downloadable=True, found_in=found),
                          download_into=base)
    transform = _normalized((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197))
    train = ArrayImageDataset(*_read_svhn(base / _SVHN_FILES[0]), transform)
    test = ArrayImageDataset(*_read_svhn(base / _SVHN_FILES[1]), transform)
    return DataSplits(train=train, eval=test, num_classes=10, name="svhn", train_plain=train)


# --------------------------------------------------------------------------- ImageFolder / ImageNet


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _split_hint(directory: Path, split: str) -> str:
    """Where the missing ``split`` folder probably is: ``validation/`` or ``test/`` beside ``train/``, or
    ``directory`` itself being one split (its parent holds train/ and val/)."""
    if split == "val":
        found = [n for n in ("validation", "valid", "test") if (directory / n).is_dir()]
        if found and (directory / "train").is_dir():
            return f"; found {directory / found[0]}: rename or symlink it to {directory / 'val'}"
    parent = directory.parent
    if directory.name in ("train", "val") and (parent / "train").is_dir() and (parent / "val").is_dir():
        return f"; {directory} is itself a split folder: give its parent {parent}"
    return ""


def _unsorted_hint(folder: Path) -> str:
    """Why ``folder`` has no class folders when it holds images or archives itself: ImageNet's validation images
    extracted flat into val/, or its per-class train archives (n01440764.tar...) not extracted."""
    try:
        files = [entry.name.lower() for entry in folder.iterdir() if entry.is_file()]
    except OSError:
        return ""
    images = sum(name.endswith(_IMAGE_SUFFIXES) for name in files)
    archives = sum(name.endswith((".tar", ".tar.gz", ".tgz", ".zip")) for name in files)
    if images and not any(entry.is_dir() for entry in folder.iterdir()):
        return (f" ({folder} holds {images} images directly, not in CLASS/ folders: move each image into the folder "
                "of its class, e.g. ImageNet's val/ with its valprep.sh script)")
    if archives:
        return f" ({folder} holds {archives} archives: extract each into a folder named after its class)"
    return ""


def _image_folder_splits(directory: Path, name: str, fix: str) -> DataSplits:
    """ImageFolder datasets over ``directory/train`` and ``directory/val`` with ImageNet transforms."""
    from .folders import TwaImageFolder

    for split in ("train", "val"):
        if not (directory / split).is_dir():
            raise DataError(
                f"--data {name}: {directory / split} is not a directory (expected {directory}/train/CLASS/IMAGE "
                f"and {directory}/val/CLASS/IMAGE{_split_hint(directory, split)}); {fix}"
            )
    t = _transforms()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = _normalized(mean, std, t.RandomResizedCrop(224), t.RandomHorizontalFlip())
    eval_tf = _normalized(mean, std, t.Resize(256), t.CenterCrop(224))
    folders = {}
    for split, transform in (("train", train_tf), ("val", eval_tf)):
        try:
            folders[split] = TwaImageFolder(str(directory / split), transform=transform)
        except (FileNotFoundError, OSError) as exc:  # no class folders, or a class folder without images
            reason = " ".join(str(exc).split())
            if "no valid file" in reason:
                reason += f" (images: {', '.join(_IMAGE_SUFFIXES)}, any case; hidden files are skipped)"
            reason += _unsorted_hint(directory / split)
            raise DataError(f"--data {name}: {directory / split}: {reason}; {fix}") from exc
    train, test = folders["train"], folders["val"]
    if train.classes != test.classes:
        only = [
            f"only in {split}: {', '.join(sorted(extra)[:3])}{'...' if len(extra) > 3 else ''}"
            for split, extra in (("train", set(train.classes) - set(test.classes)),
                                 ("val", set(test.classes) - set(train.classes)))
            if extra
        ]
        raise DataError(
            f"--data {name}: {directory / 'train'} and {directory / 'val'} have different class folders "
            f"({len(train.classes)} vs {len(test.classes)}; {'; '.join(only)}); both need the same CLASS "
            "subdirectories"
        )
    plain = copy.copy(train)  # the same list of files (not scanned twice), read with the evaluation transform
    plain.transform = eval_tf
    plain.transforms = copy.copy(train.transforms)
    plain.transforms.transform = eval_tf
    return DataSplits(train=train, eval=test, num_classes=len(train.classes), name=name, train_plain=plain)


def _build_imagenet(root: Path | None, download: bool) -> DataSplits:
    """ImageNet as ImageFolder trees at ``root/train`` and ``root/val`` (cannot be downloaded)."""
    del download  # ImageNet's licence requires a manual download
    base = root if root is not None else _default_root() / "imagenet"
    fix = "pass --data-root DIR holding train/ and val/ (ImageNet cannot be downloaded automatically)"
    return _image_folder_splits(base, "imagenet", fix)


def _build_imagefolder_spec(spec: str) -> DataSplits:
    """``imagefolder:PATH``: ImageFolder trees at ``PATH/train`` and ``PATH/val``."""
    raw_path = spec.split(":", 1)[1].strip()
    if not raw_path:
        raise ConfigError(f"--data {spec}: missing PATH; write imagefolder:PATH with PATH holding train/ and val/")
    fix = "use imagefolder:PATH with PATH holding train/CLASS/ and val/CLASS/ folders of images"
    return _image_folder_splits(Path(raw_path).expanduser(), spec, fix)


# --------------------------------------------------------------------------- synthetic


def _synthetic_templates(generator: torch.Generator, num_classes: int, size: int) -> torch.Tensor:
    """Smooth, unit-variance random class patterns, ``num_classes x size x size``."""
    coarse = torch.randn(num_classes, 1, size // 4, size // 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    smooth = smooth[:, 0]
    smooth = smooth - smooth.mean(dim=(1, 2), keepdim=True)
    return smooth / smooth.std(dim=(1, 2), keepdim=True)


def _synthetic_samples(
    generator: torch.Generator, templates: torch.Tensor, count: int, noise: float, max_shift: int
) -> TensorDataset:
    """``count`` class-balanced samples: a shifted template plus Gaussian noise, ``count x 1 x H x W``.

    Shifts pad with zeros; ``noise`` is relative to the unit-variance templates and sets the difficulty.
    """
    num_classes, size = templates.shape[0], templates.shape[-1]
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
    padded = torch.nn.functional.pad(templates, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (count, 2), generator=generator).tolist()
    images = torch.stack(
        [padded[c, dy : dy + size, dx : dx + size] for c, (dy, dx) in zip(labels.tolist(), offsets)]
    )
    images = images + noise * torch.randn(images.shape, generator=generator)
    images = images / math.sqrt(1.0 + noise**2)  # unit variance, like normalised real data
    return TensorDataset(images.unsqueeze(1), labels)


def _build_synthetic(root: Path | None, download: bool) -> DataSplits:
    """Offline 10-class demo data: 1 x 16 x 16 images, 2000 train / 500 eval, deterministic (seed 0)."""
    del root, download  # generated, never stored
    generator = torch.Generator().manual_seed(0)
    templates = _synthetic_templates(generator, num_classes=10, size=16)
    train = _synthetic_samples(generator, templates, 2000, noise=2.5, max_shift=2)
    test = _synthetic_samples(generator, templates, 500, noise=2.5, max_shift=2)
    return DataSplits(train=train, eval=test, num_classes=10, name="synthetic", train_plain=train)


# --------------------------------------------------------------------------- user functions


def _looks_like_function_spec(spec: str) -> bool:
    """Whether ``spec`` has the ``module:function`` or ``file.py:function`` shape."""
    target, sep, function = spec.rpartition(":")
    return bool(sep and target and function.isidentifier())


def _import_module(target: str, spec: str) -> Any:
    """Imports ``package.module`` for a function spec."""
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(
            f"--data {spec}: {target!r} is neither a module name nor a .py file; "
            "write package.module:function or path/to/file.py:function"
        )
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(f"{exc.name}.")):
            local = current_folder_hint(exc.name, spec.rpartition(":")[2])
            raise ConfigError(f"--data {spec}: no module named {exc.name}; "
                              f"{local or 'check the spelling or PYTHONPATH'}{_registry_hint(spec)}") from exc
        raise DataError(f"--data {spec}: importing {target} failed: {exc}") from exc
    except Exception as exc:  # user code: any failure on import is reported as such
        raise DataError(f"--data {spec}: importing {target} failed ({type(exc).__name__}: {exc})") from exc


def _import_file(path: Path, spec: str) -> Any:
    """Executes ``path`` as a module (registered in ``sys.modules`` while it runs)."""
    try:
        path.is_file()
    except OSError as exc:
        if not name_too_long(exc):
            raise
        raise ConfigError(f"--data {spec}: {path}: {TOO_LONG}; write path/to/file.py:function") from None
    if path.is_dir():
        raise ConfigError(f"--data {spec}: {path} is a folder, not a file; write path/to/file.py:function")
    if not path.is_file():
        raise ConfigError(f"--data {spec}: {path} does not exist; {missing_file_fix(path, spec.rpartition(':')[2])}")
    try:
        module = load_file(path)
        module.__twa_data__ = True  # a DataLoader worker started by spawn runs it again (``WorkerDataset``)
        return module
    except NotPythonSource as exc:
        raise ConfigError(f"--data {spec}: {exc}") from None
    except Exception as exc:  # user code: any failure on import is reported as such
        raise DataError(f"--data {spec}: running {path} failed ({type(exc).__name__}: {exc})") from exc


def _load_user_files(files: tuple[tuple[str, str], ...]) -> None:
    """In a DataLoader worker started by spawn or forkserver (macOS, Python 3.14 on Linux): run the
    ``file.py:function`` modules the parent ran, under the same names, before the dataset is unpickled."""
    for name, path in files:
        if name not in sys.modules:
            run_file(Path(path), name)


class _UserFiles:
    """Pickles as the call that loads the user's data files (``_load_user_files``)."""

    def __init__(self, files: tuple[tuple[str, str], ...]) -> None:
        self.files = files

    def __reduce__(self) -> tuple:
        return _load_user_files, (self.files,)


def _unwrapped(_: None, dataset: Dataset) -> Dataset:
    return dataset


def _is_data_file(name: str, module: object) -> bool:
    """A user's ``--data file.py`` module (a ``--model`` file alone is not: workers never need it)."""
    return (name.startswith(USER_MODULE_PREFIX) and getattr(module, "__twa_data__", False)
            and getattr(module, "__file__", None) is not None)


class WorkerDataset(Dataset):
    """``dataset`` for DataLoader workers. A worker started by spawn or forkserver unpickles the dataset, whose
    classes may live in a ``file.py:function`` module: that module exists only in the parent's ``sys.modules``
    (it is not importable by name), so this pickles as "run those files, then the dataset" and unpickles as the
    plain dataset. Under fork nothing is pickled and it only delegates."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.files = tuple((name, str(module.__file__)) for name, module in list(sys.modules.items())
                           if _is_data_file(name, module))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __reduce__(self) -> tuple:
        return _unwrapped, (_UserFiles(self.files), self.dataset)  # unpickled in this order


def for_workers(dataset: Dataset, num_workers: int) -> Dataset:
    """``dataset`` as a DataLoader with ``num_workers`` should get it (``WorkerDataset`` when workers may need the
    user's data files)."""
    if num_workers > 0 and any(_is_data_file(name, module) for name, module in list(sys.modules.items())):
        return WorkerDataset(dataset)
    return dataset


def _load_function(spec: str) -> Callable[..., Any]:
    """Resolves the callable a ``module:function`` / ``file.py:function`` spec names."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target).expanduser(), spec)
    else:
        module = _import_module(target, spec)
    function = getattr(module, name, None)
    if not callable(function):
        fix = _registry_hint(spec) or f"; {missing_function_fix(module, target, name, '(fit_dataset, eval_dataset)')}"
        raise ConfigError(f"--data {spec}: {target} has no function {name}{fix}")
    return function


def _root_parameter(function: Callable[..., Any]) -> inspect.Parameter | None:
    """``function``'s ``root`` parameter when it can be passed by keyword, else None."""
    try:
        parameter = inspect.signature(function).parameters.get("root")
    except (TypeError, ValueError):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameter if parameter is not None and parameter.kind in keyword else None


def _shape_of(value: Any) -> str:
    """``a tuple of 3`` for a sequence of the wrong length, else the type's name (``dict``, ``generator``)."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _check_dataset(dataset: Any, role: str, spec: str) -> Dataset:
    """Validates one dataset a user function returned: map-style, non-empty, (input, target) items."""
    if isinstance(dataset, DataLoader):
        raise DataError(f"--data {spec}: the {role} dataset is a DataLoader; return its dataset (loader.dataset): "
                        "twa makes its own loaders (--batch-size, --num-workers)")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(
            f"--data {spec}: the {role} dataset is a {type(dataset).__name__}, not a map-style torch Dataset "
            "(needs __len__ and __getitem__)"
        )
    if len(dataset) == 0:
        raise DataError(f"--data {spec}: the {role} dataset is empty")
    try:
        sample = dataset[0]
    except Exception as exc:  # user code: any failure is reported with its type
        raise DataError(f"--data {spec}: reading the {role} dataset's first example failed ({one_line(exc)}); "
                        "fix the dataset or its files") from exc
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise DataError(
            f"--data {spec}: the {role} dataset must yield (input, target) pairs, got {_shape_of(sample)}"
        )
    return dataset


def _build_from_function(spec: str, root: Path | None, unused: str | None = None,
                         eval_only: bool = False) -> DataSplits:
    """Calls a user function returning ``(fit_dataset, eval_dataset)``; ``root`` is passed when it takes a
    ``root`` parameter, else ``unused`` (the start of a note) says it was not. Without ``--data-root`` a
    ``root`` with a default keeps its default (``def data(root="~/data")``); a required one gets None."""
    function = _load_function(spec)
    parameter = _root_parameter(function)
    takes_root = parameter is not None
    keeps_default = root is None and takes_root and parameter.default is not inspect.Parameter.empty
    kwargs = {"root": root} if takes_root and not keeps_default else {}
    note = unused + f"{spec} has no `root` parameter to receive it" if unused and not takes_root else None
    try:
        result = function(**kwargs)
    except TwaError:
        raise
    except (Exception, SystemExit) as exc:  # user code: any failure (a sys.exit too) is reported with its type
        reason = " ".join(str(exc).split())
        raise DataError(f"--data {spec}: the function raised {type(exc).__name__}: {reason}{_registry_hint(spec)}"
                        ) from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise DataError(
            f"--data {spec}: the function must return (fit_dataset, eval_dataset), got {_shape_of(result)}"
            f"{_registry_hint(spec)}"
        )
    fit = result[0] if eval_only else _check_dataset(result[0], "fit", spec)
    test = _check_dataset(result[1], "eval", spec)
    return DataSplits(train=fit, eval=test, num_classes=None, name=spec, notes=(note,) if note else ())


# --------------------------------------------------------------------------- registry

_REGISTRY: Mapping[str, Builder] = MappingProxyType(
    {
        "cifar10": _build_cifar10,
        "cifar100": _build_cifar100,
        "mnist": _build_mnist,
        "fashion-mnist": _build_fashion_mnist,
        "svhn": _build_svhn,
        "imagenet": _build_imagenet,
        "synthetic": _build_synthetic,
    }
)

#: What a registry dataset's label i stands for. Two built-in datasets number the same classes only where these agree
#: (MNIST's and SVHN's labels are both the digit shown); otherwise the one's examples would be scored against the
#: other's classes without an error (``label_meaning``).
_LABEL_MEANINGS: Mapping[str, str] = MappingProxyType(
    {
        "cifar10": "CIFAR-10's 10 object classes",
        "cifar100": "CIFAR-100's 100 classes",
        "mnist": "the digits 0-9",
        "fashion-mnist": "Fashion-MNIST's 10 clothing classes",
        "svhn": "the digits 0-9",
        "imagenet": "ImageNet's class folders",
        "synthetic": "the synthetic data's 10 patterns",
    }
)


def label_meaning(spec: str) -> str | None:
    """What the labels of the built-in dataset ``spec`` stand for; None for any other spec (``imagefolder:PATH``, a
    function), whose classes only the data itself can tell."""
    name = registry_name(spec)
    return _LABEL_MEANINGS[name] if name is not None else None


#: Registry datasets that are generated, not read: ``--data-root`` means nothing to them.
_GENERATED = frozenset({"synthetic"})
