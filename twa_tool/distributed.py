"""Data-parallel TWA under ``torchrun``: the process group, the column-sharded basis, and the collectives.

One ``Dist`` object per process describes the group (rank, world size, device) and is passed explicitly;
a single process gets the trivial ``Dist()`` whose collectives are no-ops, so the single-process code
path is unchanged.

Sharding. Rank r owns a contiguous slice of the D flattened trainable entries (``Dist.columns``) and
holds all K basis rows for those columns, ~K*D/N values. It builds its shard straight from the
checkpoints (each rank reads every checkpoint and pushes only its columns into its ``BasisBuilder``);
every inner product of the build is summed over the ranks (all-reduce of a small k x b float64 matrix),
so all ranks take identical decisions (kept/dropped, R) and the shards are the column slices of the
one basis a single process would build (up to the float64 summation order).

One training step, per rank (global batch B = ``--batch-size``, split in N contiguous parts):
forward/backward on its part (BatchNorm uses the statistics of the whole global batch, synchronised),
all-reduce of the D-value gradient (as DDP), ``beta_r = P_r g_r`` and an all-reduce of those K values,
``g_r' = P_r^T beta``, all-gather of the N projected slices (D values), then the same SGD step on every
rank's replica of the parameters. Plus one all-reduce of 2 values (the loss, for the finite check and
the progress line) and, per BatchNorm layer, all-reduces of 2C (+1) statistics forward and backward.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Sampler

from .subspace import Basis, Subspace, gram_and_coordinates

#: Seconds a collective may wait for the other ranks before the run fails (``--dist-timeout``).
DEFAULT_TIMEOUT_S = 300.0

#: The torchrun variables that mark a distributed launch.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

#: Backend per device type (anything else: gloo).
BACKENDS: dict[str, str] = {"cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Dist:
    """The process group of this run as seen by one rank (``Dist()``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for a CUDA run, else ``device``."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def comm_device(self) -> torch.device:
        """Where tensors handed to the collectives must live (nccl: this rank's GPU)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def split(self, d: int) -> int:
        """Columns per rank, rounded up (the last rank may own fewer)."""
        return -(-d // self.world_size)

    def columns(self, d: int) -> slice:
        """The contiguous slice of the D flattened entries this rank owns."""
        step = self.split(d)
        return slice(min(d, self.rank * step), min(d, (self.rank + 1) * step))

    # -- collectives (no-ops on a single process) ------------------------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (SUM) in place; returns the tensor."""
        if self.active:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def gather_columns(self, part: torch.Tensor, d: int) -> torch.Tensor:
        """The full D-vector from every rank's ``columns(d)`` slice (all-gather, last slice padded)."""
        if not self.active:
            return part
        step = self.split(d)
        padded = torch.zeros(step, dtype=part.dtype, device=part.device)
        padded[: part.numel()] = part
        out = torch.empty(step * self.world_size, dtype=part.dtype, device=part.device)
        gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # renamed in torch 2.10+
        gather(out, padded)
        return out[:d]

    def gather_values(self, value: float) -> list[float]:
        """One number from every rank, in rank order."""
        if not self.active:
            return [value]
        out = [None] * self.world_size
        tdist.all_gather_object(out, value)
        return [float(v) for v in out]  # type: ignore[arg-type]

    def gather_objects(self, value: object) -> list:
        """A picklable value from every rank, in rank order."""
        if not self.active:
            return [value]
        out = [None] * self.world_size
        tdist.all_gather_object(out, value)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (one all-reduce): lets ranks fail together instead of waiting."""
        if not self.active:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.comm_device)
        tdist.all_reduce(flag)
        return flag.item() == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(name in env for name in ENV_VARS) and int(env["WORLD_SIZE"]) > 1


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the torchrun process group (nccl on CUDA, gloo otherwise); ``Dist()`` outside torchrun.

    The timeout bounds every collective: a rank whose peers died or hang fails after it.
    """
    if not launched_by_torchrun():
        return Dist()
    rank, world, local = (int(os.environ[n]) for n in ENV_VARS)
    backend = BACKENDS.get(device.type, "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, world_size=world, local_rank=local, backend=backend)


def shutdown(dist: Dist) -> None:
    """Leave the process group together: a barrier first, so no rank tears its connections down while a
    peer (rank 0, still writing the outputs) has the group open (gloo can abort a process on that)."""
    if dist.active and tdist.is_initialized():
        tdist.barrier()
        destroy_process_group()


def destroy_process_group() -> None:
    """``torch.distributed.destroy_process_group``, with gloo's worker threads joined without the GIL.

    torch 2.6 (before pytorch/pytorch#154976) frees the ``ProcessGroup`` with the GIL held, and its gloo
    backend joins its worker threads there; a worker still dropping the last reference to a finished
    collective's tensors needs the GIL for that, so both wait forever (seen on 2.6: a rank that refused
    its input right after a gather hung in this call until torchrun killed it, 30 s later). Holding
    the backend across the call leaves its last reference here, and the gloo backend's own binding releases
    the GIL while it joins."""
    backend = None
    if tdist.get_backend() == "gloo":
        try:
            backend = tdist.group.WORLD._get_backend(torch.device("cpu"))
        except (AttributeError, RuntimeError):  # a private API: without it, the plain call
            backend = None
    tdist.destroy_process_group()
    del backend  # ProcessGroupGloo's destructor, GIL released


# ---------------------------------------------------------------------------------------------
# The sharded basis: rank r holds the columns ``dist.columns(D)`` of every row.


@dataclass(frozen=True)
class Shard:
    """This rank's column slice of the subspace: the local basis rows and where they sit in the D entries."""

    subspace: Subspace
    columns: slice
    dim: int
    dist: Dist

    @property
    def basis(self) -> Basis:
        return self.subspace.basis

    def gram_and_coordinates(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P P^T`` of the whole basis and ``beta = P w`` of a full D-vector (float64, on the CPU): one pass
        over the local columns, one sum over the ranks."""
        gram, beta = gram_and_coordinates(self.basis, vector.reshape(-1)[self.columns])
        assert beta is not None
        k = gram.shape[0]
        total = self.dist.sum(torch.cat([gram.reshape(-1), beta]).to(self.dist.comm_device)).cpu()
        return total[: k * k].reshape(k, k), total[k * k:]

    def span_residual(self, vector: torch.Tensor, beta: torch.Tensor) -> float:
        """``|w - P^T P w| / |w|`` of a full D-vector (float64) whose coordinates ``beta = P w`` are known."""
        w = vector.reshape(-1).double()
        local = w[self.columns]
        projected = self.basis.combine(beta)
        local = local.to(projected.device)
        sums = self.dist.sum(torch.stack([(local - projected).square().sum(), local.square().sum()])
                             .to(self.dist.comm_device))
        return (sums[0].sqrt() / sums[1].sqrt()).item()

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``P^T (P g)`` of the full (already all-reduced) gradient: K-value all-reduce + D-value all-gather."""
        basis = self.basis
        local = g[self.columns].to(basis.device)
        beta = self.dist.sum(basis.projection_coordinates(local).to(self.dist.comm_device))
        out = basis.projection_combine(beta, local)
        return self.dist.gather_columns(out.to(self.dist.comm_device), self.dim).to(g.device)


# ---------------------------------------------------------------------------------------------
# Data: every rank walks the same global batches as a single process would, and takes its part.


class RankBatches(Sampler[list[int]]):
    """Rank r's part of every global batch of ``batches`` (contiguous, ``tensor_split`` sizes).

    Every rank iterates the same global batches (the same seeded sampler as a single-process run),
    so N processes see exactly the examples one process sees at each step; a part may be empty.
    """

    def __init__(self, batches: Sampler[list[int]], dist: Dist) -> None:
        self.batches = batches
        self.dist = dist

    def __iter__(self) -> Iterator[list[int]]:
        n, r = self.dist.world_size, self.dist.rank
        for batch in self.batches:
            size, extra = divmod(len(batch), n)
            start = r * size + min(r, extra)
            yield list(batch)[start:start + size + (1 if r < extra else 0)]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class RankStride(Sampler[list[int]]):
    """Whole batches ``r, r+N, r+2N, ...`` of ``batches``: a rank's share of an evaluation or BN pass."""

    def __init__(self, batches: Sampler[list[int]], dist: Dist) -> None:
        self.batches = batches
        self.dist = dist

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            if i % self.dist.world_size == self.dist.rank:
                yield batch

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]
        return len(range(self.dist.rank, total, self.dist.world_size))


class EmptyAwareCollate:
    """``default_collate``, except that an empty part becomes zero-row tensors shaped like ``example``
    (every rank must run the forward pass, since BatchNorm statistics are synchronised)."""

    def __init__(self, example: Sequence) -> None:
        self.shapes = [(torch.as_tensor(x).shape, torch.as_tensor(x).dtype) for x in example[:2]]

    def __call__(self, batch: list) -> object:
        from torch.utils.data import default_collate

        if batch:
            return default_collate(batch)
        return [torch.empty(0, *shape, dtype=dtype) for shape, dtype in self.shapes]


# ---------------------------------------------------------------------------------------------
# BatchNorm with the statistics of the global batch (training), and the merge of a distributed BN pass.


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (SUM) with its gradient: the gradient of a sum over ranks is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone()
        tdist.all_reduce(out)
        return out


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(tensor)


def _global_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm over the union of all ranks' parts (differentiable all-reduces). A half-precision
    input (``--amp``) is normalised in float32, as autocast runs torch's own batch_norm: statistics summed in
    bf16/fp16 (and an example count rounded to it) would differ from one process's by ~1e-2."""
    if not self.training:
        return type(self).forward(self, x)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([float(x.numel() // max(1, x.shape[1]))], dtype=x.dtype, device=x.device)
    stats = all_reduce(torch.cat([x.sum(dims), count]))
    n = stats[-1]
    mean = stats[:-1] / n
    centred = x - mean.view(shape)
    var = all_reduce(centred.square().sum(dims)) / n
    with torch.no_grad():
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var.detach() * n.detach() / max(1.0, float(n) - 1)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out


@contextmanager
def global_batchnorm(model: nn.Module, dist: Dist) -> Iterator[None]:
    """While training on N ranks, BatchNorm layers normalise with the whole global batch's statistics,
    so the gradient is the one a single process computes on that batch (torch's SyncBatchNorm runs on
    GPUs only; this runs on gloo too). A no-op on a single process."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if dist.active else []
    for layer in layers:
        layer.forward = types.MethodType(_global_bn_forward, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def merge_bn_statistics(model: nn.Module, batches: int, dist: Dist) -> None:
    """After each rank ran ``update_bn`` (cumulative average) over its share of whole batches, make
    every rank hold the average over all batches: exactly what one process computes over them all."""
    if not dist.active:
        return
    total = dist.sum(torch.tensor([float(batches)], device=dist.comm_device)).cpu()
    if total.item() == 0:
        return
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
            for buffer in (layer.running_mean, layer.running_var):
                merged = dist.sum(buffer.detach().double().to(dist.comm_device) * batches)
                buffer.copy_((merged.cpu() / total).to(buffer.dtype))
            layer.num_batches_tracked.fill_(int(total.item()))


def scaled_loss(logits: torch.Tensor, targets: torch.Tensor, global_count: int) -> torch.Tensor:
    """This rank's share of the global batch's mean cross-entropy (the shares sum to the mean)."""
    return F.cross_entropy(logits, targets, reduction="sum") / global_count
