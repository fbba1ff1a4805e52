"""Loading + basis build: the reference path against twa's engine, on workload W1 (issue 6).

W1: K checkpoints of torchvision resnet18 (num_classes=10), a correlated trajectory (each a small
perturbation of the previous one), written as plain ``torch.save`` state dicts.

    python benchmarks/basis_bench.py --k 50 100                      # one markdown table
    python benchmarks/basis_bench.py --k 50 100 --step --average     # + projected step, whole `twa average`
    python benchmarks/basis_bench.py --k 50 100 --threads 1          # one torch thread per operation
    python benchmarks/basis_bench.py --k 50 100 --repeat 3           # interleaved runs, medians
    python benchmarks/basis_bench.py --k 100 --step --device cuda    # the projected step on a GPU
    python benchmarks/basis_bench.py --k 100 --step-only --device cuda   # that line alone: no W1, no builds

Each path runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own:
* reference: what the paper's code does (flatten every checkpoint to numpy, stack, copy into a torch
  basis, sequential float32 classical Gram-Schmidt);
* twa: ``pipeline.stream_checkpoints`` as ``twa average`` runs it: the first file loaded safely (zip
  CRCs checked first), the others read straight into their basis rows (their pickle compared with the
  first file's, never run; CRCs checked on the bytes read), key/shape and finiteness validation, the
  sha256 of every file (a second thread), the exact float64 mean, and the basis. float32: in the basis
  buffer (consecutive differences and their Gram matrix streamed while loading on worker threads, then
  Cholesky-QR in one fused pass). bf16/int8: by column passes over the files (``stream_by_columns``:
  the same arithmetic a block of columns at a time, each block rounded as it is computed), so the
  float32 basis is never held.
* ``--average``: the whole ``twa average`` command (``w1_data``, one epoch, the SWA baseline).

``--threads N`` sets torch's thread count in every path (default: torch's, all cores). The reference
runs each operation on N threads; twa's engine runs N threads that share the work (at least two: the
reader and one worker), each operation on one thread, plus the hashing thread.

The orthonormality error is computed exactly (float64) after the timed part.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision


def build_w1(folder: Path, k: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.pt" for i in range(k)]
    if all(p.exists() for p in paths):
        return paths
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    state = {n: v.clone() for n, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters()}
    for path in paths:
        for name in params:
            state[name] += 1e-3 * state[name].std().clamp_min(1e-3) * torch.randn_like(state[name])
        torch.save(state, path)
    return paths


def reference(paths: list[Path]) -> tuple[torch.Tensor, dict]:
    """The reference implementation's path, written plainly (baseline only)."""
    model = torchvision.models.resnet18(num_classes=10)
    clock = time.perf_counter()
    rows = []
    for path in paths:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        rows.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
    w = np.array(rows)
    del rows
    p = torch.from_numpy(w).clone()
    loaded = time.perf_counter() - clock
    for i in range(p.shape[0]):
        if i > 0:
            tmp = torch.mm(p[:i, :], p[i].reshape(-1, 1))
            p[i] -= torch.mm(p[:i, :].T, tmp).reshape(-1)
        p[i] /= torch.norm(p[i])
    return p, {"load_s": loaded, "total_s": time.perf_counter() - clock}


def engine(paths: list[Path], storage: str) -> tuple[object, dict]:
    from twa_tool.checkpoints import discover
    from twa_tool.config import AverageConfig
    from twa_tool.models import trainable_names
    from twa_tool.pipeline import Reader, stream_checkpoints

    model = torchvision.models.resnet18(num_classes=10)
    files = discover(paths[0].parent)[: len(paths)]
    reader = Reader.for_run(AverageConfig(checkpoint_dir=paths[0].parent, out_dir=Path("/tmp"), data="synthetic"),
                            model)
    clock = time.perf_counter()
    stream = stream_checkpoints(files, model, trainable_names(model), 1e-5, reader, lambda e: None,
                                storage=storage)
    return stream.subspace.basis, {"total_s": time.perf_counter() - clock, "basis_bytes": stream.subspace.basis.nbytes}


def w1_data() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """``--data benchmarks/basis_bench.py:w1_data``: random 3x32x32 images in 10 classes, 512 to fit and
    256 to evaluate (W1's models are untrained: only memory and time are measured on it)."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=generator),
                                              torch.randint(0, 10, (n,), generator=generator))

    return split(512), split(256)


def average(folder: Path, k: int, storage: str) -> dict:
    """The whole ``twa average`` command on the first K checkpoints of W1 (``w1_data``, one epoch, the SWA
    baseline), in this process: its wall time and its own peak RSS."""
    import tempfile

    from twa_tool.cli import cli

    with tempfile.TemporaryDirectory() as out:
        clock = time.perf_counter()
        cli(["average", str(folder), "--out", out, "--overwrite", "-q", "--model", "torchvision:resnet18",
             "--model-arg", "num_classes=10", "--data", f"{Path(__file__).resolve()}:w1_data", "--epochs", "1",
             "--baselines", "swa",
             "--range", f"0:{k}", "--basis-dtype", storage, "--threads", str(torch.get_num_threads())],
            standalone_mode=False)
        total = time.perf_counter() - clock
        report = json.loads((Path(out) / "report.json").read_text())
    return {"total_s": total, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "accuracy": {name: m.get("accuracy") for name, m in report["metrics"].items()}}


def child(path_kind: str, folder: Path, k: int) -> None:
    from twa_tool.subspace import orthonormality_error

    if path_kind.startswith("average-"):
        print(json.dumps(average(folder, k, path_kind.split("-", 1)[1])))
        return
    paths = [folder / f"{i}.pt" for i in range(k)]
    if path_kind == "reference":
        basis, times = reference(paths)
        times["basis_bytes"] = basis.numel() * basis.element_size()
    else:
        basis, times = engine(paths, path_kind.split("-", 1)[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the float64 check below
    print(json.dumps({**times, "peak_bytes": peak, "orthonormality": orthonormality_error(basis)}))


def run_child(kind: str, folder: Path, k: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(folder), "--k", str(k),
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["(no output)"]
        sys.exit(f"error: the {kind} path at K={k} failed (exit {out.returncode}): {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the upper one of an even count): its peak memory and orthonormality
    are reported with it (they do not vary between runs)."""
    return sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]


def projected_step_line(k: int, device: torch.device, storages: list[str]) -> str:
    """Time of the projection g -> P^T (P g) against a plain SGD step of resnet18 (batch 128, 32x32), both on
    ``device`` (an accelerator is synchronised before every clock read)."""
    from twa_tool.subspace import quantize
    from twa_tool.trainer import project

    model = torchvision.models.resnet18(num_classes=10).to(device)
    d = sum(p.numel() for p in model.parameters())
    basis = torch.linalg.qr(torch.randn(d, k))[0].T.contiguous().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)
    g = torch.randn(d, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def sgd_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def timed(fn, repeat: int = 3) -> float:
        repeat = repeat if device.type == "cpu" else 20
        fn()
        sync()
        clock = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        return (time.perf_counter() - clock) / repeat

    step_s = timed(sgd_step)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    lines = []
    for storage in storages:
        stored = quantize(basis, storage)
        proj_s = timed(lambda stored=stored: project(stored, g))
        lines.append(f"projected step, resnet18, K={k}, batch 128 at 32x32, {where}, "
                     f"{storage} basis: SGD step {step_s * 1e3:.1f} ms, projection {proj_s * 1e3:.1f} ms = "
                     f"{100 * proj_s / step_s:.0f}% of the step")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100], help="numbers of checkpoints (at least 2)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/twa-bench-w1"))
    parser.add_argument("--step", action="store_true", help="also time the projected step (one line per --storage)")
    parser.add_argument("--step-only", action="store_true",
                        help="only time the projected step (K = the largest --k): no W1 files, no builds (e.g. a "
                             "short GPU check: --step-only --k 100 --device cuda)")
    parser.add_argument("--average", action="store_true",
                        help="also run the whole `twa average` (w1_data, 1 epoch) per storage: its peak RSS "
                             "against the reference path's")
    parser.add_argument("--storage", nargs="+", choices=["float32", "bf16", "int8"],
                        default=["float32", "bf16", "int8"], help="basis storage formats of the twa rows")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every path (default: torch's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every build path, interleaved, the order rotated each round (reference, twa...; "
                             "twa..., reference; ...): the table "
                             "gives each path's median time and the ratio of the medians, and the range of the "
                             "per-round ratios (a shared machine's load swings single runs by up to 1.5x)")
    parser.add_argument("--device", default="cpu",
                        help="device of the projected step (--step): cpu, cuda or cuda:N; the builds run on the "
                             "CPU, where twa reads checkpoints")
    args = parser.parse_args()
    if min(args.k) < 2:
        parser.error(f"--k {min(args.k)}: a basis needs at least 2 checkpoints")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: must be a positive integer (leave it out for torch's default)")
    args.step = args.step or args.step_only
    if args.step_only and args.average:
        parser.error("--step-only times the projected step alone; leave out --average")
    if args.step:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device}: the step is timed on cpu, cuda or cuda:N")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.dir, args.k[0])
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.step_only:
        print(projected_step_line(max(args.k), device, args.storage))
        return
    paths = build_w1(args.dir, max(args.k))
    print()
    repeated = args.repeat > 1
    if repeated:
        print(f"each build path run {args.repeat} times, interleaved; times are medians, the speed-up is the ratio "
              f"of the medians, and its range that of the per-round ratios")
        print()
    print("| K | path | load + basis (s) | speed-up | " + ("speed-up range | " if repeated else "") +
          "peak RSS (GiB) | memory ratio | basis (GiB) | max abs(PP^T - I) |")
    print("|---:|---|---:|---:|" + ("---:|" if repeated else "") + "---:|---:|---:|---:|")
    refs = {}
    for k in args.k:
        kinds = ["reference", *(f"twa-{storage}" for storage in args.storage)]
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for round_ in range(args.repeat):  # the order rotates each round: no path always runs first
            for kind in kinds[round_ % len(kinds):] + kinds[:round_ % len(kinds)]:
                runs[kind].append(run_child(kind, args.dir, k))
        ref = refs[k] = median_run(runs["reference"])
        names = ["reference (numpy stack + float32 CGS)", *(f"twa, {storage} basis" for storage in args.storage)]
        for name, kind in zip(names, kinds):
            r = median_run(runs[kind])
            ratios = [a["total_s"] / b["total_s"] for a, b in zip(runs["reference"], runs[kind])]
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}x | " if repeated else ""
            print(f"| {k} | {name} | {r['total_s']:.1f} | {ref['total_s'] / r['total_s']:.2f}x | {spread}"
                  f"{r['peak_bytes'] / 2**30:.2f} | {r['peak_bytes'] / ref['peak_bytes']:.2f} | "
                  f"{r['basis_bytes'] / 2**30:.2f} | {r['orthonormality']:.1e} |")
    if args.average:
        print()
        print("| K | `twa average`, basis | wall (s) | peak RSS (GiB) | ratio to the reference path's peak |")
        print("|---:|---|---:|---:|---:|")
        for k in args.k:
            ref = refs[k]
            for storage in args.storage:
                r = run_child(f"average-{storage}", args.dir, k)
                print(f"| {k} | {storage} | {r['total_s']:.0f} | {r['peak_bytes'] / 2**30:.2f} | "
                      f"{r['peak_bytes'] / ref['peak_bytes']:.2f} |")
    if args.step:
        print()
        print(projected_step_line(max(args.k), device, args.storage))
    del paths


if __name__ == "__main__":
    main()
