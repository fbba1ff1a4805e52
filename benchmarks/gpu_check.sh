#!/usr/bin/env bash
# The GPU checks of issue 6 in one short command, for a machine with a CUDA GPU and torch, torchvision,
# safetensors, click, rich and pytest installed (nothing is installed or downloaded here):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. tests/test_gpu.py: the projection on the GPU against the float64 reference, twa average and twa soup with
#    --device cuda against the CPU, bf16 autocast (skipped where no GPU is visible);
# 2. the projected step on the GPU: resnet18, K=100, batch 128, float32/bf16/int8 basis (no W1 files, no builds);
# 3. the projection's paths side by side (compiled, dequantized chunks, cuBLAS) with their errors, and the kernels;
# 4. with GPU_CHECK_BUILDS=1, also the W1 builds at K=50 on that machine's CPU (writes 2.2 GB under OUT_DIR).
# PYTHON names the interpreter (default python3). Each step's output is kept in OUT_DIR (default: gpu-check/
# under the current folder) as it runs, so a stopped run keeps what it did.
set -uo pipefail
python=${PYTHON:-python3}  # the interpreter that has torch
out=$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY' 2>&1 | tee "$out/device.txt"
import importlib.metadata as metadata
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")
# the machine's own packages, not pyproject's pins: a version below them fails the tests for another reason than
# the GPU (click before 8.2 mixes stderr's progress lines into the CliRunner stdout the tests parse as JSON)
need = {"click": (8, 2), "safetensors": (0, 4), "rich": (13,), "numpy": (1, 23), "pytest": (7,)}
for name, low in need.items():
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(name, "MISSING: install it (pyproject.toml lists twa's requirements)")
        continue
    parts = tuple(int(p) for p in version.split(".")[:len(low)] if p.isdigit())
    print(name, version, "" if parts >= low else f"TOO OLD: twa needs {name}>={'.'.join(map(str, low))}")
PY
status=0
"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.txt" || status=1
"$python" benchmarks/basis_bench.py --step-only --k 100 --device cuda 2>&1 | tee "$out/step.txt" || status=1
"$python" benchmarks/projection_variants.py --device cuda --profile 2>&1 | tee "$out/variants.txt" || status=1
if [ "${GPU_CHECK_BUILDS:-0}" = 1 ]; then
    "$python" benchmarks/basis_bench.py --k 50 --dir "$out/w1" 2>&1 | tee "$out/builds.txt" || status=1
    rm -rf "$out/w1"
fi
exit $status
