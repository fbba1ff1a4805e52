"""A short, ordinary SGD training run that saves one checkpoint per epoch: the input ``twa demo`` averages.

It stands in for the user's own training script, so ``twa demo`` works offline on a fresh machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .data import DataSplits, build_data
from .errors import ConfigError, OutputError
from .models import MODEL_ARGS_METADATA_KEY, MODEL_METADATA_KEY, build_model, check_data_fits
from .writer import prepare_output_dir, save_safetensors


@dataclass(frozen=True)
class DemoTrainConfig:
    out_dir: Path
    data: str = "synthetic"
    model: str = "twa:cnn"
    #: ``twa:cnn``'s ``in_channels`` and ``num_classes``, when not given, follow the data (``data_model_args``)
    model_args: tuple[tuple[str, str], ...] = (("width", "8"),)
    data_root: Path | None = None
    download: bool = False
    epochs: int = 8
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--train-epochs {self.epochs}: must be at least 1 (TWA needs 2 checkpoints: the "
                              f"init and one per epoch)")


def train_checkpoints(config: DemoTrainConfig, on_epoch: Callable[[int, float], None] | None = None,
                      on_start: Callable[[], None] | None = None) -> list[Path]:
    """Train with plain SGD; write ``0.safetensors`` (the init) and ``E.safetensors`` after each epoch E.

    The data and model are built before the output folder is touched (``on_start`` runs once they are, just before
    training); when training fails or is interrupted (``BaseException``: Ctrl-C, SIGTERM), the checkpoints this call
    wrote and the folders it created are removed.
    """
    torch.manual_seed(config.seed)
    names = tuple(f"{e}.safetensors" for e in range(config.epochs + 1))
    data = build_data(config.data, root=config.data_root, download=config.download)
    model_args = data_model_args(config, data)
    model = build_model(config.model, model_args)
    check_data_fits(model, (data.train, data.eval), data.num_classes, config.model, config.data)
    if on_start is not None:
        on_start()
    created = missing_folders(config.out_dir)
    written: list[Path] = []
    with prepare_output_dir(config.out_dir, names, config.overwrite):  # locked: one demo per folder at a time
        remove_earlier_checkpoints(config.out_dir, names, config.overwrite)
        try:
            _train(config, model_args, names, data.train, model, on_epoch, written)
        except BaseException:
            remove_partial(written, created)
            raise
    return written


_DEMO_CHECKPOINT = re.compile(r"^\d+\.safetensors$")


def remove_earlier_checkpoints(out_dir: Path, names: tuple[str, ...], overwrite: bool) -> list[str]:
    """The numbered checkpoints of an earlier demo that this one does not write (a longer run's ``5.safetensors``
    after ``--train-epochs 2``) would be averaged with the new ones: with ``--overwrite`` they are removed (the
    earlier run is being replaced), without it refused like the names this run writes. Other files stay."""
    earlier = sorted((p.name for p in out_dir.iterdir() if _DEMO_CHECKPOINT.match(p.name) and p.name not in names
                      and (p.is_file() or p.is_symlink())), key=lambda n: int(n.split(".")[0]))
    if earlier and not overwrite:
        raise OutputError(f"{out_dir / earlier[0]} already exists (an earlier run's checkpoint: twa average would "
                          f"read it with this run's); pass --overwrite or choose another --out")
    for name in earlier:
        (out_dir / name).unlink(missing_ok=True)
    return earlier


def data_model_args(config: DemoTrainConfig, data: DataSplits) -> tuple[tuple[str, str], ...]:
    """``config.model_args``, with ``twa:cnn``'s ``in_channels`` (the first example's channels) and
    ``num_classes`` (the dataset's, when known) added where not given: CIFAR-100 has 100 classes, an
    image folder 3 channels."""
    given = dict(config.model_args)
    if config.model != "twa:cnn":
        return config.model_args
    found = {}
    if "in_channels" not in given and len(data.train):
        try:
            with torch.random.fork_rng(devices=[]):  # a random transform leaves the run's stream as it was
                example = data.train[0]
        except Exception:  # unreadable: check_data_fits reports it in one line
            example = None
        inputs = example[0] if isinstance(example, (tuple, list)) and example else None
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 3:
            found["in_channels"] = str(inputs.shape[0])
    if "num_classes" not in given and data.num_classes:
        found["num_classes"] = str(data.num_classes)
    return tuple({**found, **given}.items())


def missing_folders(*paths: Path) -> list[Path]:
    """The folders among ``paths`` and their parents that do not exist yet, deepest first: what creating
    ``paths`` adds, so what a failed run removes."""
    missing = {d for path in paths for d in (path, *path.parents) if not d.exists() and not d.is_symlink()}
    return sorted(missing, key=lambda d: len(d.parts), reverse=True)


def remove_partial(files: list[Path], folders: list[Path]) -> None:
    """Delete ``files``, then each of ``folders`` (deepest first) that is empty."""
    for path in files:
        path.unlink(missing_ok=True)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (or gone): it holds something this run did not write


def _train(config: DemoTrainConfig, model_args: tuple[tuple[str, str], ...], names: tuple[str, ...],
           dataset: torch.utils.data.Dataset,
           model: torch.nn.Module, on_epoch: Callable[[int, float], None] | None, written: list[Path]) -> None:
    """The SGD loop; appends each checkpoint to ``written`` just before it is saved."""
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    metadata = {MODEL_METADATA_KEY: config.model, MODEL_ARGS_METADATA_KEY: json.dumps(dict(model_args))}
    written.append(config.out_dir / names[0])  # before the save: a signal may land after its rename
    save_safetensors(written[-1], model.state_dict(), {**metadata, "twa.epoch": "0"})
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
        written.append(config.out_dir / names[epoch])
        save_safetensors(written[-1], model.state_dict(), {**metadata, "twa.epoch": str(epoch)})
        if on_epoch is not None:
            on_epoch(epoch, total / count)
