"""Models and checkpoints whose structure is unusual but legal: parameters of mixed dtypes, BatchNorm variants,
models whose forward does not return a tensor of logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from twa_tool.cli import cli
from twa_tool.errors import ModelError
from twa_tool.models import logits_of
from twa_tool.trainer import FlatGrad, TrainConfig, train_projected

DATA = '''
import torch
from torch.utils.data import Dataset

from twa_tool.data import build_data


class Dicts(Dataset):
    def __init__(self, base, inputs_only):
        self.base, self.inputs_only = base, inputs_only

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return ({"pixels": x}, y) if self.inputs_only else {"pixels": x, "label": y}


def examples():
    s = build_data("synthetic")
    return Dicts(s.train, False), Dicts(s.eval, False)


def inputs():
    s = build_data("synthetic")
    return Dicts(s.train, True), Dicts(s.eval, True)
'''

MODELS = '''
import torch
from torch import nn


class Temperature(nn.Module):
    """A float32 linear layer and one float64 parameter (a temperature kept in double precision)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.temp = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.temp.float()


def temperature():
    return Temperature()


def half_temperature():
    model = Temperature()
    model.temp = nn.Parameter(torch.tensor(1.0, dtype=torch.float16))
    return model


class Outputs(nn.Module):
    """forward returns a tuple, a dict with or without logits, or (in training mode only) a tuple, as
    torchvision's Inception does with its auxiliary logits."""

    def __init__(self, kind="tuple"):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        if self.kind == "tuple" or (self.kind == "train-tuple" and self.training):
            return y, y.sum()
        if self.kind == "dict":
            return {"logits": y, "features": x}
        if self.kind == "dict-without-logits":
            return {"scores": y}
        return y


def outputs(kind="tuple"):
    return Outputs(kind)


class Norms(nn.Module):
    """Linear -> a normalisation layer -> Linear, for BatchNorm's variants and the BN-free norms."""

    def __init__(self, kind="bn"):
        super().__init__()
        options = {"momentum-none": dict(momentum=None), "no-running-stats": dict(track_running_stats=False),
                   "no-affine": dict(affine=False)}
        self.fc = nn.Linear(256, 16)
        self.norm = (nn.LayerNorm(16) if kind == "layernorm" else nn.GroupNorm(4, 16) if kind == "groupnorm"
                     else nn.BatchNorm1d(16, **options.get(kind, {})))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x.flatten(1)))))


def norms(kind="bn"):
    return Norms(kind)


class Frozen(nn.Module):
    """A frozen feature layer (requires_grad=False) and a trainable head; every layer frozen with all=True."""

    def __init__(self, all=False):
        super().__init__()
        self.features = nn.Linear(256, 16)
        self.head = nn.Linear(16, 10)
        self.features.requires_grad_(False)
        if all:
            self.head.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.features(x.flatten(1))))


def frozen(all=False):
    return Frozen(all)


class Tied(nn.Module):
    """An output layer tied to an embedding (one Parameter under two state-dict keys)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 10)
        self.out = nn.Linear(10, 10, bias=False)
        self.emb = nn.Embedding(10, 10)
        self.emb.weight = self.out.weight

    def forward(self, x):
        return self.out(torch.relu(self.proj(x.flatten(1))))


def tied():
    return Tied()


class EvalBackbone(nn.Module):
    """A backbone with BatchNorm that the constructor puts in eval mode."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(256, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.backbone.eval()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.backbone(x.flatten(1)))


def eval_backbone():
    return EvalBackbone()


class Odd(nn.Module):
    """A parameter with no entries and a scalar (0-dim) one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.empty = nn.Parameter(torch.zeros(0))
        self.scalar = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scalar + self.empty.sum()


def odd():
    return Odd()
'''


def _module(tmp_path: Path):
    import importlib.util

    path = tmp_path / "structures.py"
    path.write_text(MODELS)
    spec = importlib.util.spec_from_file_location("structures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _trajectory(model: nn.Module, folder: Path, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` checkpoints (torch.save'd state dicts) along a random walk of every floating parameter."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    states = []
    for i in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(state, folder / f"{i}.pt")
        states.append(state)
    return states


RUN = ["--data", "synthetic", "--epochs", "1", "--lr", "0.05", "--batch-size", "512", "--threads", "1"]


def _average_of(tmp_path: Path, builder: str, count: int,
                *extra: str) -> tuple[list[dict[str, torch.Tensor]], Path, Path]:
    """``count`` checkpoints of ``models.py:builder`` (seed 0) averaged by the CLI (``RUN``, ``extra``) into
    ``tmp_path/out``; the checkpoints' states, that folder and the models file."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    states = _trajectory(getattr(module, builder)(), tmp_path / "ckpts", count)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(tmp_path / "ckpts"), "--model", f"{path}:{builder}", *RUN,
                                      *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return states, out, path


def test_flat_grad_of_mixed_dtypes_is_gathered_and_scattered() -> None:
    """A float64 parameter beside float32 ones: its gradient cannot be a view of a float32 buffer (torch refused
    the assignment: exit 1 'attempting to assign a gradient with dtype double'); the buffer is float64 and the
    float32 parameters' gradients are copied in and out."""
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones((), dtype=torch.float64))
    flat = FlatGrad([a, b])
    assert flat.buffer.dtype == torch.float64 and flat.mixed
    (a.sum() * 2 + b * 3).backward()
    assert flat.gather().tolist() == [2, 2, 2, 3]
    flat.buffer.mul_(0.5)
    flat.scatter()
    assert a.grad.tolist() == [1, 1, 1] and b.grad.item() == 1.5
    flat.zero()
    assert a.grad.abs().sum() == 0 and b.grad == 0
    same = FlatGrad([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(()))])
    assert same.buffer.dtype == torch.float32 and not same.mixed


def _one_projected_step_is_the_reference(tmp_path: Path) -> nn.Module:
    """One ``train_projected`` step (lr 0.1, no momentum or decay) of the float32 + float64 model against the plain
    float64 projected SGD step ``w - lr * P^T P g``; returns the model."""
    module, _ = _module(tmp_path)
    torch.manual_seed(0)
    model = module.temperature()
    names = [n for n, _ in model.named_parameters()]
    basis = torch.linalg.qr(torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64))[0].T
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    start = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.cat([t.double().reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    config = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, epochs=1, batch_size=8, schedule="constant")
    train_projected(model, names, basis, [(x, y)], config, torch.device("cpu"))
    after = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, start - 0.1 * basis.T @ (basis @ g), atol=1e-6, rtol=1e-5)
    return model


def test_projected_step_with_a_float64_parameter_is_the_projected_sgd_step(tmp_path: Path) -> None:
    model = _one_projected_step_is_the_reference(tmp_path)
    assert model.temp.dtype == torch.float64


def test_average_and_soup_of_a_model_with_a_float64_parameter(tmp_path: Path) -> None:
    states, out, path = _average_of(tmp_path, "temperature", 4)
    a = json.loads((out / "report.json").read_text())["coefficients"]
    saved = load_file(out / "model.safetensors")
    assert saved["temp"].dtype == torch.float64
    for key in ("temp", "fc.weight"):  # the result is Σ aᵢ wᵢ
        mix = sum(ai * s[key].double() for ai, s in zip(a, states))
        torch.testing.assert_close(saved[key].double(), mix, atol=1e-6, rtol=1e-5)
    souped = CliRunner().invoke(cli, ["soup", str(tmp_path / "ckpts"), "--model", f"{path}:temperature", *RUN,
                                      "--method", "twa", "--out", str(tmp_path / "soup")])
    assert souped.exit_code == 0, souped.output
    lam = json.loads((tmp_path / "soup" / "report.json").read_text())["coefficients"]["twa"]
    written = load_file(tmp_path / "soup" / "model.safetensors")
    mix = sum(li * s["temp"] for li, s in zip(lam, states))
    torch.testing.assert_close(written["temp"], mix, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("command", ["average", "soup"])
@pytest.mark.parametrize("kind, code, text", [
    ("tuple", 4, "its forward returned a tuple of 2, not a tensor of logits"),
    ("dict-without-logits", 4, "its forward returned a dict with keys scores, not a tensor of logits"),
    ("train-tuple", 4, "the model: its forward returned a tuple of 2, not a tensor of logits"),
    ("dict", 0, ""),
])
def test_a_forward_that_does_not_return_a_tensor(tmp_path: Path, command: str, kind: str, code: int,
                                                 text: str) -> None:
    """A tuple or a dict was an unexpected error (exit 1, "'tuple' object has no attribute 'float'"); now an output
    with ``logits`` is read, and anything else is one line naming --model (before any checkpoint is read when the
    eval-mode forward shows it; at the first training step when only training mode returns it)."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    _trajectory(module.outputs(), tmp_path / "ckpts", 3)
    args = [command, str(tmp_path / "ckpts"), "--model", f"{path}:outputs", "--model-arg", f"kind={kind}", *RUN,
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    if code:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and text in errors[0] and "Traceback" not in result.output, result.stderr
        assert not (tmp_path / "out").exists()


def test_logits_of() -> None:
    from collections import namedtuple

    y = torch.zeros(2, 3)
    assert logits_of(y) is y
    assert logits_of({"logits": y}) is y
    assert logits_of(namedtuple("InceptionOutputs", ["logits", "aux_logits"])(y, None)) is y
    with pytest.raises(ModelError, match="--model m: its forward returned a list of 1"):
        logits_of([y], "m")


@pytest.mark.parametrize("kind", ["momentum-none", "no-running-stats", "no-affine", "layernorm", "groupnorm"])
def test_normalisation_variants_average_and_soup(tmp_path: Path, kind: str) -> None:
    """BatchNorm without running statistics failed the pre-flight (exit 4: "Expected more than 1 value per
    channel", its eval mode normalises a batch of one with that batch's statistics); every variant now runs, the
    result is Σ aᵢ wᵢ, and BN statistics, where there are any, are re-estimated (num_batches_tracked counts the
    re-estimation's batches)."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    states = _trajectory(module.norms(kind), tmp_path / "ckpts", 3)
    out = tmp_path / "out"
    flags = ["--model", f"{path}:norms", "--model-arg", f"kind={kind}", *RUN]
    result = CliRunner().invoke(cli, ["average", str(tmp_path / "ckpts"), *flags, "--out", str(out)])
    assert result.exit_code == 0, result.output
    a = json.loads((out / "report.json").read_text())["coefficients"]
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(states[-1])
    for key in ("fc.weight", "head.bias"):
        mix = sum(ai * s[key].double() for ai, s in zip(a, states))
        torch.testing.assert_close(saved[key].double(), mix, atol=1e-6, rtol=1e-5)
    if "norm.num_batches_tracked" in saved:
        assert saved["norm.num_batches_tracked"].item() == 4  # 2000 training examples in batches of 512
    souped = CliRunner().invoke(cli, ["soup", str(tmp_path / "ckpts"), *flags, "--method", "twa",
                                      "--out", str(tmp_path / "soup")])
    assert souped.exit_code == 0, souped.output


def test_an_eval_batch_of_one_without_running_statistics_is_a_usage_error(tmp_path: Path) -> None:
    """Without running statistics BN's eval mode needs 2 examples too: a --batch-size that leaves one example in
    the eval split's last batch (500 = 499 + 1) is refused before any checkpoint is read, not exit 1 mid-run."""
    module, path = _module(tmp_path)
    _trajectory(module.norms("no-running-stats"), tmp_path / "ckpts", 3)
    for command in ("average", "soup"):
        result = CliRunner().invoke(cli, [command, str(tmp_path / "ckpts"), "--model", f"{path}:norms",
                                          "--model-arg", "kind=no-running-stats", "--data", "synthetic",
                                          "--batch-size", "499", "--out", str(tmp_path / command)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--batch-size 499: --data's eval split has 500 examples and its last batch " \
            "holds one" in errors[0], result.stderr
        assert not (tmp_path / command).exists()


@pytest.mark.parametrize("start", ["mean", "last", "1"])
def test_frozen_parameters_keep_the_start_point_and_the_report_names_them(tmp_path: Path, start: str) -> None:
    """README (--start): frozen parameters are left out of the basis and keep the start point's values (their
    mean for mean, that checkpoint's otherwise); report.json's model.frozen and report.md now name them."""
    states, out, path = _average_of(tmp_path, "frozen", 3, "--start", start)
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["frozen"] == ["features.weight", "features.bias"]
    assert report["model"]["parameters"] == 170  # trainable ones only: the basis's D
    saved = load_file(out / "model.safetensors")
    expected = (torch.stack([s["features.weight"] for s in states]).double().mean(0).float() if start == "mean"
                else states[-1 if start == "last" else 1]["features.weight"])
    torch.testing.assert_close(saved["features.weight"], expected, atol=1e-7, rtol=0)
    mix = sum(a * s["head.weight"].double() for a, s in zip(report["coefficients"], states))
    torch.testing.assert_close(saved["head.weight"].double(), mix, atol=1e-6, rtol=1e-5)
    assert "2 frozen parameter tensors (requires_grad=False) not trained, kept at the start point" in \
        (out / "report.md").read_text()
    souped = CliRunner().invoke(cli, ["soup", str(tmp_path / "ckpts"), "--model", f"{path}:frozen", *RUN,
                                      "--out", str(tmp_path / "soup")])
    assert souped.exit_code == 0, souped.output
    assert json.loads((tmp_path / "soup" / "report.json").read_text())["model"]["frozen"] == [
        "features.weight", "features.bias"]


@pytest.mark.parametrize("command", [["average"], ["average", "--dry-run"], ["soup"]])
def test_a_model_without_trainable_parameters_is_one_line_naming_the_model(tmp_path: Path,
                                                                          command: list[str]) -> None:
    """Every parameter frozen: `twa average` said "only 0 linearly independent checkpoint(s)" (exit 6, wrong
    cause) and `twa soup` failed with exit 1 (torch.cat of nothing)."""
    module, path = _module(tmp_path)
    _trajectory(module.frozen(all=True), tmp_path / "ckpts", 3)
    result = CliRunner().invoke(cli, [command[0], str(tmp_path / "ckpts"), "--model", f"{path}:frozen",
                                      "--model-arg", "all=True", *RUN, *command[1:], "--out", str(tmp_path / "out")])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no trainable parameters (all 4282 parameter values have requires_grad=False)" \
        in errors[0] and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "out").exists()


def test_tied_weights_average_to_one_value_in_the_span(tmp_path: Path) -> None:
    """torch.save'd state dicts list a tied weight under both keys: it is one coordinate block of the basis, the
    result is Σ aᵢ wᵢ and both keys hold it."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    states = _trajectory(module.tied(), tmp_path / "ckpts", 3)
    out = tmp_path / "out"
    for command in ("average", "soup"):
        result = CliRunner().invoke(cli, [command, str(tmp_path / "ckpts"), "--model", f"{path}:tied", *RUN,
                                          "--out", str(out / command)])
        assert result.exit_code == 0, result.output
    report = json.loads((out / "average" / "report.json").read_text())
    assert report["model"]["parameters"] == 10 * 256 + 10 + 100  # the tied weight counted once
    saved = load_file(out / "average" / "model.safetensors")
    mix = sum(a * s["out.weight"].double() for a, s in zip(report["coefficients"], states))
    torch.testing.assert_close(saved["out.weight"].double(), mix, atol=1e-6, rtol=1e-5)
    assert torch.equal(saved["emb.weight"], saved["out.weight"])


@pytest.mark.parametrize("untied", [[0, 1, 2], [1]])
@pytest.mark.parametrize("basis", ["float32", "int8"])
def test_checkpoints_that_do_not_tie_what_the_model_ties_are_refused(tmp_path: Path, untied: list[int],
                                                                     basis: str) -> None:
    """Checkpoints from a model without the tie hold two values under a tied parameter's two keys: loading kept
    one of them silently and the result left the span (|out − Σ aᵢ wᵢ| up to 1.7 on the tied weight). Now one
    line naming the keys (exit 4), whether the file is loaded (first, last) or read in place (a middle file
    laid out as the first one: caught by its sum)."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    folder = tmp_path / "ckpts"
    _trajectory(module.tied(), folder, 3)
    for i in range(3):  # separate storages, equal values unless untied: every file has the same pickle
        state = torch.load(folder / f"{i}.pt", weights_only=True)
        state["emb.weight"] = state["out.weight"].clone() + (1.0 if i in untied else 0.0)
        torch.save(state, folder / f"{i}.pt")
    for command in ("average", "soup"):
        result = CliRunner().invoke(cli, [command, str(folder), "--model", f"{path}:tied", *RUN,
                                          "--basis-dtype", basis, "--out", str(tmp_path / command)])
        assert result.exit_code == 4, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "emb.weight and out.weight are one tied parameter of the model" in errors[0] \
            and "Traceback" not in result.output, result.stderr
        assert not (tmp_path / command).exists()


@pytest.mark.parametrize("function, text", [
    ("examples", "the fit dataset must yield (input, target) pairs, got dict"),
    ("inputs", "its inputs are a dict (pixels), not a tensor; twa calls model(inputs) with one tensor"),
])
def test_data_yielding_dicts_is_one_line_naming_data(tmp_path: Path, function: str, text: str) -> None:
    """README (Inputs): examples are (input, label) with one input tensor; dicts are refused before any checkpoint
    is read, in one line naming --data (exit 4), by average, its dry run, and soup."""
    module, path = _module(tmp_path)
    (tmp_path / "dicts.py").write_text(DATA)
    _trajectory(module.tied(), tmp_path / "ckpts", 3)
    for command in (["average"], ["average", "--dry-run"], ["soup"]):
        result = CliRunner().invoke(cli, [command[0], str(tmp_path / "ckpts"), "--model", f"{path}:tied",
                                          "--data", f"{tmp_path / 'dicts.py'}:{function}", *command[1:],
                                          "--out", str(tmp_path / "out")])
        assert result.exit_code == 4, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--data " in errors[0] and text in errors[0], result.stderr
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_batchnorm_of_a_submodule_in_eval_mode_is_re_estimated_as_documented(tmp_path: Path) -> None:
    """README (step 2): the whole model is put in training mode; a submodule the constructor left in eval mode is
    no exception, so its BatchNorm statistics are re-estimated like the others'."""
    states, out, _ = _average_of(tmp_path, "eval_backbone", 3)
    saved = load_file(out / "model.safetensors")
    assert saved["backbone.1.num_batches_tracked"].item() == 4  # the re-estimation's batches (2000 / 512)
    assert not torch.allclose(saved["backbone.1.running_var"], states[-1]["backbone.1.running_var"])


@pytest.mark.parametrize("basis", ["float32", "bf16", "int8"])
def test_a_size_zero_and_a_scalar_parameter(tmp_path: Path, basis: str) -> None:
    """A parameter of size 0 and a 0-dim one, with every basis storage: `twa soup --basis-dtype int8` failed with
    exit 1 (max() of the empty tensor's deviations); the average is Σ aᵢ wᵢ on the scalar too."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    states = _trajectory(module.odd(), tmp_path / "ckpts", 3)
    flags = ["--model", f"{path}:odd", *RUN, "--basis-dtype", basis]
    result = CliRunner().invoke(cli, ["average", str(tmp_path / "ckpts"), *flags, "--out", str(tmp_path / "avg")])
    assert result.exit_code == 0, result.output
    a = json.loads((tmp_path / "avg" / "report.json").read_text())["coefficients"]
    saved = load_file(tmp_path / "avg" / "model.safetensors")
    assert saved["empty"].shape == (0,) and saved["scalar"].shape == ()
    mix = sum(ai * s["scalar"].double() for ai, s in zip(a, states))
    torch.testing.assert_close(saved["scalar"].double(), mix, atol=1e-3 if basis != "float32" else 1e-6, rtol=0)
    for granularity in ("model", "layer"):
        souped = CliRunner().invoke(cli, ["soup", str(tmp_path / "ckpts"), *flags, "--method", "twa",
                                          "--granularity", granularity, "--out", str(tmp_path / granularity)])
        assert souped.exit_code == 0, souped.output
        assert load_file(tmp_path / granularity / "model.safetensors")["empty"].shape == (0,)


@pytest.mark.parametrize("basis", ["float32", "int8"])
def test_a_tied_weight_stored_under_its_alias_only(tmp_path: Path, basis: str) -> None:
    """safetensors' save_model keeps a tied weight under its alphabetically first name: `emb.weight`, the model's
    alias, not `out.weight`, the name named_parameters gives. Only the other way round was filled in: these files
    were refused (exit 4, "out.weight missing"). Now both are read, and the output keeps the input's keys."""
    from safetensors.torch import load_model, save_model

    module, path = _module(tmp_path)
    torch.manual_seed(0)
    model = module.tied()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    states = []
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_model(model, str(folder / f"{i}.safetensors"))
        states.append(load_file(folder / f"{i}.safetensors"))
    assert set(states[0]) == {"emb.weight", "proj.weight", "proj.bias"}
    flags = ["--model", f"{path}:tied", *RUN, "--basis-dtype", basis]
    result = CliRunner().invoke(cli, ["average", str(folder), *flags, "--out", str(tmp_path / "avg")])
    assert result.exit_code == 0, result.output
    a = json.loads((tmp_path / "avg" / "report.json").read_text())["coefficients"]
    saved = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(saved) == set(states[0])
    mix = sum(ai * s["emb.weight"].double() for ai, s in zip(a, states))
    torch.testing.assert_close(saved["emb.weight"].double(), mix, atol=1e-6 if basis == "float32" else 2e-3, rtol=0)
    fresh = module.tied()
    load_model(fresh, str(tmp_path / "avg" / "model.safetensors"))  # strict: the tie restores out.weight
    assert torch.equal(fresh.out.weight, saved["emb.weight"])
    souped = CliRunner().invoke(cli, ["soup", str(folder), *flags, "--out", str(tmp_path / "soup")])
    assert souped.exit_code == 0, souped.output
    assert set(load_file(tmp_path / "soup" / "model.safetensors")) == set(states[0])


def test_a_float16_parameter_under_amp_fp16_is_a_usage_error_before_any_checkpoint_is_read(tmp_path: Path) -> None:
    """GradScaler refuses to unscale float16 gradients: a float16 parameter under --amp fp16 was 'unexpected error:
    ValueError: Attempting to unscale FP16 gradients' (exit 1) at the first training step, after every checkpoint
    was read. Now a usage error naming the parameter and --amp, before any heavy work; --amp bf16 trains."""
    module, path = _module(tmp_path)
    torch.manual_seed(0)
    _trajectory(module.half_temperature(), tmp_path / "ckpts", 3)
    args = ["average", str(tmp_path / "ckpts"), "--model", f"{path}:half_temperature", *RUN]
    result = CliRunner().invoke(cli, [*args, "--amp", "fp16", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--amp fp16: the model's parameter temp is float16" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, [*args, "--amp", "bf16", "--out", str(tmp_path / "bf16")])
    assert result.exit_code == 0, result.output


def test_a_tie_kept_by_torch_save_is_not_compared_value_by_value(tmp_path: Path, monkeypatch) -> None:
    """torch.save keeps a tie: the two keys load as two tensors over one storage. Reader.load compared them
    element by element (torch.equal) for every checkpoint, a second full read of, e.g., a tied embedding per
    file in the per-checkpoint loop; tensors viewing the same memory are now taken as equal. Two stored values
    are still compared and refused when they differ."""
    from twa_tool.config import AverageConfig
    from twa_tool.errors import CheckpointError
    from twa_tool.pipeline import Reader

    module, _ = _module(tmp_path)
    model = module.tied()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    reader = Reader.for_run(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "out", data="synthetic"),
                             model)
    assert reader.tied == (("emb.weight", "out.weight"),)
    calls = []
    real = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real(a, b))
    state = reader.load(tmp_path / "tied.pt")
    assert state["emb.weight"] is not state["out.weight"] and calls == []
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    untied["emb.weight"] = untied["emb.weight"] + 1.0
    torch.save(untied, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="emb.weight and out.weight are one tied parameter"):
        reader.load(tmp_path / "untied.pt")
    assert calls == [1]


def test_mixed_dtypes_without_loss_scaling_copy_the_gradients_once_per_step(tmp_path: Path, monkeypatch) -> None:
    """The mixed-dtype path copied every gradient of the buffer's other dtype out and back in around
    scaler.unscale_ on every step, also without --amp fp16, where unscale_ does nothing: two extra passes over
    the float32 gradients (the bulk of the model, the buffer being float64) per step. One gather and one scatter
    per step remain, and the step is the projected SGD step."""
    counts = {"gather": 0, "scatter": 0}
    for name in counts:
        real = getattr(FlatGrad, name)

        def spy(self, _real=real, _name=name):
            counts[_name] += 1
            return _real(self)

        monkeypatch.setattr(FlatGrad, name, spy)
    _one_projected_step_is_the_reference(tmp_path)
    assert counts == {"gather": 1, "scatter": 1}


def test_tied_means_that_differ_in_the_last_bits_of_a_cancelling_coordinate_are_accepted() -> None:
    # the alias's mean (summed file by file) and the key's (summed by the basis builder in blocks) add the same
    # values in other orders: where a coordinate's mean nearly cancels they differ in the last bits, not a broken tie
    from twa_tool.errors import CheckpointError
    from twa_tool.pipeline import _mean_state

    last = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0])}
    mean = torch.tensor([1.0, 0.0], dtype=torch.float64)
    state = _mean_state(last, {"b": torch.tensor([4.0, 1e-17], dtype=torch.float64)}, 4, mean, ["a"], (("b", "a"),))
    assert state["b"] is state["a"] and state["a"].tolist() == [1.0, 0.0]
    with pytest.raises(CheckpointError, match="one tied parameter"):  # a real difference is still refused
        _mean_state(last, {"b": torch.tensor([4.4, 0.0], dtype=torch.float64)}, 4, mean, ["a"], (("b", "a"),))


def test_a_model_whose_only_trainable_parameter_is_empty_is_named_as_such(tmp_path: Path) -> None:
    # it said "all 3 parameter values have requires_grad=False", which the user then found set to True
    from twa_tool.config import AverageConfig
    from twa_tool.errors import ModelError
    from twa_tool.pipeline import build_run_model

    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\n"
                                   "def build():\n    m = nn.Linear(3, 1)\n    m.weight.requires_grad_(False)\n"
                                   "    m.bias.requires_grad_(False)\n    m.empty = nn.Parameter(torch.zeros(0))\n"
                                   "    return m\n")
    config = AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic",
                           model=f"{tmp_path / 'm.py'}:build")
    with pytest.raises(ModelError, match=r"its trainable parameters hold no values \(size 0\); 4 values have "
                                         r"requires_grad=False"):
        build_run_model(config, None)
