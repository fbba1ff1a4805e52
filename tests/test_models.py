"""Model specs: registry prefixes, module:function, file.py:function, and their errors."""

from __future__ import annotations

import sys
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


def test_file_spec_imports_the_modules_beside_it(tmp_path: Path) -> None:
    """As ``python net.py`` would: a model file may import its helper modules from its own folder."""
    (tmp_path / "twa_test_blocks_m.py").write_text("import torch\n\ndef head(n):\n    return torch.nn.Linear(2, n)\n")
    (tmp_path / "net.py").write_text("from twa_test_blocks_m import head\n\ndef make(n=3):\n    return head(n)\n")
    before = list(sys.path)
    model = build_model(f"{tmp_path / 'net.py'}:make", (("n", "5"),))
    assert isinstance(model, nn.Linear) and model.out_features == 5
    assert sys.path == before  # the folder is on sys.path only while the file runs


@pytest.mark.parametrize("spec, text, code", [
    ("torchvision:nonet", "unknown torchvision model", 2),
    ("twa:big", "choose one of twa:cnn", 2),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz", 2),
    ("missing.py:f", "missing.py not found", 2),
    ("torch.nn:NotThere", "has no callable NotThere", 2),
    ("justaname", "expected torchvision:NAME, .* or path/to/file.py:function$", 2),
    ("builtins:dict", "expected a torch.nn.Module", 4),
])
def test_bad_specs_name_the_problem(spec: str, text: str, code: int) -> None:
    """A spec naming nothing there is a usage error (exit 2, as for --data); what it names failing is exit 4."""
    with pytest.raises(ModelError, match=text) as err:
        build_model(spec)
    assert err.value.exit_code == code


NET_FILE = ("from torch import nn\n\nclass Net(nn.Module):\n    pass\n\n"
            "def make_model():\n    return nn.Linear(2, 2)\n\nWIDTH = 3\n")


@pytest.mark.parametrize("spec, files, text", [
    ("models/net.py:build", {}, "--model models/net.py:build: models/net.py not found; check the path of the file "
                                "that defines build (a relative path is taken from the current folder, {cwd})"),
    ("{cwd}/net.py:build", {}, "--model {cwd}/net.py:build: {cwd}/net.py not found; check the path of the file that "
                               "defines build"),
    ("net.py:build", {"net.py": NET_FILE}, "--model net.py:build: net.py has no callable build; it defines Net, "
                                           "make_model: write net.py:NAME with the one that returns the model, or "
                                           "define build in it"),
    ("net.py:make_modle", {"net.py": NET_FILE}, "net.py has no callable make_modle; did you mean net.py:make_model?"),
    ("net.py:WIDTH", {"net.py": NET_FILE}, "net.py has no callable WIDTH; WIDTH there is a value of type int, not a "
                                           "function; it defines Net, make_model: "),
    ("one.py:build", {"one.py": "import torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n"},
     "one.py has no callable build; it defines make: write one.py:make if that returns the model, or define build in "
     "it"),
    ("none.py:build", {"none.py": "import torch\n"}, "none.py has no callable build; it defines no function: define "
                                                    "build in it, returning the model"),
    ("torch.nn:Linaer", {}, "torch.nn has no callable Linaer; did you mean torch.nn:Linear?"),
])
def test_a_missing_model_file_or_function_is_named_with_the_fix(spec: str, files: dict[str, str], text: str,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model net.py:build` without net.py said 'net.py not found; write path/to/file.py:function' (the form the
    user had written, not where twa looked), and without build in it 'net.py has no callable build' (no way on).
    Now the line names the file and the function, where a relative path was looked for, and what the file defines."""
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ModelError) as err:
        build_model(spec.format(cwd=tmp_path))
    assert text.format(cwd=tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_an_unknown_timm_name_is_a_usage_error_as_an_unknown_torchvision_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model timm:resnet51` reached timm.create_model, whose RuntimeError('Unknown model') was 'building the model
    failed' (exit 4), where `torchvision:resnet51` is an unknown name. timm's own registry is asked first."""
    import types

    fake = types.SimpleNamespace(is_model=lambda name: name == "resnet50",
                                 create_model=lambda name, pretrained, **kwargs: nn.Linear(2, 2))
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(ModelError, match=r"^--model timm:resnet51: unknown timm model; see timm\.list_models") as err:
        build_model("timm:resnet51")
    assert err.value.exit_code == 2
    assert isinstance(build_model("timm:resnet50"), nn.Linear)
    assert isinstance(build_model("timm:hf-hub:org/name"), nn.Linear)  # a hub name is timm's to resolve


def test_an_unknown_model_a_checkpoint_records_is_that_files_fault(tmp_path: Path) -> None:
    """An unknown name passed as --model is a usage error (2); the same name recorded in a checkpoint is the file's
    (4, naming it), since no flag the user typed is wrong."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from twa_tool.cli import cli

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        save_file(build_model("twa:mlp").state_dict(), ckpts / f"{i}.safetensors", metadata={"twa.model": "twa:big"})
    result = CliRunner().invoke(cli, ["average", str(ckpts), "--data", "synthetic", "--dry-run", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith(f"error: {ckpts / '0.safetensors'}: the architecture it records, twa:big, cannot "
                                    f"be built (unknown built-in model; "), result.stderr


@pytest.mark.parametrize("spec, hint", [
    ("resnet18", "; did you mean torchvision:resnet18?"),
    ("cnn", "; did you mean twa:cnn?"),
    ("torchvision.resnet18", "; did you mean torchvision:resnet18?"),
    # the Python path of the function: was 'did you mean torchvision:models.resnet18?', itself an unknown model
    ("torchvision.models.resnet18", "; did you mean torchvision:resnet18?"),
    ("timm.models.resnet50", "; did you mean timm:resnet50?"),
    ("train.py", "; name the function that returns the model: train.py:FUNCTION"),
    ("justaname", ""),
])
def test_malformed_model_spec_names_the_spec_it_likely_means(spec: str, hint: str) -> None:
    """`--model resnet18` or `--model train.py` said only 'expected module:function or path/to/file.py:function',
    without the torchvision:/timm:/twa: forms a user would need."""
    with pytest.raises(ModelError) as err:
        build_model(spec)
    assert str(err.value) == (f"--model {spec}: expected torchvision:NAME, timm:NAME, twa:NAME, "
                              f"package.module:function or path/to/file.py:function{hint}")


def test_bad_model_arg_of_a_users_function_lists_what_it_takes(tmp_path: Path) -> None:
    """`--model net.py:build` without its required `num_classes`, or with a misspelt name: the error said 'bad
    --model-arg (... missing ... / unexpected keyword ...); read as: none' without the names the function takes."""
    (tmp_path / "net.py").write_text("import torch\n\ndef build(num_classes, width=16, *, act='relu'):\n"
                                     "    return torch.nn.Linear(width, num_classes)\n")
    takes = "; it takes num_classes, width=16, act='relu'"
    with pytest.raises(ModelError, match=rf"; read as: none{takes}$"):
        build_model(f"{tmp_path / 'net.py'}:build")
    with pytest.raises(ModelError, match=rf"unexpected keyword argument 'num_class'.*; read as: num_class=3{takes}$"):
        build_model(f"{tmp_path / 'net.py'}:build", (("num_class", "3"),))


def test_module_spec_of_a_file_in_the_current_folder_says_file_py(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model train:make_model` beside train.py said 'cannot import train ...; check the module path': twa, an
    installed script, does not import from the current folder. The error now gives both fixes."""
    (tmp_path / "twa_qa_train_here.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        build_model("twa_qa_train_here:make")
    assert str(err.value).endswith("; twa_qa_train_here.py is in the current folder, which twa does not import from: "
                                   "write twa_qa_train_here.py:make, or run PYTHONPATH=. twa ...")
    assert isinstance(build_model("twa_qa_train_here.py:make"), nn.Linear)


def test_bad_model_arg_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="bad --model-arg"):
        build_model("twa:cnn", (("colour", "red"),))
    # a value of the wrong type gave only the constructor's own words ('not all arguments converted during
    # string formatting'); the arguments as they were read show which one is not what the model takes
    with pytest.raises(ModelError, match=r"bad --model-arg \(.*\); read as: num_classes=10, width='abc'$"):
        build_model("twa:cnn", (("num_classes", "10"), ("width", "abc")))


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


USER_MODELS = """
import sys
import torch


def fails(**kwargs):
    raise RuntimeError("weights server down")


def exits(**kwargs):
    sys.exit(2)
"""


@pytest.mark.parametrize("attr, text", [("fails", r"building the model failed \(RuntimeError: weights server down\)"),
                                        ("exits", r"building the model failed \(SystemExit: 2\)")])
def test_a_constructor_that_raises_is_a_model_error(tmp_path: Path, attr: str, text: str) -> None:
    (tmp_path / "net.py").write_text(USER_MODELS)
    with pytest.raises(ModelError, match=text):
        build_model(f"{tmp_path / 'net.py'}:{attr}")


def test_a_model_arg_the_constructor_rejects_with_a_runtime_error_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"--model twa:cnn: building the model failed \(RuntimeError: .*negative"):
        build_model("twa:cnn", (("num_classes", "-1"),))


def test_a_module_that_raises_on_import_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "twa_boom_models.py").write_text("raise RuntimeError('config file missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match=r"importing twa_boom_models failed \(RuntimeError: config file missing\)"):
        build_model("twa_boom_models:make")


@pytest.mark.parametrize("args", ["{width: 4", "[1, 2]"])
def test_model_args_metadata_that_is_not_a_json_object_is_a_model_error(args: str) -> None:
    with pytest.raises(ModelError, match="twa.model_args metadata is not a JSON object"):
        spec_from_metadata({"twa.model": "twa:cnn", "twa.model_args": args})


def test_cli_names_the_checkpoint_with_bad_model_args_metadata(demo_ckpts: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from twa_tool.cli import cli

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for path in sorted(demo_ckpts.glob("*.safetensors"))[:3]:
        save_file(load_file(path), folder / path.name, metadata={"twa.model": "twa:cnn", "twa.model_args": "{width"})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(folder), "--data", "synthetic", "--out", str(out), "--dry-run"])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "twa.model_args metadata is not a JSON object" in errors[0], result.stderr
    assert str(folder) in errors[0] and "Traceback" not in result.output and not out.exists()


def test_model_args_update_the_recorded_ones(demo_ckpts: Path, tmp_path: Path) -> None:
    """Without --model, --model-arg adds to or replaces the checkpoints' recorded arguments; it does not
    drop the others (which would build the wrong architecture)."""
    import json

    from click.testing import CliRunner

    from twa_tool.cli import cli

    def dry_run(*args: str):
        return CliRunner().invoke(cli, ["average", str(demo_ckpts), "--data", "synthetic", "--out",
                                        str(tmp_path / "out"), "--dry-run", "--json", *args])

    result = dry_run("--model-arg", "num_classes=10")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["spec"] == "twa:cnn" and model["args"] == {"in_channels": "1", "num_classes": "10", "width": "4"}
    result = dry_run("--model-arg", "width=8")  # replaced: the checkpoints no longer fit the model
    assert result.exit_code == 4 and "Traceback" not in result.output, result.output
