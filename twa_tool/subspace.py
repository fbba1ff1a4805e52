"""Pure tensor math of the TWA subspace: orthonormal basis of the checkpoints' span, projection, coefficients.

Only depends on torch. The basis is built as the checkpoints stream in, a block at a time, inside
the one preallocated ``capacity x D`` buffer that becomes the basis: a checkpoint is copied into its
row and orthogonalised there, so peak memory is the basis plus one checkpoint, never the K
checkpoints and the basis at once.

Numerics. The reference implementation runs single-pass classical Gram-Schmidt in float32, which
loses orthogonality completely on a correlated training trajectory (max|P P^T - I| ~ 1, see
``benchmarks/basis_bench.py``). Here every block of checkpoints is orthogonalised twice against the
rows so far and twice within itself (block classical Gram-Schmidt with Cholesky-QR inside the block,
"BCGS2 + CholQR2": two passes are enough for a numerically full-rank block, Giraud et al. 2005;
Barlow & Smoktunowicz 2013). All bulk arithmetic is float32 matrix-matrix products over the basis
(BLAS-3, no float64 copies of it); the small k x b coefficient matrices are accumulated in float64
over column chunks. A block whose vectors are close to dependent on each other (a within-block
pivot below 1% of the vector's residual, where the Gram matrix cannot decide reliably) is
orthogonalised vector by vector instead (CGS2), which decides linear dependence exactly as the
one-by-one build: a vector whose residual is below ``rtol`` times its own norm is dropped.

Storage. The finished basis can be kept as float32, bfloat16 or int8 (per row and per block of
``QUANT_BLOCK`` columns scaled, as the TWA journal version's low-bit P): 4, 2 or ~1 bytes per entry.
The low-precision bases are built in float32 and rounded once at the end; their rows are orthonormal
to the rounding error of the format (documented in ``STORAGE_TOLERANCE``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

#: A checkpoint whose residual after projecting out the previous ones is below this fraction of its
#: own norm is linearly dependent on them (duplicates, exact combinations, float32 rounding noise).
DEFAULT_RANK_RTOL = 1e-5

#: Columns sharing one int8 scale per row.
QUANT_BLOCK = 4096

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
#: float64 projection onto the exact span. Tests hold these; measured values are far below them.
STORAGE_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "bf16": 4e-3, "int8": 1e-2}
PROJECTION_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 1e-6, "bf16": 1e-2, "int8": 5e-2}

#: A within-block Cholesky pivot below this fraction of the vector's residual norm sends the block to
#: the vector-by-vector path (the Gram matrix, accurate to ~1e-7 relative, cannot resolve it).
_GRAM_PIVOT_FLOOR = 1e-2

#: After the second pass, a prefix whose Gram matrix is this close to the identity skips the second
#: Cholesky-QR (one pass over its rows less); well below the float32 basis's 1e-5 bound.
_ORTHONORMAL_ENOUGH = 1e-6

#: Columns per chunk of the float64-accumulated products (k x chunk float32 GEMMs).
_CHUNK = 1 << 18


def _chunks(d: int, step: int | None = None) -> Iterator[slice]:
    step = step or _CHUNK
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def _dot(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p @ y^T`` (rows x b) in float64: float32 GEMMs over column chunks, chunk results summed in float64."""
    out = torch.zeros(p.shape[0], y.shape[0], dtype=torch.float64, device=p.device)
    if p.shape[0] == 0:
        return out
    for cols in _chunks(p.shape[1]):
        out += (p[:, cols] @ y[:, cols].T).to(torch.float64)
    return out


def _subtract(y: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> None:
    """``y -= c^T p`` in place, one BLAS-3 call in the working dtype."""
    if p.shape[0]:
        y.addmm_(c.T.to(y.dtype), p, alpha=-1)


def _transform(y: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
    """``out = t @ y`` chunk by chunk (``out`` may overlap ``y``: each chunk is computed before written),
    through one reused chunk buffer (a fresh large temporary per chunk costs more in page faults)."""
    t = t.to(y.dtype)
    step = 4 * _CHUNK
    buffer = torch.empty(t.shape[0], min(step, y.shape[1]), dtype=y.dtype)
    for cols in _chunks(y.shape[1], step):
        part = buffer[:, : cols.stop - cols.start]
        torch.matmul(t, y[:, cols], out=part)
        out[:, cols].copy_(part)


def _widen(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values.to(dtype)``; bfloat16 on the CPU goes through numpy (a bfloat16 is the top half of a
    float32, so a 16-bit shift is exact), several times faster than CPU torch's conversion."""
    if values.dtype != torch.bfloat16 or values.device.type != "cpu":
        return values.to(dtype)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    widened = np.left_shift(bits, 16, dtype=np.uint32)
    return torch.from_numpy(widened.view(np.float32)).to(dtype)


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

    def chunk(self, cols: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Columns ``cols`` of the basis in ``dtype`` (dequantized for int8); ``cols.start`` a multiple of
        QUANT_BLOCK for int8."""
        part = _widen(self.values[:, cols], dtype)
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

    def column_chunks(self, dtype: torch.dtype, step: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(cols, chunk)`` over all columns; a dense basis already in ``dtype`` is one chunk, no copy.

        Other chunks are about a million entries (``step`` columns; default: cache-sized for the rank),
        converted or dequantized on the fly.
        """
        if self.scales is None and self.values.dtype == dtype:
            yield slice(0, self.dim), self.values
            return
        step = step or (1 << 20) // max(1, self.rank)
        step = max(QUANT_BLOCK, step // QUANT_BLOCK * QUANT_BLOCK)
        for cols in _chunks(self.dim, step):
            yield cols, self.chunk(cols, dtype)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection ``P^T (P g)`` in ``g``'s dtype: two passes over the basis."""
        if self.scales is None and self.values.dtype == g.dtype:
            return self.values.T @ (self.values @ g)
        beta = torch.zeros(self.rank, dtype=g.dtype, device=g.device)
        for cols, part in self.column_chunks(g.dtype):
            beta += part @ g[cols]
        out = torch.empty_like(g)
        for cols, part in self.column_chunks(g.dtype):
            out[cols] = part.T @ beta
        return out

    def coordinates(self, vector: torch.Tensor) -> torch.Tensor:
        """``beta = P w`` in float64 (chunked: the basis is never copied whole to float64)."""
        v = vector.reshape(-1)
        beta = torch.zeros(self.rank, dtype=torch.float64, device=self.device)
        for cols, part in self.column_chunks(torch.float64, step=(1 << 22) // max(1, self.rank)):
            beta += part @ v[cols].to(device=self.device, dtype=torch.float64)
        return beta

    def combine(self, beta: torch.Tensor) -> torch.Tensor:
        """``P^T beta`` in float64."""
        out = torch.empty(self.dim, dtype=torch.float64, device=self.device)
        beta = beta.to(device=self.device, dtype=torch.float64)
        for cols, part in self.column_chunks(torch.float64, step=(1 << 22) // max(1, self.rank)):
            out[cols] = part.T @ beta
        return out


def quantize(values: torch.Tensor, storage: str) -> Basis:
    """Store a float basis as ``storage``, one row at a time (the only extra memory is one row)."""
    dtype = STORAGE_DTYPES[storage]
    if values.dtype == dtype:
        return Basis(values)
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    if storage != "int8":
        for i, row in enumerate(values):
            out[i] = row
        return Basis(out)
    k, d = values.shape
    blocks, full = -(-d // QUANT_BLOCK), d // QUANT_BLOCK * QUANT_BLOCK
    scales = torch.empty(k, blocks, dtype=torch.float32, device=values.device)
    for i, row in enumerate(values):
        parts = [row[:full].view(-1, QUANT_BLOCK)] + ([row[full:].view(1, -1)] if full < d else [])
        start, first = 0, 0
        for part in parts:  # the whole blocks, then the shorter last one
            low, high = torch.aminmax(part.float(), dim=1)
            scale = (torch.maximum(high, -low) / 127.0).clamp_min(1e-30)  # 1/scale finite for all-zero blocks
            scales[i, first:first + len(scale)] = scale
            out[i, start:start + part.numel()] = (part.float() * (1.0 / scale)[:, None]).round_().view(-1)
            start, first = start + part.numel(), first + len(scale)
    return Basis(out, scales)


def orthonormality_error(basis: Basis | torch.Tensor) -> float:
    """max |P P^T - I| computed in float64, over column chunks (no float64 copy of the basis)."""
    basis = basis if isinstance(basis, Basis) else Basis(basis)
    gram = torch.zeros(basis.rank, basis.rank, dtype=torch.float64, device=basis.device)
    for _, part in basis.column_chunks(torch.float64, step=(1 << 22) // max(1, basis.rank)):
        gram += part @ part.T
    return (gram - torch.eye(basis.rank, dtype=torch.float64, device=basis.device)).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Building it


class BasisBuilder:
    """Streamed orthonormalisation of flattened checkpoints, in order, a block at a time.

    ``push`` copies a vector into the next free row of the basis buffer; every ``block`` pushes (and
    at ``finish``) the pending rows are orthogonalised in place. ``add``/``add_many`` push and process
    at once. The float64 sum of everything pushed is kept when ``track_mean`` (the SWA mean of the
    trainable parameters, without a second pass over the checkpoints).

    ``r`` records the coefficients: kept checkpoint j equals ``sum_i r[i, j] * P[i]``, i.e.
    ``W_kept^T = P^T R`` with R upper triangular. That maps coordinates in the orthonormal basis back
    to coefficients over the original checkpoints.

    Args:
        capacity: the most vectors that will be added (the buffer is preallocated, no per-add copies).
        rtol: relative residual below which a vector counts as linearly dependent.
        dtype: working and storage dtype of the rows (float32, or float64 for reference builds).
        block: vectors orthogonalised together.
        track_mean: keep the float64 sum of the pushed vectors.
        reduce: applied to every float64 inner-product matrix (and the squared row norms) before use;
            identity by default. A column-sharded build passes a sum over the shards (an all-reduce), so
            every shard sees the inner products of the whole vectors and takes the same decisions.
    """

    def __init__(self, capacity: int, rtol: float = DEFAULT_RANK_RTOL, dtype: torch.dtype = torch.float32,
                 block: int = 16, track_mean: bool = False,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, background: bool = False) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.rtol = rtol
        self.dtype = dtype
        self.block = max(1, block)
        self.track_mean = track_mean
        self._reduce = reduce
        self._rows: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._anchor: torch.Tensor | None = None  # the first kept vector, subtracted from all later ones
        self._anchor_index = -1
        self._r_columns: list[torch.Tensor] = []
        self._pending = 0
        self._flags: list[bool] = []
        self.kept: list[int] = []
        self.dropped: list[int] = []
        self.seen = 0
        self.rounds = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twa-basis") if background else None
        self._running: Future | None = None

    # -- input ------------------------------------------------------------------------------

    def push(self, vector: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy ``vector`` (or the concatenation of several tensors, flattened) into the next free row;
        orthogonalise when a block is full. The parts are copied straight into the row: no flat copy."""
        parts = [vector] if isinstance(vector, torch.Tensor) else list(vector)
        parts = [t.detach().reshape(-1) for t in parts]
        size = sum(t.numel() for t in parts)
        if self.seen >= self.capacity:
            raise ValueError(f"more than capacity={self.capacity} vectors added")
        if self._rows is None:
            self._rows = torch.empty(self.capacity, size, dtype=self.dtype)
        elif size != self._rows.shape[1]:
            raise ValueError(f"vector {self.seen} has {size} entries, expected {self._rows.shape[1]}")
        row, offset = self._rows[self.seen], 0  # rows of earlier blocks are compacted when processed
        for t in parts:
            row[offset:offset + t.numel()].copy_(t)
            offset += t.numel()
        if self.track_mean:  # here, on the caller's thread, while a background block is being processed
            self._accumulate(row)
        self._pending += 1
        self.seen += 1
        if self._pending == self.block:
            self.flush(wait=False)

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

    def flush(self, wait: bool = True) -> None:
        """Orthogonalise the pending rows; with ``background`` and ``wait=False``, on the worker thread
        while the caller pushes the next block into later rows (the two never touch the same rows).
        Errors of a background block are raised by the next ``flush``.
        """
        self._wait()  # blocks are processed in order: the next one needs the rows of this one
        b, self._pending = self._pending, 0
        if b and self._rows is not None:
            if self._worker is not None and not wait:
                self._running = self._worker.submit(self._process, self.seen - b, b)
            else:
                self._process(self.seen - b, b)

    def _wait(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running.result()

    def close(self) -> None:
        """Stop the background worker (after the block it is processing, if any)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
            self._running = None

    def _process(self, first: int, b: int) -> None:
        """Orthogonalise rows ``first .. first+b`` (vectors ``first ..``) against the finished rows.

        One round: a pass against the finished rows, the block's Gram matrix, Cholesky in order. The
        prefix of vectors the Gram matrix resolves is finished (Cholesky-QR, second pass against the
        old rows, Cholesky-QR again); the rest, from the first vector nearly dependent on the ones
        before it in the block, starts a new round, now against those too. Every round finishes at
        least one vector.
        """
        block = self._rows[first:first + b]
        norms0 = torch.linalg.vector_norm(block, dim=1).to(torch.float64)
        if self._reduce is not None:
            norms0 = self._reduce(norms0.square()).sqrt()
        bad = (~torch.isfinite(norms0)).nonzero()
        if len(bad):
            raise ValueError(f"vector {first + int(bad[0])} has non-finite entries")
        self._subtract_anchor(block, first, norms0)
        done, coeffs = 0, torch.zeros(0, b, dtype=torch.float64)
        while done < b:
            k = len(self.kept)
            y, p = block[done:], self._rows[:k]
            c = self._dot(p, y)
            _subtract(y, c, p)
            coeffs = torch.cat([coeffs, torch.zeros(k - coeffs.shape[0], b - done, dtype=torch.float64)]) + c
            keep, lower, stop = _cholesky_in_order(self._dot(y, y), self.rtol * norms0[done:])
            self.rounds += 1
            self._finish_prefix(k, y[:stop], keep, lower, coeffs[:, :stop], first + done)
            coeffs, done = coeffs[:, stop:], done + stop

    def _dot(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``p @ y^T`` in float64, summed over the shards when the build is sharded."""
        out = _dot(p, y)
        return out if self._reduce is None or out.numel() == 0 else self._reduce(out)

    def _subtract_anchor(self, block: torch.Tensor, first: int, norms0: torch.Tensor) -> None:
        """Replace every vector after the anchor (the first non-zero one) by its difference from it.

        The span is the same, but nearby checkpoints no longer share their large common part, so the
        float32 orthogonalisation does not lose digits to cancellation: differences of nearby values
        are exact in float32 (Sterbenz). The anchor's coordinates are added back in the R columns.
        """
        rows = range(block.shape[0])
        if self._anchor is None:
            nonzero = [j for j in rows if norms0[j] > 0]
            if not nonzero:
                return
            self._anchor_index = first + nonzero[0]
            self._anchor = block[nonzero[0]].clone()
            rows = range(nonzero[0] + 1, block.shape[0])
        for j in rows:
            if norms0[j] > 0:  # a zero vector stays zero, and is dropped
                block[j] -= self._anchor

    def _accumulate(self, row: torch.Tensor) -> None:
        """Add a row to the float64 sum, exactly (each float32 value is exact in float64).

        numpy's mixed-precision add (single-threaded, vectorised, without the GIL) does it without a
        float64 copy of the row; CPU torch's float32 -> float64 promotion is several times slower.
        """
        if self._sum is None:
            self._sum = torch.zeros(row.shape[0], dtype=torch.float64)
        total = self._sum.numpy()
        np.add(total, row.numpy(), out=total)

    def _finish_prefix(self, k: int, y: torch.Tensor, keep: list[int], lower: torch.Tensor, c1: torch.Tensor,
                       first: int) -> None:
        """Cholesky-QR of ``y`` (already once against the old rows), a second pass against the old rows
        and Cholesky-QR again; the kept rows land at ``k..k+m`` and their R columns are recorded."""
        m = len(keep)
        if m:
            rows = self._rows
            eye = torch.eye(m, dtype=torch.float64)
            t1 = torch.zeros(m, y.shape[0], dtype=torch.float64)  # L1^-1 over the kept vectors, 0 for the dropped
            t1[:, keep] = torch.linalg.solve_triangular(lower, eye, upper=False)
            q, p = rows[k:k + m], rows[:k]
            _transform(y, t1, q)  # Q1 = L1^-1 Y_kept, compacted to rows k..k+m (never past y's own rows)
            c2 = self._dot(p, q)
            _subtract(q, c2, p)
            gram2 = self._dot(q, q)
            if (gram2 - eye).abs().max() <= _ORTHONORMAL_ENOUGH:  # the second Cholesky-QR would change nothing
                lower2 = eye
            else:
                lower2 = torch.linalg.cholesky(gram2)
                _transform(q, torch.linalg.solve_triangular(lower2, eye, upper=False), q)
            old = c1[:, keep] + c2 @ lower.T  # k x m: coefficients on the old rows
            new = lower @ lower2  # m x m lower triangular: on this prefix's new rows
        for j in range(y.shape[0]):
            kept = j in keep
            self._flags.append(kept)
            if kept:
                t = keep.index(j)
                column = torch.cat([old[:, t], new[t, : t + 1]])
                if first + j > self._anchor_index:  # a difference from the anchor: add the anchor back
                    column[0] += self._r_columns[0][0]
                self._r_columns.append(column)
                self.kept.append(first + j)
            else:
                self.dropped.append(first + j)

    # -- output -------------------------------------------------------------------------------

    def mean(self) -> torch.Tensor:
        """float64 mean of every vector pushed so far (kept or dropped); needs ``track_mean``."""
        if self._sum is None:
            raise ValueError("the builder was created without track_mean=True, or nothing was pushed")
        self.flush()
        return self._sum / self.seen

    def finish(self, storage: str | None = None) -> Subspace:
        """Return the finished subspace, its basis stored as ``storage`` (default: the working dtype)."""
        self.flush()
        self.close()
        k = len(self.kept)
        if k == 0 or self._rows is None:
            raise ValueError("no independent vectors were added")
        r = torch.zeros(k, k, dtype=torch.float64)
        for j, col in enumerate(self._r_columns):
            r[: j + 1, j] = col
        values = self._rows[:k]  # a view: dropped rows stay allocated rather than copying the basis
        self._rows = None
        name = storage or next(n for n, dt in STORAGE_DTYPES.items() if dt == self.dtype)
        return Subspace(basis=quantize(values, name), r=r, kept=tuple(self.kept), dropped=tuple(self.dropped),
                        total=self.seen)


def _cholesky_in_order(gram: torch.Tensor, tol: torch.Tensor) -> tuple[list[int], torch.Tensor, int]:
    """Cholesky of a block's Gram matrix in order, skipping vectors whose residual is below ``tol``.

    Returns the kept indices, the lower factor over them, and ``stop``: the first vector whose pivot is
    below ``_GRAM_PIVOT_FLOOR`` of its residual norm (too close to the vectors before it for the Gram
    matrix to decide), or the block size. The result covers the vectors before ``stop``.
    """
    b = gram.shape[0]
    keep: list[int] = []
    lower = torch.zeros(b, b, dtype=torch.float64)
    for j in range(b):
        norm2 = gram[j, j]
        if norm2.sqrt() <= tol[j]:  # dependent on the old rows alone (a diagonal entry: accurate)
            continue
        row = torch.zeros(len(keep), dtype=torch.float64)
        for t, i in enumerate(keep):
            row[t] = (gram[j, i] - row[:t] @ lower[t, :t]) / lower[t, t]
        pivot2 = norm2 - row @ row
        if pivot2 < (_GRAM_PIVOT_FLOOR ** 2) * norm2:
            return keep, lower[: len(keep), : len(keep)].clone(), j
        if pivot2.sqrt() <= tol[j]:  # dependent on the old rows and the block's kept vectors
            continue
        t = len(keep)
        lower[t, :t] = row
        lower[t, t] = pivot2.sqrt()
        keep.append(j)
    return keep, lower[: len(keep), : len(keep)].clone(), b


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
        beta = self.coordinates(vector).cpu()
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
