"""``twa soup``: uniform, greedy and trainable (TWA-v) soups of fine-tunes of one pretrained model.

Methods (Wortsman et al. 2022, "Model soups"; Li et al., TWA journal version and MEHL-Soup):

* ``uniform``: the float64 mean of every ingredient's floating tensors, streamed (one loaded model plus
  the running sum);
* ``greedy``: rank the ingredients by held-out accuracy, start with the best, add the next one only if
  the held-out accuracy of the running uniform average strictly improves (one pass, as model-soups'
  ``main.py``);
* ``twa``: mixing coefficients fitted on the held-out split, starting from the uniform soup, in the
  span of the ingredients ``w = Σ λᵢ wᵢ`` or, with a base model, of the task vectors
  ``w = base + Σ λᵢ (wᵢ − base)``; one λ per ingredient (``model``) or per ingredient and parameter
  tensor (``layer``, the learned-soup-by-layer setting).

Memory: the coefficients parametrise ``w`` through ``Directions``: the start point ``c`` (the uniform
soup) and ``ū = c − origin`` in float32, and the K deviations ``δᵢ = wᵢ − c`` in float32, bfloat16 or
int8 (one scale per ingredient and tensor). Only δ is stored at low precision, and it is small next to
the weights, so ``c`` (λ = 1/K) is exact whatever the storage. Peak host memory is about
``K·D·b + 8·D + 14·S`` (b = 4, 2 or 1 bytes, S the bytes of one state dict); see ``memory_formula``.

Every evaluated model gets its BatchNorm statistics re-estimated on the fit split first. The eval
split is only ever reported, never used to choose.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import __version__
from .checkpoints import (
    CheckpointFile,
    HeaderMemo,
    check_allow_globals,
    discover,
    folder_weight_files,
    no_checkpoints,
    raise_if_refused,
    sha256_file,
    weights_path,
)
from .config import CoefficientTrainConfig, Selection, SoupConfig
from .data import DataSplits, build_data, download_note, for_workers, label_meaning, registry_name, split_holdout
from .errors import (
    TOO_LONG,
    CheckpointError,
    ConfigError,
    DataError,
    MissingData,
    NumericalError,
    TwaError,
    exclude_hint,
    name_too_long,
)
from .models import (
    MODEL_ARGS_METADATA_KEY,
    MODEL_METADATA_KEY,
    check_compatible,
    check_data_fits,
    check_finite,
    flatten,
    frozen_names,
    load_state,
    logits_of,
    trainable_names,
    write_flat,
)
from .pipeline import (
    SCHEMA_VERSION,
    Event,
    EventSink,
    Reader,
    abandon,
    build_run_model,
    check_batch_of_one,
    check_eval_batches,
    download_plan,
    hf_folder,
    peak_rss_bytes,
    process_bytes,
    resolve_device,
    same_weights_as_read,
    validate_headers,
)
from .report import markdown_soup_report
from .selection import Chosen, Dropped, alias_reason, same_file, select, weight_copies
from .subspace import STORAGE_DTYPES
from .trainer import (
    SCHEDULES,
    Batches,
    FlatGrad,
    Metrics,
    Sourced,
    StepInfo,
    autocast,
    class_loss,
    drop_single_last,
    evaluate,
    recalibrate_bn,
)
from .writer import (
    HUMAN_REPORT_FILE,
    REPORT_FILE,
    StagedOutput,
    cast_state,
    check_output,
    planned_model,
    prepare_output_dir,
    side_file_names,
    write_model,
)

METHODS = ("uniform", "greedy", "twa")
State = dict[str, torch.Tensor]


def _ignore(_: Event) -> None:
    return None


# --------------------------------------------------------------------------------------------- uniform


class StateSum:
    """Float64 running sum of the floating tensors of state dicts (non-floating ones: the first state's).

    Averages come out in the widest floating dtype among the states summed (``torch.promote_types``): a
    bf16 first ingredient does not round the mean of float32 ones; the writer casts to the output dtype.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.reference: State = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        if not self.reference:
            self.reference = {k: v.detach().clone() for k, v in state.items()}
        for key, value in state.items():
            if value.is_floating_point():
                if key in self.sums:
                    self.sums[key].add_(value)  # float64 += float32/bf16: exact widening, no temporary
                else:
                    self.sums[key] = value.double()
                self.dtypes[key] = torch.promote_types(self.dtypes.get(key, value.dtype), value.dtype)
        self.count += 1

    def mean(self) -> State:
        """The average, each floating tensor in the widest dtype of the states summed."""
        return {k: (self.sums[k] / self.count).to(self.dtypes[k]) if k in self.sums else v.clone()
                for k, v in self.reference.items()}

    def candidate(self, state: Mapping[str, torch.Tensor]) -> State:
        """The average with ``state`` added, without adding it: ``(sum + w) / (n + 1)``."""
        return {k: ((self.sums[k] + state[k].double()) / (self.count + 1)).to(
                    torch.promote_types(self.dtypes[k], state[k].dtype)) if k in self.sums
                else v.clone() for k, v in self.reference.items()}  # one float64 temporary at a time


def uniform_soup(states: Iterable[Mapping[str, torch.Tensor]]) -> State:
    """The plain average of the states (float64 accumulation), reading one state at a time."""
    total = StateSum()
    for state in states:
        total.add(state)
    return total.mean()


# --------------------------------------------------------------------------------------------- greedy


@dataclass(frozen=True)
class GreedyStep:
    """One held-out evaluation of greedy soup: the ingredient tried, the soup's accuracy, the verdict."""

    candidate: str
    heldout_accuracy: float
    accepted: bool
    soup: tuple[str, ...]


@dataclass(frozen=True)
class GreedyResult:
    soup: tuple[str, ...]
    state: State
    trace: tuple[GreedyStep, ...]


def greedy_soup(heldout_accuracy: Mapping[str, float], load: Callable[[str], State],
                score: Callable[[State], float]) -> GreedyResult:
    """Model soups' greedy procedure, exactly as ``mlfoundations/model-soups`` ``main.py`` runs it.

    Args:
        heldout_accuracy: every ingredient's held-out accuracy, in file-name order (ties keep that order).
        load: reads one ingredient's state by name.
        score: held-out accuracy of a candidate soup (BN re-estimated by the caller).

    Returns:
        The accepted ingredients in the order they joined, the soup's state (float64 mean of them) and
        the trace of every evaluation: first the best ingredient alone, then one line per candidate.
    """
    ranked = sorted(heldout_accuracy, key=lambda name: -heldout_accuracy[name])
    total = StateSum()
    total.add(load(ranked[0]))
    best = heldout_accuracy[ranked[0]]
    soup = [ranked[0]]
    trace = [GreedyStep(ranked[0], best, True, tuple(soup))]
    for name in ranked[1:]:
        state = load(name)
        accuracy = score(total.candidate(state))
        accepted = accuracy > best  # strictly better, as the reference code
        if accepted:
            total.add(state)
            soup.append(name)
            best = accuracy
        trace.append(GreedyStep(name, accuracy, accepted, tuple(soup)))
    return GreedyResult(soup=tuple(soup), state=total.mean(), trace=tuple(trace))


# --------------------------------------------------------------------------------------------- twa


@dataclass(frozen=True)
class Segment:
    """One trainable parameter tensor inside the flat vector."""

    name: str
    offset: int
    numel: int


def segments_of(model: nn.Module, names: list[str]) -> tuple[Segment, ...]:
    params = dict(model.named_parameters())
    out, offset = [], 0
    for name in names:
        out.append(Segment(name, offset, params[name].numel()))
        offset += params[name].numel()
    return tuple(out)


#: Which coefficient column each parameter tensor uses: one column for all (model) or one per tensor (layer).
GRANULARITIES: dict[str, Callable[[int], list[int]]] = {
    "model": lambda tensors: [0] * tensors,
    "layer": lambda tensors: list(range(tensors)),
}

class Directions:
    """The coefficient parametrisation of the soup, ``w(λ) = origin + Σᵢ λᵢ (wᵢ − origin)``, stored as

    ``w_l(λ) = c_l + (Σᵢ λ[i,l] − 1) ū_l + Σᵢ (λ[i,l] − 1/K) δᵢ,l`` on parameter tensor l (``Σᵢ δᵢ = 0``),

    with ``c`` the uniform soup, ``ū = c − origin`` (float32) and ``δᵢ = wᵢ − c`` in ``dtype``
    (float32, bfloat16, or int8 with one absmax scale per ingredient and tensor). At λ = 1/K it is
    exactly ``c``; the gradient ``∂L/∂λ[i,l] = (ū_l + δᵢ,l)·g_l`` costs one pass over the rows.
    """

    #: Entries (K x columns) of one float32 block of deviations, 16 MiB.
    BLOCK_ENTRIES = 1 << 22

    def __init__(self, center: torch.Tensor, origin_offset: torch.Tensor, segments: tuple[Segment, ...], count: int,
                 dtype: str = "float32") -> None:
        self.center = center.to(torch.float32)
        self.offset = origin_offset.to(torch.float32)
        self.segments = segments
        self.dtype = dtype
        self.rows = torch.zeros(count, center.numel(), dtype=STORAGE_DTYPES[dtype])
        self.scales = torch.ones(count, len(segments), dtype=torch.float32)

    @property
    def count(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: the K rows, their scales, c and ū (one tensor when there is no base)."""
        held = {t.data_ptr(): t for t in (self.rows, self.scales, self.center, self.offset)}
        return sum(t.numel() * t.element_size() for t in held.values())

    def to(self, device: torch.device) -> Directions:
        """Move every tensor to ``device``; without a base ``c`` and ``ū`` are one tensor, and stay one there."""
        shared = self.offset is self.center
        for name in ("center", "offset", "rows", "scales"):
            setattr(self, name, getattr(self, name).to(device))
        if shared:
            self.offset = self.center
        return self

    def set_row(self, index: int, weights: torch.Tensor) -> None:
        """Store ``δ = weights − c`` (the flat trainable weights of ingredient ``index``)."""
        delta = weights.to(self.center.device, torch.float32) - self.center
        for t, seg in enumerate(self.segments):
            part = delta[seg.offset: seg.offset + seg.numel]
            if self.dtype == "int8" and part.numel():  # a size-0 parameter has no entries to scale
                scale = part.abs().max() / 127
                scale = scale if scale > 0 else torch.ones_like(scale)
                self.scales[index, t] = scale
                part = torch.round(part / scale).clamp_(-127, 127)
            self.rows[index, seg.offset: seg.offset + seg.numel] = part.to(self.rows.dtype)

    def blocks(self, t: int) -> Iterable[tuple[slice, torch.Tensor]]:
        """Tensor t's K deviations as float32 column blocks (K x at most ``BLOCK_ENTRIES / K``): rounded storage
        is converted one block at a time, so the float32 copy never exists at full size."""
        seg = self.segments[t]
        step = max(1, self.BLOCK_ENTRIES // self.count)
        for start in range(seg.offset, seg.offset + seg.numel, step):
            span = slice(start, min(start + step, seg.offset + seg.numel))
            rows = self.rows[:, span].to(torch.float32)  # a view when stored in float32, else a copy
            yield span, rows.mul_(self.scales[:, t, None]) if self.dtype == "int8" else rows

    def weights(self, coefficients: torch.Tensor, columns: list[int]) -> torch.Tensor:
        """Flat trainable weights for coefficients (K x columns); ``columns[t]`` is tensor t's column."""
        out = torch.empty_like(self.center)
        lams = [coefficients[:, columns[t]].to(torch.float32) for t in range(len(self.segments))]
        sums = torch.stack([lam.sum() for lam in lams]).tolist()  # one device sync per call, not one per tensor
        for t, seg in enumerate(self.segments):
            lam = lams[t]
            span = slice(seg.offset, seg.offset + seg.numel)
            out[span] = self.center[span]
            out[span].add_(self.offset[span], alpha=sums[t] - 1)
            # Σ λᵢ δᵢ = Σ (λᵢ − 1/K) δᵢ since Σ δᵢ = 0; the second form stays exactly c at λ = 1/K even when
            # the stored δᵢ are rounded (bf16/int8) and no longer sum to zero.
            for part, rows in self.blocks(t):
                out[part].addmv_(rows.T, lam - 1 / self.count)
        return out

    def coefficient_grad(self, grad: torch.Tensor, columns: list[int], width: int) -> torch.Tensor:
        """``∂L/∂λ`` (K x width) from the flat gradient of the weights: tied tensors add up."""
        out = torch.zeros(self.count, width, dtype=torch.float32, device=grad.device)
        for t, _ in enumerate(self.segments):
            for part, rows in self.blocks(t):
                g = grad[part].to(torch.float32)
                out[:, columns[t]] += rows @ g + torch.dot(self.offset[part], g)
        return out


#: Optimizers over the coefficients, by ``--optimizer``.
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], CoefficientTrainConfig], torch.optim.Optimizer]] = {
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}


def lr_factor(config: CoefficientTrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The schedule's factor times a linear warm-up over the first ``warmup`` fraction of the steps."""
    factor = SCHEDULES[config.schedule](epoch, step, steps_per_epoch, config.epochs)
    warm_steps = config.warmup * config.epochs * steps_per_epoch
    done = epoch * steps_per_epoch + step + 1
    return factor * min(1.0, done / warm_steps) if warm_steps > 0 else factor


@dataclass(frozen=True)
class CoefficientFit:
    coefficients: torch.Tensor  # K x columns, float64 on the CPU
    steps: int
    epoch_losses: tuple[float, ...]


def fit_coefficients(model: nn.Module, names: list[str], directions: Directions, columns: list[int],
                     loader: Iterable, config: CoefficientTrainConfig, device: torch.device, amp: str = "off",
                     on_step: Callable[[StepInfo], None] | None = None) -> CoefficientFit:
    """Fit the mixing coefficients λ by minimising the cross-entropy on ``loader``, starting at λ = 1/K.

    The model's parameters are rewritten from λ before every step (BN layers in train mode use batch
    statistics); the optimizer steps on λ only. The model ends at the fitted weights.
    """
    width = max(columns) + 1
    lam = torch.full((directions.count, width), 1.0 / directions.count, device=device, requires_grad=True)
    optimizer = OPTIMIZERS[config.optimizer]([lam], config)
    # fp16: the loss is scaled before back-propagating (as ``train_projected``), or activation gradients below
    # float16's range flush to zero; the scaled ∂L/∂λ is linear in the parameters' gradients, so the scaler
    # unscales it (and skips a step whose gradients overflowed) on λ, the optimizer's one parameter
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    params = dict(model.named_parameters())
    flat = FlatGrad([params[n] for n in names])
    steps_per_epoch = len(loader)
    model.train()
    steps, losses = 0, []
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for step, (inputs, targets) in enumerate(Batches(loader)):
            lr = config.lr * lr_factor(config, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            write_flat(model, names, directions.weights(lam.detach(), columns))
            flat.zero()
            with autocast(device, amp):
                loss = class_loss(logits_of(model(inputs.to(device))), targets.to(device))
            value = loss.item()
            if not torch.isfinite(loss):
                raise NumericalError(f"soup training loss became {value} at epoch {epoch + 1} step {step + 1} "
                                     f"(lr {lr:g}); lower --lr")
            scaler.scale(loss).backward()
            lam.grad = directions.coefficient_grad(flat.gather(), columns, width)
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            total += value * len(targets)
            count += len(targets)
            if on_step is not None:
                on_step(StepInfo(epoch, step, steps_per_epoch, config.epochs, lr, value))
        losses.append(total / max(1, count))
    for p in params.values():
        p.grad = None
    fitted = lam.detach()
    if not torch.isfinite(fitted).all():
        raise NumericalError(f"soup coefficients became non-finite (lr {config.lr:g}); lower --lr")
    write_flat(model, names, directions.weights(fitted, columns))
    return CoefficientFit(coefficients=fitted.double().cpu(), steps=steps, epoch_losses=tuple(losses))


def per_ingredient(coefficients: torch.Tensor, segments: tuple[Segment, ...], columns: list[int]) -> list[float]:
    """One coefficient per ingredient: λ itself per model, the numel-weighted mean over tensors per layer."""
    weights = torch.zeros(coefficients.shape[1], dtype=torch.float64)
    for seg, column in zip(segments, columns):
        weights[column] += seg.numel
    return (coefficients @ (weights / weights.sum())).tolist()


# --------------------------------------------------------------------------------------------- evaluation


@dataclass
class SoupEvaluator:
    """Loads a state, re-estimates BN on the fit split, scores it on the held-out and eval splits."""

    model: nn.Module
    device: torch.device
    bn_loader: DataLoader
    heldout_loader: Iterable  # a Sourced DataLoader when --holdout gave the split
    eval_loader: DataLoader
    seed: int
    amp: str = "off"

    def settle(self, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Load ``state`` (or keep the model's weights) and re-estimate BN with the same draws every time."""
        if state is not None:
            load_state(self.model, state)
        torch.manual_seed(self.seed)
        recalibrate_bn(self.model, self.bn_loader, self.device)

    def heldout(self, state: Mapping[str, torch.Tensor]) -> Metrics:
        self.settle(state)
        return evaluate(self.model, self.heldout_loader, self.device, self.amp)

    def both(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict]:
        """Held-out and eval metrics after one BN re-estimation."""
        self.settle(state)
        return {"heldout": evaluate(self.model, self.heldout_loader, self.device, self.amp).as_dict(),
                "eval": evaluate(self.model, self.eval_loader, self.device, self.amp).as_dict()}

    def snapshot(self) -> State:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


# --------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class SoupResult:
    report: dict
    model_path: Path
    report_path: Path
    warnings: tuple[str, ...]


@dataclass
class Inputs:
    """The ingredients, the optional base, the model and its reader, validated from headers."""

    files: list[CheckpointFile]
    base: CheckpointFile | None
    spec: str
    model_args: tuple[tuple[str, str], ...]
    model: nn.Module
    reader: Reader
    stored: dict[str, tuple[tuple[int, ...], str]]  # the last ingredient's tensors (shape, dtype), from its header
    excluded: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    base_reader: Reader | None = None  # the reader of --base (``reader_for_base``)


def find_inputs(config: SoupConfig) -> Inputs:
    """Discover the ingredients (file-name order, aliases counted once, the base left out), build the model."""
    found = discover(config.finetunes_dir)
    if not found:
        raise no_checkpoints(config.finetunes_dir)
    chosen = without_weight_copies(select(found, Selection(include=config.include, exclude=config.exclude),
                                          same_weights=same_weights_as_read(config), trajectory=False), config)
    base = None
    try:
        if config.base is not None:
            if not config.base.exists():
                raise CheckpointError(f"--base {config.base}: not found; pass the pretrained model's file")
            base = CheckpointFile(name=config.base.name, path=config.base)
        # a save_pretrained folder is listed by its weight file: compare --base the same way, folder or file
        as_base = {f.name: same_file(f.path, weights_path(base.path)) for f in chosen.files} if base else {}
    except PermissionError as exc:
        raise CheckpointError(f"--base {config.base}: permission denied reading {exc.filename or config.base}; make "
                              f"it readable (chmod -R a+rX) or run as a user who can read it") from None
    except OSError as exc:
        if not name_too_long(exc):
            raise
        raise CheckpointError(f"--base {config.base}: {TOO_LONG}; pass the pretrained model's file") from None
    files = [f for f in chosen.files if as_base.get(f.name) is None]  # the base, or a link or copy of it
    excluded = [{"name": d.name, "reason": d.reason} for d in chosen.dropped]
    excluded += [{"name": f.name, "reason": "the --base model" + ("" if as_base[f.name].startswith("symlink")
                                                                  else f" ({as_base[f.name]})")}
                 for f in chosen.files if f not in files]
    for entry in files + ([base] if base else []):
        raise_if_refused(entry.path)
    if len(files) < 2:
        left_out = [f"{d.name}: {d.reason}, counted once" for d in chosen.dropped if d.alias_of is not None]
        left_out += [f"{f.name}: the --base model" for f in chosen.files if f not in files]
        more = f"; {len(left_out) - 1} more left out" if len(left_out) > 1 else ""
        why = f" ({left_out[0]}{more})" if left_out else ""
        raise CheckpointError(f"{config.finetunes_dir}: {len(files)} ingredient(s) found{why}; a soup needs at least "
                              f"2 distinct fine-tunes (check --include/--exclude)")
    spec, model_args, model = build_run_model(config, files[0])
    reader = Reader.for_run(config, model)
    notes, headers = validate_headers(files, model, reader, spec, trajectory=False)  # fine-tunes: no order
    base_reader, base_note = reader_for_base(base, model, reader, spec) if base is not None else (None, None)
    warnings = [f"{d.name}: {d.reason}; counted once" for d in chosen.dropped if d.alias_of is not None]
    warnings += notes + ([base_note] if base_note else [])
    return Inputs(files, base, spec, model_args, model, reader, dict(headers[files[-1].name].tensors), excluded,
                  warnings, base_reader)


def without_weight_copies(chosen: Chosen, config: SoupConfig) -> Chosen:
    """``chosen`` less the torch files that hold another ingredient's weights in another container, whatever their
    names (``select`` compares an unnumbered file with the numbered ones only): each would count twice in the
    uniform soup and greedy's candidates (``weight_copies`` says which file is kept)."""
    copies = weight_copies(list(chosen.files), same_weights_as_read(config))
    dropped = [Dropped(name, alias_reason(how, original), alias_of=original)
               for name, (original, how) in copies.items()]
    return Chosen(files=tuple(f for f in chosen.files if f.name not in copies), dropped=(*chosen.dropped, *dropped))


def reader_for_base(base: CheckpointFile, model: nn.Module, reader: Reader, spec: str) -> tuple[Reader, str | None]:
    """The reader of ``--base`` (checked against the model) and a note when it is not the run's. The reading
    options describe the fine-tunes, and a released pretrained file often lacks what they name: with ``--weights
    ema`` or ``--weights KEY``, a base with one set of weights (safetensors, a plain state dict) is read as that
    set; with ``--strip-prefix``, a base without that prefix is matched to the model as if the flag were not
    given."""
    variants = [(reader, "")]  # the others read with other options: headers of their own
    if reader.weights != "raw":
        lacks = "no EMA copy" if reader.weights == "ema" else f"no {reader.weights!r} key"
        variants.append((replace(reader, weights="raw", headers=HeaderMemo()),
                         f"holds {lacks}; its one set of weights is the base"))
    if reader.strip_prefix:
        variants += [(replace(r, strip_prefix=None, headers=HeaderMemo()), f"{why + '; ' if why else ''}its keys "
                      f"do not start with {reader.strip_prefix}, matched to the model as they are")
                     for r, why in variants]
    first = None
    for candidate, why in variants:
        try:
            check_base(base, model, candidate, spec)
        except CheckpointError as err:
            first = first or err
            continue
        return candidate, (f"--base {base.path}: {why} (the reading options are the fine-tunes')" if why else None)
    raise first


def check_base(base: CheckpointFile, model: nn.Module, reader: Reader, spec: str) -> None:
    """``--base`` read from its header and checked against the model; errors name ``--base`` (the fixes
    for a file in the folder, such as ``--exclude``, do not apply to it)."""
    try:
        validate_headers([base], model, reader, spec)
    except CheckpointError as err:
        reason = str(err).split("; ")[0].removeprefix(f"{base.path}: ")  # the path once: after --base
        raise CheckpointError(f"--base {base.path}: {reason}; pass the pretrained weights the fine-tunes "
                              f"started from (the same --model)", err.details) from None


def same_data(a: str, b: str) -> bool:
    """Do two data specs name the same data? Registry names ignoring case; ``file.py:fn`` by resolved path."""
    def key(spec: str) -> tuple[str, ...]:
        text = spec.strip()
        path, sep, function = text.rpartition(":")
        if sep and path.endswith(".py"):
            return (str(Path(path).expanduser().resolve()), function)
        return (registry_name(text) or text.lower().replace("_", "-"),)

    return key(a) == key(b)


def check_holdout_labels(config: SoupConfig) -> None:
    """``--data`` and ``--holdout`` naming two built-in datasets whose labels stand for different classes (``cifar10``
    and ``svhn``: label 3 is a cat in one, the digit 3 in the other): every held-out example would be scored against
    the wrong class, and the soups chosen on that, without an error. A usage error instead."""
    if config.holdout is None:
        return
    ours, theirs = label_meaning(config.data), label_meaning(config.holdout)
    if ours is not None and theirs is not None and ours != theirs:
        raise ConfigError(f"--holdout {config.holdout.strip()}'s labels stand for {theirs}, --data "
                          f"{config.data.strip()}'s for {ours}: the held-out examples would be scored against the "
                          f"wrong classes; drop --holdout (a part of --data's fit split is held out) or give a "
                          f"--holdout with --data's classes")


def output_names(config: SoupConfig, inputs: Inputs, hf_source: Path | None = None) -> tuple[tuple[str, ...], int]:
    """The files this run writes (with the copied config/tokenizer files of ``hf_source``) and the model's size:
    the last ingredient's tensors as stored (the soup keeps their dtypes under ``--out-dtype auto``)."""
    model_files, size = planned_model(inputs.stored, config.out_dtype, config.max_shard_size)
    return (*model_files, REPORT_FILE, HUMAN_REPORT_FILE, *side_file_names(hf_source)), size


def _loader(dataset: Dataset, config: SoupConfig, shuffle: bool, train_mode: bool = False) -> DataLoader:
    """Batches of ``--batch-size``; a ``train_mode`` pass (fitting, BN) drops a last batch of one example."""
    drop = train_mode and drop_single_last(len(dataset), config.train.batch_size)  # type: ignore[arg-type]
    return DataLoader(for_workers(dataset, config.num_workers), batch_size=config.train.batch_size, shuffle=shuffle,
                      num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed),
                      drop_last=drop)


def _heldout_loader(dataset: Dataset, config: SoupConfig, shuffle: bool, train_mode: bool = False) -> Iterable:
    """``_loader`` of the held-out split; its read errors name ``--holdout`` when that flag gave it."""
    loader = _loader(dataset, config, shuffle, train_mode)
    return Sourced(loader, "--holdout") if config.holdout is not None else loader


def _holdout_data(config: SoupConfig) -> DataSplits:
    """``--holdout``'s datasets (its eval split is the held-out set); errors name ``--holdout``, not ``--data``."""
    assert config.holdout is not None
    try:
        return build_data(config.holdout, root=config.data_root, download=config.download, eval_only=True)
    except TwaError as exc:
        message = str(exc)
        if not message.startswith("--data "):
            raise
        renamed = type(exc)("--holdout " + message[len("--data "):], exc.details)
        raise renamed.with_traceback(exc.__traceback__) from exc.__cause__


#: Below this many held-out examples a soup run warns that its choices are mostly chance.
FEW_HELDOUT = 100


@dataclass(frozen=True)
class SoupSplits:
    """The data of a soup run. ``heldout_eval`` scores the held-out examples (greedy's ranking and acceptance,
    the best single ingredient, the written soup): read as the evaluation split is read, without training
    augmentation, as model soups score ImageNet2p. ``heldout_fit`` is what the coefficients are fitted on: the
    same examples as ``--data``'s fit split yields them (its augmentation), or ``--holdout``'s split."""

    fit: Dataset
    heldout_fit: Dataset
    heldout_eval: Dataset
    eval: Dataset
    facts: dict
    notes: tuple[str, ...]


def _check_same_classes(fit: Dataset, heldout: Dataset, config: SoupConfig) -> None:
    """``--holdout``'s class names against ``--data``'s where both datasets name them (ImageFolder's ``classes``):
    class folders that differ would number the classes differently, scoring every held-out example against the
    wrong label without an error."""
    ours, theirs = getattr(fit, "classes", None), getattr(heldout, "classes", None)
    if not (isinstance(ours, list) and isinstance(theirs, list)) or ours == theirs:
        return
    only = [f"only in {flag}: {', '.join(sorted(extra)[:3])}{'...' if len(extra) > 3 else ''}"
            for flag, extra in (("--data", set(ours) - set(theirs)), ("--holdout", set(theirs) - set(ours))) if extra]
    detail = "; ".join(only) or "in another order"
    raise DataError(f"--holdout {config.holdout}: its classes differ from --data {config.data}'s ({len(theirs)} vs "
                    f"{len(ours)}; {detail}), so the same label would mean different classes; give both the same "
                    "CLASS folders")


def soup_data(config: SoupConfig) -> SoupSplits:
    """The fit, held-out and eval splits: the held-out part is carved from the fit split or given by
    ``--holdout``; the facts for the report; the notes about options the specs do not use (``DataSplits.notes``)."""
    data = build_data(config.data, root=config.data_root, download=config.download)
    notes = data.notes
    if config.holdout is not None:
        holdout = _holdout_data(config)
        fit, heldout = data.train, holdout.eval
        _check_same_classes(data.train, heldout, config)
        scored = heldout
        # --download beside a --holdout that never downloads is not "unused" when --data downloads with it
        holdout_notes = [n for n in holdout.notes if not (n.startswith("--download ") and download_note(config.data)
                                                          is None)]
        notes = tuple(dict.fromkeys([*notes, *(n.replace("--data ", "--holdout ", 1) for n in holdout_notes)]))
        source = f"--holdout {config.holdout}"
    else:
        fit, heldout = split_holdout(data.train, config.holdout_fraction, config.seed)
        # scored without augmentation where --data knows its plain view (a user function's fit split: as it yields)
        scored = Subset(data.train_plain, heldout.indices) if data.train_plain is not None else heldout
        source = f"--holdout-fraction {config.holdout_fraction} of --data's fit split (seed {config.seed})"
    facts = {"spec": config.data, "name": data.name, "num_classes": data.num_classes, "heldout": source,
             "fit_examples": len(fit), "heldout_examples": len(heldout), "eval_examples": len(data.eval)}
    return SoupSplits(fit=fit, heldout_fit=heldout, heldout_eval=scored, eval=data.eval, facts=facts, notes=notes)


def planned_soup_data(config: SoupConfig) -> SoupSplits | dict:
    """``--dry-run``'s data: the splits built as the run builds them, without downloading; the plan's ``data``
    (``download_plan``) when the files are missing and ``--download`` would fetch them (then nothing else about
    the data can be checked)."""
    try:
        return soup_data(replace(config, download=False))
    except MissingData as err:
        if not config.download:
            raise
        return download_plan(config.data, err)


def soup_dry_run(config: SoupConfig, inputs: Inputs, outputs: tuple[str, ...], size: int, data: dict) -> SoupResult:
    """What a run would do: the ingredients, the data, a memory estimate and the files it would write; nothing
    touched (no ingredient's weights read, no folder created)."""
    parameters = sum(p.numel() for p in inputs.model.parameters() if p.requires_grad)
    state_bytes = sum(math.prod(shape) * getattr(torch, dtype).itemsize for shape, dtype in inputs.stored.values())
    report = {
        "schema_version": SCHEMA_VERSION, "tool": "twa", "version": __version__, "command": "soup", "dry_run": True,
        "ingredients": [f.name for f in inputs.files],
        "inputs": [{"name": f.name, "path": str(f.path)} for f in inputs.files],
        "base": str(inputs.base.path) if inputs.base else None,
        "excluded": inputs.excluded,
        "model": {"spec": inputs.spec, "args": dict(inputs.model_args), "parameters": parameters},
        "data": data,
        "memory_estimate_bytes": whole_process(memory_formula(len(inputs.files), parameters, state_bytes,
                                                              config.basis_dtype), process_bytes()),
        "threads": torch.get_num_threads(),  # what the run would use: --threads, else torch's default
        "would_write": [str(config.out_dir / n) for n in outputs],
        "output_bytes": size,
        "config": _config_dict(config),
        "warnings": inputs.warnings,
    }
    return SoupResult(report=report, model_path=config.out_dir / outputs[0], report_path=config.out_dir / REPORT_FILE,
                      warnings=tuple(inputs.warnings))


def whole_process(formula: dict, process: int) -> dict:
    """A dry run's estimate: ``memory_formula`` (its parts and ``total``, beyond torch and the data, as
    ``report.json``'s ``memory.estimate``), with ``torch_model_data`` (what the dry run's process holds:
    ``process_bytes``) and their sum, ``whole_process``, the figure to compare with the machine's memory."""
    return {**formula, "torch_model_data": process, "whole_process": process + formula["total"]}


def memory_formula(k: int, d: int, state_bytes: int, basis_dtype: str) -> dict:
    """Peak host memory of the run beyond framework and data (bytes), for K ingredients of D trainable parameters.

    ``K·D·b`` for the directions (b = 4, 2, 1), ``8·D`` for c and ū, and ``14·S`` (S: bytes of one state
    dict, ≈ 4·D in float32): six state dicts during greedy (model, uniform soup, float64 running sum x2,
    candidate, loaded ingredient), then while fitting the model, the assembled weights, the flat gradient
    and autograd's temporaries. The K-independent part was measured (benchmarks/soup_memory.py): 63-70·D
    bytes for an 8M-parameter float32 model against 8·D + 14·S = 64·D here.
    """
    b = STORAGE_DTYPES[basis_dtype].itemsize
    parts = {"directions": k * d * b, "center_and_offset": 2 * 4 * d, "states_and_workspace": 14 * state_bytes}
    return {"formula": f"K*D*{b} + 8*D + 14*S (S: bytes of one state dict)", **parts, "total": sum(parts.values())}


def run_soup(config: SoupConfig, on_event: EventSink = _ignore) -> SoupResult:
    """Run ``twa soup`` end to end: evaluate every ingredient, the uniform, greedy and TWA soups, write one.

    Steps: inputs and output checked from headers -> data -> uniform soup (streamed) -> every ingredient
    (their deviations join the directions) -> uniform -> greedy -> twa -> report -> write the chosen soup.
    """
    timings: dict[str, float] = {}
    check_allow_globals(config.allow_globals)
    check_holdout_labels(config)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    inputs = find_inputs(config)
    for message in inputs.warnings:
        on_event(Event("warning", message))
    outputs, size = output_names(config, inputs, hf_folder(inputs.files[-1], config.finetunes_dir))
    base = inputs.base.path if inputs.base else None
    # a --base folder is read through its weight files (or index and shards): those are inputs, never overwritten
    sources = tuple(f.path for f in inputs.files) + \
        ((base, *(folder_weight_files(base) if base.is_dir() else ())) if base else ())
    check_output(config.out_dir, outputs, config.overwrite, sources, size, config.finetunes_dir)  # before the data
    splits = planned_soup_data(config) if config.dry_run else soup_data(config)
    if isinstance(splits, dict):  # a dry run whose data --download would fetch
        return soup_dry_run(config, inputs, outputs, size, splits)
    fit, heldout, eval_data, data_facts, notes = (splits.fit, splits.heldout_eval, splits.eval, splits.facts,
                                                  splits.notes)
    for message in notes:
        inputs.warnings.append(message)
        on_event(Event("warning", message))
    if config.holdout is not None and same_data(config.holdout, config.data):
        message = (f"--holdout {config.holdout.strip()} is --data's own evaluation split: the soups are chosen on the "
                   f"examples they are evaluated on, so the eval numbers are not held out; use "
                   f"--holdout-fraction (carved from the fit split) or another --holdout")
        inputs.warnings.append(message)
        on_event(Event("warning", message))
    if data_facts["heldout_examples"] < FEW_HELDOUT:
        count = data_facts["heldout_examples"]
        message = (f"the held-out split has {count} example{'s' if count != 1 else ''}: its accuracies move in "
                   f"steps of {100 / count:.3g} points, so the choices made on it (greedy's, the written soup) are "
                   f"mostly chance; hold out at least {FEW_HELDOUT} (--holdout-fraction or --holdout)")
        inputs.warnings.append(message)
        on_event(Event("warning", message))
    classes = data_facts["num_classes"]  # one example of each split through the model, before any ingredient is read
    check_data_fits(inputs.model, (fit, eval_data), classes, inputs.spec, config.data)
    if config.holdout:
        check_data_fits(inputs.model, (heldout,), classes, inputs.spec, config.holdout, "--holdout")
    check_batch_of_one(inputs.model, config, fit)
    check_eval_batches(inputs.model, config.train.batch_size,
                       [("the held-out split", heldout), ("--data's eval split", eval_data)])
    if config.dry_run:
        return soup_dry_run(config, inputs, outputs, size, {**data_facts, "would_download": False})
    names = trainable_names(inputs.model)
    dtypes = {k: getattr(torch, dtype) for k, (_, dtype) in inputs.reader.header(inputs.files[-1].path).tensors.items()}
    with prepare_output_dir(config.out_dir, outputs, config.overwrite, sources, size,
                            config.finetunes_dir):  # --out locked for this run; a failed run leaves no empty --out
        clock = time.perf_counter()
        base_state = _load(inputs, inputs.base, inputs.base_reader) if inputs.base else None
        origin = flatten(base_state, names, torch.float32) if base_state is not None else None
        base_weights = weights_digest(base_state) if base_state is not None else None
        del base_state
        uniform, center, digests = read_uniform(inputs, names, on_event, base_weights)
        directions = Directions(center, center - origin if origin is not None else center,
                                segments_of(inputs.model, names), len(inputs.files), config.basis_dtype)
        timings["uniform_s"] = time.perf_counter() - clock
        inputs.model.to(device)
        evaluator = SoupEvaluator(inputs.model, device, _loader(fit, config, False, train_mode=True),
                                  _heldout_loader(heldout, config, False),
                                  _loader(eval_data, config, False), config.seed, config.amp)

        clock = time.perf_counter()
        metrics = evaluate_ingredients(inputs, names, directions, evaluator, on_event)
        timings["ingredients_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        on_event(Event("phase", "uniform soup", total=1))
        metrics["uniform"] = evaluator.both(uniform)
        on_event(Event("advance"))
        greedy = run_greedy(inputs, metrics, evaluator, on_event)
        metrics["greedy"] = evaluator.both(greedy.state)
        timings["greedy_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        fitted, columns = run_twa(config, inputs.model, names, uniform, directions, evaluator,
                                  _heldout_loader(splits.heldout_fit, config, shuffle=True, train_mode=True),
                                  on_event)
        metrics["twa"] = evaluator.both()
        timings["twa_s"] = time.perf_counter() - clock

        report = soup_report(config, inputs, metrics, greedy, fitted, directions, columns, uniform, digests)
        report.update(data=data_facts, device=str(device), timings=timings)
        del directions
        chosen = {"uniform": uniform, "greedy": greedy.state}.get(report["written_method"])
        if chosen is not None:  # (the model holds the TWA soup, BN re-estimated, as it was evaluated)
            evaluator.settle(chosen)  # written with the BN statistics it was evaluated with
        del uniform, greedy, chosen
        state = {k: v.to(dtypes[k]) for k, v in evaluator.snapshot().items()}  # the ingredients' dtypes
        report["memory"]["peak_rss_bytes"] = peak_rss_bytes()
        return write_soup(config, report, state, inputs)


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state's keys, dtypes, shapes and values: equal for the same weights in any file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_distinct(entry: CheckpointFile, digest: str, seen: dict[str, str | None]) -> None:
    """Refuse an ingredient whose weights (``weights_digest``) an earlier one or the base (``None`` in ``seen``)
    holds: a copy in another format, which the aliases found from the files' bytes miss, would count twice."""
    if digest not in seen:
        seen[digest] = entry.name
        return
    other = seen[digest]
    what = ("holds the --base model's weights: it is not a fine-tune" if other is None else
            f"holds the same weights as {other} (another format or container): the soups would count them twice")
    raise CheckpointError(f"{entry.path}: {what}; leave it out: {exclude_hint(entry.name)}")


def read_uniform(inputs: Inputs, names: list[str], on_event: EventSink,
                 base_weights: str | None = None) -> tuple[State, torch.Tensor, list[str]]:
    """One streamed pass: the uniform soup, its trainable part as a float32 vector, the inputs' sha256. An
    ingredient holding the weights of an earlier one, or of the base (``base_weights``: its ``weights_digest``),
    is refused (``check_distinct``)."""
    on_event(Event("phase", "reading the ingredients (uniform soup)", total=len(inputs.files)))
    total = StateSum()
    seen: dict[str, str | None] = {base_weights: None} if base_weights else {}
    # hashlib releases the GIL: one thread hashes the files, another each loaded state while it is summed
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="twa-sha256") as files,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="twa-weights") as weights):
        digests = [files.submit(sha256_file, entry.path) for entry in inputs.files]
        try:
            for entry in inputs.files:
                state = _load(inputs, entry)
                digest = weights.submit(weights_digest, state)
                total.add(state)
                check_distinct(entry, digest.result(), seen)
                del state, digest
                on_event(Event("advance"))
        except BaseException:
            abandon(digests)
            raise
        sha256 = [future.result() for future in digests]
    center = torch.cat([(total.sums[n] / total.count).reshape(-1) for n in names]).to(torch.float32)
    return total.mean(), center, sha256


def evaluate_ingredients(inputs: Inputs, names: list[str], directions: Directions, evaluator: SoupEvaluator,
                         on_event: EventSink) -> dict[str, dict]:
    """Every ingredient on both splits (their deviations join the directions) and the best on held-out."""
    on_event(Event("phase", "evaluating every ingredient", total=len(inputs.files)))
    ingredients = {}
    for index, entry in enumerate(inputs.files):
        state = _load(inputs, entry)
        directions.set_row(index, flatten(state, names, torch.float32))
        ingredients[entry.name] = evaluator.both(state)
        on_event(Event("advance"))
    best = max(ingredients, key=lambda n: ingredients[n]["heldout"]["accuracy"])  # ties: file order, as greedy
    return {"ingredients": ingredients, "best_single": {**ingredients[best], "ingredient": best}}


def run_greedy(inputs: Inputs, metrics: dict[str, dict], evaluator: SoupEvaluator,
               on_event: EventSink) -> GreedyResult:
    on_event(Event("phase", "greedy soup", total=len(inputs.files) - 1))
    by_name = {f.name: f for f in inputs.files}

    def score(candidate: State) -> float:
        on_event(Event("advance"))
        return evaluator.heldout(candidate).accuracy

    return greedy_soup({n: metrics["ingredients"][n]["heldout"]["accuracy"] for n in by_name},
                       lambda n: _load(inputs, by_name[n]), score)


def run_twa(config: SoupConfig, model: nn.Module, names: list[str], uniform: State, directions: Directions,
            evaluator: SoupEvaluator, loader: Iterable, on_event: EventSink) -> tuple[CoefficientFit, list[int]]:
    """Coefficients fitted on the held-out split from the uniform soup; the model ends at the TWA soup."""
    columns = GRANULARITIES[config.granularity](len(directions.segments))
    load_state(model, uniform)
    directions.to(evaluator.device)
    epochs = f"{config.train.epochs} epoch{'' if config.train.epochs == 1 else 's'}"
    on_event(Event("phase", f"fitting soup coefficients on the held-out split ({epochs})",
                   total=config.train.epochs * len(loader)))
    torch.manual_seed(config.seed)
    fitted = fit_coefficients(model, names, directions, columns, loader, config.train, evaluator.device, config.amp,
                              on_step=lambda info: on_event(Event("step", step=info)))
    return fitted, columns


def soup_report(config: SoupConfig, inputs: Inputs, metrics: dict, greedy: GreedyResult, fitted: CoefficientFit,
                directions: Directions, columns: list[int], uniform: State, digests: list[str]) -> dict:
    """The report's record of inputs, metrics, coefficients, the greedy trace, the fit and memory."""
    files, segments = inputs.files, directions.segments
    method, chosen_by = _written_method(config, metrics)
    parameters = sum(s.numel for s in segments)
    state_bytes = sum(v.numel() * v.element_size() for v in uniform.values())
    return {
        "schema_version": SCHEMA_VERSION, "tool": "twa", "version": __version__, "command": "soup",
        "ingredients": [f.name for f in files],
        "base": str(inputs.base.path) if inputs.base else None,
        "base_sha256": sha256_file(inputs.base.path) if inputs.base else None,
        "coefficients_of": "task_vectors" if inputs.base else "ingredients",
        "metrics": metrics,
        "coefficients": {"uniform": [1 / len(files)] * len(files),
                         "greedy": [1 / len(greedy.soup) if f.name in greedy.soup else 0.0 for f in files],
                         "twa": per_ingredient(fitted.coefficients, segments, columns)},
        "greedy": {"soup": list(greedy.soup), "trace": [asdict(s) for s in greedy.trace]},
        "twa": {"granularity": config.granularity, "start": "uniform", "fit_on": "heldout",
                "steps": fitted.steps, "epoch_losses": list(fitted.epoch_losses),
                "by_tensor": ({s.name: fitted.coefficients[:, c].tolist() for s, c in zip(segments, columns)}
                              if config.granularity == "layer" else None)},
        "written_method": method, "chosen_by": chosen_by,
        "model": {"spec": inputs.spec, "args": dict(inputs.model_args), "parameters": parameters,
                  "frozen": frozen_names(inputs.model)},
        "memory": {"basis_dtype": config.basis_dtype, "directions_bytes": directions.nbytes,
                   "estimate": memory_formula(len(files), parameters, state_bytes, config.basis_dtype)},
        "excluded": inputs.excluded,
        "inputs": [{"name": f.name, "path": str(f.path), "sha256": h} for f, h in zip(files, digests)],
        "config": _config_dict(config),
        "versions": {"twa": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),  # CPU results are byte-identical for the same seed and count
        "warnings": inputs.warnings,
    }


def _load(inputs: Inputs, entry: CheckpointFile, reader: Reader | None = None) -> State:
    """One checkpoint through the safe reader (the run's unless given), checked against the model and for
    finite values."""
    state = (reader or inputs.reader).load(entry.path)
    check_compatible(inputs.model, state, str(entry.path))
    is_base = inputs.base is not None and entry.path == inputs.base.path
    check_finite(state, str(entry.path), "pass a finite pretrained model as --base" if is_base else None)
    return state


def _written_method(config: SoupConfig, metrics: dict) -> tuple[str, str]:
    """``--method``, or the soup with the best held-out accuracy (ties: lower held-out loss, then the simpler)."""
    if config.method != "best":
        return config.method, "--method"
    return min(METHODS, key=lambda m: (-metrics[m]["heldout"]["accuracy"], metrics[m]["heldout"]["loss"])), "heldout"


def _config_dict(config: SoupConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def write_soup(config: SoupConfig, report: dict, state: State, inputs: Inputs) -> SoupResult:
    """Write the chosen soup (with provenance metadata), report.json and report.md, all or nothing."""
    method = report["written_method"]
    metadata = {
        "twa.version": __version__,
        "twa.method": f"soup-{method}",
        MODEL_METADATA_KEY: inputs.spec,
        MODEL_ARGS_METADATA_KEY: json.dumps(dict(inputs.model_args)),
        "twa.coefficients": json.dumps(report["coefficients"][method]),
        "twa.coefficients_of": report["coefficients_of"],
        "twa.sources": json.dumps([{"name": s["name"], "sha256": s["sha256"]} for s in report["inputs"]]),
        "twa.seed": str(config.seed),
    }
    if inputs.base is not None:
        metadata["twa.base"] = json.dumps({"name": inputs.base.name, "sha256": report["base_sha256"]})
    report_path = config.out_dir / REPORT_FILE
    with StagedOutput(config.out_dir) as staged:  # every file to a temp first; renamed together, or none
        stored = inputs.reader.as_stored(dict(state), inputs.files[-1].path)  # the input's keys (tied weights)
        written = write_model(staged, cast_state(stored, config.out_dtype), metadata, config.max_shard_size,
                              hf_folder(inputs.files[-1], config.finetunes_dir))  # its config/tokenizer files
        report["outputs"] = written.outputs(report_path)
        report["outputs"]["human"] = [str(config.out_dir / HUMAN_REPORT_FILE)]
        staged.save_json(REPORT_FILE, report)
        staged.write_bytes(HUMAN_REPORT_FILE, markdown_soup_report(report).encode())
        staged.commit()
    return SoupResult(report=report, model_path=written.main, report_path=report_path,
                      warnings=tuple(report["warnings"]))
