"""Known answers for the basis: orthonormal, spans the inputs, drops dependent vectors, exact coefficients."""

from __future__ import annotations

import pytest
import torch

from twa_tool.subspace import BasisBuilder, build_subspace, orthonormality_error


def trajectory(k: int, d: int, step: float = 1e-3, seed: int = 0) -> list[torch.Tensor]:
    """A highly correlated float32 'training trajectory': each vector a small step from the previous."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    out = []
    for _ in range(k):
        w = w + step * torch.randn(d, generator=g)
        out.append(w.clone())
    return out


def reference_cgs_float32(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The reference code's single-pass classical Gram-Schmidt in float32 (for contrast only)."""
    p = torch.stack(vectors).float()
    for i in range(p.shape[0]):
        if i:
            p[i] -= p[:i].T @ (p[:i] @ p[i])
        p[i] /= torch.linalg.vector_norm(p[i])
    return p


def test_basis_is_orthonormal_on_correlated_trajectory() -> None:
    vectors = trajectory(30, 20_000)
    sub = build_subspace(vectors)
    assert sub.rank == 30
    assert orthonormality_error(sub.basis) <= 1e-5
    # the float32 single-pass reference is far from orthonormal on the same data
    assert orthonormality_error(reference_cgs_float32(vectors)) > 1e-3


def test_basis_spans_every_input() -> None:
    vectors = trajectory(10, 5000)
    sub = build_subspace(vectors, dtype=torch.float64)
    for v in vectors:
        v64 = v.double()
        residual = torch.linalg.vector_norm(v64 - sub.basis.T @ (sub.basis @ v64)) / torch.linalg.vector_norm(v64)
        assert residual < 1e-10


def test_projection_is_idempotent_and_symmetric() -> None:
    sub = build_subspace(trajectory(8, 3000))
    g = torch.randn(3000, dtype=torch.float64)
    h = torch.randn(3000, dtype=torch.float64)
    once = sub.project(g)
    assert torch.linalg.vector_norm(sub.project(once) - once) <= 1e-6 * torch.linalg.vector_norm(once)
    assert torch.allclose(once @ h, g @ sub.project(h), rtol=1e-6)
    # the residual is orthogonal to the span
    assert (sub.basis.double() @ (g - once)).abs().max() < 1e-8


def test_dependent_zero_and_duplicate_vectors_are_dropped_without_nan() -> None:
    a, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    sub = build_subspace([a, b, a.clone(), 2 * a - 3 * b, torch.zeros(100), b + 1e-3 * torch.randn(100)])
    assert sub.kept == (0, 1, 5)
    assert sub.dropped == (2, 3, 4)
    assert torch.isfinite(sub.basis).all()
    assert orthonormality_error(sub.basis) <= 1e-6


def test_coefficients_over_checkpoints_are_exact() -> None:
    vectors = trajectory(6, 4000, step=1e-2)
    sub = build_subspace(vectors, dtype=torch.float64)
    a = torch.tensor([0.5, -1.0, 2.0, 0.25, 0.0, -0.75], dtype=torch.float64)
    w = sum(ai * v.double() for ai, v in zip(a, vectors))
    assert torch.allclose(sub.checkpoint_coefficients(w), a, atol=1e-6)


def test_coefficients_with_dropped_checkpoints_reconstruct_the_vector() -> None:
    a, b, c = (torch.randn(500, dtype=torch.float64) for _ in range(3))
    vectors = [a, b, a.clone(), c]
    sub = build_subspace(vectors, dtype=torch.float64)
    w = 0.3 * a + 0.2 * b + 0.5 * c
    coef = sub.checkpoint_coefficients(w)
    assert coef[2] == 0
    rebuilt = sum(ci * v for ci, v in zip(coef, vectors))
    assert torch.allclose(rebuilt, w, atol=1e-10)


def test_mean_start_coefficients_are_uniform() -> None:
    vectors = trajectory(5, 2000, step=1e-1)
    sub = build_subspace(vectors, dtype=torch.float64)
    mean = torch.stack([v.double() for v in vectors]).mean(0)
    assert torch.allclose(sub.checkpoint_coefficients(mean), torch.full((5,), 0.2, dtype=torch.float64), atol=1e-8)


def test_non_finite_and_size_mismatch_are_errors() -> None:
    builder = BasisBuilder(capacity=3)
    builder.add(torch.randn(10))
    with pytest.raises(ValueError, match="non-finite"):
        builder.add(torch.tensor([float("nan")] * 10))
    with pytest.raises(ValueError, match="entries"):
        builder.add(torch.randn(11))


def test_blocked_float32_storage_matches_float64_build(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = trajectory(12, 10_000)
    reference = build_subspace(vectors, dtype=torch.float64)
    monkeypatch.setattr(BasisBuilder, "BLOCK_ENTRIES", 12 * 777)  # many uneven column blocks
    blocked = build_subspace(vectors, dtype=torch.float32)
    assert blocked.basis.dtype == torch.float32
    assert orthonormality_error(blocked.basis) <= 1e-5
    assert torch.allclose(blocked.basis.double(), reference.basis, atol=1e-5)
    assert torch.allclose(blocked.r, reference.r, rtol=1e-5)


def test_block_build_equals_one_by_one() -> None:
    vectors = trajectory(11, 3000, step=1e-2)
    vectors.insert(4, vectors[2].clone())  # a duplicate inside the first block
    vectors.insert(9, 0.5 * vectors[0] + 0.5 * vectors[6])  # dependent across blocks
    sequential = build_subspace(vectors, dtype=torch.float64)
    builder = BasisBuilder(capacity=len(vectors), dtype=torch.float64)
    flags = builder.add_many(vectors[:5]) + builder.add_many(vectors[5:10]) + builder.add_many(vectors[10:])
    blocked = builder.finish()
    assert blocked.kept == sequential.kept and blocked.dropped == sequential.dropped == (4, 9)
    assert flags == [i not in (4, 9) for i in range(len(vectors))]
    assert torch.allclose(blocked.basis, sequential.basis, atol=1e-10)
    assert torch.allclose(blocked.r, sequential.r, atol=1e-10)
    assert orthonormality_error(blocked.basis) < 1e-12
