"""A short, ordinary SGD training run that saves one checkpoint per epoch: the input ``twa demo`` averages.

It stands in for the user's own training script, so ``twa demo`` works offline on a fresh machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .data import build_data
from .models import MODEL_ARGS_METADATA_KEY, MODEL_METADATA_KEY, build_model
from .writer import prepare_output_dir, save_safetensors


@dataclass(frozen=True)
class DemoTrainConfig:
    out_dir: Path
    data: str = "synthetic"
    model: str = "twa:cnn"
    model_args: tuple[tuple[str, str], ...] = (("in_channels", "1"), ("num_classes", "10"), ("width", "8"))
    data_root: Path | None = None
    epochs: int = 8
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    overwrite: bool = False


def train_checkpoints(config: DemoTrainConfig, on_epoch: Callable[[int, float], None] | None = None) -> list[Path]:
    """Train with plain SGD; write ``0.safetensors`` (the init) and ``E.safetensors`` after each epoch E."""
    torch.manual_seed(config.seed)
    names = tuple(f"{e}.safetensors" for e in range(config.epochs + 1))
    prepare_output_dir(config.out_dir, names, config.overwrite)
    data = build_data(config.data, root=config.data_root)
    model = build_model(config.model, config.model_args)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    metadata = {MODEL_METADATA_KEY: config.model, MODEL_ARGS_METADATA_KEY: json.dumps(dict(config.model_args))}
    paths = [config.out_dir / names[0]]
    save_safetensors(paths[0], model.state_dict(), {**metadata, "twa.epoch": "0"})
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
        paths.append(config.out_dir / names[epoch])
        save_safetensors(paths[-1], model.state_dict(), {**metadata, "twa.epoch": str(epoch)})
        if on_epoch is not None:
            on_epoch(epoch, total / count)
    return paths
