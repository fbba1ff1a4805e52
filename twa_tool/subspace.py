"""Pure tensor math of the TWA subspace: orthonormal basis of the checkpoints' span, projection, coefficients.

Only depends on torch. The basis is built as the checkpoints stream in, a block at a time, inside
the one preallocated ``capacity x D`` buffer that becomes the basis: a checkpoint is copied into its
row and orthogonalised there, so peak memory is the basis plus one checkpoint, never the K
checkpoints and the basis at once.

Numerics. The reference implementation runs single-pass classical Gram-Schmidt in float32, which
loses orthogonality completely on a correlated training trajectory (max|P P^T - I| ~ 1, see
``benchmarks/basis_bench.py``). Here each checkpoint's row is replaced by its difference from the
previous checkpoint (exact in float32 for nearby values, and far better conditioned along a
trajectory than the checkpoints themselves), and the Gram matrix of those rows is accumulated while
the checkpoints stream in. At the end, the in-order Cholesky factor of that Gram matrix decides which
checkpoints are kept and one pass over the buffer applies ``L^-1`` (Cholesky-QR) while computing the
new rows' Gram matrix; a second Cholesky-QR runs only if that one is not the identity to 1e-6
(CholQR2, Yamamoto et al. 2015). When the Gram matrix cannot decide (a pivot below 1% of the
vector's residual: nearly dependent vectors), the rest is orthogonalised a block at a time, twice
against the rows so far and twice within the block ("BCGS2 + CholQR2", Barlow & Smoktunowicz 2013),
down to vector by vector. All bulk arithmetic is float32 matrix-matrix products over the buffer
(BLAS-3, no float64 copies of it); the small inner-product matrices are accumulated in float64 over
column chunks. Linear dependence is decided exactly as the one-by-one build decides it: a checkpoint
whose residual against the kept ones is below ``rtol`` times its own norm is dropped.

Storage. The finished basis can be kept as float32, bfloat16 or int8 (per row and per block of
``QUANT_BLOCK`` columns scaled, as the TWA journal version's low-bit P): 4, 2 or ~1 bytes per entry.
``BasisBuilder`` builds in float32 and rounds once at the end (in place). ``build_by_columns`` runs the
same fast path by passes over blocks of columns, reading every vector's block from where it lies (files
in the page cache), and rounds each block of the result as it is computed: the float32 basis is never
held. Either way the rows are orthonormal to the rounding error of the format (``STORAGE_TOLERANCE``).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

#: A checkpoint whose residual after projecting out the previous ones is below this fraction of its
#: own norm is linearly dependent on them (duplicates, exact combinations, float32 rounding noise).
DEFAULT_RANK_RTOL = 1e-5

#: Columns sharing one int8 scale per row.
QUANT_BLOCK = 4096

#: 1.5 * 2^23: float32 ``(x + _ROUNDING) - _ROUNDING`` rounds x to the nearest integer, ties to even,
#: for |x| <= 2^22 (int8 values are at most 127 in magnitude).
_ROUNDING = 12582912.0

#: Storage formats of a finished basis: name -> dtype.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}

#: Documented bounds per storage format: max|P P^T - I| (float32: the build; bf16: twice its unit
#: roundoff 2^-9, reached when a row is concentrated on few entries; int8: twice the per-entry rounding
#: of 1/254 of a block's largest entry), and the relative error of a projected vector against the
#: float64 projection onto the exact span. Tests hold these. The projection bounds are limits, not proofs:
#: int8 can exceed 5e-2 where one 4096-column block mixes entries of very different size (README).
STORAGE_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "bf16": 4e-3, "int8": 1e-2}
PROJECTION_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 1e-6, "bf16": 1e-2, "int8": 5e-2}

#: A within-block Cholesky pivot below this fraction of the vector's residual norm sends the block to
#: the vector-by-vector path (the Gram matrix, accurate to ~1e-7 relative, cannot resolve it).
_GRAM_PIVOT_FLOOR = 1e-2

#: After the second pass, a prefix whose Gram matrix is this close to the identity skips the second
#: Cholesky-QR (one pass over its rows less); well below the float32 basis's 1e-5 bound.
_ORTHONORMAL_ENOUGH = 1e-6

#: Buffers from this size on are mapped with their pages populated up front.
_POPULATE_MIN_BYTES = 1 << 26

#: Linux's ``madvise`` advice that maps (and zeroes) every page of a range for writing (Linux >= 5.14).
_MADV_POPULATE_WRITE = 23

#: Linux's ``madvise`` advice that frees a range's pages (private anonymous memory reads as zeros after).
_MADV_DONTNEED = 4

#: Bytes populated per call (page-aligned).
_POPULATE_STEP = 1 << 26

#: Output rows per block of a triangular transform (large enough for an efficient GEMM).
_ROW_BLOCK = 32

#: Columns per chunk of the float64-accumulated products (k x chunk float32 GEMMs).
_CHUNK = 1 << 18

#: The longest inner product summed in float32 before its partial sum goes to float64, in the Gram matrices
#: that decide the Cholesky factors (``_dot``). A float32 sum of n products is off by about sqrt(n) ulps or
#: worse, by the CPU's BLAS kernel: 1M-column chunks (a few checkpoints of resnet18) gave Gram matrices off by
#: ~5e-6; on an AMD EPYC, 4000-column products left a nearly dependent trajectory's coefficients off by 1.2e-6
#: relative, 2048-column ones by 2.5e-7 (float64 products: 4e-8), for ~3% more time in those products.
_DOT_LENGTH = 1 << 11

#: The same for the Gram matrix of a finished pass (``_add_lower_gram``), which only checks orthonormality
#: against ``_ORTHONORMAL_ENOUGH``: 2^15 columns, ~3e-7 (2^11 cost 15% more time in the final pass).
_CHECK_DOT_LENGTH = 1 << 15

#: Columns per float32 product of a projection's first pass on the CPU (summed in float64).
_PROJECT_CHUNK = 1 << 12

#: Entries per dequantized chunk of a bf16/int8 projection on an accelerator (float32: 128 MB). The CPU's
#: cache-sized chunks would mean thousands of small kernel launches per step there.
_ACCELERATOR_CHUNK_ENTRIES = 1 << 25

#: Largest relative difference between a compiled projection pass and the chunked one it replaces (measured on
#: an H100: ~5e-7, mostly the chunked pass's own float32 rounding).
_FUSED_AGREEMENT = 1e-5

#: Distinct (pass, basis shape and format) compiled in one process, below torch.compile's recompile limit (8 per
#: function), past which it runs a function eagerly: a run compiles 2 (one basis).
_FUSED_SHAPES = 8

#: Device types without float64 (MPS): there a projection's first pass sums in the gradient's dtype.
_NO_FLOAT64 = ("mps",)

#: Fixed column groups of the final pass, shared by the threads (their products summed in order).
_GROUPS = 64


def _chunks(d: int, step: int | None = None) -> Iterator[slice]:
    step = step or _CHUNK
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def _dot(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p @ y^T`` (rows x b) in float64: float32 GEMMs over column chunks (at most ``_DOT_LENGTH``), the
    chunk results summed in float64."""
    out = torch.zeros(p.shape[0], y.shape[0], dtype=torch.float64, device=p.device)
    if p.shape[0] == 0:
        return out
    for cols in _chunks(p.shape[1], _DOT_LENGTH):
        out += (p[:, cols] @ y[:, cols].T).to(torch.float64)
    return out


def _subtract(y: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> None:
    """``y -= c^T p`` in place, one BLAS-3 call in the working dtype."""
    if p.shape[0]:
        y.addmm_(c.T.to(y.dtype), p, alpha=-1)


def _transform(y: torch.Tensor, t: torch.Tensor, out: torch.Tensor, gram: bool = False,
               workers: _Workers | None = None) -> torch.Tensor | None:
    """``out = t @ y`` chunk by chunk (``out`` may overlap ``y``: each chunk is computed before written),
    through a reused cache-sized chunk buffer per thread. With ``gram``, also return ``out @ out^T``
    (float64 sums of the chunks' float32 products), computed while each chunk is in cache: no second pass.

    A lower-triangular (staircase) ``t`` is applied by blocks of ``_ROW_BLOCK`` output rows, each reading
    only the input rows it reaches, and only the lower blocks of the Gram matrix are computed: about
    half the arithmetic of the dense products.

    The columns are cut into ``_GROUPS`` fixed groups, shared by this thread and ``workers``, every
    product on one thread; the groups' products are summed in group order. The results are therefore
    bit-identical whatever the number of threads (with several threads per operation, MKL may split a
    long inner dimension differently when two calls compete for the threads).
    """
    t = t.to(y.dtype)
    m = t.shape[0]
    steps = _staircase(t)
    d = y.shape[1]
    step = max(1024, (1 << 20) // max(1, m))  # ~4 MB of output per chunk
    groups = list(_chunks(d, max(step, -(-d // _GROUPS))))
    products = _OrderedSum((m, m)) if gram else None
    buffers: dict[int, torch.Tensor] = {}  # one chunk buffer per thread

    def group(index: int) -> None:
        cols = groups[index]
        buffer = buffers.get(threading.get_ident())
        if buffer is None:
            buffer = buffers.setdefault(threading.get_ident(),
                                        torch.empty(m, min(step, d), dtype=y.dtype))
        total = torch.zeros(m, m, dtype=torch.float64) if products is not None else None
        for chunk in _chunks(cols.stop - cols.start, step):
            chunk = slice(cols.start + chunk.start, cols.start + chunk.stop)
            part = buffer[:, : chunk.stop - chunk.start]
            _apply_staircase(t, steps, y[:, chunk], part)
            out[:, chunk].copy_(part)
            if total is not None:
                _add_lower_gram(part, total)
        if products is not None and total is not None:
            products.add(index, total)

    _shared(_Job(len(groups), group, lambda: None), workers)
    return None if products is None else _symmetric(products.total)


def _staircase(t: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first, end, width)`` per block of ``_ROW_BLOCK`` output rows of ``t @ y``: the block's rows of
    ``t`` reach only the first ``width`` rows of ``y`` (a lower-triangular ``t`` halves the arithmetic)."""
    m = t.shape[0]
    reach = [int(row.nonzero().max()) + 1 if row.any() else 0 for row in t != 0]
    return [(r0, min(r0 + _ROW_BLOCK, m), max(reach[r0:r0 + _ROW_BLOCK])) for r0 in range(0, m, _ROW_BLOCK)]


def _apply_staircase(t: torch.Tensor, steps: list[tuple[int, int, int]], y: torch.Tensor, out: torch.Tensor) -> None:
    """``out = t @ y`` through the blocks ``_staircase(t)`` found (``out`` must not overlap ``y``)."""
    for r0, r1, width in steps:
        torch.matmul(t[r0:r1, :width], y[:width], out=out[r0:r1])


def _add_lower_gram(part: torch.Tensor, total: torch.Tensor) -> None:
    """``total += part @ part^T`` on and below the diagonal blocks only (float32 products of at most
    ``_CHECK_DOT_LENGTH`` columns, summed in float64)."""
    for cols in _chunks(part.shape[1], _CHECK_DOT_LENGTH):
        for r0 in range(0, part.shape[0], _ROW_BLOCK):
            r1 = min(r0 + _ROW_BLOCK, part.shape[0])
            total[r0:r1, :r1] += (part[r0:r1, cols] @ part[:r1, cols].T).to(torch.float64)


class NonFiniteVector(ValueError):
    """Vector ``index`` (in push order) has non-finite entries (or its norm overflows float32)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"vector {index} has non-finite entries")
        self.index = index


class _OrderedSum:
    """The float64 sum of per-block results that threads hand in in any order, added in block order (so
    bit-identical for any thread count) as soon as the next block's result is in: only the results that
    arrived early are held, not one per block."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.total = torch.zeros(shape, dtype=torch.float64)
        self._early: dict[int, torch.Tensor] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, index: int, value: torch.Tensor) -> None:
        with self._lock:
            self._early[index] = value
            while self._next in self._early:
                self.total += self._early.pop(self._next)
                self._next += 1


def _differences_in_place(rows: torch.Tensor) -> None:
    """Row i becomes row i minus row i-1 (i >= 1), last row first: no temporary."""
    for i in range(rows.shape[0] - 1, 0, -1):
        rows[i] -= rows[i - 1]


def _symmetric(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle ``lower`` holds."""
    return lower.tril() + lower.tril(-1).T


def _preallocated(rows: int, cols: int, dtype: torch.dtype,
                  background: bool = False) -> tuple[torch.Tensor, Callable[[], None]]:
    """An uninitialised ``rows x cols`` CPU tensor whose pages are mapped up front: filling gigabytes of
    fresh memory page fault by page fault runs at a fraction of the copy speed (measured 0.5 against 1.9
    GB/s in a VM). Linux ``madvise(MADV_POPULATE_WRITE)`` through ctypes, which lets other threads run
    meanwhile (``mmap``'s ``MAP_POPULATE`` holds the GIL for the whole mapping: 0.6 s for 2 GB, the
    hashing thread stalled); ``MAP_POPULATE`` on kernels before 5.14; ``torch.empty`` elsewhere.

    With ``background``, only the first ``_POPULATE_STEP`` bytes are mapped before returning and a thread
    maps the rest, first bytes first, while the caller already writes (a page the caller reaches first is
    mapped by its own fault, as without this; mapping a page that holds data keeps the data). Returned with
    the tensor: a function that waits for that thread, to be called before any page of the buffer is freed
    (``release_tail``)."""
    populate = getattr(mmap, "MAP_POPULATE", None)
    nbytes = rows * cols * torch.tensor([], dtype=dtype).element_size()
    if populate is None or nbytes < _POPULATE_MIN_BYTES:
        return torch.empty(rows, cols, dtype=dtype), _nothing
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = min(nbytes, _POPULATE_STEP) if background else nbytes
    if not _populate(memory, 0, first):
        memory.close()
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        first = nbytes
    tensor = torch.frombuffer(memory, dtype=dtype).view(rows, cols)  # the tensor keeps the mapping alive
    if first == nbytes:
        return tensor, _nothing
    thread = threading.Thread(target=_populate, args=(memory, first, nbytes), name="twa-prefault", daemon=True)
    thread.start()
    return tensor, thread.join


def _nothing() -> None:
    return None


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(address, length, advice)`` through ctypes (it releases the GIL), or None."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _populate(memory: mmap.mmap, start: int, stop: int) -> bool:
    """Map every page of bytes ``start .. stop`` of ``memory`` now (``MADV_POPULATE_WRITE``); False where the
    kernel cannot. ``start`` page-aligned."""
    madvise = _libc_madvise()
    if madvise is None:
        return False
    anchor = ctypes.c_char.from_buffer(memory)  # the mapping's address; released before returning
    try:
        address = ctypes.addressof(anchor)
        for begin in range(start, stop, _POPULATE_STEP):  # the kernel holds the memory map's lock per call:
            size = min(_POPULATE_STEP, stop - begin)  # other threads' mmap calls get it in between
            if madvise(address + begin, size, _MADV_POPULATE_WRITE) != 0:
                return False
        return True
    finally:
        del anchor


# ---------------------------------------------------------------------------------------------
# The stored basis


@dataclass(frozen=True)
class Basis:
    """``k x D`` orthonormal rows: dense (float32/float64/bfloat16) or int8 with per-block scales.

    ``scales`` (int8 only) is ``k x ceil(D / QUANT_BLOCK)`` float32: row i, columns of block j are
    ``values[i, cols] * scales[i, j]``.
    """

    values: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    @property
    def storage(self) -> str:
        return next(name for name, dtype in STORAGE_DTYPES.items() if dtype == self.values.dtype)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.values.numel() * self.values.element_size() + extra

    def to(self, device: torch.device | str) -> Basis:
        scales = None if self.scales is None else self.scales.to(device)
        return Basis(self.values.to(device), scales)

    def chunk(self, cols: slice, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """Columns ``cols`` of the basis in ``dtype`` (dequantized for int8); ``cols.start`` a multiple of
        QUANT_BLOCK for int8. ``out``: a ``dtype`` buffer of at least that many columns, written into instead
        of a new tensor (the result is a view of it)."""
        if out is None:
            part = self.values[:, cols].to(dtype)  # torch 2.14 widens bf16 faster than numpy's 16-bit shift
        else:
            part = out[:, : cols.stop - cols.start]
            part.copy_(self.values[:, cols])
        if self.scales is not None:
            first, n = cols.start // QUANT_BLOCK, part.shape[1]
            whole = n // QUANT_BLOCK
            scale = self.scales[:, first:first + -(-n // QUANT_BLOCK)].to(dtype)
            if whole == n / QUANT_BLOCK:  # broadcast one scale over each block of columns, no repeat
                part.view(self.rank, whole, QUANT_BLOCK).mul_(scale[:, :, None])
            else:
                for b in range(scale.shape[1]):
                    part[:, b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK].mul_(scale[:, b:b + 1])
        return part

    def _chunk_columns(self, step: int | None) -> int:
        """Columns per converted chunk: ``step`` (default: about a million entries for the rank), a whole number
        of quantization blocks."""
        step = step or (1 << 20) // max(1, self.rank)
        return max(QUANT_BLOCK, step // QUANT_BLOCK * QUANT_BLOCK)

    def column_chunks(self, dtype: torch.dtype, step: int | None = None,
                      reuse: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(cols, chunk)`` over all columns; a dense basis already in ``dtype`` is one chunk, no copy.

        Other chunks are about a million entries (``step`` columns; default: cache-sized for the rank),
        converted or dequantized on the fly. With ``reuse`` they are written into one buffer, so each chunk
        is valid only until the next one is asked for (for a caller that uses each chunk at once: 1.2x
        faster than a new tensor per chunk for a bf16 projection on the CPU).
        """
        if self.scales is None and self.values.dtype == dtype:
            yield slice(0, self.dim), self.values
            return
        step = self._chunk_columns(step)
        buffer = torch.empty(self.rank, min(step, self.dim), dtype=dtype, device=self.device) if reuse else None
        for cols in _chunks(self.dim, step):
            yield cols, self.chunk(cols, dtype, out=buffer)

    def projection_step(self, device: torch.device) -> int | None:
        """Columns per dequantized chunk of a projection on ``device``: about ``_ACCELERATOR_CHUNK_ENTRIES``
        entries on an accelerator (a handful of kernels per pass), None (cache-sized) on the CPU."""
        return None if device.type == "cpu" else _ACCELERATOR_CHUNK_ENTRIES // max(1, self.rank)

    def project(self, g: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Orthogonal projection ``P^T (P g)`` in ``g``'s dtype: two passes over the basis,
        ``projection_coordinates`` and ``projection_combine`` (see there)."""
        return self.projection_combine(self.projection_coordinates(g, step), g, step)

    def projection_coordinates(self, g: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The projection's first pass, ``P g`` (float64, or ``g``'s dtype on MPS, which has no float64; ``g`` on
        the basis's device, in its dtype).

        Float32 products are summed in float64 per column chunk: one float32 product over all D columns is off
        by ~1e-5 relative at D = 11M on the CPU (1.2e-6 on an H100), the chunked sums by ~2-3e-7. On an
        accelerator a dense basis takes one batched product over ``QUANT_BLOCK``-column blocks (as fast as the
        one product on an H100); a bf16/int8 one, on a CUDA GPU, ``torch.compile``-fused kernels that read each
        stored entry once (``_FUSED``; float32 gradients). Elsewhere, or where those cannot be used, a bf16/int8
        basis is dequantized ``step`` columns at a time (default: cache-sized on the CPU, about
        ``_ACCELERATOR_CHUNK_ENTRIES`` entries elsewhere)."""
        if self.scales is None and self.values.dtype == g.dtype and g.device.type != "cpu":
            if g.device.type in _NO_FLOAT64:
                return self.values @ g  # one product in g's dtype
            return _block_products(self.values, g)
        if _FUSED.applies(self, g):
            return _FUSED.run(0, (self.values, self.scales, g), lambda: self._chunked_coordinates(g, step))
        return self._chunked_coordinates(g, step)

    def _chunked_coordinates(self, g: torch.Tensor, step: int | None) -> torch.Tensor:
        dense = self.scales is None and self.values.dtype == g.dtype  # in g's dtype: no conversion
        total = g.dtype if g.device.type in _NO_FLOAT64 else torch.float64
        beta = torch.zeros(self.rank, dtype=total, device=g.device)
        if dense:
            scratch = torch.empty(self.rank, min(self.dim, _PROJECT_CHUNK), dtype=g.dtype, device=g.device)
            for cols in _chunks(self.dim, _PROJECT_CHUNK):
                beta += _row_dots(self.values[:, cols], g[cols], scratch)
            return beta
        step = step or self.projection_step(g.device)
        if self.scales is not None and g.device.type == "cpu":
            return self._scaled_coordinates(g, step)
        for cols, part in self.column_chunks(g.dtype, step, reuse=True):  # a converted copy: multiplied in place
            beta += _row_dots(part, g[cols], part)
        return beta

    def projection_combine(self, beta: torch.Tensor, like: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The projection's second pass, ``P^T beta``: a D-vector in ``like``'s dtype, on the basis's device
        (fused as the first pass where that one is)."""
        coefficients = beta.to(device=like.device, dtype=like.dtype)
        if self.scales is None and self.values.dtype == like.dtype:
            return self.values.T @ coefficients
        if _FUSED.applies(self, like):
            return _FUSED.run(1, (self.values, self.scales, coefficients),
                              lambda: self._chunked_combine(coefficients, step))
        return self._chunked_combine(coefficients, step)

    def _chunked_combine(self, coefficients: torch.Tensor, step: int | None) -> torch.Tensor:
        step = step or self.projection_step(coefficients.device)
        if self.scales is not None and coefficients.device.type == "cpu":
            return self._scaled_combine(coefficients, step)
        out = torch.empty(self.dim, dtype=coefficients.dtype, device=coefficients.device)
        for cols, part in self.column_chunks(coefficients.dtype, step, reuse=True):
            out[cols] = part.T @ coefficients
        return out

    def _widened_chunks(self, dtype: torch.dtype, step: int | None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(cols, chunk)`` of an int8 basis's entries converted to ``dtype``, scales not applied (one reused
        buffer): ``_scaled_coordinates``/``_scaled_combine`` apply them to the K x blocks partial products and to
        the coefficients instead of to every entry (1.2-1.3x faster at K=100, D=11.2M, one thread)."""
        step = self._chunk_columns(step)
        buffer = torch.empty(self.rank, min(step, self.dim), dtype=dtype)
        for cols in _chunks(self.dim, step):
            part = buffer[:, : cols.stop - cols.start]
            part.copy_(self.values[:, cols])
            yield cols, part

    def _scaled_coordinates(self, g: torch.Tensor, step: int | None) -> torch.Tensor:
        """``projection_coordinates`` of an int8 basis on the CPU: per-block float32 products, scaled, summed in
        float64."""
        assert self.scales is not None
        beta = torch.zeros(self.rank, dtype=torch.float64)
        for cols, part in self._widened_chunks(g.dtype, step):
            gv = g[cols]
            blocks = list(_chunks(part.shape[1], QUANT_BLOCK))
            first = cols.start // QUANT_BLOCK
            part.mul_(gv)  # the widened copy
            partial = torch.stack([part[:, b].sum(1) for b in blocks], dim=1)
            beta += (partial * self.scales[:, first:first + len(blocks)].to(g.dtype)).sum(1, dtype=torch.float64)
        return beta

    def _scaled_combine(self, coefficients: torch.Tensor, step: int | None) -> torch.Tensor:
        """``projection_combine`` of an int8 basis on the CPU: each block's scales folded into the coefficients."""
        assert self.scales is not None
        out = torch.empty(self.dim, dtype=coefficients.dtype)
        for cols, part in self._widened_chunks(coefficients.dtype, step):
            ov = out[cols]
            blocks = list(_chunks(part.shape[1], QUANT_BLOCK))
            first = cols.start // QUANT_BLOCK
            scaled = coefficients[:, None] * self.scales[:, first:first + len(blocks)].to(coefficients.dtype)
            for j, b in enumerate(blocks):
                torch.mv(part[:, b].T, scaled[:, j], out=ov[b])
        return out

    def coordinates(self, vector: torch.Tensor) -> torch.Tensor:
        """``beta = P w`` in float64 (chunked: the basis is never copied whole to float64)."""
        v = vector.reshape(-1)
        beta = torch.zeros(self.rank, dtype=torch.float64, device=self.device)
        for cols, part in self.column_chunks(torch.float64, reuse=True):
            beta += part @ v[cols].to(device=self.device, dtype=torch.float64)
        return beta

    def combine(self, beta: torch.Tensor) -> torch.Tensor:
        """``P^T beta`` in float64."""
        out = torch.empty(self.dim, dtype=torch.float64, device=self.device)
        beta = beta.to(device=self.device, dtype=torch.float64)
        for cols, part in self.column_chunks(torch.float64, reuse=True):
            out[cols] = part.T @ beta
        return out


def fused_coordinates(values: torch.Tensor, scales: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """``P g`` (float64) written as whole-tensor reductions over ``QUANT_BLOCK``-column blocks: float32 sums of
    each block's products, scaled (int8), summed in float64. Eager, this widens the whole basis to float32: it
    is meant for ``torch.compile``, which fuses it into one pass that reads every stored entry once."""
    k, d = values.shape
    n = d // QUANT_BLOCK
    full = n * QUANT_BLOCK
    g = g.float()
    partial = (values[:, :full].view(k, n, QUANT_BLOCK).float() * g[:full].view(1, n, QUANT_BLOCK)).sum(-1)
    rest = (values[:, full:].float() * g[full:]).sum(-1, keepdim=True)  # the shorter last block (or zeros)
    partial = torch.cat([partial, rest], dim=1).double()
    if scales is not None:  # one scale per block: ceil(d / QUANT_BLOCK) of them
        partial = partial[:, : scales.shape[1]] * scales.double()
    return partial.sum(1)


def fused_combine(values: torch.Tensor, scales: torch.Tensor | None, beta: torch.Tensor) -> torch.Tensor:
    """``P^T beta`` (float32) as one reduction over the rows, each block's scale folded into its coefficient;
    for ``torch.compile``, as ``fused_coordinates``."""
    k, d = values.shape
    n = d // QUANT_BLOCK
    full = n * QUANT_BLOCK
    beta = beta.float()
    weights = beta[:, None].expand(k, n + 1) if scales is None else scales * beta[:, None]
    blocks = (values[:, :full].view(k, n, QUANT_BLOCK).float() * weights[:, :n, None]).sum(0).reshape(full)
    rest = (values[:, full:].float() * weights[:, n:n + 1]).sum(0)
    return torch.cat([blocks, rest])


def _row_dots(part: torch.Tensor, v: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``part @ v`` (one value per row, in their dtype) as torch's reduction sums the products (pairwise, in
    vector lanes), through ``scratch`` (at least ``part``'s size; it may be ``part`` itself, which is then
    overwritten). A BLAS matrix-vector product's running sums depend on the CPU's kernel: on an AMD EPYC its
    4096-column products left ``P g`` off by 9.6e-7 relative where ``|P g|`` is 2% of ``|g|``, the reduction's by
    1.8e-7, in less time (K=100, D=11.2M: 180 against 203 ms)."""
    products = scratch[:, : part.shape[1]] if scratch is not part else part
    return torch.mul(part, v, out=products).sum(1)


def _block_products(values: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``P g`` (float64) of a dense basis in ``g``'s dtype as one batched product over ``QUANT_BLOCK``-column blocks
    (a strided view, no copy), the blocks' float32 sums added in float64: on an H100 at K=100, D=11.2M, 1.56 ms
    and 1.6e-7 relative error, against 1.54 ms and 1.2e-6 for one product over all columns."""
    k, d = values.shape
    n = d // QUANT_BLOCK
    full = n * QUANT_BLOCK
    beta = (values[:, full:] @ g[full:]).double()
    if n:
        blocks = torch.bmm(values[:, :full].view(k, n, QUANT_BLOCK).transpose(0, 1), g[:full].view(n, QUANT_BLOCK, 1))
        beta += blocks[:, :, 0].sum(0, dtype=torch.float64)
    return beta


class _FusedPasses:
    """The two passes of a bf16/int8 projection compiled with ``torch.compile`` for a CUDA GPU (Triton kernels,
    built on first use and cached by torch). On an H100 at K=100 and resnet18's D, one projection took 3.0 ms
    (bf16) and 2.2 ms (int8) against 12.1 and 19.5 ms dequantizing chunks, with a relative error of 1.4-1.7e-7
    against the float64 projection onto the stored rows (chunked: 5e-7).

    A compiler is code this project does not control: each compiled pass is checked once per shape against the
    chunked pass (within ``_FUSED_AGREEMENT``; one chunked projection's time). Where compiling fails (no Triton,
    say) or a check does not hold, ``failure`` says why in one line, and from then on this process takes the
    chunked passes. They take float32 gradients only (they compute in float32; other dtypes' chunked passes compute
    in theirs). Off with ``TORCHDYNAMO_DISABLE=1`` or ``TORCHDYNAMO_SUPPRESS_ERRORS=1``: torch.compile would then
    run the fused functions eagerly (where compiling fails, for the second), widening the whole basis, so they are
    not used at all, nor for more than ``_FUSED_SHAPES // 2`` basis shapes in one process (past torch.compile's
    recompile limit it would run them eagerly too). ``fallbacks`` counts the passes that took the chunked way
    where the compiled one applies (after a failure), so that a run can tell whether the failure concerned it."""

    devices = ("cuda",)
    min_dim = QUANT_BLOCK  # fewer columns: the chunked passes are one small product each

    def __init__(self) -> None:
        self.compiled: tuple[Callable, ...] | None = None
        self.shapes: set[tuple] = set()  # (pass, basis shape, dtype, device, scaled) compiled for
        self.checked: set[tuple] = set()
        self.failure: str | None = None
        self.fallbacks = 0

    def applies(self, basis: Basis, g: torch.Tensor) -> bool:
        if not (g.device.type in self.devices and g.dtype == torch.float32 and basis.dim >= self.min_dim
                and not _compiler_runs_eagerly()):
            return False
        if self.failure is not None:
            self.fallbacks += 1
            return False
        return True

    def run(self, which: int, args: tuple[torch.Tensor | None, ...], chunked: Callable[[], torch.Tensor]
            ) -> torch.Tensor:
        """Pass ``which`` (0: ``fused_coordinates``, 1: ``fused_combine``) of ``args``; ``chunked`` computes the
        same without the compiler."""
        values = args[0]
        assert values is not None
        key = (which, tuple(values.shape), values.dtype, values.device, args[1] is not None)
        if key not in self.shapes:
            if len(self.shapes) >= _FUSED_SHAPES:
                self.failure = (f"more than {_FUSED_SHAPES // 2} basis shapes in one process (torch.compile would "
                                f"recompile past its limit and then run the fused passes eagerly)")
                self.fallbacks += 1
                return chunked()
            self.shapes.add(key)
        try:
            if self.compiled is None:
                self.compiled = (torch.compile(fused_coordinates), torch.compile(fused_combine))
            out = self.compiled[which](*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # any compiler failure: the chunked passes compute the same projection
            self.failure = "torch.compile failed: " + (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0]
            self.fallbacks += 1
            return chunked()
        if key not in self.checked:
            expected = chunked()
            difference = torch.linalg.vector_norm(out.double() - expected.double())
            scale = torch.linalg.vector_norm(expected.double())
            if not difference <= _FUSED_AGREEMENT * scale:  # NaN and inf fail too
                self.failure = (f"the compiled projection pass {which + 1} differed from the chunked one by "
                                f"{(difference / scale).item():.1e} (relative)")
                self.fallbacks += 1
                return expected
            if scale > 0:  # a zero result (a zero gradient) agrees with any kernel that keeps zero: no check
                self.checked.add(key)
        return out


def _compiler_runs_eagerly() -> bool:
    """Whether torch.compile may run a function eagerly without an exception: switched off
    (``TORCHDYNAMO_DISABLE=1``), or told to run eagerly where compiling fails (``TORCHDYNAMO_SUPPRESS_ERRORS=1``)."""
    import torch._dynamo

    config = torch._dynamo.config
    return bool(getattr(config, "disable", False) or getattr(config, "suppress_errors", False))


_FUSED = _FusedPasses()


def compiled_projection_failure() -> str | None:
    """Why this process stopped using the compiled projection passes (one line), or None."""
    return _FUSED.failure


def compiled_projection_fallbacks() -> int:
    """How many projection passes in this process took the chunked way where the compiled one applies (after
    ``compiled_projection_failure``): a run compares the count before and after it."""
    return _FUSED.fallbacks


def quantize(values: torch.Tensor, storage: str, in_place: bool = False) -> Basis:
    """Store a float basis as ``storage``, one row at a time (the only extra memory is one row).

    ``in_place`` writes the narrower entries into ``values``' own memory, which must be contiguous and
    is not to be used afterwards: row i's entries land on bytes that rows before i held (row 0 goes
    through a copy), so nothing is allocated beside the float basis (see ``release_tail``)."""
    dtype = STORAGE_DTYPES[storage]
    if values.dtype == dtype:
        return Basis(values)
    k, d = values.shape
    size = torch.tensor([], dtype=dtype).element_size()
    rows: torch.Tensor | Sequence[torch.Tensor] = values
    if in_place and values.is_contiguous() and size < values.element_size() and k:
        out = values.reshape(-1).view(torch.uint8)[: k * d * size].view(dtype).view(k, d)
        rows = [values[0].clone(), *values[1:]]  # rows 1.. are read before anything lands on them
    else:
        out = torch.empty(values.shape, dtype=dtype, device=values.device)
    if storage != "int8":
        for i, row in enumerate(rows):
            out[i] = row
        return Basis(out)
    scales = torch.empty(k, -(-d // QUANT_BLOCK), dtype=torch.float32, device=values.device)
    scratch = torch.empty(1, d, dtype=torch.float32, device=values.device)  # reused: no fresh pages per row
    for i, row in enumerate(rows):
        _quantize_into(row.float()[None], out[i:i + 1], scales[i:i + 1], scratch)
    return Basis(out, scales)


def _quantize_into(part: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, scratch: torch.Tensor) -> None:
    """Round float32 ``part`` (rows x n, n a multiple of ``QUANT_BLOCK`` except at the end of a row) to int8
    ``values`` with one scale per row and block of ``QUANT_BLOCK`` columns (``scales``: rows x blocks), through
    ``scratch`` (float32, at least ``part``'s shape). Scale: the block's largest magnitude / 127; rounding
    half to even, as ``torch.round``."""
    rows, n = part.shape
    full = n // QUANT_BLOCK * QUANT_BLOCK
    work = scratch[:rows, :n]
    pieces = [(part[:, :full].reshape(rows, -1, QUANT_BLOCK), work[:, :full].view(rows, -1, QUANT_BLOCK))]
    if full < n:
        pieces.append((part[:, full:, None].transpose(1, 2), work[:, full:, None].transpose(1, 2)))
    first = 0
    for piece, buffer in pieces:  # the whole blocks, then the shorter last one
        low, high = piece.amin(dim=2), piece.amax(dim=2)  # two reductions: 6x faster than aminmax
        scale = (torch.maximum(high, -low) / 127.0).clamp_min(1e-30)  # 1/scale finite for all-zero blocks
        scales[:, first:first + scale.shape[1]] = scale
        torch.mul(piece, (1.0 / scale)[:, :, None], out=buffer)
        first += scale.shape[1]
    values.copy_(work.add_(_ROUNDING).sub_(_ROUNDING))  # round half to even, as torch.round (5x faster)


def release_tail(buffer: torch.Tensor, keep: int) -> bool:
    """Give the pages of ``buffer``'s memory past its first ``keep`` bytes back to the system
    (``madvise(MADV_DONTNEED)``: they read as zeros if touched again). False where that is unavailable."""
    page = mmap.PAGESIZE
    begin = buffer.data_ptr()
    start = -(-(begin + keep) // page) * page
    stop = (begin + buffer.numel() * buffer.element_size()) // page * page
    if buffer.device.type != "cpu" or not buffer.is_contiguous() or stop <= start:
        return False
    madvise = _libc_madvise()
    return madvise is not None and madvise(start, stop - start, _MADV_DONTNEED) == 0


def gram_matrix(basis: Basis | torch.Tensor) -> torch.Tensor:
    """``P P^T`` in float64, over cache-sized column chunks (no float64 copy of the basis); only the blocks
    on and below the diagonal are computed (``_add_lower_gram``), the rest mirrored."""
    return gram_and_coordinates(basis)[0]


def gram_and_coordinates(basis: Basis | torch.Tensor,
                         vector: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``P P^T`` (as ``gram_matrix``) and the coordinates ``P w`` of ``vector`` (as ``Basis.coordinates``;
    None without a vector), both float64, in one pass over the basis."""
    basis = basis if isinstance(basis, Basis) else Basis(basis)
    gram = torch.zeros(basis.rank, basis.rank, dtype=torch.float64, device=basis.device)
    beta = None if vector is None else torch.zeros(basis.rank, dtype=torch.float64, device=basis.device)
    v = None if vector is None else vector.reshape(-1)
    for cols, part in basis.column_chunks(torch.float64, reuse=True):
        _add_lower_gram(part, gram)
        if beta is not None and v is not None:
            beta += part @ v[cols].to(device=basis.device, dtype=torch.float64)
    return _symmetric(gram), beta


def distance_from_identity(gram: torch.Tensor) -> float:
    """max |G - I|."""
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()


def orthonormality_error(basis: Basis | torch.Tensor) -> float:
    """max |P P^T - I| computed in float64 (``gram_matrix``)."""
    return distance_from_identity(gram_matrix(basis))


# ---------------------------------------------------------------------------------------------
# Building it


class BasisBuilder:
    """Streamed orthonormalisation of flattened checkpoints, in order.

    ``push`` copies a vector into the next free row of the basis buffer. Every ``block`` pushes the
    pending rows are *prepared* (on a worker thread with ``background``): each raw row is replaced by
    its difference from the previous vector, and, until the first orthogonalisation, the Gram matrix
    of the difference rows is accumulated (float32 GEMMs over cache-sized column chunks, summed in
    float64), with the row norms and the float64 sum of the raw vectors in the same pass. ``flush``
    (called by ``mean``/``finish``/``add_many``) orthogonalises everything prepared:

    * fast path, the whole build at once when nothing was orthogonalised before: the in-order Cholesky
      factor ``L`` of the streamed Gram matrix decides the kept vectors, and one chunked pass computes
      ``Q = L^-1 E A`` together with ``Q Q^T``; a second Cholesky-QR follows only if that Gram matrix is
      not within ``_ORTHONORMAL_ENOUGH`` of the identity (CholQR2, Yamamoto et al. 2015);
    * general path (a vector the Gram matrix cannot decide, or incremental ``add_many``): blocks of
      ``block`` vectors, block classical Gram-Schmidt twice against the finished rows with Cholesky-QR
      inside the block ("BCGS2 + CholQR2", Barlow & Smoktunowicz 2013).

    Dependence is decided as the one-by-one build decides it: vector j is dropped when its residual
    against the span of the kept vectors is at most ``rtol * |w_j|``. The residual of w_j equals the
    residual of ``w_j - w_lk`` (lk: the last kept vector), i.e. of the sum of the differences since
    lk (the rows ``E`` combines), so dropped vectors accumulate into the next one.

    ``r`` records the coefficients: kept checkpoint j equals ``sum_i r[i, j] * P[i]``, i.e.
    ``W_kept^T = P^T R`` with R upper triangular. That maps coordinates in the orthonormal basis back
    to coefficients over the original checkpoints.

    Args:
        capacity: the most vectors that will be added (the buffer is preallocated, no per-add copies).
        rtol: relative residual below which a vector counts as linearly dependent.
        dtype: working and storage dtype of the rows (float32, or float64 for reference builds).
        block: vectors prepared together, and the block size of the general path.
        track_mean: keep the float64 sum of the pushed vectors.
        reduce: applied to every float64 inner-product matrix (and the squared row norms) before use;
            identity by default. A column-sharded build passes a sum over the shards (an all-reduce), so
            every shard sees the inner products of the whole vectors and takes the same decisions.
        background: prepare full blocks on a worker thread while the caller pushes the next ones.
        threads: threads sharing the chunked passes (default: torch's thread count), each running one
            thread per operation, so the results are bit-identical for any count, with or without
            ``background``.
    """

    def __init__(self, capacity: int, rtol: float = DEFAULT_RANK_RTOL, dtype: torch.dtype = torch.float32,
                 block: int = 16, track_mean: bool = False,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, background: bool = False,
                 threads: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.rtol = rtol
        self.dtype = dtype
        self.block = max(1, block)
        self.track_mean = track_mean
        self._reduce = reduce
        self._rows: torch.Tensor | None = None  # raw vector -> difference (prepared) -> basis row (processed)
        self._populated: Callable[[], None] = _nothing  # waits for the thread mapping the rows' pages
        self._previous: torch.Tensor | None = None  # the last prepared raw vector
        self._sum: torch.Tensor | None = None
        self._gram = torch.zeros(capacity, capacity, dtype=torch.float64)  # of the difference rows (fast path)
        self._norms = torch.zeros(capacity, dtype=torch.float64)  # of the raw vectors
        self._prepared = 0
        self._processed = 0
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None  # dropped rows owed to the next vector
        self._r_columns: list[torch.Tensor] = []
        self._pending = 0
        self._flags: list[bool] = []
        self.kept: list[int] = []
        self.dropped: list[int] = []
        self.seen = 0
        self.rounds = 0
        self._background = background
        # threads - 1 workers share the chunked passes with the caller (one with ``background`` at least,
        # which prepares blocks while the caller reads)
        self._workers = _Workers(max(int(background), (threads or torch.get_num_threads()) - 1))
        self._running: tuple[_Job, list[Future]] | None = None

    # -- input ------------------------------------------------------------------------------

    def push(self, vector: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy ``vector`` (or the concatenation of several tensors, flattened) into the next free row;
        prepare the block when it is full. The parts are copied straight into the row: no flat copy."""
        parts = [vector] if isinstance(vector, torch.Tensor) else list(vector)
        parts = [t.detach().reshape(-1) for t in parts]

        def copy(row: torch.Tensor) -> None:
            offset = 0
            for t in parts:
                row[offset:offset + t.numel()].copy_(t)
                offset += t.numel()

        self.push_with(sum(t.numel() for t in parts), copy)

    def push_with(self, size: int, fill: Callable[[torch.Tensor], None]) -> None:
        """Let ``fill`` write the next vector (``size`` entries) into its row, e.g. straight from a file;
        prepare the block when it is full."""
        if self.seen >= self.capacity:
            raise ValueError(f"more than capacity={self.capacity} vectors added")
        if self._rows is None:
            self._rows, self._populated = _preallocated(self.capacity, size, self.dtype, background=True)
        elif size != self._rows.shape[1]:
            raise ValueError(f"vector {self.seen} has {size} entries, expected {self._rows.shape[1]}")
        fill(self._rows[self.seen])  # rows of earlier blocks are compacted when processed
        self._pending += 1
        self.seen += 1
        if self._pending == self.block:
            self._stage(wait=False)

    def add(self, vector: torch.Tensor) -> bool:
        """Orthogonalise ``vector`` against the basis so far and append it if independent."""
        return self.add_many([vector])[0]

    def add_many(self, vectors: list[torch.Tensor]) -> list[bool]:
        """Push a list and process it; returns, per vector, whether it was kept."""
        self.flush()
        start = len(self._flags)
        for v in vectors:
            self.push(v)
        self.flush()
        return self._flags[start:]

    def flush(self) -> None:
        """Prepare the pending rows and orthogonalise every prepared vector. Errors of a background
        block are raised here (or by the next block's preparation)."""
        self._stage(wait=True)
        if self._processed < self._prepared:
            self._process(self._processed, self._prepared - self._processed)
            self._processed = self._prepared

    def _stage(self, wait: bool) -> None:
        """Prepare the pending rows: the workers start on them, and the caller takes the chunks left when
        it next waits (at once with ``wait`` or without ``background``)."""
        self._wait()  # blocks are prepared in order: the next one differences against this one
        b, self._pending = self._pending, 0
        if b and self._rows is not None:
            first, self._prepared = self._prepared, self._prepared + b
            job = self._preparation(first, b)
            self._running = (job, self._workers.start(job.work))
            if wait or not self._background:
                self._wait()

    def _wait(self) -> None:
        """Finish the block being prepared, taking its remaining chunks on this thread too."""
        if self._running is not None:
            (job, running), self._running = self._running, None
            _finish(job, running)

    def close(self) -> None:
        """Stop the workers (after the block they are preparing, if any) and the page-mapping thread."""
        self._workers.shutdown()
        self._populated()
        self._running = None

    def _preparation(self, first: int, b: int) -> _Job:
        """One pass over column chunks of rows ``first .. first+b``: the float64 sum and the norms of the
        raw vectors, consecutive differences in place, and (before the first orthogonalisation) their
        inner products with every row so far. The chunks are independent: whichever thread is free takes
        the next one, and the per-chunk products are summed in chunk order, so the result does not
        depend on who did what.

        Differences of nearby checkpoints are exact in float32 (Sterbenz) and, along a trajectory, far
        better conditioned than the checkpoints or their differences from one anchor, so a single
        Cholesky-QR of their Gram matrix is usually orthonormal to float32 precision.
        """
        assert self._rows is not None
        rows, n = self._rows[first:first + b], first + b
        gram = self._processed == 0  # afterwards the earlier rows are basis rows: the general path needs none
        if self._previous is None:
            self._previous = torch.empty(rows.shape[1], dtype=self.dtype)
        if self.track_mean and self._sum is None:
            self._sum = torch.zeros(rows.shape[1], dtype=torch.float64)
        step = max(1024, (1 << 21) // max(1, n if gram else b))  # the chunk of every row so far: ~8 MB
        chunks = list(_chunks(rows.shape[1], step))
        squares: list[torch.Tensor | None] = [None] * len(chunks)  # the raw rows' squared norms
        products: list[torch.Tensor | None] = [None] * len(chunks)  # with every row so far (gram)

        def chunk(index: int) -> None:
            cols = chunks[index]
            part = rows[:, cols]
            if self._sum is not None:  # numpy sums the float32 rows exactly into float64, no float64 copy
                total = self._sum[cols].numpy()
                np.add(total, part.numpy().sum(axis=0, dtype=np.float64), out=total)
            squares[index] = torch.linalg.vector_norm(part, dim=1).to(torch.float64).square()
            last = part[-1].clone()
            _differences_in_place(part)
            if first:
                part[0] -= self._previous[cols]
            self._previous[cols] = last
            if gram:
                products[index] = _dot(part, self._rows[:n, cols])

        def complete() -> None:  # the chunks' partial results summed in chunk order: deterministic
            norms2 = torch.stack(squares).sum(0) if chunks else torch.zeros(b, dtype=torch.float64)
            if self._reduce is not None:
                norms2 = self._reduce(norms2)
            bad = (~torch.isfinite(norms2)).nonzero()
            if len(bad):
                raise NonFiniteVector(first + int(bad[0]))
            self._norms[first:n] = norms2.sqrt()
            if gram:
                total = torch.stack(products).sum(0) if chunks else torch.zeros(b, n, dtype=torch.float64)
                if self._reduce is not None:
                    total = self._reduce(total)
                self._gram[first:n, :n] = total
                self._gram[:n, first:n] = total.T

        return _Job(len(chunks), chunk, complete)

    def _process(self, first: int, b: int) -> None:
        """Orthogonalise the prepared vectors ``first .. first+b`` against the finished rows, in rounds.

        A round takes a window of vectors (all of them on the fast path, else at most ``block``), makes
        them orthogonal to the finished rows once, and runs the in-order Cholesky of their Gram matrix.
        The prefix of vectors it resolves is finished; the rest of the window, from the first vector too
        close to the ones before it for the Gram matrix to decide, starts the next round.
        """
        assert self._rows is not None
        tol = self.rtol * self._norms[first:first + b]
        zero = self._norms[first:first + b] == 0
        fast = self._processed == 0 and first == 0 and self._carry is None
        done, size, coeffs = 0, 0, torch.zeros(0, 0, dtype=torch.float64)
        while done < b:
            k = len(self.kept)
            if size == 0:  # open a new window
                size = b if fast else min(self.block, b - done)
                coeffs = torch.zeros(k, size, dtype=torch.float64)
                if self._carry is not None:
                    vector, offset = self._carry
                    self._rows[first + done] += vector
                    coeffs[: len(offset), 0] = offset
                    self._carry = None
            y, p = self._rows[first + done:first + done + size], self._rows[:k]
            if fast:
                gram = self._gram[:size, :size]
            else:
                c = self._dot(p, y)
                _subtract(y, c, p)
                coeffs = torch.cat([coeffs, torch.zeros(k - coeffs.shape[0], size, dtype=torch.float64)]) + c
                gram = self._dot(y, y)
            chol = _cholesky_in_order(gram, tol[done:done + size], zero[done:done + size])
            self.rounds += 1
            stop = chol.stop
            if chol.owed:  # dropped after the last kept one: their rows belong to the next vector
                owed = (y[chol.owed].sum(0), coeffs[:, chol.owed].sum(1))
                if stop < size:
                    y[stop] += owed[0]
                    coeffs[:, stop] += owed[1]
                elif first + done + size < self.capacity:
                    self._carry = owed
            self._finish_prefix(k, y[:stop], chol, coeffs[:, :stop], first + done)
            done, size, coeffs = done + stop, size - stop, coeffs[:, stop:]
            if fast and size:  # the rest, which the streamed Gram matrix could not decide: general path
                fast, size = False, 0

    def _dot(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``p @ y^T`` in float64, summed over the shards when the build is sharded."""
        out = _dot(p, y)
        return out if self._reduce is None or out.numel() == 0 else self._reduce(out)

    def _finish_prefix(self, k: int, y: torch.Tensor, chol: _InOrder, c1: torch.Tensor, first: int) -> None:
        """Cholesky-QR of the kept combinations of ``y`` (already once against the old rows), a second
        pass against the old rows, and a second Cholesky-QR unless the rows are orthonormal already; the
        kept rows land at ``k..k+m`` and their R columns are recorded."""
        assert self._rows is not None
        keep, m = chol.keep, len(chol.keep)
        combine = chol.combine[:, : y.shape[0]]  # combinations only reach back, never past the prefix
        if m:
            rows = self._rows
            eye = torch.eye(m, dtype=torch.float64)
            t1 = torch.linalg.solve_triangular(chol.lower, combine, upper=False)  # L^-1 E
            q, p = rows[k:k + m], rows[:k]
            gram2 = _transform(y, t1, q, gram=k == 0, workers=self._workers)  # Q1 = L^-1 E Y, compacted to rows k..k+m
            c2 = self._dot(p, q)
            if k:
                _subtract(q, c2, p)
                gram2 = self._dot(q, q)
            elif self._reduce is not None:
                gram2 = self._reduce(gram2)
            if (gram2 - eye).abs().max() <= _ORTHONORMAL_ENOUGH:  # the second Cholesky-QR would change nothing
                lower2 = eye
            else:
                lower2 = torch.linalg.cholesky(gram2)
                _transform(q, torch.linalg.solve_triangular(lower2, eye, upper=False), q, workers=self._workers)
            old = c1 @ combine.T + c2 @ chol.lower.T  # k x m: coefficients on the old rows
            new = chol.lower @ lower2  # m x m lower triangular: on this prefix's new rows
        for j in range(y.shape[0]):
            kept = j in keep
            self._flags.append(kept)
            if kept:  # w_j = w_lk + (the kept combination): its coordinates add to those of w_lk
                t = keep.index(j)
                column = torch.cat([old[:, t], new[t, : t + 1]])
                if self._r_columns:
                    previous = self._r_columns[-1]
                    column[: len(previous)] += previous
                self._r_columns.append(column)
                self.kept.append(first + j)
            else:
                self.dropped.append(first + j)

    # -- output -------------------------------------------------------------------------------

    def mean(self) -> torch.Tensor:
        """float64 mean of every vector pushed so far (kept or dropped); needs ``track_mean``."""
        self._stage(wait=True)
        if self._sum is None:
            raise ValueError("the builder was created without track_mean=True, or nothing was pushed")
        return self._sum / self.seen

    def finish(self, storage: str | None = None) -> Subspace:
        """Return the finished subspace, its basis stored as ``storage`` (default: the working dtype)."""
        try:
            self.flush()
        finally:
            self.close()
        k = len(self.kept)
        if k == 0 or self._rows is None:
            raise ValueError("no independent vectors were added")
        r = torch.zeros(k, k, dtype=torch.float64)
        for j, col in enumerate(self._r_columns):
            r[: len(col), j] = col
        buffer, values = self._rows, self._rows[:k]  # a view: the basis is never copied
        self._rows = self._previous = None
        name = storage or next(n for n, dt in STORAGE_DTYPES.items() if dt == self.dtype)
        basis = quantize(values, name, in_place=True)  # bf16/int8: written over the float32 rows
        release_tail(buffer, basis.values.numel() * basis.values.element_size())  # dropped rows, rounded-away bytes
        return Subspace(basis=basis, r=r, kept=tuple(self.kept), dropped=tuple(self.dropped), total=self.seen)


class _Job:
    """``count`` independent pieces of work, ``run(i)`` each, taken in turn by every thread that calls
    ``work`` (taking the next index is atomic under the GIL); ``complete`` runs once all are done."""

    def __init__(self, count: int, run: Callable[[int], None], complete: Callable[[], None]) -> None:
        self._next = itertools.count()
        self._count = count
        self._run = run
        self.complete = complete

    def work(self) -> None:
        while (index := next(self._next)) < self._count:
            self._run(index)


class _Workers:
    """``count`` threads (possibly none) that share chunked jobs with the caller, each running one thread
    per operation."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="twa-basis",
                                        initializer=_one_thread_from_now_on) if count else None
        if self._pool is not None:  # start them all now, then restore the process-wide default they changed
            caller, started = torch.get_num_threads(), threading.Barrier(count)
            try:
                for future in [self._pool.submit(started.wait) for _ in range(count)]:
                    future.result()
            except BaseException:  # a thread that could not start ("can't start new thread" at a limit): the ones
                started.abort()  # that did would wait at the barrier forever, and the exit would join them
                self.shutdown()
                raise
            finally:
                torch.set_num_threads(caller)

    def start(self, work: Callable[[], None]) -> list[Future]:
        return [self._pool.submit(work) for _ in range(self.count)] if self._pool is not None else []

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _one_thread_from_now_on() -> None:
    """Torch operations of this (new) thread on one thread. Torch initialises a thread's count from the
    process-wide default at its first operation, so that happens first, or it would undo the setting."""
    torch.get_num_threads()
    torch.set_num_threads(1)


@contextmanager
def _one_thread_per_operation() -> Iterator[None]:
    """Torch operations of this thread on one thread (OpenMP and MKL keep the count per thread)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _finish(job: _Job, running: list[Future]) -> None:
    """Take ``job``'s remaining pieces on this thread, wait for the workers' ones, then complete it."""
    try:
        with _one_thread_per_operation():
            job.work()
    finally:
        for future in running:
            future.result()
    job.complete()


def _shared(job: _Job, workers: _Workers | None) -> None:
    """Run ``job`` on this thread and ``workers`` together."""
    _finish(job, workers.start(job.work) if workers is not None else [])


@dataclass(frozen=True)
class _InOrder:
    """Result of ``_cholesky_in_order``: kept indices, the lower factor over their combinations, the
    combinations (``combine[t]`` sums the rows since the previous kept vector), where it stopped, and
    the dropped indices after the last kept one (owed to the next vector)."""

    keep: list[int]
    lower: torch.Tensor
    combine: torch.Tensor
    stop: int
    owed: list[int]


def _cholesky_in_order(gram: torch.Tensor, tol: torch.Tensor, zero: torch.Tensor) -> _InOrder:
    """Cholesky of a window's Gram matrix in order, deciding each vector as the one-by-one build would.

    Row j stands for ``w_j - w_lk``: the sum of itself and the rows dropped since the last kept vector.
    It is dropped if its residual is at most ``tol[j]`` (or the vector is zero). ``stop`` is the first
    vector whose pivot is below ``_GRAM_PIVOT_FLOOR`` of its norm (too close to the vectors before it for
    the Gram matrix, accurate to ~1e-7 relative, to decide), or the window size.
    """
    b = gram.shape[0]
    keep: list[int] = []
    lower = torch.zeros(b, b, dtype=torch.float64)
    combine = torch.zeros(b, b, dtype=torch.float64)
    owed: list[int] = []
    for j in range(b):
        e = torch.zeros(b, dtype=torch.float64)
        e[[j, *owed]] = 1
        products = gram @ e  # <row i, combination j> for every row i of the window
        norm2 = e @ products
        if zero[j] or norm2.clamp_min(0).sqrt() <= tol[j]:  # dependent on the old rows alone (accurate)
            owed.append(j)
            continue
        m = len(keep)
        row = torch.linalg.solve_triangular(lower[:m, :m], (combine[:m] @ products)[:, None], upper=False)[:, 0] \
            if m else torch.zeros(0, dtype=torch.float64)
        pivot2 = norm2 - row @ row
        if pivot2 < (_GRAM_PIVOT_FLOOR ** 2) * norm2:
            return _InOrder(keep, lower[:m, :m].clone(), combine[:m].clone(), j, owed)
        if pivot2.sqrt() <= tol[j]:  # dependent on the old rows and the window's kept vectors
            owed.append(j)
            continue
        lower[m, :m] = row
        lower[m, m] = pivot2.sqrt()
        combine[m] = e
        keep.append(j)
        owed = []
    m = len(keep)
    return _InOrder(keep, lower[:m, :m].clone(), combine[:m].clone(), b, owed)


@dataclass(frozen=True)
class Subspace:
    """Orthonormal basis ``basis`` (k x D) of the span of the kept checkpoints."""

    basis: Basis
    r: torch.Tensor
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    total: int

    @property
    def rank(self) -> int:
        return self.basis.rank

    def coordinates(self, vector: torch.Tensor) -> torch.Tensor:
        """Coordinates ``beta = P w`` of a vector in the orthonormal basis (float64)."""
        return self.basis.coordinates(vector)

    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection ``P^T (P g)`` onto the span, in the vector's dtype."""
        return self.basis.project(vector)

    def checkpoint_coefficients(self, vector: torch.Tensor) -> torch.Tensor:
        """Coefficients a over all ``total`` checkpoints with ``vector ~= sum_i a_i w_i``.

        Dropped (dependent) checkpoints get coefficient 0; the kept ones absorb their share.
        """
        return self.coefficients_at(self.coordinates(vector))

    def coefficients_at(self, beta: torch.Tensor) -> torch.Tensor:
        """``checkpoint_coefficients`` of the vector whose coordinates ``beta`` already are."""
        beta = beta.cpu()
        a_kept = torch.linalg.solve_triangular(self.r, beta[:, None], upper=True)[:, 0]
        a = torch.zeros(self.total, dtype=torch.float64)
        a[list(self.kept)] = a_kept
        return a


def build_subspace(vectors: list[torch.Tensor], rtol: float = DEFAULT_RANK_RTOL,
                   dtype: torch.dtype = torch.float32, block: int = 16, storage: str | None = None) -> Subspace:
    """Convenience: orthonormalise a list of flat vectors in order."""
    builder = BasisBuilder(capacity=len(vectors), rtol=rtol, dtype=dtype, block=block)
    for v in vectors:
        builder.push(v)
    return builder.finish(storage)


# ---------------------------------------------------------------------------------------------
# Building it by column blocks: the vectors stay where they are (files in the page cache)

#: Reads columns ``cols`` of vector ``index`` into ``out`` (a contiguous float32 row); called from
#: several threads at once.
ColumnReader = Callable[[int, slice, torch.Tensor], None]


@dataclass(frozen=True)
class ColumnBuild:
    """The result of ``build_by_columns``: the subspace and the float64 mean of all the vectors."""

    subspace: Subspace
    mean: torch.Tensor


def column_block(count: int) -> int:
    """Columns per block of ``build_by_columns``: a multiple of ``QUANT_BLOCK``, about 16 MB of rows."""
    return max(QUANT_BLOCK, (1 << 22) // max(1, count) // QUANT_BLOCK * QUANT_BLOCK)


def build_by_columns(count: int, dim: int, read: ColumnReader, storage: str = "float32",
                     rtol: float = DEFAULT_RANK_RTOL, threads: int | None = None, block: int | None = None,
                     on_pass: Callable[[str], None] | None = None) -> ColumnBuild | None:
    """The fast path of ``BasisBuilder`` without ever holding the vectors: passes over blocks of columns,
    each reading that block of every vector (``read``), so memory is the finished basis, in its storage
    format, plus one block of rows per thread. The vectors are read two or three times.

    1. Gram matrix of the consecutive differences (and the norms and float64 mean of the vectors).
       The in-order Cholesky factor ``L`` decides the kept vectors, as ``BasisBuilder`` does.
    2. ``Q1 = L^-1 E A`` per block, its Gram matrix accumulated, and ``Q1`` stored (rounded to
       ``storage``: float32, bf16, or int8 with the per-row, per-``QUANT_BLOCK`` scales of ``quantize``).
    3. Only when ``Q1 Q1^T`` is not within ``_ORTHONORMAL_ENOUGH`` of the identity: ``Q = L2^-1 Q1``
       (CholQR2), recomputing ``Q1`` block by block, and stored over it.

    Returns None when the Gram matrix cannot decide a vector (too close to the ones before it: a pivot
    below ``_GRAM_PIVOT_FLOOR``); ``BasisBuilder``'s general path, which holds the rows, is needed then.
    Raises ``NonFiniteVector`` (a ``ValueError``) like ``BasisBuilder``. The blocks are shared by
    the caller and ``threads - 1`` workers (at least one, as ``BasisBuilder`` with ``background``: while
    one thread waits for a read, the other computes), one torch thread per operation, and every partial
    result is summed in block order: the result does not depend on ``threads``.
    """
    if storage not in ("float32", "bf16", "int8"):
        raise ValueError(f"storage {storage!r}: build_by_columns stores float32, bf16 or int8")
    width = block or column_block(count)
    if width % QUANT_BLOCK:
        raise ValueError(f"block={width} is not a multiple of QUANT_BLOCK={QUANT_BLOCK}")
    blocks = list(_chunks(dim, width))
    workers = _Workers(max(1, (threads or torch.get_num_threads()) - 1))  # as BasisBuilder: reader + worker
    buffers: dict[tuple[int, str], torch.Tensor] = {}  # per thread: the rows, and Q1 / Q

    def buffer(name: str, rows: int, n: int) -> torch.Tensor:
        key = (threading.get_ident(), name)
        if key not in buffers:
            buffers[key] = torch.empty(rows, min(width, dim), dtype=torch.float32)
        return buffers[key][:rows, :n]

    def differences(cols: slice, raw: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """This thread's rows buffer holding the block's consecutive differences (``raw`` sees it before)."""
        x = buffer("rows", count, cols.stop - cols.start)
        for i in range(count):
            read(i, cols, x[i])
        if raw is not None:
            raw(x)
        _differences_in_place(x)
        return x

    def run(job: Callable[[int], None], name: str) -> None:
        _shared(_Job(len(blocks), job, lambda: None), workers)
        if on_pass is not None:
            on_pass(name)

    try:
        mean = torch.empty(dim, dtype=torch.float64)
        squares, grams = _OrderedSum((count,)), _OrderedSum((count, count))

        def gram_pass(index: int) -> None:
            cols = blocks[index]

            def raw(x: torch.Tensor) -> None:  # numpy sums float32 into float64 exactly, no float64 copy
                x.numpy().sum(axis=0, dtype=np.float64, out=mean[cols].numpy())
                squares.add(index, torch.linalg.vector_norm(x, dim=1).to(torch.float64).square())

            x = differences(cols, raw)
            total = torch.zeros(count, count, dtype=torch.float64)
            _add_lower_gram(x, total)
            grams.add(index, total)

        run(gram_pass, "gram")
        norms = squares.total.sqrt()
        bad = (~torch.isfinite(norms)).nonzero()
        if len(bad):
            raise NonFiniteVector(int(bad[0]))
        mean /= count
        gram = _symmetric(grams.total)
        chol = _cholesky_in_order(gram, rtol * norms, norms == 0)
        if chol.stop < count:
            return None
        keep, m = chol.keep, len(chol.keep)
        if m == 0:
            raise ValueError("no independent vectors were added")
        t1 = torch.linalg.solve_triangular(chol.lower, chol.combine, upper=False).to(torch.float32)  # L^-1 E
        steps1 = _staircase(t1)
        values, _ = _preallocated(m, dim, STORAGE_DTYPES[storage])
        scales = torch.empty(m, -(-dim // QUANT_BLOCK), dtype=torch.float32) if storage == "int8" else None

        def store(q: torch.Tensor, cols: slice) -> None:
            if scales is None:
                values[:, cols].copy_(q)
            else:
                first = cols.start // QUANT_BLOCK
                _quantize_into(q, values[:, cols], scales[:, first:first + -(-q.shape[1] // QUANT_BLOCK)],
                               buffer("scratch", m, q.shape[1]))

        def first_transform(cols: slice) -> torch.Tensor:
            q1 = buffer("q1", m, cols.stop - cols.start)
            _apply_staircase(t1, steps1, differences(cols), q1)
            return q1

        grams2 = _OrderedSum((m, m))

        def orthonormal_pass(index: int) -> None:
            q1 = first_transform(blocks[index])
            total = torch.zeros(m, m, dtype=torch.float64)
            _add_lower_gram(q1, total)
            grams2.add(index, total)
            store(q1, blocks[index])

        run(orthonormal_pass, "orthonormal")
        gram2 = _symmetric(grams2.total)
        eye = torch.eye(m, dtype=torch.float64)
        lower2 = eye
        if (gram2 - eye).abs().max() > _ORTHONORMAL_ENOUGH:
            lower2 = torch.linalg.cholesky(gram2)
            t2 = torch.linalg.solve_triangular(lower2, eye, upper=False).to(torch.float32)
            steps2 = _staircase(t2)

            def second_pass(index: int) -> None:
                cols = blocks[index]
                q = buffer("q", m, cols.stop - cols.start)
                _apply_staircase(t2, steps2, first_transform(cols), q)
                store(q, cols)

            run(second_pass, "second")
    finally:
        workers.shutdown()
    r = torch.cumsum((chol.lower @ lower2).T, dim=1)  # kept j = (kept j-1) + (its combination), as BasisBuilder
    dropped = tuple(j for j in range(count) if j not in set(keep))
    subspace = Subspace(basis=Basis(values, scales), r=r, kept=tuple(keep), dropped=dropped, total=count)
    return ColumnBuild(subspace=subspace, mean=mean)
