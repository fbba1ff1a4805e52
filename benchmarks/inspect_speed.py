"""How long `twa inspect` takes on a folder of N ResNet-50 checkpoints (headers only, no tensor data read).

    python benchmarks/inspect_speed.py --count 100 --format safetensors --dir /tmp/twa-bench-inspect

Writes the checkpoints once (about 100 MB each; reused when present), then times the CLI's listing
in-process, and prints one table. The baseline is reading every file fully, as a naive tool would.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file

from twa_tool.checkpoints import load_checkpoint
from twa_tool.cli import cli


def write_folder(folder: Path, count: int, fmt: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in torchvision.models.resnet50(num_classes=10).state_dict().items()}
    paths = []
    for i in range(count):
        path = folder / (f"{i}.safetensors" if fmt == "safetensors" else f"{i}.pt")
        if not path.exists():
            if fmt == "safetensors":
                save_file(state, path, metadata={"format": "pt", "epoch": str(i)})  # bytes differ per file
            else:
                torch.save({"state_dict": state, "epoch": i}, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/twa-bench-inspect"))
    args = parser.parse_args()
    folder = args.dir / args.format
    paths = write_folder(folder, args.count, args.format)
    clock = time.perf_counter()
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    inspect_s = time.perf_counter() - clock
    assert result.exit_code == 0, result.output
    sample = paths[: min(5, len(paths))]
    clock = time.perf_counter()
    for path in sample:
        load_checkpoint(path)
    full_s = (time.perf_counter() - clock) / len(sample) * len(paths)
    print(f"| files | format | twa inspect (s) | full load of every file (s, from {len(sample)}) | ratio |")
    print("|---:|---|---:|---:|---:|")
    print(f"| {len(paths)} | {args.format} | {inspect_s:.2f} | {full_s:.2f} | {full_s / inspect_s:.1f}x |")


if __name__ == "__main__":
    main()
