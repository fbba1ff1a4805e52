"""Projected SGD in the span of the checkpoints (the paper's P-SGD), evaluation and BN re-estimation.

The model's trainable parameters keep their ``.grad`` as views into one flat buffer, so the
projection ``g -> P^T (P g)`` is two matrix-vector products over the basis and one in-place copy;
no per-step concatenation and no per-parameter clones. The optimizer is plain
``torch.optim.SGD(momentum, weight_decay)`` as in the reference: coupled weight decay and the
momentum buffer are both combinations of vectors in the span, so the iterates stay in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from .config import TrainConfig
from .distributed import Dist, Shard, global_batchnorm, merge_bn_statistics
from .errors import DataError, NumericalError, TwaError, is_out_of_memory, is_out_of_threads, one_line
from .models import logits_of
from .subspace import Basis

# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: factor of the base lr at (epoch, step within epoch).

def _step(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """x0.1 at floor(0.5E) and floor(0.75E + 0.9): MultiStepLR as the reference configures it."""
    milestones = (int(0.5 * epochs), int(0.75 * epochs + 0.9))
    return 0.1 ** sum(epoch >= m for m in milestones)


def _progress(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    return (epoch * steps_per_epoch + step) / max(1, epochs * steps_per_epoch)


def _linear(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Per-iteration linear decay to 0, as the reference's ``linear`` schedule."""
    return 1.0 - _progress(epoch, step, steps_per_epoch, epochs)


def _cosine(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * _progress(epoch, step, steps_per_epoch, epochs)))


def _constant(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[int, int, int, int], float]] = {
    "step": _step,
    "linear": _linear,
    "cosine": _cosine,
    "constant": _constant,
}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    count: int

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "loss": self.loss, "count": self.count}


@dataclass(frozen=True)
class StepInfo:
    """What the progress callback receives after every optimizer step."""

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    lr: float
    loss: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    epoch_losses: tuple[float, ...]


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """Autocast context for ``--amp bf16|fp16|off``."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class FlatGrad:
    """Gradients of ``params`` living as views into one flat buffer (D entries).

    The buffer has the parameters' common dtype (``torch.promote_types``: float64 when a model has one float64
    parameter among float32 ones). A parameter of another dtype cannot have a view of it as its gradient: it keeps
    a gradient of its own, copied into the buffer by ``gather`` and back by ``scatter`` (``mixed`` is then True)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        dtype = params[0].dtype if params else torch.float32
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype,
                                  device=params[0].device if params else None)
        self.views = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        self.own = [p.dtype == dtype for p in params]  # whether the parameter's gradient is a view of the buffer
        self.mixed = not all(self.own)
        self.attach()

    def attach(self) -> None:
        for p, v, own in zip(self.params, self.views, self.own):
            p.grad = v if own else torch.zeros_like(p)

    def zero(self) -> None:
        """Zero every gradient (the buffer, and the gradients of another dtype)."""
        self.buffer.zero_()
        for p, own in zip(self.params, self.own):
            if not own and p.grad is not None:
                p.grad.zero_()

    def gather(self) -> torch.Tensor:
        """The flat gradient; copies only a gradient autograd chose to reallocate (rare), and the gradients of
        parameters whose dtype is not the buffer's."""
        for p, v, own in zip(self.params, self.views, self.own):
            if p.grad is None:
                v.zero_()
                p.grad = v if own else torch.zeros_like(p)
            elif not own:
                v.copy_(p.grad)
            elif p.grad is not v:
                v.copy_(p.grad)
                p.grad = v
        return self.buffer

    def scatter(self) -> None:
        """The buffer's values back into the gradients that are not views of it (another dtype)."""
        if not self.mixed:  # every gradient is a view of the buffer: nothing to copy (the usual case, every step)
            return
        for p, v, own in zip(self.params, self.views, self.own):
            if not own:
                p.grad.copy_(v)


def project(basis: Basis, g: torch.Tensor) -> torch.Tensor:
    """``P^T (P g)``: two passes over the basis (``Basis.project``: compiled kernels for a bf16/int8 basis on a
    CUDA GPU, chunk by chunk elsewhere). A basis kept on the CPU (it did not fit on the accelerator) projects a
    CPU copy of the gradient."""
    if basis.device != g.device:
        return basis.project(g.to(basis.device)).to(g.device)
    return basis.project(g)


class Sourced:
    """A loader and the flag its data comes from (``--data`` unless wrapped), for ``Batches``' errors."""

    def __init__(self, loader: Iterable, source: str) -> None:
        self.loader = loader
        self.source = source

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class Batches:
    """``loader`` iterated with its failures (an image file that cannot be read, examples that cannot be batched,
    an error in the dataset's own code) as a one-line ``DataError`` naming the data (``--data``, or the flag a
    ``Sourced`` loader names), not an unexpected error after minutes of work; ``len`` is the loader's."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.source = loader.source if isinstance(loader, Sourced) else "--data"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        try:
            iterator = self._start()
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                yield batch
        except TwaError:
            raise
        except Exception as err:
            if is_out_of_memory(err) or is_out_of_threads(err):  # the batch did not fit, a worker could not start
                raise  # a thread: --batch-size or --threads, not the data, is at fault
            raise DataError(f"reading a batch of {self.source} failed ({one_line(err)}); fix or remove the "
                            f"example it names, or the dataset's code") from err

    def _start(self) -> Iterator:
        """``iter(loader)``: where workers started by spawn or forkserver (macOS, Python 3.14 on Linux) receive the
        pickled dataset; one that cannot be pickled (a lambda, an open file in it) is named as such, not as an
        example to fix."""
        try:
            return iter(self.loader)
        except TwaError:
            raise
        except Exception as err:
            if "pickle" not in str(err).lower():
                raise
            workers = getattr(getattr(self.loader, "loader", self.loader), "num_workers", None)
            raise DataError(f"--num-workers {workers}: {self.source}'s dataset cannot be sent to the worker processes "
                            f"({one_line(err)}); make it picklable (no lambdas, local classes or open files in it), "
                            "or use --num-workers 0") from err


def _batch_to(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = batch[0], batch[1]
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def train_projected(
    model: nn.Module,
    names: list[str],
    basis: Basis | torch.Tensor | Shard,
    loader: Iterable,
    config: TrainConfig,
    device: torch.device,
    amp: str = "off",
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD on the gradient projected onto the row span of ``basis``.

    Args:
        model: on ``device``, its named parameters ``names`` already at the start point.
        names: the trainable parameters that ``basis`` spans (flattened in this order).
        basis: orthonormal rows (k x D), on ``device`` (a plain tensor is taken as a dense basis).
        loader: yields ``(inputs, targets)``; iterated once per epoch.
        config: optimiser hyper-parameters and schedule.
        on_step: progress callback, called after each step.

    With a ``Shard`` (``torchrun``), ``loader`` yields this rank's part of each global batch: the
    losses and gradients are summed over the ranks, BatchNorm uses the global batch's statistics, and
    the projection runs on the rank's columns; every rank then takes the same step.
    """
    replica = _Sharded(basis) if isinstance(basis, Shard) else _Local(basis if isinstance(basis, Basis)
                                                                      else Basis(basis))
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    flat = FlatGrad(params)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    schedule = SCHEDULES[config.schedule]
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    model.train()
    steps, epoch_losses, loss_value = 0, [], float("nan")
    with replica.context(model):
        for epoch in range(config.epochs):
            total, count = 0.0, 0
            for step, batch in enumerate(Batches(loader)):
                lr = config.lr * schedule(epoch, step, steps_per_epoch, config.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs, targets = _batch_to(batch, device)
                optimizer.zero_grad(set_to_none=False)
                with autocast(device, amp):
                    loss, loss_value, examples = replica.loss(logits_of(model(inputs)), targets)
                if not math.isfinite(loss_value):
                    raise NumericalError(f"training loss became {loss_value} at epoch {epoch + 1} step {step + 1} "
                                         f"(lr {lr:g}); lower --lr")
                scaler.scale(loss).backward()
                g = replica.gradient(flat.gather())
                if flat.mixed and scaler.is_enabled():  # gradients of another dtype: unscaled in place, given g first
                    flat.scatter()
                    scaler.unscale_(optimizer)
                    flat.gather()
                else:
                    scaler.unscale_(optimizer)  # in place on the flat buffer the parameters' grads view
                g.copy_(replica.project(g))
                flat.scatter()
                scaler.step(optimizer)
                scaler.update()
                steps += 1
                total += loss_value * examples
                count += examples
                if on_step is not None:
                    on_step(StepInfo(epoch, step, steps_per_epoch, config.epochs, lr, loss_value))
            epoch_losses.append(total / max(1, count))
    for p in params:
        p.grad = None
    return TrainResult(steps=steps, final_loss=loss_value, epoch_losses=tuple(epoch_losses))


@dataclass(frozen=True)
class _Local:
    """One process: the batch's mean loss, its gradient, projected on the whole basis."""

    basis: Basis

    def context(self, model: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        loss = class_loss(logits, targets)
        return loss, loss.item(), len(targets)

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return project(self.basis, g)


@dataclass(frozen=True)
class _Sharded:
    """N ranks (torchrun), each with its part of the global batch and its columns of the basis. Per
    step: all-reduce of 2 values (loss sum, example count), of the D gradient values and of K
    coefficients, all-gather of the D projected values (BN layers: their statistics and gradients).
    BatchNorm uses the global batch's statistics, so every rank takes the one-process step."""

    shard: Shard

    def context(self, model: nn.Module) -> AbstractContextManager:
        return global_batchnorm(model, self.shard.dist)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        dist = self.shard.dist
        loss_sum = class_loss(logits.float(), targets, reduction="sum")
        sums = dist.sum(torch.stack([loss_sum.detach().double(), torch.tensor(float(len(targets)),
                                     dtype=torch.float64, device=loss_sum.device)]).to(dist.comm_device))
        examples = int(sums[1].item())
        return loss_sum / examples, sums[0].item() / max(1, examples), examples

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        return self.shard.dist.sum(g)  # in place: the global batch's mean gradient on every rank

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return self.shard.project(g)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: str = "off",
             dist: Dist | None = None) -> Metrics:
    """Top-1 accuracy (fraction) and mean cross-entropy over ``loader``; restores the train flag.

    With ``dist`` (torchrun), ``loader`` is this rank's share and the sums are added over the ranks."""
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for batch in Batches(loader):
        inputs, targets = _batch_to(batch, device)
        with autocast(device, amp):
            logits = logits_of(model(inputs))
        loss_sum += class_loss(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    if dist is not None and dist.active:
        sums = dist.sum(torch.tensor([correct, loss_sum, count], dtype=torch.float64, device=dist.comm_device))
        correct, loss_sum, count = int(sums[0].item()), sums[1].item(), int(sums[2].item())
    if count == 0:
        raise NumericalError("the evaluation split is empty; check --data")
    return Metrics(accuracy=correct / count, loss=loss_sum / count, count=count)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def class_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against integer class indices; targets of another kind, or a label outside the model's
    outputs, are a one-line ``DataError`` (``check_accepts`` catches most before any checkpoint is read)."""
    if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        raise DataError(f"the data's targets are {targets.dtype} with shape {tuple(targets.shape[1:])} per example; "
                        f"twa needs one integer class index per example: check --data (and --holdout)")
    if targets.dtype not in (torch.long, torch.uint8):
        targets = targets.long()  # int32/int16/int8 labels are class indices too; cross_entropy takes only these
    # Checked here on every device: on the CPU cross_entropy raises IndexError for such a label, but on CUDA it is a
    # device-side assert (an unexpected error at the next sync, and every later CUDA call in the process fails).
    # One sync per batch on an accelerator, where the caller's loss.item() syncs anyway.
    outputs = logits.shape[-1]
    bad = targets >= outputs
    if targets.dtype != torch.uint8:
        bad |= (targets < 0) & (targets != -100)  # -100: cross_entropy's ignore_index, skipped on every device
    if bool(bad.any()):
        label = int(targets[bad][0])
        raise DataError(f"a class label is outside the model's {outputs} outputs (Target {label} is out of bounds); "
                        f"check the labels of --data (and --holdout), or --model-arg num_classes")
    try:
        return F.cross_entropy(logits, targets, reduction=reduction)
    except IndexError as err:  # e.g. "Target 11 is out of bounds."
        raise DataError(f"a class label is outside the model's {logits.shape[-1]} outputs ({err}); check the labels "
                        f"of --data (and --holdout), or --model-arg num_classes") from None


def drop_single_last(size: int, batch_size: int) -> bool:
    """Whether a train-mode pass over ``size`` examples drops its last batch: only when that batch would hold
    one example, which BatchNorm cannot normalise (one value per channel is an error in training mode)."""
    return size > 1 and size % batch_size == 1


def recalibrate_bn(model: nn.Module, loader: Iterable, device: torch.device, dist: Dist | None = None) -> bool:
    """Reset and re-estimate BatchNorm running statistics (cumulative average over one pass).

    Delegates to ``torch.optim.swa_utils.update_bn``. Returns False when the model has no BN. With
    ``dist`` (torchrun), ``loader`` holds this rank's whole batches and the per-rank averages are merged
    into the average over all batches, as one process computes it.
    """
    if not has_batchnorm(model):
        return False
    update_bn(Batches(loader), model, device=device)
    if dist is not None:
        merge_bn_statistics(model, len(loader), dist)  # type: ignore[arg-type]
    return True
