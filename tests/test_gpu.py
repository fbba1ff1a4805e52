"""GPU checks: the accelerator paths against the CPU and the float64 reference. Skipped without CUDA (CI has
none); ``bash benchmarks/gpu_check.sh`` runs them on a machine with a GPU. The same code paths run on the CPU
in the rest of the suite (the accelerator's chunking included, via ``step``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import dequantized_projection, model_flags, trajectory

from twa_tool import subspace
from twa_tool.cli import cli
from twa_tool.subspace import PROJECTION_TOLERANCE, Basis, build_subspace, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_compiled_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own holder of the compiled projection passes: the process-wide one would carry an earlier
    test's failure, or its count of basis shapes (capped per process), into the next test."""
    monkeypatch.setattr(subspace, "_FUSED", subspace._FusedPasses())


@pytest.mark.parametrize("storage", ["float32", "bf16", "int8"])
def test_projection_on_the_gpu_matches_the_float64_reference(storage: str) -> None:
    """P^T (P g) with the basis on the GPU (float32: per-block batched products; bf16/int8: the compiled passes)
    against the float64 projection onto the same stored rows, and onto the exact span."""
    vectors = trajectory(20, 300_001)
    stored = build_subspace(vectors, storage=storage).basis
    g = torch.randn(300_001, generator=torch.Generator().manual_seed(2))
    on_gpu = Basis(stored.values.cuda(), None if stored.scales is None else stored.scales.cuda())
    got = on_gpu.project(g.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # the compiled passes sum each 4096-column block's float32 products in float64: 1.7e-7 on an H100 at
    # K=100, D=11.2M (cuBLAS's one float32 product over all columns: 1.2e-6)
    assert subspace._FUSED.failure is None
    own = dequantized_projection(stored, g)
    error = torch.linalg.vector_norm(got.cpu().double() - own) / torch.linalg.vector_norm(own)
    assert error <= 1e-6, error
    exact = build_subspace(vectors, dtype=torch.float64)
    reference = exact.project(g.double())
    error = torch.linalg.vector_norm(got.cpu().double() - reference) / torch.linalg.vector_norm(reference)
    assert error <= max(PROJECTION_TOLERANCE[storage], 1e-4)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_compiled_passes_on_the_gpu_agree_with_the_chunked_ones(storage: str) -> None:
    """The torch.compile'd passes (Triton) against the same projection without them (chunks dequantized), both on
    the GPU, for a last block shorter than the others; the once-per-shape check passed."""
    stored = build_subspace(trajectory(12, 5 * 4096 + 333), storage=storage).basis.to("cuda")
    g = torch.randn(stored.dim, generator=torch.Generator().manual_seed(3)).cuda()
    fused = stored.project(g)
    assert subspace._FUSED.failure is None
    with torch._dynamo.config.patch(disable=True):
        chunked = stored.project(g)
    error = torch.linalg.vector_norm(fused - chunked) / torch.linalg.vector_norm(chunked)
    assert fused.dtype == torch.float32 and error <= 1e-6, error


def test_quantized_basis_moved_to_the_gpu_is_unchanged() -> None:
    values = torch.linalg.qr(torch.randn(10_000, 7))[0].T.contiguous()
    for storage in ("bf16", "int8"):
        stored = quantize(values, storage)
        back = stored.to("cuda").to("cpu")
        assert torch.equal(back.values, stored.values)
        assert (back.scales is None) == (stored.scales is None)
        if stored.scales is not None:
            assert torch.equal(back.scales, stored.scales)


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_average_on_the_gpu_agrees_with_the_cpu(demo_ckpts: Path, tmp_path: Path, storage: str) -> None:
    """The whole twa average with --device cuda: same selection and basis facts as on the CPU, coefficients
    and accuracies close (GPU kernels sum in other orders), the report names the device."""
    reports = {}
    for run, device in enumerate(("cpu", "cuda")):
        result = CliRunner().invoke(cli, ["average", str(demo_ckpts), "--data", "synthetic", "--epochs", "1",
                                          "--batch-size", "256", "--lr", "0.5", "--basis-dtype", storage,
                                          "--device", device, "--out", str(tmp_path / f"run-{run}"), "--json"])
        assert result.exit_code == 0, result.output
        reports[device] = json.loads(result.stdout)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["device"].startswith("cuda")
    assert gpu["checkpoints"] == cpu["checkpoints"] and gpu["basis"]["rank"] == cpu["basis"]["rank"]
    assert gpu["basis"]["orthonormality_error"] == cpu["basis"]["orthonormality_error"]  # built on the CPU
    assert max(abs(a - b) for a, b in zip(gpu["coefficients"], cpu["coefficients"])) < 5e-3
    for method in ("swa", "twa"):
        assert abs(gpu["metrics"][method]["accuracy"] - cpu["metrics"][method]["accuracy"]) <= 0.02


def test_average_on_the_gpu_with_bf16_autocast(demo_ckpts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), "--data", "synthetic", "--epochs", "1",
                                      "--batch-size", "256", "--device", "cuda", "--amp", "bf16",
                                      "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 <= report["metrics"]["twa"]["accuracy"] <= 1 and report["device"].startswith("cuda")
    assert report["basis"]["span_residual"] < 1e-4  # the result stays in the span under autocast too


def test_soup_on_the_gpu_agrees_with_the_cpu(finetunes: Path, tmp_path: Path) -> None:
    reports = {}
    for run, device in enumerate(("cpu", "cuda")):
        result = CliRunner().invoke(cli, ["soup", str(finetunes), *model_flags(), "--data", "synthetic",
                                          "--epochs", "1", "--batch-size", "256", "--base",
                                          str(finetunes / "base.safetensors"), "--device", device,
                                          "--out", str(tmp_path / f"run-{run}"), "--json"])
        assert result.exit_code == 0, result.output
        reports[device] = json.loads(result.stdout)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["ingredients"] == cpu["ingredients"]
    assert gpu["coefficients"]["uniform"] == cpu["coefficients"]["uniform"]
    for method in ("uniform", "greedy", "twa"):
        assert abs(gpu["metrics"][method]["eval"]["accuracy"] - cpu["metrics"][method]["eval"]["accuracy"]) <= 0.02
