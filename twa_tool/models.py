"""Build an ``nn.Module`` from a spec string and move weights between it and flat vectors.

Specs (a registry keyed by the part before the first ``:``):

* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **args)``
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **args)`` (if timm is installed)
* ``twa:NAME``: small built-in models (``twa:cnn``) used by the demo, the examples and the tests
* ``package.module:function`` or ``path/to/file.py:function``: a callable returning a module
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import (
    TOO_LONG,
    CheckpointError,
    InputError,
    ModelError,
    ModelSpecError,
    NumericalError,
    exclude_hint,
    is_out_of_memory,
    name_too_long,
    one_line,
)
from .usercode import current_folder_hint, load_file, missing_file_fix, missing_function_fix

ModelArgs = tuple[tuple[str, str], ...]

#: safetensors metadata keys by which a checkpoint records its architecture.
MODEL_METADATA_KEY = "twa.model"
MODEL_ARGS_METADATA_KEY = "twa.model_args"


def parse_value(text: str) -> object:
    """``--model-arg`` values: Python literals (10, 0.5, True, None, 'x') else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 + linear head: tiny, BatchNorm-bearing, for demos and tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """Linear-BN-ReLU-Linear over flattened input."""

    def __init__(self, in_features: int = 256, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": SmallCNN, "mlp": MLP}


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelSpecError(f"--model torchvision:{name}: unknown torchvision model; see "
                         f"torchvision.models.list_models() (e.g. resnet18)")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(name: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"--model timm:{name}: timm is not installed; pip install timm") from None
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and ":" not in name and not is_model(name):  # "hf-hub:ORG/NAME" is timm's to resolve
        raise ModelSpecError(f"--model timm:{name}: unknown timm model; see timm.list_models() (e.g. resnet50)")
    return timm.create_model(name, pretrained=False, **kwargs)


def _builtin(name: str, kwargs: dict) -> nn.Module:
    if name not in BUILTIN_MODELS:
        raise ModelSpecError(f"--model twa:{name}: unknown built-in model; choose one of "
                         f"{', '.join('twa:' + n for n in BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name](**kwargs)


MODEL_FACTORIES: dict[str, Callable[[str, dict], nn.Module]] = {
    "torchvision": _torchvision,
    "timm": _timm,
    "twa": _builtin,
}


def _spec_hint(spec: str) -> str:
    """The spec a malformed ``--model`` value most likely means: ``resnet18`` -> ``torchvision:resnet18``,
    ``cnn`` -> ``twa:cnn``, ``torchvision.resnet18`` and ``torchvision.models.resnet18`` (the Python path) ->
    ``torchvision:resnet18``, ``train.py`` -> ``train.py:FUNCTION``; empty when nothing fits."""
    prefix, dot, name = spec.partition(".")
    name = name.rpartition(".")[2]  # torchvision:NAME takes the model's name, not its module path
    if dot and prefix in MODEL_FACTORIES and name:
        return f"; did you mean {prefix}:{name}?"
    if spec.endswith(".py"):
        return f"; name the function that returns the model: {spec}:FUNCTION"
    if spec in BUILTIN_MODELS:
        return f"; did you mean twa:{spec}?"
    import torchvision

    if spec.lower() in torchvision.models.list_models():
        return f"; did you mean torchvision:{spec.lower()}?"
    return ""


def load_callable(spec: str, flag: str) -> Callable:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` to the callable. A spec that names
    nothing there (malformed, a missing file, module or function) is a ``ModelSpecError`` (exit 2, as for
    ``--data``); a file or module that is there but fails to import is a ``ModelError`` (exit 4)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        forms = ", ".join(f"{name}:NAME" for name in MODEL_FACTORIES)
        raise ModelSpecError(f"{flag} {spec}: expected {forms}, package.module:function or path/to/file.py:function"
                             f"{_spec_hint(spec)}")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        try:
            path.is_file()
        except OSError as err:
            if not name_too_long(err):
                raise
            raise ModelSpecError(f"{flag} {spec}: {path}: {TOO_LONG}; write path/to/file.py:function") from None
        if path.is_dir():
            raise ModelSpecError(f"{flag} {spec}: {path} is a folder, not a file; write path/to/file.py:function")
        if not path.is_file():
            raise ModelSpecError(f"{flag} {spec}: {path} not found; {missing_file_fix(path, attr)}")
        try:
            module = load_file(path)
        except Exception as err:
            raise ModelError(f"{flag} {spec}: importing {path} failed ({type(err).__name__}: {err})") from err
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if not err.name or (target != err.name and not target.startswith(f"{err.name}.")):
                # a module the target itself imports: the target is there, its code fails
                raise ModelError(f"{flag} {spec}: importing {target} failed ({type(err).__name__}: {err})") from err
            local = current_folder_hint(err.name if err.name == target else None, attr)
            raise ModelSpecError(f"{flag} {spec}: cannot import {target} ({err}); "
                                 f"{local or 'check the module path'}") from None
        except Exception as err:  # user code: any failure on import is reported as such
            raise ModelError(f"{flag} {spec}: importing {target} failed ({type(err).__name__}: {err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelSpecError(f"{flag} {spec}: {target} has no callable {attr}; "
                             f"{missing_function_fix(module, target, attr, 'the model')}")
    return fn


def _takes(fn: Callable | None) -> str:
    """``; it takes num_classes, width=16`` for a user's function: the --model-arg names it accepts."""
    try:
        parameters = inspect.signature(fn).parameters.values() if fn is not None else ()
    except (TypeError, ValueError):
        return ""
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    shown = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in named]
    return f"; it takes {', '.join(shown)}" if shown else ""


def build_model(spec: str, args: ModelArgs = ()) -> nn.Module:
    """Build a freshly initialised model from its spec and ``--model-arg`` pairs."""
    kwargs = {k: parse_value(v) for k, v in args}
    prefix, sep, name = spec.partition(":")
    fn = None
    try:
        if sep and prefix in MODEL_FACTORIES:
            model = MODEL_FACTORIES[prefix](name, kwargs)
        else:
            fn = load_callable(spec, "--model")
            model = fn(**kwargs)
    except ModelError:
        raise
    except TypeError as err:  # a name the constructor lacks, or a value of the wrong type ("width=abc")
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
        raise ModelError(f"--model {spec}: bad --model-arg ({err}); read as: {given}{_takes(fn)}") from None
    except (Exception, SystemExit) as err:  # user or library code: e.g. num_classes=-1, a raise or sys.exit
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ModelError(f"--model {spec}: building the model failed ({type(err).__name__}: {reason}); check "
                         f"--model and --model-arg") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec}: returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def batch_statistics_in_eval(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` normalises with the batch's own statistics in eval mode too
    (``track_running_stats=False``: it has no running statistics), so a batch of one example is an error there."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


def logits_of(out: object, model_name: str | None = None) -> torch.Tensor:
    """The logits in what ``model(inputs)`` returned: a tensor as it is; an output object's ``logits`` (Hugging Face
    outputs, torchvision's ``InceptionOutputs``/``GoogLeNetOutputs`` in training mode, a dict with a ``logits``
    key). Anything else (a tuple, a dict without ``logits``) is a one-line ``ModelError``: which of its entries are
    the logits is the model's to say."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    what = f"--model {model_name}" if model_name else "the model"
    kind = type(out).__name__
    if isinstance(out, Mapping):
        kind += f" with keys {', '.join(map(str, list(out)[:4]))}{'...' if len(out) > 4 else ''}"
    elif isinstance(out, (tuple, list)):
        kind += f" of {len(out)}"
    raise ModelError(f"{what}: its forward returned a {kind}, not a tensor of logits; twa calls model(inputs) and "
                     f"needs the (batch, classes) logits: give --model a function returning a module whose forward "
                     f"returns them (e.g. a subclass returning output[0])")


def _known_targets(dataset: object, first: object) -> torch.Tensor | None:
    """The dataset's class targets, one row per example, when it exposes them cheaply (torchvision's
    ``targets`` unless a ``target_transform`` changes them, a ``TensorDataset``'s second tensor, a ``Subset``
    of either), else the first example's; None when the target is not a number or tensor."""
    from torch.utils.data import Subset, TensorDataset

    indices = None
    while isinstance(dataset, Subset):
        indices = dataset.indices if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    known = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        known = dataset.tensors[1]
    elif hasattr(dataset, "targets") and getattr(dataset, "target_transform", None) is None:
        try:
            known = torch.as_tensor(dataset.targets)
        except (TypeError, ValueError, RuntimeError):
            known = None
    if known is not None and known.ndim >= 1:
        return known[torch.as_tensor(indices, dtype=torch.long)] if indices is not None else known
    target = torch.as_tensor(first) if isinstance(first, (int, float, bool, torch.Tensor)) else None
    return None if target is None else target.unsqueeze(0)


def _check_targets(targets: torch.Tensor, outputs: int | None, model_name: str, flag: str, data_name: str) -> None:
    """Class-index targets must be integers within the model's outputs (else the loss fails mid-run)."""
    if targets.numel() == 0:
        return
    if targets.ndim != 1:
        raise InputError(f"{flag} {data_name}: its targets have shape {tuple(targets.shape[1:])} per example; twa "
                         f"needs one integer class index per example (not one-hot or probabilities)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise InputError(f"{flag} {data_name}: its targets are {targets.dtype}, not integer class indices; "
                         f"return integer labels (e.g. torch.long) from the dataset")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or (outputs is not None and high >= outputs):
        raise InputError(f"{flag} {data_name} has class labels from {low} to {high} but --model {model_name} "
                         f"outputs {outputs} classes; pick the {flag} the checkpoints were trained on, or the "
                         f"matching --model-arg num_classes")


def check_accepts(model: nn.Module, dataset: object, num_classes: int | None, model_name: str,
                  data_name: str, flag: str = "--data") -> None:
    """Run the first example of ``dataset`` through ``model`` (eval mode, no grad: its weights and BatchNorm
    statistics stay as they are), so a model that does not fit the data is an ``InputError`` before any
    checkpoint is read, not a shape error after all of them.

    The example is drawn with torch's RNG forked (a random transform leaves the run's stream as it was) and
    batched as the data loader batches it (``default_collate``), so an example that cannot be read or batched,
    or whose inputs or targets do not batch into tensors (a PIL image without ``ToTensor``, string labels), is
    refused too. Empty datasets, and items that are not ``(input, target, ...)`` sequences, are not checked. A
    model with fewer outputs than the data has classes is refused too (``num_classes``, when known), and so are
    class labels that are not integers or fall outside the model's outputs (every label when the dataset exposes
    its ``targets``, else the first example's). ``flag`` names the option the data came from.
    """
    from torch.utils.data import default_collate

    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or not len(dataset):
        return
    with torch.random.fork_rng(devices=[]):
        try:
            example = dataset[0]
        except Exception as err:  # user or third-party dataset code: any failure is the data's
            raise InputError(f"{flag} {data_name}: reading its first example failed ({one_line(err)}); fix the "
                             f"dataset or its files") from err
    if not isinstance(example, (tuple, list)) or not example:
        return
    try:
        batch = default_collate([example])
    except (TypeError, RuntimeError, ValueError) as err:
        raise InputError(f"{flag} {data_name}: its examples cannot be batched ({one_line(err)}); return tensors "
                         f"(e.g. add transforms.ToTensor()) and integer labels") from None
    if isinstance(example[0], Mapping):  # a tokenizer's dict of tensors, say: model(inputs) takes one tensor
        keys = ", ".join(map(str, list(example[0])[:4]))
        raise InputError(f"{flag} {data_name}: its inputs are a dict ({keys}), not a tensor; twa calls model(inputs) "
                         f"with one tensor: return (tensor, label) examples and give --model a module whose forward "
                         f"takes that tensor")
    for position, what in ((0, "inputs"), (1, "targets"))[:len(example)]:
        if not isinstance(batch[position], torch.Tensor):
            raise InputError(f"{flag} {data_name}: its {what} are {type(example[position]).__name__}, not tensors "
                             f"or numbers; return a tensor (e.g. add transforms.ToTensor()) and an integer label")
    inputs = batch[0]
    if batch_statistics_in_eval(model):  # BatchNorm without running statistics cannot normalise one example
        inputs = torch.cat([inputs, inputs])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        if is_out_of_memory(err):  # the model did not fit the device: not the data's fault
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        dtype = "" if inputs.dtype == torch.float32 else f", {inputs.dtype}"
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), inputs.dtype)
        fix = (f"pick the {flag} the checkpoints were trained on, or the matching --model/--model-arg (e.g. "
               f"in_channels)")
        if inputs.dtype != weights:  # uint8 pixels, float64 arrays: the model's layers refuse them
            fix = (f"return {str(weights).replace('torch.', '')} inputs from the dataset (e.g. transforms.ToTensor() "
                   f"for images, or .float())")
        raise InputError(f"{flag} {data_name}: its inputs (shape {tuple(inputs.shape[1:])}{dtype}) do not fit --model "
                         f"{model_name} ({reason}); {fix}") from None
    finally:
        model.train(was_training)
    out = logits_of(out, model_name)
    outputs = out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
    if num_classes and outputs is not None and outputs < num_classes:
        raise InputError(f"{flag} {data_name} has {num_classes} classes but --model {model_name} outputs "
                         f"{outputs}; pick the {flag} the checkpoints were trained on, or the matching "
                         f"--model-arg num_classes")
    if len(example) > 1:
        targets = _known_targets(dataset, batch[1][0])
        if targets is not None:
            _check_targets(targets, outputs, model_name, flag, data_name)


def check_data_fits(model: nn.Module, splits: tuple[object, ...], num_classes: int | None, spec: str,
                    data_spec: str, flag: str = "--data") -> None:
    """Every split of a data option against the model (``check_accepts``): by ``twa average`` and its
    ``--dry-run``, and by ``twa soup`` for ``--data`` and ``--holdout``."""
    for split in splits:
        check_accepts(model, split, num_classes, spec, data_spec, flag)


def spec_from_metadata(metadata: Mapping[str, str]) -> tuple[str, ModelArgs] | None:
    """The model spec a checkpoint records about itself (``twa.model`` metadata, or a timm ``arch`` with its run's
    ``args.num_classes`` and input channels)."""
    if MODEL_METADATA_KEY in metadata:
        text = metadata.get(MODEL_ARGS_METADATA_KEY, "{}") or "{}"
        try:
            raw_args = json.loads(text)
        except ValueError:
            raw_args = None
        if not isinstance(raw_args, dict):
            raise ModelError(f"its {MODEL_ARGS_METADATA_KEY} metadata is not a JSON object ({text[:60]!r}); pass "
                             f"--model and --model-arg")
        return metadata[MODEL_METADATA_KEY], tuple((str(k), str(v)) for k, v in raw_args.items())
    if "arch" in metadata:
        recorded = tuple((k, metadata[k]) for k in ("num_classes", "in_chans") if metadata.get(k))
        return f"timm:{metadata['arch']}", recorded
    return None


#: Constructor arguments of the registered builders that load or download weights (timm's ``checkpoint_path``
#: unpickles a file): never taken from a checkpoint's metadata, only from ``--model-arg``.
LOADING_ARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                          "weights", "weights_backbone"})


def recorded_spec_problem(spec: str, args: ModelArgs) -> str | None:
    """Why a spec read from a checkpoint's metadata must not be built without the user naming it, or None.

    A checkpoint is data: only the registered builders (``twa:``, ``torchvision:``, ``timm:``), which build
    a model by name, may come from it. ``package.module:function`` and ``path/to/file.py:function`` would
    import and run code the file names (``os:system``...), and some builder arguments load or download
    weights; those need ``--model`` / ``--model-arg`` from the user."""
    prefix, sep, _ = spec.partition(":")
    if not sep or prefix not in MODEL_FACTORIES:
        return (f"its {MODEL_METADATA_KEY} metadata names {spec!r}, code that building the model would import and "
                f"run; pass --model yourself if you trust it")
    loading = sorted(k for k, _ in args if k in LOADING_ARGS)
    if loading:
        return (f"its {MODEL_ARGS_METADATA_KEY} metadata sets {loading[0]}, which loads or downloads weights; pass "
                f"--model and --model-arg yourself if you trust it")
    return None


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters TWA averages over (requires_grad), in ``named_parameters`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_names(model: nn.Module) -> list[str]:
    """Names of the parameters TWA does not train (requires_grad=False), in ``named_parameters`` order: they are
    left out of the basis and keep the start point's values (``report.json``'s ``model.frozen``)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def tied_keys(model: nn.Module) -> dict[str, str]:
    """Keys of the model's state dict that are the same tensor as an earlier key (tied weights, e.g. an
    LM head tied to the embedding), mapped to that key. ``safetensors.torch.save_model`` and Hugging Face's
    ``save_pretrained`` store such a tensor once, so a checkpoint may lack the alias."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        source = first.setdefault(id(value), key)
        if source != key:
            tied[key] = source
    return tied


def flatten(state: Mapping[str, torch.Tensor], names: list[str], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Concatenate the named tensors of a state dict into one flat vector."""
    return torch.cat([state[n].detach().reshape(-1).to(dtype) for n in names])


Shapes = Mapping[str, tuple[int, ...]]


def key_problems(expected: Shapes, found: Shapes) -> list[tuple[str, str, str]]:
    """How ``found`` key shapes differ from the model's: (key, what the checkpoint has, what the model has).

    Missing keys come first, then unexpected ones, then shape mismatches, each in the model's or file's order.
    """
    problems = [(k, "missing", str(shape)) for k, shape in expected.items() if k not in found]
    problems += [(k, "unexpected", str(shape)) for k, shape in found.items() if k not in expected]
    problems += [(k, f"shape {found[k]}", f"model {shape}") for k, shape in expected.items()
                 if k in found and found[k] != shape]
    return problems


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Keys and shapes of ``state`` must equal the model's state dict; the error lists what differs."""
    problems = key_problems({k: tuple(v.shape) for k, v in model.state_dict().items()},
                            {k: tuple(v.shape) for k, v in state.items()})
    if not problems:
        return
    missing = sorted(k for k, kind, _ in problems if kind == "missing")
    unexpected = sorted(k for k, kind, _ in problems if kind == "unexpected")
    shapes = [f"{k}: {have[len('shape '):]} vs {want}" for k, have, want in problems if have.startswith("shape ")]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])}"
                     f"{'...' if len(unexpected) > 3 else ''})")
    if shapes:
        parts.append(f"shape mismatch {shapes[0]}")
    raise CheckpointError(f"{source}: does not match the model: {'; '.join(parts)}; check --model and "
                          f"--model-arg")


def check_finite(state: Mapping[str, torch.Tensor], source: str, fix: str | None = None) -> None:
    """Refuse NaN/Inf in any floating tensor, naming ``source`` and the tensor; ``fix`` defaults to leaving
    the file out (``--exclude``, which every command has)."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            fix = fix or f"leave this checkpoint out with {exclude_hint(Path(source).name)}"
            raise NumericalError(f"{source}: tensor {key} has non-finite values (NaN/Inf); {fix}")


@torch.no_grad()
def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a (compatible) state dict into the model in place, keeping the model's dtypes."""
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def write_flat(model: nn.Module, names: list[str], vector: torch.Tensor) -> None:
    """Write a flat vector into the named parameters (inverse of ``flatten``)."""
    params = dict(model.named_parameters())
    offset = 0
    for n in names:
        p = params[n]
        p.copy_(vector[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters {offset}")


