"""Model specs: registry prefixes, module:function, file.py:function, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from twa_tool.errors import CheckpointError, ModelError
from twa_tool.models import build_model, check_compatible, flatten, parse_value, spec_from_metadata, write_flat


def test_torchvision_model_with_args() -> None:
    model = build_model("torchvision:resnet18", (("num_classes", "10"),))
    assert model.fc.out_features == 10


def test_file_and_module_function_specs(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("import torch\n\ndef make(hidden=3):\n    return torch.nn.Linear(2, hidden)\n")
    model = build_model(f"{tmp_path / 'net.py'}:make", (("hidden", "7"),))
    assert isinstance(model, nn.Linear) and model.out_features == 7
    assert isinstance(build_model("torch.nn:Identity"), nn.Identity)


@pytest.mark.parametrize("spec, text", [
    ("torchvision:nonet", "unknown torchvision model"),
    ("twa:big", "choose one of twa:cnn"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("missing.py:f", "missing.py not found"),
    ("torch.nn:NotThere", "has no callable NotThere"),
    ("justaname", "expected module:function"),
    ("builtins:dict", "expected a torch.nn.Module"),
])
def test_bad_specs_name_the_problem(spec: str, text: str) -> None:
    with pytest.raises(ModelError, match=text):
        build_model(spec)


def test_bad_model_arg_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="bad --model-arg"):
        build_model("twa:cnn", (("colour", "red"),))


def test_parse_value_and_metadata_spec() -> None:
    assert parse_value("10") == 10 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("relu") == "relu"
    assert spec_from_metadata({"twa.model": "twa:cnn", "twa.model_args": '{"width": "4"}'}) == \
        ("twa:cnn", (("width", "4"),))
    assert spec_from_metadata({"arch": "resnet50"}) == ("timm:resnet50", ())
    assert spec_from_metadata({}) is None


def test_flatten_write_flat_round_trip_and_compatibility() -> None:
    model = build_model("twa:mlp", (("in_features", "8"), ("hidden", "4")))
    names = [n for n, _ in model.named_parameters()]
    vector = torch.randn(sum(p.numel() for p in model.parameters()))
    write_flat(model, names, vector)
    assert torch.equal(flatten(dict(model.named_parameters()), names, torch.float32), vector)
    state = model.state_dict()
    state.pop("net.1.weight")
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"x\.pt: does not match the model: missing 1 keys \(net\.1\.weight\); "
                                              r"unexpected 1 keys \(extra\)"):
        check_compatible(model, state, "x.pt")
