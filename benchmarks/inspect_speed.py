"""How long `twa inspect` takes on a folder of N ResNet-50 checkpoints (headers only, no tensor data read).

    python benchmarks/inspect_speed.py --count 100 --format safetensors --dir /tmp/twa-bench-inspect

Writes the checkpoints once (about 100 MB each; reused when present), then times the CLI's listing
in-process, and prints one table. The baseline is reading every file fully, as a naive tool would.
"""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--count", type=int, default=100, help="number of checkpoints (at least 2)")
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/twa-bench-inspect"))
    args = parser.parse_args()
    if args.count < 2:
        parser.error(f"--count {args.count}: twa inspect refuses fewer than 2 checkpoints")
    folder = args.dir / args.format
    paths = write_folder(folder, args.count, args.format)
    others = sorted(set(folder.iterdir()) - set(paths))
    if others:  # twa inspect lists the whole folder: the table would count the wrong number of files
        sys.exit(f"error: {folder} holds {len(others)} other file(s) ({others[0].name}, ...), e.g. from a run with a "
                 f"larger --count; pass another --dir or delete them")
    clock = time.perf_counter()
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    inspect_s = time.perf_counter() - clock
    if result.exit_code != 0:
        sys.exit(f"error: twa inspect {folder} failed (exit {result.exit_code}): {result.stderr.strip()}")
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
