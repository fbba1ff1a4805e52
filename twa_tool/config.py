"""Frozen run configuration: one object per run, built by the CLI (or a caller), validated on creation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

SCHEDULES = ("step", "linear", "constant", "cosine")
BASELINES = ("last", "best", "swa")
AMP_MODES = ("off", "bf16", "fp16")
FIT_ON = ("train", "holdout")
BASIS_DTYPES = ("float32", "bf16", "int8")

#: The smallest --rank-rtol: a float32 residual of a checkpoint that is a combination of the earlier ones is
#: rounding noise of about 1e-8..1e-7 of its norm, which a smaller tolerance would keep as a basis direction.
MIN_RANK_RTOL = 1e-6
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


#: The kinds of weights ``--weights`` names; any other value is a top-level key of the checkpoint dicts.
WEIGHT_KINDS = ("raw", "ema")


def check_weights(weights: str) -> None:
    """``--weights``: raw, ema, or a top-level key (non-empty, one line)."""
    if not weights.strip() or "\n" in weights:
        raise ConfigError(f"--weights {weights!r}: use raw, ema, or the top-level key of the checkpoint dict that "
                          f"holds the model's state_dict")


@dataclass(frozen=True)
class Selection:
    """Which checkpoints of the ordered directory listing to use.

    ``include``/``exclude`` are globs on names; ``start``/``stop`` a Python slice over the ordered
    list (``--range``); ``every`` keeps every K-th of that, counted from its end so the last
    checkpoint is always in; ``last`` keeps the last N; ``top_k`` the K best by the stored metric
    ``by`` (``mode`` min or max, required: a loss wants min, an accuracy max).
    """

    start: int | None = None
    stop: int | None = None
    last: int | None = None
    every: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    top_k: int | None = None
    by: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--last", self.last), ("--every", self.every), ("--top-k", self.top_k)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be a positive number")
        if self.top_k is not None and (self.by is None or self.mode not in ("min", "max")):
            raise ConfigError("--top-k needs --by METRIC and --mode min|max (min for a loss, max for an accuracy)")
        if self.top_k is None and self.by is not None:
            raise ConfigError("--by needs --top-k K")
        if self.top_k is None and self.mode is not None:
            raise ConfigError(f"--mode {self.mode} needs --top-k K and --by METRIC")

    def apply(self, items: list) -> list:
        steps = self.slices(items)
        return list(steps[-1][1] if steps else items)

    def slices(self, items: list) -> list[tuple[str, list]]:
        """``--range``, ``--every`` and ``--last`` in turn, as given: (why an item the step drops is left out, the
        items left after it)."""
        steps = []
        chosen = items
        if self.start is not None or self.stop is not None:
            chosen = chosen[self.start:self.stop]
            steps.append((f"outside --range {'' if self.start is None else self.start}:"
                          f"{'' if self.stop is None else self.stop}", chosen))
        if self.every is not None:
            chosen = chosen[::-1][:: self.every][::-1]
            steps.append((f"not every {_ordinal(self.every)} from the last (--every {self.every})", chosen))
        if self.last is not None:
            chosen = chosen[-self.last:]
            steps.append((f"not among the last {self.last} (--last {self.last})", chosen))
        return steps


def _ordinal(n: int) -> str:
    """``2nd``, ``3rd``, ``11th``, ``21st``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class TrainConfig:
    """Projected SGD on the span of the checkpoints (the paper's P-SGD)."""

    lr: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    epochs: int = 10
    batch_size: int = 128
    schedule: str = "step"

    def __post_init__(self) -> None:
        check_optimizer_fields(self)


def check_finite(flag: str, value: float, minimum: float, inclusive: bool = True) -> None:
    """A float flag must be a finite number above ``minimum`` (nan and inf fail here, not mid-run)."""
    if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
        raise ConfigError(f"{flag} {value}: must be a finite number {'>=' if inclusive else '>'} {minimum:g}")


#: The most ``--num-workers`` takes. Each DataLoader worker is a process of its own (a fork of this one, with its
#: own copy of every page of the dataset it touches), started at every pass over the data: more workers than CPUs
#: only add memory and start-up time (200 workers turned the 1 s one-epoch TWA fit of the demo's checkpoints into
#: 17 s on 2 CPUs), and a typo such as 100000 would exhaust the machine's processes before the first batch. Above
#: the CPU count of any one host a run would use, as ``--threads``'s bound is.
MAX_NUM_WORKERS = 256


def check_num_workers(num_workers: int) -> None:
    """``--num-workers``: from 0 (load in the main process) to ``MAX_NUM_WORKERS``."""
    if num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: must be at least 0 (0 loads the data in the main process)")
    if num_workers > MAX_NUM_WORKERS:
        raise ConfigError(f"--num-workers {num_workers}: must be at most {MAX_NUM_WORKERS} (this machine has "
                          f"{os.cpu_count()} CPUs: each worker is a process of its own, so more workers than CPUs only "
                          f"add memory and start-up time, and far more exhaust the limit on processes)")


def check_seed(seed: int) -> None:
    """``--seed`` within what ``torch.manual_seed`` takes (a 64-bit integer, signed or not)."""
    if not -2**63 <= seed < 2**64:
        raise ConfigError(f"--seed {seed}: must be a 64-bit integer (from {-2**63} to {2**64 - 1})")


def check_optimizer_fields(config: TrainConfig | CoefficientTrainConfig) -> None:
    """The flags both trainers share: --schedule, --lr, --wd, --momentum, --epochs, --batch-size."""
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {config.schedule}: choose one of {', '.join(SCHEDULES)}")
    check_finite("--lr", config.lr, minimum=0.0, inclusive=False)
    check_finite("--wd", config.weight_decay, minimum=0.0)
    for flag, value in (("--lr", config.lr), ("--wd", config.weight_decay)):
        if value > FLOAT32_MAX:  # the optimizer's step multiplies float32 weights by it: it must be one
            raise ConfigError(f"{flag} {value:g}: too large; the weights are float32, so it must be at most "
                              f"{FLOAT32_MAX:.4g}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"--momentum {config.momentum}: must be in [0, 1)")
    if config.epochs < 0:
        raise ConfigError(f"--epochs {config.epochs}: must be >= 0")
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size {config.batch_size}: must be >= 1")


@dataclass(frozen=True)
class AverageConfig:
    """Everything one ``twa average`` run needs."""

    checkpoint_dir: Path
    out_dir: Path
    data: str
    model: str | None = None
    model_args: tuple[tuple[str, str], ...] = ()
    data_root: Path | None = None
    download: bool = False
    selection: Selection = field(default_factory=Selection)
    start: str = "mean"
    train: TrainConfig = field(default_factory=TrainConfig)
    fit_on: str = "train"
    holdout_fraction: float = 0.1
    baselines: tuple[str, ...] = BASELINES
    device: str = "auto"
    amp: str = "off"
    num_workers: int = 0
    seed: int = 0
    overwrite: bool = False
    rank_rtol: float = 1e-5
    weights: str = "raw"
    strip_prefix: str | None = None
    trust_pickle: bool = False
    allow_globals: tuple[str, ...] = ()
    out_dtype: str = "auto"
    basis_dtype: str = "float32"
    max_shard_size: int | None = None
    fail_if_worse_than: str | None = None
    tolerance: float = 0.0
    on_worse: str = "keep"
    dry_run: bool = False
    dist_timeout: float = 300.0  # seconds a torchrun rank waits in a collective (the CLI's process group)
    faults: tuple[str, ...] = ()  # fault injection for tests (hidden --fault), e.g. "oom-basis"

    def __post_init__(self) -> None:
        if self.start not in ("mean", "last"):
            try:
                int(self.start)
            except ValueError:
                raise ConfigError(f"--start {self.start}: use mean, last or a checkpoint index") from None
        if self.fit_on not in FIT_ON:
            raise ConfigError(f"--fit-on {self.fit_on}: choose train or holdout")
        if not (math.isfinite(self.rank_rtol) and MIN_RANK_RTOL <= self.rank_rtol < 1):
            raise ConfigError(f"--rank-rtol {self.rank_rtol}: must be from {MIN_RANK_RTOL:g} to below 1 (below "
                              f"{MIN_RANK_RTOL:g}, float32 rounding noise would be kept as a direction)")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"--holdout-fraction {self.holdout_fraction}: must be strictly between 0 and 1")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"--baselines: unknown {', '.join(unknown)}; use a comma-separated subset of "
                              f"{','.join(BASELINES)}, or none")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp}: choose one of {', '.join(AMP_MODES)}")
        check_weights(self.weights)
        if self.basis_dtype not in BASIS_DTYPES:
            raise ConfigError(f"--basis-dtype {self.basis_dtype}: choose float32, bf16 or int8")
        if self.out_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"--out-dtype {self.out_dtype}: choose auto, float32, float16 or bfloat16")
        if self.fail_if_worse_than is not None and self.fail_if_worse_than not in self.baselines:
            raise ConfigError(f"--fail-if-worse-than {self.fail_if_worse_than}: that baseline is not evaluated; add it "
                              f"to --baselines")
        if self.on_worse not in ("keep", "fallback"):
            raise ConfigError(f"--on-worse {self.on_worse}: choose keep or fallback")
        if self.on_worse == "fallback" and not self.baselines:
            raise ConfigError("--on-worse fallback needs at least one of --baselines last,best,swa")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= 1):
            raise ConfigError(f"--tolerance {self.tolerance}: must be a number from 0 to 1 (accuracy as a fraction, "
                              f"e.g. 0.002 for 0.2 points)")
        check_num_workers(self.num_workers)
        check_seed(self.seed)
        check_finite("--dist-timeout", self.dist_timeout, minimum=0.0, inclusive=False)


def parse_baselines(text: str) -> tuple[str, ...]:
    """Parse ``--baselines``: comma-separated subset of last,best,swa, or ``none``."""
    text = text.strip()
    if text.lower() == "none" or text == "":
        return ()
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    return names


def parse_range(text: str) -> tuple[int | None, int | None]:
    """Parse ``--range A:B`` with Python slice semantics (either side may be empty or negative)."""
    if ":" not in text:
        raise ConfigError(f"--range {text}: expected A:B (Python slice, e.g. 0:101, 10:, :-5)")
    a, b = text.split(":", 1)
    try:
        return (int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise ConfigError(f"--range {text}: A and B must be integers or empty (e.g. 0:101)") from None


def parse_key_values(pairs: tuple[str, ...], flag: str = "--model-arg") -> tuple[tuple[str, str], ...]:
    """Parse repeated ``key=value`` options."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair}: expected key=value (e.g. {flag} num_classes=10)")
        out.append((key.strip(), value.strip()))
    return tuple(out)


SOUP_METHODS = ("best", "uniform", "greedy", "twa")
GRANULARITIES = ("model", "layer")
SOUP_OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class CoefficientTrainConfig:
    """How ``twa soup`` fits the mixing coefficients on the held-out split (TWA-v).

    Defaults are the measured ones (README, ``twa soup``): AdamW on the coefficients, no weight decay,
    cosine schedule with a linear warm-up over the first ``warmup`` fraction of the steps.
    """

    optimizer: str = "adamw"
    lr: float = 1e-2
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 5
    batch_size: int = 128
    schedule: str = "cosine"
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if self.optimizer not in SOUP_OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer}: choose one of {', '.join(SOUP_OPTIMIZERS)}")
        check_optimizer_fields(self)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup {self.warmup}: a fraction of the steps in [0, 1)")


@dataclass(frozen=True)
class SoupConfig:
    """Everything one ``twa soup`` run needs."""

    finetunes_dir: Path
    out_dir: Path
    data: str
    model: str | None = None
    model_args: tuple[tuple[str, str], ...] = ()
    data_root: Path | None = None
    download: bool = False
    base: Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    holdout: str | None = None
    holdout_fraction: float = 0.1
    method: str = "best"
    granularity: str = "model"
    train: CoefficientTrainConfig = field(default_factory=CoefficientTrainConfig)
    basis_dtype: str = "float32"
    device: str = "auto"
    amp: str = "off"
    num_workers: int = 0
    seed: int = 0
    overwrite: bool = False
    weights: str = "raw"
    strip_prefix: str | None = None
    trust_pickle: bool = False
    allow_globals: tuple[str, ...] = ()
    out_dtype: str = "auto"
    max_shard_size: int | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.method not in SOUP_METHODS:
            raise ConfigError(f"--method {self.method}: choose one of {', '.join(SOUP_METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"--granularity {self.granularity}: choose model or layer")
        if self.basis_dtype not in BASIS_DTYPES:
            raise ConfigError(f"--basis-dtype {self.basis_dtype}: choose one of {', '.join(BASIS_DTYPES)}")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"--holdout-fraction {self.holdout_fraction}: must be strictly between 0 and 1")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp}: choose one of {', '.join(AMP_MODES)}")
        check_weights(self.weights)
        if self.out_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"--out-dtype {self.out_dtype}: choose auto, float32, float16 or bfloat16")
        check_num_workers(self.num_workers)
        check_seed(self.seed)
