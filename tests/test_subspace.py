"""Known answers for the basis: orthonormal, spans the inputs, drops dependent vectors, exact coefficients."""

from __future__ import annotations

import mmap
import threading

import pytest
import torch
from conftest import dequantized_projection, trajectory

from twa_tool import subspace
from twa_tool.subspace import (
    PROJECTION_TOLERANCE,
    STORAGE_TOLERANCE,
    Basis,
    BasisBuilder,
    build_by_columns,
    build_subspace,
    orthonormality_error,
)


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
        p = sub.basis.values
        residual = torch.linalg.vector_norm(v64 - p.T @ (p @ v64)) / torch.linalg.vector_norm(v64)
        assert residual < 1e-10


def test_projection_is_idempotent_and_symmetric() -> None:
    sub = build_subspace(trajectory(8, 3000))
    rng = torch.Generator().manual_seed(5)
    g = torch.randn(3000, dtype=torch.float64, generator=rng)
    h = torch.randn(3000, dtype=torch.float64, generator=rng)
    once = sub.project(g)
    assert torch.linalg.vector_norm(sub.project(once) - once) <= 1e-6 * torch.linalg.vector_norm(once)
    # <P g, h> = <g, P h>, to float64 rounding relative to the norms (not to the inner product, which may be ~0)
    norms = torch.linalg.vector_norm(g) * torch.linalg.vector_norm(h)
    assert (once @ h - g @ sub.project(h)).abs() <= 1e-12 * norms
    # the residual is orthogonal to the span
    assert (sub.basis.values.double() @ (g - once)).abs().max() < 1e-8 * torch.linalg.vector_norm(g)


def test_dependent_zero_and_duplicate_vectors_are_dropped_without_nan() -> None:
    a, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    sub = build_subspace([a, b, a.clone(), 2 * a - 3 * b, torch.zeros(100), b + 1e-3 * torch.randn(100)])
    assert sub.kept == (0, 1, 5)
    assert sub.dropped == (2, 3, 4)
    assert torch.isfinite(sub.basis.values).all()
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
    monkeypatch.setattr(subspace, "_CHUNK", 777)  # many uneven column chunks
    blocked = build_subspace(vectors, dtype=torch.float32, block=5)
    assert blocked.basis.values.dtype == torch.float32
    assert orthonormality_error(blocked.basis) <= 1e-5
    assert torch.allclose(blocked.basis.values.double(), reference.basis.values, atol=1e-5)
    assert torch.allclose(blocked.r, reference.r, rtol=1e-5)


def test_block_build_equals_one_by_one() -> None:
    vectors = trajectory(11, 3000, step=1e-2)
    vectors.insert(4, vectors[2].clone())  # a duplicate inside the first block
    vectors.insert(9, 0.5 * vectors[0] + 0.5 * vectors[6])  # dependent across blocks
    sequential = build_subspace(vectors, dtype=torch.float64, block=1)
    builder = BasisBuilder(capacity=len(vectors), dtype=torch.float64)
    flags = builder.add_many(vectors[:5]) + builder.add_many(vectors[5:10]) + builder.add_many(vectors[10:])
    blocked = builder.finish()
    assert builder.rounds > 3  # the in-block duplicate sent the rest of its block to a second round
    assert blocked.kept == sequential.kept and blocked.dropped == sequential.dropped == (4, 9)
    assert flags == [i not in (4, 9) for i in range(len(vectors))]
    assert torch.allclose(blocked.basis.values, sequential.basis.values, atol=1e-10)
    assert torch.allclose(blocked.r, sequential.r, atol=1e-10)
    assert orthonormality_error(blocked.basis) < 1e-12


def test_mean_is_the_float64_mean_exactly() -> None:
    vectors = trajectory(37, 50_000, step=1e-2)
    vectors.insert(20, 5 * torch.randn(50_000))  # an unrelated vector: differences are not small
    builder = BasisBuilder(capacity=len(vectors), block=16, track_mean=True)
    for v in vectors:
        builder.push(v)
    exact = torch.stack([v.double() for v in vectors]).mean(0)
    assert (builder.mean() - exact).abs().max() <= 1e-12
    assert torch.equal(builder.mean().float(), exact.float())


def test_push_of_parts_equals_push_of_the_flat_vector() -> None:
    vectors = trajectory(5, 1000)
    whole = build_subspace(vectors)
    builder = BasisBuilder(capacity=5)
    for v in vectors:
        builder.push([v[:300].view(10, 30), v[300:]])
    parts = builder.finish()
    assert torch.equal(parts.basis.values, whole.basis.values) and torch.equal(parts.r, whole.r)


def test_projection_matches_the_float64_reference() -> None:
    vectors = trajectory(20, 40_000)
    sub = build_subspace(vectors)  # float32, blocks of 16: BCGS2 + CholQR2 with a split round
    p64 = build_subspace(vectors, dtype=torch.float64, block=1).basis.values  # the plain float64 reference
    # a fixed gradient: |P g| is ~2% of |g|, so the float32 rounding of P g is up to ~6e-7 relative to the
    # result even with the chunked float64 sum (one float32 product: up to ~1e-6); the span agrees to ~3e-7
    g = torch.randn(40_000, generator=torch.Generator().manual_seed(1))
    expected = p64.T @ (p64 @ g.double())
    got = sub.project(g)
    assert got.dtype == torch.float32
    assert torch.linalg.vector_norm(got.double() - expected) <= PROJECTION_TOLERANCE["float32"] * \
        torch.linalg.vector_norm(expected)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_low_precision_basis_within_its_documented_tolerance(storage: str) -> None:
    vectors = trajectory(12, 30_000)
    full = build_subspace(vectors, dtype=torch.float64)
    low = build_subspace(vectors, storage=storage)
    assert low.basis.storage == storage
    ratio = build_subspace(vectors).basis.nbytes / low.basis.nbytes
    assert ratio == 2 if storage == "bf16" else 3.9 < ratio < 4
    error = orthonormality_error(low.basis)
    assert 1e-7 < error <= STORAGE_TOLERANCE[storage]  # really rounded, and within the documented bound
    # the projection with the stored basis is the projection onto its own (dequantized) rows
    dense = torch.cat([part for _, part in low.basis.column_chunks(torch.float64)], dim=1)
    g = torch.randn(30_000, dtype=torch.float64)
    assert torch.allclose(low.project(g), dense.T @ (dense @ g), atol=1e-10)
    # the accelerator's chunking (few wide chunks), run here on the CPU: the same projection
    assert torch.allclose(low.basis.project(g, step=1 << 25), dense.T @ (dense @ g), atol=1e-10)
    assert torch.allclose(low.basis.project(g, step=5000), dense.T @ (dense @ g), atol=1e-10)  # a ragged last chunk
    # and close to the projection onto the exact span, to the format's documented precision
    p64 = full.basis.values
    exact = p64.T @ (p64 @ g)
    assert torch.linalg.vector_norm(full.project(g) - exact) <= 1e-6 * torch.linalg.vector_norm(exact)
    error = torch.linalg.vector_norm(low.project(g) - exact) / torch.linalg.vector_norm(exact)
    assert 1e-5 < error <= PROJECTION_TOLERANCE[storage]


@pytest.mark.parametrize("step", [None, 4096, 5000, 1 << 25])
def test_int8_projection_of_a_float32_gradient_is_its_dequantized_rows(step: int | None) -> None:
    """The CPU int8 projection scales the partial products and the coefficients, not every entry: it must equal
    P^T (P g) with P the dequantized rows, for float32 gradients (training's), ragged last blocks included."""
    low = build_subspace(trajectory(7, 4096 * 5 + 1000), storage="int8")
    g = torch.randn(low.basis.dim, generator=torch.Generator().manual_seed(2))
    expected = dequantized_projection(low.basis, g)
    got = low.basis.project(g, step=step)
    assert got.dtype == torch.float32
    assert torch.linalg.vector_norm(got.double() - expected) <= 1e-6 * torch.linalg.vector_norm(expected)


def test_int8_chunks_dequantize_every_column_block() -> None:
    values = torch.randn(3, 3 * 4096 + 17)
    values[1, 4096:8192] = 0  # an all-zero block stays exactly zero
    basis = subspace.quantize(values, "int8")
    dense = torch.cat([part for _, part in basis.column_chunks(torch.float32, step=4096)], dim=1)
    scale = values.abs().max() / 127
    assert dense.shape == values.shape and (dense - values).abs().max() <= scale / 2 + 1e-6
    assert torch.isfinite(dense).all() and not dense[1, 4096:8192].any()
    assert isinstance(basis.to("cpu"), Basis)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_in_place_rounding_equals_the_copy_bit_for_bit(storage: str, rows: int) -> None:
    values = torch.randn(rows, 2 * 4096 + 33)
    expected = subspace.quantize(values, storage)
    work = values.clone()
    got = subspace.quantize(work, storage, in_place=True)
    assert got.values.data_ptr() == work.data_ptr()  # written over the float rows, nothing allocated
    assert torch.equal(got.values, expected.values)
    assert (got.scales is None and expected.scales is None) or torch.equal(got.scales, expected.scales)
    if storage == "int8":  # the plain definition: every block divided by its scale, rounded half to even
        assert expected.scales is not None
        scale = expected.scales.repeat_interleave(4096, dim=1)[:, : values.shape[1]]
        assert torch.equal(expected.values, (values * (1.0 / scale)).round().to(torch.int8))
    else:
        assert torch.equal(expected.values, values.to(torch.bfloat16))
    assert subspace.quantize(values[:, 1:], storage, in_place=True).values.data_ptr() != values.data_ptr()  # strided


def test_released_tail_reads_as_zeros_and_the_head_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subspace, "_POPULATE_MIN_BYTES", 0)
    buffer, _ = subspace._preallocated(8, 4096, torch.float32)  # 8 rows of 16 kB (4 pages each)
    buffer.copy_(torch.arange(8 * 4096, dtype=torch.float32).view(8, 4096) + 1)
    keep = 3 * 4096 * 4 + 10  # a partial page is kept whole
    if not subspace.release_tail(buffer, keep):
        pytest.skip("madvise(MADV_DONTNEED) is not available here")
    flat = buffer.view(-1)
    first_released = -(-(buffer.data_ptr() + keep) // mmap.PAGESIZE) * mmap.PAGESIZE - buffer.data_ptr()
    assert torch.equal(flat[: first_released // 4], torch.arange(first_released // 4, dtype=torch.float32) + 1)
    assert not flat[first_released // 4:].any()
    assert not subspace.release_tail(buffer[:, ::2], 0)  # not contiguous: left alone


def test_block_and_one_by_one_decide_dependence_alike_at_the_threshold() -> None:
    vectors = trajectory(40, 20_000, step=1e-5)  # residuals straddle rtol = 1e-5
    reference = build_subspace(vectors, dtype=torch.float64, block=1)
    assert 10 < reference.rank < 40
    for block in (1, 16):
        assert build_subspace(vectors, block=block).kept == reference.kept


@pytest.mark.parametrize("threads", [1, 2])
def test_background_blocks_give_the_same_basis_and_raise_their_errors(threads: int) -> None:
    # one thread per operation: the worker and this thread share each block's chunks and the final pass's
    # columns (the worker must run its products with this thread's count, or the bits differ)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        background_blocks_give_the_same_basis_and_raise_their_errors()
    finally:
        torch.set_num_threads(before)


def new_thread_count() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_any_number_of_sharing_threads_gives_the_same_bits_and_leaves_torch_threads_alone() -> None:
    vectors = trajectory(30, 50_000)
    vectors.insert(5, vectors[2].clone())  # a dropped row: the general path runs too
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads in (1, 2, 3):
            builder = BasisBuilder(capacity=len(vectors), block=8, threads=threads, background=threads == 3,
                                   track_mean=True)
            assert new_thread_count() == 2  # starting the workers leaves the default a new thread starts from
            for v in vectors:
                builder.push(v)
            mean = builder.mean()
            results.append((builder.finish(), mean))
            assert torch.get_num_threads() == 2 and new_thread_count() == 2  # and so does the build
    finally:
        torch.set_num_threads(before)
    (first, mean), *others = results
    for other, other_mean in others:
        assert other.kept == first.kept and other.dropped == first.dropped == (5,)
        assert torch.equal(other.basis.values, first.basis.values) and torch.equal(other.r, first.r)
        assert torch.equal(other_mean, mean)


def background_blocks_give_the_same_basis_and_raise_their_errors() -> None:
    vectors = trajectory(40, 20_000)
    vectors.insert(7, vectors[3].clone())  # a dropped row: later blocks are compacted over it
    results = []
    for background in (False, True):
        builder = BasisBuilder(capacity=len(vectors), block=8, background=background, track_mean=True)
        for v in vectors:
            builder.push(v)
        mean = builder.mean()
        results.append((builder.finish(), mean))
    (plain, mean_plain), (threaded, mean_threaded) = results
    assert threaded.kept == plain.kept and threaded.dropped == plain.dropped == (7,)
    assert torch.equal(threaded.basis.values, plain.basis.values) and torch.equal(threaded.r, plain.r)
    assert torch.equal(mean_threaded, mean_plain)
    builder = BasisBuilder(capacity=20, block=4, background=True)
    for v in trajectory(3, 100):
        builder.push(v)
    builder.push(torch.full((100,), float("inf")))  # completes a block, processed on the worker
    with pytest.raises(ValueError, match="vector 3 has non-finite entries"):
        for v in trajectory(4, 100):  # the error surfaces at the next block's flush, or at the end
            builder.push(v)
        builder.finish()


def test_non_finite_is_its_own_error_with_the_index() -> None:
    """The pipeline names the file from ``NonFiniteVector.index``; other ``vector ...`` errors are not it."""
    builder = BasisBuilder(capacity=5, block=2)
    builder.push(torch.ones(10))
    with pytest.raises(subspace.NonFiniteVector) as err:  # the full block is prepared at once
        builder.push(torch.full((10,), 3e38))  # every entry finite, the squared norm overflows
    assert err.value.index == 1 and str(err.value) == "vector 1 has non-finite entries"
    sized = BasisBuilder(capacity=5)
    sized.push(torch.ones(10))
    with pytest.raises(ValueError, match="vector 1 has 11 entries") as err:
        sized.push(torch.ones(11))
    assert not isinstance(err.value, subspace.NonFiniteVector)


# ---------------------------------------------------------------------------------------------
# The streamed-Gram fast path and what it must keep from the one-by-one build


def creeping(rtol: float = 1e-5) -> list[torch.Tensor]:
    """Two successive steps along a new direction, each below ``rtol`` of the vector, together above it:
    the one-by-one build drops the first and keeps the second (its residual is the sum of both)."""
    g = torch.Generator().manual_seed(3)
    w0, w1 = torch.randn(4000, generator=g, dtype=torch.float64), torch.randn(4000, generator=g, dtype=torch.float64)
    u = torch.randn(4000, generator=g, dtype=torch.float64)
    u -= torch.stack([w0, w1]).T @ torch.linalg.lstsq(torch.stack([w0, w1]).T, u).solution  # orthogonal to both
    u /= torch.linalg.vector_norm(u)
    step = 0.6 * rtol * torch.linalg.vector_norm(w1)
    return [w0, w1, w1 + step * u, w1 + 2 * step * u, w1 + 2 * step * u + torch.randn(4000, generator=g,
                                                                                       dtype=torch.float64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_below_the_tolerance_add_up_as_in_the_one_by_one_build(dtype: torch.dtype) -> None:
    vectors = [v.to(dtype).double() for v in creeping()]  # the reference sees exactly the stored inputs
    reference = build_subspace(vectors, dtype=torch.float64, block=1)
    assert reference.kept == (0, 1, 3, 4) and reference.dropped == (2,)
    fast = build_subspace(vectors, dtype=dtype)  # one round over the streamed Gram matrix
    builder = BasisBuilder(capacity=len(vectors), dtype=dtype)  # the general path, the carry across a flush
    flags = builder.add_many(vectors[:3]) + builder.add_many(vectors[3:])
    general = builder.finish()
    assert flags == [True, True, False, True, True]
    for sub in (fast, general):
        assert sub.kept == reference.kept and sub.dropped == reference.dropped
        w = 0.3 * vectors[0] + 0.5 * vectors[3] + 0.2 * vectors[4]
        rebuilt = sum(c * v for c, v in zip(sub.checkpoint_coefficients(w), vectors))
        assert torch.linalg.vector_norm(rebuilt - w) <= 1e-6 * torch.linalg.vector_norm(w)
        assert torch.allclose(sub.r, reference.r, rtol=1e-6, atol=1e-6 * reference.r.abs().max())


def test_streamed_gram_round_orthonormalises_a_trajectory_in_one_pass() -> None:
    vectors = trajectory(40, 20_000)
    builder = BasisBuilder(capacity=len(vectors), block=16)
    for v in vectors:
        builder.push(v)
    sub = builder.finish()
    assert builder.rounds == 1 and sub.rank == 40
    assert orthonormality_error(sub.basis) <= 1e-6
    reference = build_subspace(vectors, dtype=torch.float64, block=1)
    assert torch.allclose(sub.basis.values.double(), reference.basis.values, atol=1e-5)
    assert torch.allclose(sub.r, reference.r, rtol=1e-5)


@pytest.mark.parametrize("gram", [False, True])
def test_staircase_transform_equals_the_dense_product(monkeypatch: pytest.MonkeyPatch, gram: bool) -> None:
    monkeypatch.setattr(subspace, "_ROW_BLOCK", 3)
    y = torch.randn(9, 5000, dtype=torch.float64)
    t = torch.randn(7, 9, dtype=torch.float64).tril()
    t[:, 8] = 0  # the last input row is never reached
    t[2] = 0  # nor by a row of zeros
    for matrix in (t, torch.randn(7, 9, dtype=torch.float64)):  # staircase and dense
        out = torch.empty(7, 5000, dtype=torch.float64)
        products = subspace._transform(y, matrix, out, gram=gram)
        assert torch.allclose(out, matrix @ y, atol=1e-12)
        if gram:
            assert torch.allclose(products, out @ out.T, atol=1e-10)
        else:
            assert products is None
    inplace = y.clone()  # the output may be the input's first rows: each chunk is read before written
    subspace._transform(inplace, t, inplace[:7])
    assert torch.allclose(inplace[:7], t @ y, atol=1e-12)


@pytest.mark.parametrize("madvise", [True, False])
def test_populated_buffer_is_an_ordinary_writable_tensor(madvise: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subspace, "_POPULATE_MIN_BYTES", 0)
    if not madvise:  # a kernel without MADV_POPULATE_WRITE: MAP_POPULATE instead
        monkeypatch.setattr(subspace, "_populate", lambda memory, start, stop: False)
    rows, _ = subspace._preallocated(3, 1000, torch.float32)
    assert rows.shape == (3, 1000) and rows.dtype == torch.float32
    rows.copy_(torch.arange(3000.0).view(3, 1000))
    view = rows[1:]
    del rows
    assert view.sum().item() == sum(range(1000, 3000))


def test_pages_mapped_in_the_background_keep_what_was_written_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """BasisBuilder's buffer: the first step is mapped at once, a thread maps the rest while the caller writes.
    Mapping a page that already holds data keeps it; the wait function joins the thread."""
    monkeypatch.setattr(subspace, "_POPULATE_MIN_BYTES", 0)
    monkeypatch.setattr(subspace, "_POPULATE_STEP", 4 * mmap.PAGESIZE)
    calls = []
    populate = subspace._populate
    monkeypatch.setattr(subspace, "_populate", lambda memory, start, stop: calls.append((start, stop)) or
                        populate(memory, start, stop))
    rows, wait = subspace._preallocated(64, 4096, torch.float32, background=True)  # 1 MB: 64 steps of 4 pages
    pattern = torch.arange(64 * 4096, dtype=torch.float32).view(64, 4096)
    for i in (63, 0, 31, 5):  # rows the thread has or has not reached yet
        rows[i] = pattern[i]
    wait()
    assert calls[0] == (0, 4 * mmap.PAGESIZE) and calls[1] == (4 * mmap.PAGESIZE, 64 * 4096 * 4)
    for i in (63, 0, 31, 5):
        assert torch.equal(rows[i], pattern[i])
    rows.copy_(pattern)
    assert torch.equal(rows, pattern)
    # without madvise: MAP_POPULATE maps everything at once, no thread
    monkeypatch.setattr(subspace, "_populate", lambda memory, start, stop: False)
    rows, wait = subspace._preallocated(64, 4096, torch.float32, background=True)
    assert wait is subspace._nothing
    rows.copy_(pattern)
    assert torch.equal(rows, pattern)


def test_few_long_vectors_are_orthonormalised_to_float32_precision() -> None:
    """A few checkpoints of a large model: the Gram matrices' float32 inner products are long (2M entries);
    summed in float32 they were off by ~1e-6, and bases off by 2e-6 (rows) / 1.1e-5 (columns) passed the
    1e-6 check. Both builds must reach float32 precision."""
    g = torch.Generator().manual_seed(0)
    d = 1 << 21
    w = [0.05 * torch.randn(d, generator=g)]
    for _ in range(2):  # a trajectory: each a small perturbation of the previous
        w.append(w[-1] + 5e-5 * torch.randn(d, generator=g))
    builder = BasisBuilder(capacity=3, track_mean=True, background=True)
    for v in w:
        builder.push(v)
    assert orthonormality_error(builder.finish().basis) < 6e-7
    rows = torch.stack(w)
    by_columns = build_by_columns(3, d, lambda i, cols, out: out.copy_(rows[i, cols]), storage="float32")
    assert by_columns is not None and orthonormality_error(by_columns.subspace.basis) < 6e-7


@pytest.mark.parametrize("i, j", [(1, 0), (40, 3), (69, 68), (65, 33), (31, 32)])
def test_orthonormality_error_finds_one_inner_product_in_any_block(i: int, j: int) -> None:
    """Rows i and j of otherwise orthonormal rows (70 rows: three row blocks; 70001 columns: a ragged last
    chunk) with inner product c: max|PP^T - I| is exactly what float64 says, wherever (i, j) lies."""
    g = torch.Generator().manual_seed(i * 100 + j)
    q = torch.linalg.qr(torch.randn(70_001, 70, generator=g, dtype=torch.float64))[0].T.contiguous()
    c = 1e-3
    q[i] = (q[i] + c * q[j]) / (1 + c * c) ** 0.5  # unit norm; <q_i, q_j> = c / sqrt(1 + c^2)
    expected = (q @ q.T - torch.eye(70, dtype=torch.float64)).abs().max().item()
    assert expected == pytest.approx(c / (1 + c * c) ** 0.5, rel=1e-9)
    assert orthonormality_error(q) == pytest.approx(expected, rel=1e-12)
    single = q.float()
    exact = (single.double() @ single.double().T - torch.eye(70, dtype=torch.float64)).abs().max().item()
    assert orthonormality_error(single) == pytest.approx(exact, rel=1e-9)
    for storage in ("bf16", "int8"):
        stored = subspace.quantize(single, storage)
        values = torch.cat([part for _, part in stored.column_chunks(torch.float64)], dim=1)
        exact = (values @ values.T - torch.eye(70, dtype=torch.float64)).abs().max().item()
        assert orthonormality_error(stored) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("storage", ["float32", "bf16", "int8"])
def test_gram_and_coordinates_in_one_pass_match_float64(storage: str) -> None:
    """The report's single pass: P P^T and P w equal the float64 products of the stored (dequantized) basis."""
    g = torch.Generator().manual_seed(3)
    rows = torch.linalg.qr(torch.randn(50_001, 37, generator=g))[0].T.contiguous()
    stored = subspace.quantize(rows, storage)
    values = torch.cat([part for _, part in stored.column_chunks(torch.float64)], dim=1)
    w = torch.randn(50_001, generator=g)
    gram, beta = subspace.gram_and_coordinates(stored, w)
    assert beta is not None
    # float64 sums of 50k products in another order: 1.2e-13 apart on an AMD EPYC (rounding is ~1e-16 per term)
    torch.testing.assert_close(gram, values @ values.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(beta, values @ w.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(beta, stored.coordinates(w), rtol=1e-12, atol=1e-12)
    assert subspace.gram_and_coordinates(stored)[1] is None
    torch.testing.assert_close(subspace.gram_matrix(stored), gram, rtol=0, atol=0)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_reused_chunk_buffer_gives_the_same_chunks(storage: str) -> None:
    """column_chunks(reuse=True) writes every chunk into one buffer (a ragged last chunk included): each chunk,
    copied before the next is asked for, equals the freshly allocated one."""
    g = torch.Generator().manual_seed(5)
    stored = subspace.quantize(torch.randn(9, 3 * 4096 + 123, generator=g), storage)
    fresh = [(cols, part) for cols, part in stored.column_chunks(torch.float32, step=4096)]
    reused = [(cols, part.clone()) for cols, part in stored.column_chunks(torch.float32, step=4096, reuse=True)]
    assert [c for c, _ in fresh] == [c for c, _ in reused] and len(fresh) == 4
    for (_, a), (_, b) in zip(fresh, reused):
        assert torch.equal(a, b)


@pytest.mark.parametrize("storage", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("dim", [3 * 4096, 3 * 4096 + 1001])  # whole blocks only, and a shorter last block
def test_fused_passes_are_the_projection_onto_the_stored_rows(storage: str, dim: int) -> None:
    """The functions torch.compile fuses for the GPU, run eagerly: P g in float64 and P^T beta, per-block scales
    folded in, equal to the float64 projection onto the dequantized rows."""
    basis = build_subspace(trajectory(9, dim), storage=storage).basis
    g = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    expected = dequantized_projection(basis, g)
    beta = subspace.fused_coordinates(basis.values, basis.scales, g)
    assert beta.dtype == torch.float64
    got = subspace.fused_combine(basis.values, basis.scales, beta)
    assert got.dtype == torch.float32 and got.shape == (dim,)
    assert torch.linalg.vector_norm(got.double() - expected) <= 1e-6 * torch.linalg.vector_norm(expected)


def _fused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> subspace._FusedPasses:
    """A fresh per-process fused-pass holder that also applies on the CPU (the GPU's path, run here)."""
    fused = subspace._FusedPasses()
    fused.devices = ("cpu",)
    monkeypatch.setattr(subspace, "_FUSED", fused)
    return fused


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_basis_project_takes_the_fused_passes_where_they_apply(monkeypatch: pytest.MonkeyPatch, storage: str) -> None:
    """Basis.project on a fused device goes through both compiled passes (here: counted stand-ins for
    torch.compile, which the next test runs for real) and gives the chunked path's projection."""
    basis = build_subspace(trajectory(6, 2 * 4096 + 5), storage=storage).basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(4))
    chunked = basis.project(g)  # the CPU does not take the fused passes
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: calls.append(fn.__name__) or fn(*a))
    _fused_on_cpu(monkeypatch)
    got = basis.project(g)
    assert calls == ["fused_coordinates", "fused_combine"]
    assert torch.linalg.vector_norm(got - chunked) <= 1e-6 * torch.linalg.vector_norm(chunked)
    small = build_subspace(trajectory(3, 4095), storage=storage).basis  # under one block: chunked, not fused
    small.project(torch.randn(4095))
    assert len(calls) == 2


def test_a_compiler_failure_falls_back_to_the_chunked_passes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    basis = build_subspace(trajectory(5, 4096 + 7), storage="int8").basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(5))
    chunked = basis.project(g)
    tries = []

    def broken(fn):
        def call(*args):
            tries.append(1)
            raise RuntimeError("Cannot find a working triton installation\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    fused = _fused_on_cpu(monkeypatch)
    assert torch.equal(basis.project(g), chunked)
    assert fused.failure == "torch.compile failed: RuntimeError: Cannot find a working triton installation"
    assert torch.equal(basis.project(g), chunked) and len(tries) == 1  # not tried again
    # out of memory is not a compiler failure: it is raised, and the fused passes stay on
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    fresh = _fused_on_cpu(monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        basis.project(g)
    assert fresh.failure is None


def test_a_compiled_pass_that_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each compiled pass is checked once per shape against the chunked one: a wrong kernel (here: every output
    doubled, or NaN) gives the chunked result, says by how much it differed, and is not used again."""
    basis = build_subspace(trajectory(5, 2 * 4096 + 9), storage="bf16").basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(7))
    chunked = basis.project(g)
    calls = []
    for wrong, said in ((lambda out: 2 * out, "by 1.0e+00 (relative)"),
                        (lambda out: out * float("nan"), "by nan (relative)")):
        monkeypatch.setattr(torch, "compile", lambda fn, wrong=wrong: lambda *a: calls.append(1) or wrong(fn(*a)))
        fused = _fused_on_cpu(monkeypatch)
        assert torch.equal(basis.project(g), chunked)
        assert fused.failure is not None and fused.failure.startswith("the compiled projection pass 1 differed")
        assert fused.failure.endswith(said)
        calls.clear()
        assert torch.equal(basis.project(g), chunked) and not calls  # the chunked passes from then on
    # a right kernel is checked once per pass and shape, then trusted
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: calls.append(fn.__name__) or fn(*a))
    fused = _fused_on_cpu(monkeypatch)
    chunked_passes = []
    for name in ("_chunked_coordinates", "_chunked_combine"):
        original = getattr(Basis, name)
        monkeypatch.setattr(Basis, name, lambda self, *a, original=original, name=name:
                            chunked_passes.append(name) or original(self, *a))
    for _ in range(3):
        assert torch.linalg.vector_norm(basis.project(g) - chunked) <= 1e-6 * torch.linalg.vector_norm(chunked)
    assert fused.failure is None and len(calls) == 6
    assert chunked_passes == ["_chunked_coordinates", "_chunked_combine"]


@pytest.mark.parametrize("dim", [100, 4096, 3 * 4096 + 5])
def test_block_products_are_p_g_summed_per_block(dim: int) -> None:
    """The accelerator's first pass for a dense basis (one batched product over 4096-column blocks, a strided view
    of the rows): P g in float64, to the float32 rounding of each block's sum."""
    values = torch.linalg.qr(torch.randn(dim, 6, dtype=torch.float64))[0].T.contiguous()
    g = torch.randn(dim, dtype=torch.float64)
    got = subspace._block_products(values.float(), g.float())
    assert got.dtype == torch.float64
    assert torch.allclose(got, values @ g, rtol=0, atol=1e-5)


def test_the_compiled_passes_stop_before_the_recompile_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new basis shape recompiles; past torch.compile's limit it would run the fused passes eagerly (the
    whole basis widened). After _FUSED_SHAPES // 2 shapes the process takes the chunked passes and says why."""
    monkeypatch.setattr(subspace, "_FUSED_SHAPES", 4)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: compiled.append(a[0].shape) or fn(*a))
    fused = _fused_on_cpu(monkeypatch)
    for dim in (4096 + 1, 4096 + 2, 4096 + 1, 4096 + 3):
        basis = build_subspace(trajectory(3, dim), storage="int8").basis
        g = torch.randn(dim, generator=torch.Generator().manual_seed(dim))
        got = basis.project(g)
        expected = dequantized_projection(basis, g)
        assert torch.linalg.vector_norm(got.double() - expected) <= 1e-6 * torch.linalg.vector_norm(expected)
    assert [shape[1] for shape in compiled] == [4097, 4097, 4098, 4098, 4097, 4097]  # not the third shape
    assert fused.failure == ("more than 2 basis shapes in one process (torch.compile would recompile past its "
                             "limit and then run the fused passes eagerly)")
    assert fused.fallbacks == 2  # both passes of the last projection


def test_fused_passes_are_off_when_torch_compile_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCHDYNAMO_DISABLE=1 makes torch.compile run functions eagerly, and the eager fused passes widen the whole
    basis to float32: then they are not used."""
    import torch._dynamo

    basis = build_subspace(trajectory(4, 4096 + 3), storage="bf16").basis
    fused = _fused_on_cpu(monkeypatch)
    assert fused.applies(basis, torch.zeros(basis.dim))
    with torch._dynamo.config.patch(disable=True):
        assert not fused.applies(basis, torch.zeros(basis.dim))
    assert fused.applies(basis, torch.zeros(basis.dim))


def test_fused_passes_compile_and_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torch.compile of both passes (the CPU's C++ backend here, Triton on a GPU) against the eager
    functions. Skipped where this machine cannot compile (no C++ compiler): the GPU check runs it there."""
    basis = build_subspace(trajectory(6, 2 * 4096 + 999), storage="int8").basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(6))
    fused = _fused_on_cpu(monkeypatch)
    got = basis.project(g)
    if fused.failure is not None:
        pytest.skip(f"torch.compile does not work here: {fused.failure}")
    expected = dequantized_projection(basis, g)
    assert torch.linalg.vector_norm(got.double() - expected) <= 1e-6 * torch.linalg.vector_norm(expected)


def test_the_projection_on_a_device_without_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPS has no float64 (every float64 tensor there is a TypeError): the first pass on such a device sums in
    float32, as one product did before the per-block float64 sums (a dense float32 basis, the default, raised on
    `--device mps`; bf16/int8 chunks already did). The meta device stands in for MPS here, declared as one
    without float64, under a mode that raises MPS's error for any float64 tensor on it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == torch.float64
                   for t in tree_leaves(out)):
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                                "support float64. Please use float32 instead.")
            return out

    monkeypatch.setattr(subspace, "_NO_FLOAT64", ("mps", "meta"), raising=False)
    meta = torch.device("meta")
    k, d = 5, 3 * 4096 + 7
    for values, scales in ((torch.empty(k, d, device=meta), None),
                           (torch.empty(k, d, dtype=torch.bfloat16, device=meta), None),
                           (torch.empty(k, d, dtype=torch.int8, device=meta), torch.empty(k, 4, device=meta))):
        basis = Basis(values, scales)
        with NoFloat64():
            out = basis.project(torch.empty(d, device=meta))
        assert out.shape == (d,) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fused_passes_take_only_float32_gradients(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The compiled passes compute in float32. A bf16 gradient's chunked passes compute in bf16, so the
    once-per-shape check found them 1.8e-3 apart and switched the compiled passes off for the whole process, with
    a warning blaming the compiler; a float64 gradient got a float32-accurate projection. Other dtypes take the
    chunked passes (in the gradient's dtype, as before the compiled passes) and leave the compiled ones on."""
    basis = build_subspace(trajectory(5, 2 * 4096 + 1), storage="int8").basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(8)).to(dtype)
    chunked = basis.project(g)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: calls.append(fn.__name__) or fn(*a))
    fused = _fused_on_cpu(monkeypatch)
    got = basis.project(g)
    assert fused.failure is None and calls == []
    assert got.dtype == dtype and torch.equal(got, chunked)


def test_a_zero_vector_does_not_count_as_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass whose chunked result is zero (a zero gradient, as a shard's columns can have at the first step) agrees
    with any kernel that maps zero to zero: that is no check. It was recorded as the shape's check, and a wrong
    kernel (here: every output doubled) was trusted from then on; now the next nonzero vector is checked."""
    basis = build_subspace(trajectory(5, 2 * 4096 + 9), storage="bf16").basis
    g = torch.randn(basis.dim, generator=torch.Generator().manual_seed(9))
    chunked = basis.project(g)
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: 2 * fn(*a))
    fused = _fused_on_cpu(monkeypatch)
    assert torch.equal(basis.project(torch.zeros(basis.dim)), torch.zeros(basis.dim))
    assert fused.failure is None
    assert torch.equal(basis.project(g), chunked)
    assert fused.failure is not None and fused.failure.startswith("the compiled projection pass 1 differed")


def test_fused_passes_are_off_when_compile_errors_are_suppressed(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCHDYNAMO_SUPPRESS_ERRORS=1 makes torch.compile run a function eagerly where compiling fails (no Triton,
    no C++ compiler), without an exception: the fused passes then widened the whole basis to float32 at every
    step (measured here: with no working C++ compiler, no failure recorded and the eager functions run). Off,
    as with TORCHDYNAMO_DISABLE=1."""
    import torch._dynamo

    basis = build_subspace(trajectory(4, 4096 + 3), storage="int8").basis
    fused = _fused_on_cpu(monkeypatch)
    with torch._dynamo.config.patch(suppress_errors=True):
        assert not fused.applies(basis, torch.zeros(basis.dim))
    assert fused.applies(basis, torch.zeros(basis.dim))
