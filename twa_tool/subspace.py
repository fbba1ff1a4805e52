"""Pure tensor math of the TWA subspace: orthonormal basis of checkpoint span, projection, coefficients.

Only depends on torch. The basis is built incrementally, one flattened checkpoint at a time, so the
caller never has to hold all K checkpoints at once: peak memory is the basis plus one checkpoint.

Numerics: the reference implementation runs single-pass classical Gram-Schmidt in float32, which
loses orthogonality badly on a correlated training trajectory (max|P P^T - I| ~ 0.1, see
../shared/reference/paper.md section 6). Here every row is orthogonalised twice in float64 (CGS2,
"twice is enough", Giraud et al. 2005), which keeps max|P P^T - I| near machine precision, and a row
whose residual is tiny relative to its norm is reported as linearly dependent instead of being
normalised into noise or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: A checkpoint whose residual after projecting out the previous ones is below this fraction of its
#: own norm is linearly dependent on them (duplicates, exact combinations, float32 rounding noise).
DEFAULT_RANK_RTOL = 1e-5


class BasisBuilder:
    """Incremental orthonormalisation of flattened checkpoints.

    Rows are stored in ``dtype`` (float32 by default: the basis never exists in float64 at full
    size) while all arithmetic runs in float64, block by block over the columns, so memory is the
    basis plus one float64 vector plus one block.

    ``r`` records the Gram-Schmidt coefficients: kept checkpoint j equals ``sum_i r[i, j] * P[i]``,
    i.e. ``W_kept^T = P^T R`` with R upper triangular. That is what maps coordinates in the
    orthonormal basis back to coefficients over the original checkpoints.

    Args:
        capacity: the most vectors that will be added (rows are preallocated, no per-add copies).
        rtol: relative residual below which a vector counts as linearly dependent.
        dtype: storage dtype of the basis rows.
    """

    #: Entries of one float64 working block (k rows x block columns), 128 MiB.
    BLOCK_ENTRIES = 1 << 24

    def __init__(self, capacity: int, rtol: float = DEFAULT_RANK_RTOL, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.rtol = rtol
        self.dtype = dtype
        self._rows: torch.Tensor | None = None
        self._r_columns: list[torch.Tensor] = []
        self.kept: list[int] = []
        self.dropped: list[int] = []
        self.seen = 0

    def add(self, vector: torch.Tensor) -> bool:
        """Orthogonalise ``vector`` against the basis so far and append it if independent.

        Returns True when the vector was kept. Zero, duplicate and dependent vectors are dropped
        (their index is recorded in ``dropped``); non-finite vectors raise ValueError.
        """
        return self.add_many([vector])[0]

    def add_many(self, vectors: list[torch.Tensor]) -> list[bool]:
        """Add a block of vectors at once (block CGS2): the same result as adding them one by one.

        The projection against the existing basis runs as two matrix-matrix products per pass
        (BLAS-3) instead of one matrix-vector product per vector, so the basis is read from memory
        once per block instead of once per vector; the vectors of the block are then
        orthogonalised against each other in order.
        """
        if self.seen + len(vectors) > self.capacity:
            raise ValueError(f"more than capacity={self.capacity} vectors added")
        first = self.seen
        block = torch.stack([v.detach().reshape(-1).to(torch.float64) for v in vectors])
        for i, row in enumerate(block):
            if not torch.isfinite(row).all():
                raise ValueError(f"vector {first + i} has non-finite entries")
        if self._rows is None:
            self._rows = torch.empty(self.capacity, block.shape[1], dtype=self.dtype)
        elif block.shape[1] != self._rows.shape[1]:
            raise ValueError(f"vector {first} has {block.shape[1]} entries, expected {self._rows.shape[1]}")
        self.seen += len(vectors)
        old = len(self.kept)
        norms0 = torch.linalg.vector_norm(block, dim=1)
        coeffs_old = torch.zeros(old, len(vectors), dtype=torch.float64)
        for _ in range(2 if old else 0):  # CGS2: a second pass repairs the orthogonality the first one lost
            c = self._dot_rows(0, old, block)
            self._subtract_rows(0, old, block, c)
            coeffs_old += c
        kept = []
        for j, v in enumerate(block):
            k = len(self.kept)
            coeffs_new = torch.zeros(k - old, dtype=torch.float64)
            for _ in range(2 if k > old else 0):
                c = self._dot_rows(old, k, v[None])[:, 0]
                self._subtract_rows(old, k, v[None], c[:, None])
                coeffs_new += c
            norm = torch.linalg.vector_norm(v)
            if norms0[j] == 0 or norm <= self.rtol * norms0[j]:
                self.dropped.append(first + j)
                kept.append(False)
                continue
            self._rows[k] = v / norm
            self._r_columns.append(torch.cat([coeffs_old[:, j], coeffs_new, norm.reshape(1)]))
            self.kept.append(first + j)
            kept.append(True)
        return kept

    def _step(self, rows: int) -> int:
        return max(4096, self.BLOCK_ENTRIES // max(1, rows))

    def _dot_rows(self, lo: int, hi: int, block: torch.Tensor) -> torch.Tensor:
        """``P[lo:hi] @ block^T`` (rows x b) in float64, one column chunk of the basis converted at a time."""
        step = self._step(hi - lo)
        c = torch.zeros(hi - lo, block.shape[0], dtype=torch.float64)
        for start in range(0, block.shape[1], step):
            c += self._rows[lo:hi, start:start + step].to(torch.float64) @ block[:, start:start + step].T
        return c

    def _subtract_rows(self, lo: int, hi: int, block: torch.Tensor, c: torch.Tensor) -> None:
        """``block -= c^T P[lo:hi]`` in float64, chunk by chunk (in place)."""
        step = self._step(hi - lo)
        for start in range(0, block.shape[1], step):
            block[:, start:start + step] -= c.T @ self._rows[lo:hi, start:start + step].to(torch.float64)

    def finish(self) -> Subspace:
        """Return the finished subspace (the basis keeps the builder's storage dtype)."""
        k = len(self.kept)
        if k == 0 or self._rows is None:
            raise ValueError("no independent vectors were added")
        r = torch.zeros(k, k, dtype=torch.float64)
        for j, col in enumerate(self._r_columns):
            r[: j + 1, j] = col
        basis = self._rows if k == self.capacity else self._rows[:k].clone()
        self._rows = None
        return Subspace(basis=basis, r=r, kept=tuple(self.kept), dropped=tuple(self.dropped), total=self.seen)


@dataclass(frozen=True)
class Subspace:
    """Orthonormal basis ``basis`` (k x D) of the span of the kept checkpoints."""

    basis: torch.Tensor
    r: torch.Tensor
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    total: int

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def coordinates(self, vector: torch.Tensor) -> torch.Tensor:
        """Coordinates ``beta = P w`` of a vector in the orthonormal basis (float64)."""
        return self.basis.to(torch.float64) @ vector.reshape(-1).to(torch.float64)

    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection ``P^T (P g)`` onto the span, in the vector's dtype."""
        p = self.basis.to(vector.dtype)
        return p.T @ (p @ vector)

    def checkpoint_coefficients(self, vector: torch.Tensor) -> torch.Tensor:
        """Coefficients a over all ``total`` checkpoints with ``vector ~= sum_i a_i w_i``.

        Dropped (dependent) checkpoints get coefficient 0; the kept ones absorb their share.
        """
        beta = self.coordinates(vector)
        a_kept = torch.linalg.solve_triangular(self.r, beta[:, None], upper=True)[:, 0]
        a = torch.zeros(self.total, dtype=torch.float64)
        a[list(self.kept)] = a_kept
        return a


def orthonormality_error(basis: torch.Tensor) -> float:
    """max |P P^T - I| computed in float64."""
    p = basis.to(torch.float64)
    return (p @ p.T - torch.eye(p.shape[0], dtype=torch.float64)).abs().max().item()


def build_subspace(vectors: list[torch.Tensor], rtol: float = DEFAULT_RANK_RTOL,
                   dtype: torch.dtype = torch.float32) -> Subspace:
    """Convenience: orthonormalise a list of flat vectors in order."""
    builder = BasisBuilder(capacity=len(vectors), rtol=rtol, dtype=dtype)
    for v in vectors:
        builder.add(v)
    return builder.finish()
