"""Peak host memory of ``twa soup`` for K fine-tunes of D parameters, against the formula in the report.

Fine-tunes: K random perturbations of one ``twa:mlp`` (hidden units set D) saved as safetensors, with
the base; data: the built-in synthetic set (16 x 16, 2000 fit / 500 eval), 1 epoch of coefficient
fitting. Each run is a fresh process (``python -m twa_tool soup``), so ``memory.peak_rss_bytes`` in its
report is that run's own. The baseline is a process that imports twa, builds the data and the model.

    python benchmarks/soup_memory.py --hidden 30000 --k 8 16 --dtype float32 bf16 int8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from twa_tool.models import build_model

DTYPES = ("float32", "bf16", "int8")  # twa soup --basis-dtype

BASELINE = """
import resource, torch
from twa_tool.data import build_data
from twa_tool.models import build_model
torch.set_num_threads(1)
data, model = build_data("synthetic"), build_model("twa:mlp", (("hidden", "{hidden}"),))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_finetunes(folder: Path, k: int, hidden: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = build_model("twa:mlp", (("hidden", str(hidden)),)).state_dict()
    save_file(base, str(folder.parent / f"base-{hidden}.safetensors"))
    for i in range(k):
        path = folder / f"ft-{i}.safetensors"
        if not path.exists():
            save_file({n: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for n, v in base.items()},
                      str(path))
    return folder.parent / f"base-{hidden}.safetensors"


def run(folder: Path, base: Path, out: Path, hidden: int, dtype: str, epochs: int) -> dict:
    command = [sys.executable, "-m", "twa_tool", "soup", str(folder), "--model", "twa:mlp", "--model-arg",
               f"hidden={hidden}", "--data", "synthetic", "--base", str(base), "--basis-dtype", dtype, "--epochs",
               str(epochs), "--threads", "1", "--out", str(out), "--overwrite", "-q"]
    code = subprocess.run(command).returncode
    if code != 0:  # twa has printed its one-line error above
        sys.exit(f"error: twa soup failed (exit {code}) on {folder} with --basis-dtype {dtype}")
    return json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=30000, help="hidden units of twa:mlp (sets D)")
    parser.add_argument("--k", type=int, nargs="+", default=[8], help="numbers of fine-tunes (at least 2)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="basis dtypes to measure (twa soup --basis-dtype)")
    parser.add_argument("--work", type=Path, default=Path("runs/soup_memory"))
    args = parser.parse_args()
    if min(args.k) < 2:
        parser.error(f"--k {min(args.k)}: a soup needs at least 2 fine-tunes")
    if args.hidden < 1:
        parser.error(f"--hidden {args.hidden}: must be a positive integer")
    print("| K | D | basis dtype | directions + c + ū (MiB) | formula K·D·b + 8·D + 14·S (MiB) | peak RSS (MiB) | "
          "peak RSS − baseline (MiB) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    folder = args.work / f"ft-{args.hidden}-{max(args.k)}"
    base = make_finetunes(folder, max(args.k), args.hidden)
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE.format(hidden=args.hidden)], check=True,
                                  capture_output=True, text=True).stdout)
    for k in args.k:
        sub = args.work / f"ft-{args.hidden}-k{k}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(k):
            link = sub / f"ft-{i}.safetensors"
            if not link.exists():
                link.symlink_to((folder / f"ft-{i}.safetensors").resolve())
        for dtype in args.dtype:
            report = run(sub, base, args.work / f"out-{k}-{dtype}", args.hidden, dtype, 1)
            memory, mib = report["memory"], 2**20
            print(f"| {k} | {report['model']['parameters']:,} | {dtype} | {memory['directions_bytes'] / mib:.0f} | "
                  f"{memory['estimate']['total'] / mib:.0f} | {memory['peak_rss_bytes'] / mib:.0f} | "
                  f"{(memory['peak_rss_bytes'] - baseline) / mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
