"""The projection's paths side by side on one device, timed against a plain SGD step of resnet18.

    python benchmarks/projection_variants.py --device cuda            # K=100, resnet18's D, inputs 32 and 224
    python benchmarks/projection_variants.py --device cpu --dim 200000 --sizes 32   # a quick check of the logic

Rows: twa's ``Basis.project`` for float32/bf16/int8 storage (on a CUDA GPU: the passes torch.compile fuses);
the same without torch.compile (bf16/int8 dequantized chunk by chunk); one product per pass (cuBLAS on a GPU),
float32 and on bf16 operands (float32 accumulation, the gradient rounded to bf16). Each row gives the time, the
share of an SGD step (batch 128, float32, 32x32 and 224x224 inputs) and the error against the float64
projection onto the same stored rows. Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision

from twa_tool import subspace
from twa_tool.subspace import Basis, quantize


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()
    synchronise(device)
    clock = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronise(device)
    return (time.perf_counter() - clock) / repeat


def sgd_step_seconds(size: int, device: torch.device, repeat: int) -> float:
    model = torchvision.models.resnet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(128, 3, size, size, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return timed(step, device, repeat)


def native_bf16(values: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    beta = (values @ g.to(torch.bfloat16)).float()
    return (values.T @ beta.to(torch.bfloat16)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dim", type=int, default=None, help="columns (default: resnet18's, num_classes=10)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="input sizes of the SGD step")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also list the kernels of the projection (cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    d = args.dim or sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, K={args.k}, D={d}")
    steps = {size: sgd_step_seconds(size, device, args.repeat) for size in args.sizes}
    print("SGD step, resnet18, batch 128, float32: " + ", ".join(
        f"{size}x{size} {s * 1e3:.2f} ms" for size, s in steps.items()))

    dense = torch.linalg.qr(torch.randn(d, args.k, device=device))[0].T.contiguous()
    g = torch.randn(d, device=device)
    chunked = torch._dynamo.config.patch(disable=True)  # twa's passes without the compiled kernels
    rows: list[tuple[str, Callable[[], torch.Tensor], Basis]] = []
    stores = {storage: quantize(dense, storage) for storage in ("float32", "bf16", "int8")}
    for storage, stored in stores.items():
        rows.append((f"twa project, {storage}", lambda s=stored: s.project(g), stored))
    for storage in ("bf16", "int8"):
        rows.append((f"chunked (no compile), {storage}", chunked(lambda s=stores[storage]: s.project(g)),
                     stores[storage]))
    rows.append(("one product per pass, float32", lambda: dense.T @ (dense @ g), stores["float32"]))
    rows.append(("bf16 operands, bf16", lambda: native_bf16(stores["bf16"].values, g), stores["bf16"]))
    head = f"{'path':<30} {'time ms':>9} " + " ".join(f"{f'% step {s}':>11}" for s in args.sizes)
    print(head + f" {'rel. error':>11} {'first call s':>13}")
    for name, fn, stored in rows:
        clock = time.perf_counter()
        try:
            got = fn()
            synchronise(device)
        except Exception as exc:  # a candidate that does not run on this machine is a finding, not a stop
            print(f"{name:<30} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        first = time.perf_counter() - clock
        own = stored.combine(stored.coordinates(g))  # float64, chunk by chunk
        error = (torch.linalg.vector_norm(got.double() - own) / torch.linalg.vector_norm(own)).item()
        del own
        seconds = timed(fn, device, args.repeat)
        shares = " ".join(f"{100 * seconds / steps[s]:>10.1f}%" for s in args.sizes)
        print(f"{name:<30} {seconds * 1e3:>9.2f} {shares} {error:>11.1e} {first:>13.1f}")
    failure = subspace._FUSED.failure
    used = "used for the twa bf16/int8 rows" if device.type in subspace._FUSED.devices else "not used on this device"
    print(f"compiled passes: {'not compiled: ' + failure if failure else used}")
    if args.profile and device.type == "cuda":
        for storage in ("float32", "int8"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    stores[storage].project(g)
                synchronise(device)
            print(f"kernels of 5 projections, {storage} basis:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
