"""Make a real fine-tune set offline: pretrain a small CNN on one part of Fashion-MNIST, then fine-tune
variants of it (different lr, augmentation, label smoothing, seed) on another part.

    python examples/soup/make_finetunes.py --out runs/soup

writes ``OUT/pretrained.safetensors`` and ``OUT/finetunes/ft-<i>.safetensors`` (plain safetensors with
the architecture recorded in the ``twa.model`` metadata), and ``OUT/finetunes.json`` with each
variant's recipe and test accuracy. Deterministic on CPU for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fashion_mnist"))
from data import finetune, pretrain  # noqa: E402
from model import cnn  # noqa: E402  (examples/fashion_mnist/model.py)

from twa_tool.errors import TwaError  # noqa: E402
from twa_tool.models import MODEL_ARGS_METADATA_KEY, MODEL_METADATA_KEY  # noqa: E402
from twa_tool.writer import save_safetensors  # noqa: E402

MODEL_SPEC = "examples/fashion_mnist/model.py:cnn"


@dataclass(frozen=True)
class Recipe:
    lr: float
    seed: int
    augment: bool = False
    label_smoothing: float = 0.0


#: The fine-tunes: a small hyper-parameter grid as in model soups (lr x augmentation x seed), plus a
#: label-smoothing run and one high-lr run that may leave the pretrained basin.
VARIANTS = (
    Recipe(lr=0.01, seed=1),
    Recipe(lr=0.01, seed=2, augment=True),
    Recipe(lr=0.03, seed=3),
    Recipe(lr=0.03, seed=4, augment=True),
    Recipe(lr=0.1, seed=5),
    Recipe(lr=0.1, seed=6, augment=True),
    Recipe(lr=0.03, seed=7, augment=True, label_smoothing=0.1),
    Recipe(lr=0.3, seed=8),
)


def as_tensors(dataset: Dataset) -> TensorDataset:
    inputs, targets = zip(*DataLoader(dataset, batch_size=2000, shuffle=False))
    return TensorDataset(torch.cat(inputs), torch.cat(targets))


def augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (one draw per batch)."""
    if torch.rand((), generator=generator) < 0.5:
        inputs = inputs.flip(-1)
    dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(inputs, shifts=(dy, dx), dims=(-2, -1))


def train(model: torch.nn.Module, data: TensorDataset, recipe: Recipe, epochs: int) -> None:
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            if recipe.augment:
                inputs = augment(inputs, generator)
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    inputs, targets = data.tensors
    return (model(inputs).argmax(1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    metadata = {MODEL_METADATA_KEY: MODEL_SPEC, MODEL_ARGS_METADATA_KEY: "{}"}
    try:
        pre_data, test = (as_tensors(d) for d in pretrain(args.data_root))
        ft_data = as_tensors(finetune(args.data_root)[0])
    except TwaError as exc:  # e.g. no dataset files under --data-root: one line, as twa prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    (args.out / "finetunes").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = cnn()
    start = time.perf_counter()
    train(model, pre_data, Recipe(lr=0.05, seed=0), args.pretrain_epochs)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    save_safetensors(args.out / "pretrained.safetensors", pretrained, metadata)
    summary = {"pretrained": {"test_accuracy": accuracy(model, test), "seconds": time.perf_counter() - start},
               "finetunes": {}}
    print(f"pretrained: test acc {100 * summary['pretrained']['test_accuracy']:.2f}%", flush=True)
    for index, recipe in enumerate(VARIANTS):
        start = time.perf_counter()
        torch.manual_seed(recipe.seed)
        model.load_state_dict(pretrained)
        train(model, ft_data, recipe, args.finetune_epochs)
        name = f"ft-{index}.safetensors"
        save_safetensors(args.out / "finetunes" / name, model.state_dict(), metadata)
        row = {**asdict(recipe), "test_accuracy": accuracy(model, test), "seconds": time.perf_counter() - start}
        summary["finetunes"][name] = row
        print(f"{name}: {recipe} test acc {100 * row['test_accuracy']:.2f}% ({row['seconds']:.0f}s)", flush=True)
    (args.out / "finetunes.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
