"""torchvision ``ImageFolder`` as ``--data imagefolder:PATH`` and ``imagenet`` read it (imported on first use, to keep
the CLI's start-up fast; a module of its own so DataLoader workers started by spawn can unpickle it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS


def _is_image(path: str) -> bool:
    """An image file by its extension (any case), not a hidden file: macOS's ``._NAME.png`` AppleDouble files and
    other dot-files are metadata, which torchvision would count as images and fail to read minutes into a run."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _holds_images(directory: Path) -> bool:
    """Whether ``directory`` holds an image at any depth (links followed, as torchvision follows them), not counting
    its hidden subfolders (a ``.git`` can hold millions of files, never a class's images) and entering each folder
    once: a link back up (``loop -> ..``) would otherwise be walked down to the kernel's link limit, in every
    branch."""
    seen: set[tuple[int, int]] = set()
    for root, folders, names in os.walk(directory, followlinks=True):
        try:
            status = os.stat(root)
        except OSError:  # gone, or a link the kernel gives up on (ELOOP)
            folders[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        if any(_is_image(name) for name in names):
            return True
        folders[:] = [name for name in folders if not name.startswith(".")]
    return False


def load_image(path: str) -> Image.Image:
    """torchvision's default loader (``convert("RGB")``), with the file named when it cannot be read: PIL's own
    message ("Truncated File Read", "cannot identify image file <_io.BufferedReader ...>") does not name it."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as exc:  # PIL fails in many ways on a damaged file; all mean "this file"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise OSError(f"cannot read image {path} ({type(exc).__name__}: {reason or 'unreadable'})") from exc


class TwaImageFolder(ImageFolder):
    """``ImageFolder`` that skips hidden files and hidden folders without images (``.ipynb_checkpoints``,
    ``.DS_Store`` folders' kin), which torchvision counts as a class and then refuses; a hidden folder that does
    hold images stays a class, as torchvision has it, so class indices never differ from torchvision's."""

    def __init__(self, root: str, transform: Any) -> None:
        super().__init__(root, transform=transform, loader=load_image, is_valid_file=_is_image)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        kept = [c for c in classes if not (c.startswith(".") and not _holds_images(Path(directory) / c))]
        if not kept:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return kept, {name: index for index, name in enumerate(kept)}
