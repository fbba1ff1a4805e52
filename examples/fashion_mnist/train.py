"""Plain SGD training of the small CNN on Fashion-MNIST, saving one checkpoint per epoch.

This stands in for "your own training script": nothing in it knows about TWA except that it
saves ``model.state_dict()`` after every epoch, which is all ``twa average`` needs:

    OUT/0.pt            the initialisation, before any step
    OUT/1.pt ... E.pt   after each epoch (plain ``torch.save(model.state_dict(), path)``)
    OUT/history.json    test accuracy / loss per epoch

SGD with momentum 0.9 and weight decay 5e-4; the learning rate is multiplied by 0.1 at 50% and
75% of the epochs, as in the paper's CIFAR base runs (200 epochs, decay at 100 and 150).
Deterministic on CPU for a given --seed.

    python examples/fashion_mnist/train.py --out runs/fashion_mnist/ckpts --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import cnn  # noqa: E402  (this example's model file)

from twa_tool.data import build_data  # noqa: E402
from twa_tool.errors import TwaError  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for 0.pt..E.pt and history.json")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder with the four Fashion-MNIST IDX files (default: the Debian package "
                             "/usr/share/datasets/fashion-mnist or ~/.cache/twa/data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: train at least 1 epoch")
    return args


def as_tensors(dataset: Dataset) -> TensorDataset:
    """Decode the whole split once (Fashion-MNIST has no augmentation, so every epoch sees the same
    tensors); saves the per-sample PIL -> tensor conversion on every epoch."""
    loader = DataLoader(dataset, batch_size=1000, shuffle=False)
    inputs, targets = zip(*loader)
    return TensorDataset(torch.cat(inputs), torch.cat(targets))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for inputs, targets in loader:
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    return correct / count, loss_sum / count


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    try:
        data = build_data("fashion-mnist", root=args.data_root, download=args.download)
    except TwaError as exc:  # e.g. no dataset files under --data-root: one line, as twa prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = as_tensors(data.train), as_tensors(data.eval)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=1000, shuffle=False)

    model = cnn(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # after epoch 10 and 15 of 20; never before the first epoch (a short run starts at --lr, not --lr/100)
    milestones = [max(1, int(0.5 * args.epochs)), max(1, int(0.75 * args.epochs))]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    torch.save(model.state_dict(), args.out / "0.pt")
    accuracy, loss = evaluate(model, test_loader)
    history = {"0": {"test_accuracy": accuracy, "test_loss": loss, "train_loss": None, "lr": None, "seconds": 0.0}}
    print(f"epoch 0 (init): test acc {100 * accuracy:.2f}%  loss {loss:.4f}", flush=True)

    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        total, count = 0.0, 0
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
        scheduler.step()
        torch.save(model.state_dict(), args.out / f"{epoch}.pt")
        accuracy, test_loss = evaluate(model, test_loader)
        seconds = time.perf_counter() - start
        history[str(epoch)] = {"test_accuracy": accuracy, "test_loss": test_loss, "train_loss": total / count,
                               "lr": lr, "seconds": seconds}
        print(f"epoch {epoch}/{args.epochs}: lr {lr:g}  train loss {total / count:.4f}  "
              f"test acc {100 * accuracy:.2f}%  loss {test_loss:.4f}  ({seconds:.1f}s)", flush=True)
        (args.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")


if __name__ == "__main__":
    main()
