"""`twa soup` on awkward inputs: a bad --holdout is named as such and refused before any ingredient is read,
labels are checked against the model, fixes name flags soup has, dtypes and ties follow the documented rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset, TensorDataset

from tests.conftest import TINY_ARGS, model_flags
from twa_tool.cli import cli
from twa_tool.errors import InputError
from twa_tool.models import build_model, check_accepts

HOLDOUTS = '''
import torch
from torch.utils.data import TensorDataset
from twa_tool.data import build_data

def _with(x, y):
    data = build_data("synthetic")
    return data.train, TensorDataset(x, y)

def labels_37():
    return _with(torch.randn(20, 1, 16, 16), torch.full((20,), 37))

def three_channels():
    return _with(torch.randn(20, 3, 16, 16), torch.zeros(20, dtype=torch.long))

def float_labels():
    return _with(torch.randn(20, 1, 16, 16), torch.zeros(20))
'''


@pytest.fixture(scope="module")
def ingredients(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ingredients") / "ft"
    out.mkdir()
    for epoch in range(1, 4):
        save_file(load_file(demo_ckpts / f"{epoch}.safetensors"), str(out / f"ft-{epoch}.safetensors"))
    return out


def soup(folder: Path, out: Path, *extra: str):
    args = ["soup", str(folder), *model_flags(), "--data", "synthetic", "--epochs", "1", "--batch-size", "256",
            "--threads", "1", "--out", str(out), *extra]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize("function, text", [
    ("labels_37", "has class labels from 37 to 37 but --model twa:cnn outputs 10 classes"),
    ("three_channels", "its inputs (shape (3, 16, 16)) do not fit --model twa:cnn"),
    ("float_labels", "its targets are torch.float32, not integer class indices"),
])
def test_a_bad_holdout_is_named_and_refused_before_reading(function: str, text: str, ingredients: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import twa_tool.soup as soup_module

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("an ingredient was read")

    monkeypatch.setattr(soup_module, "read_uniform", no_reading)
    (tmp_path / "holdouts.py").write_text(HOLDOUTS)
    spec = f"{tmp_path / 'holdouts.py'}:{function}"
    result = soup(ingredients, tmp_path / "out", "--holdout", spec)
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --holdout {spec}") and text in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_holdout_function_returning_anything_as_its_fit_part(ingredients: Path, tmp_path: Path) -> None:
    """README: --holdout takes `file.py:function` returning `(anything, heldout)`: its fit part is never used,
    so it is not checked (None was refused as 'not a map-style torch Dataset', exit 4)."""
    (tmp_path / "anything.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n\n"
        "def heldout():\n"
        "    g = torch.Generator().manual_seed(3)\n"
        "    return None, TensorDataset(torch.randn(40, 1, 16, 16, generator=g), torch.arange(40) % 10)\n")
    result = soup(ingredients, tmp_path / "out", "--holdout", f"{tmp_path / 'anything.py'}:heldout", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["heldout_examples"] == 40


def test_a_missing_holdout_file_names_holdout(ingredients: Path, tmp_path: Path) -> None:
    result = soup(ingredients, tmp_path / "out", "--holdout", "nofile.py:heldout")
    assert result.exit_code != 0 and "error: --holdout nofile.py:heldout" in result.stderr, result.stderr
    assert "--data nofile" not in result.stderr


def test_labels_are_checked_through_subsets_and_targets() -> None:
    model = build_model("twa:cnn", TINY_ARGS)
    x = torch.randn(6, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 12])  # only the last is out of range
    check_accepts(model, TensorDataset(x, labels.clamp(max=9)), 10, "twa:cnn", "d")
    with pytest.raises(InputError, match="labels from 0 to 12"):
        check_accepts(model, TensorDataset(x, labels), None, "twa:cnn", "d")  # every label, not the first only
    check_accepts(model, Subset(TensorDataset(x, labels), [0, 1, 2]), None, "twa:cnn", "d")  # the subset's labels
    with pytest.raises(InputError, match="from -1 to 11"):
        check_accepts(model, TensorDataset(x, labels - 1), None, "twa:cnn", "d")

    class WithTargets(torch.utils.data.Dataset):
        targets = [3, 4, 10]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return x[index], self.targets[index]

    with pytest.raises(InputError, match="labels from 3 to 10"):
        check_accepts(model, WithTargets(), 10, "twa:cnn", "d")
    soft = TensorDataset(x, torch.softmax(torch.randn(6, 10), 1))  # class probabilities: not indices
    with pytest.raises(InputError, match=r"its targets have shape \(10,\) per example"):
        check_accepts(model, soft, None, "twa:cnn", "d")

    class Coarse(WithTargets):  # torchvision's pattern: targets raw, target_transform applied per item
        targets = [18, 19, 4]
        target_transform = staticmethod(lambda t: t // 2)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return x[index], self.target_transform(self.targets[index])

    check_accepts(model, Coarse(), 10, "twa:cnn", "d")  # the labels it returns (9, 9, 2) fit

    class NoTargets(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[index], torch.nn.functional.one_hot(torch.tensor(3), 10)

    with pytest.raises(InputError, match="not one-hot or probabilities"):
        check_accepts(model, NoTargets(), 10, "twa:cnn", "d")


def test_non_finite_ingredient_and_base_name_fixes_soup_has(ingredients: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ft"
    folder.mkdir()
    for path in ingredients.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = load_file(ingredients / "ft-2.safetensors")
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "ft-2.safetensors"))
    result = soup(folder, tmp_path / "o1")
    assert result.exit_code == 6 and "leave this checkpoint out with --exclude ft-2.safetensors" in result.stderr
    save_file(state, str(tmp_path / "base.safetensors"))
    result = soup(ingredients, tmp_path / "o2", "--base", str(tmp_path / "base.safetensors"))
    assert result.exit_code == 6 and "pass a finite pretrained model as --base" in result.stderr, result.stderr
    assert "--range" not in result.stderr


def test_mixed_dtypes_are_written_in_the_last_ingredients(ingredients: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ft"
    folder.mkdir()
    for i, path in enumerate(sorted(ingredients.iterdir())):
        state = load_file(path)
        if i == 0:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(folder / path.name))
    result = soup(folder, tmp_path / "out", "--method", "uniform")
    assert result.exit_code == 0, result.output
    assert load_file(tmp_path / "out" / "model.safetensors")["head.weight"].dtype == torch.float32


def test_best_single_breaks_ties_in_file_order_as_greedy_does(ingredients: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tie"
    folder.mkdir()
    state = load_file(ingredients / "ft-3.safetensors")
    save_file(state, str(folder / "a.safetensors"))
    state["head.weight"][0, 0] += 1e-6  # the same accuracy, not a byte-identical copy
    save_file(state, str(folder / "b.safetensors"))
    save_file(load_file(ingredients / "ft-1.safetensors"), str(folder / "c.safetensors"))
    result = soup(folder, tmp_path / "out", "--method", "uniform")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    accuracy = {n: m["heldout"]["accuracy"] for n, m in report["metrics"]["ingredients"].items()}
    assert accuracy["a.safetensors"] == accuracy["b.safetensors"]  # the tie this test is about
    assert report["metrics"]["best_single"]["ingredient"] == report["greedy"]["soup"][0] == "a.safetensors"


def test_holdout_equal_to_the_eval_split_is_warned_and_threads_are_recorded(ingredients: Path,
                                                                            tmp_path: Path) -> None:
    result = soup(ingredients, tmp_path / "out", "--method", "uniform", "--holdout", "Synthetic")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("is --data's own evaluation split" in w for w in report["warnings"])
    assert "is --data's own evaluation split" in result.stderr
    assert report["threads"] == 1  # soup() passes --threads 1
    assert not any("held-out split has" in w for w in report["warnings"])  # 500 examples


def test_a_small_held_out_split_is_warned(ingredients: Path, tmp_path: Path) -> None:
    result = soup(ingredients, tmp_path / "out", "--method", "uniform", "--holdout-fraction", "0.01")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["heldout_examples"] == 20
    text = "the held-out split has 20 examples: its accuracies move in steps of 5 points"
    assert any(w.startswith(text) for w in report["warnings"]), report["warnings"]
    assert text in " ".join(result.stderr.split())
    # report.md, the file people read later (a CI artifact), says it too: its accuracies are mostly chance
    assert f"- {text}" in (tmp_path / "out" / "report.md").read_text()


def test_the_mean_is_not_rounded_to_a_narrower_first_ingredient() -> None:
    from twa_tool.soup import StateSum

    torch.manual_seed(0)
    states = [{"w": torch.randn(64).bfloat16()}] + [{"w": torch.randn(64)} for _ in range(3)]
    total = StateSum()
    for state in states:
        total.add(state)
    exact = sum(s["w"].double() for s in states) / 4
    mean = total.mean()["w"]
    assert mean.dtype == torch.float32 and torch.allclose(mean.double(), exact, rtol=0, atol=1e-6)
    fresh = StateSum()
    fresh.add(states[0])
    assert fresh.candidate(states[1])["w"].dtype == torch.float32  # greedy's candidates too


MLP_DATA = '''
import torch
from torch.utils.data import TensorDataset

def one_over(n):
    g = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))

def fit_and_eval():  # 2 * 64 + 1 examples: a last batch of one at --batch-size 64
    return one_over(129), one_over(40)

def heldout():
    return one_over(20), one_over(65)
'''


def test_a_last_batch_of_one_example_does_not_break_batchnorm1d(tmp_path: Path) -> None:
    from twa_tool.models import build_model
    from twa_tool.writer import save_safetensors

    folder = tmp_path / "mlp"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_model("twa:mlp", (("hidden", "8"),))
    meta = {"twa.model": "twa:mlp", "twa.model_args": '{"hidden": 8}'}
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_safetensors(folder / f"{i}.safetensors", model.state_dict(), meta)
    (tmp_path / "mlpdata.py").write_text(MLP_DATA)
    data, common = str(tmp_path / "mlpdata.py"), ["--epochs", "1", "--batch-size", "64", "--threads", "1"]
    result = CliRunner().invoke(cli, ["soup", str(folder), "--data", f"{data}:fit_and_eval", "--holdout",
                                      f"{data}:heldout", *common, "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["average", str(folder), "--data", f"{data}:fit_and_eval", *common,
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output


def test_labels_the_first_example_hides_fail_as_one_line_data_errors() -> None:
    from twa_tool.errors import DataError
    from twa_tool.trainer import class_loss

    logits = torch.randn(3, 10)
    with pytest.raises(DataError, match=r"outside the model's 10 outputs \(Target 11 is out of bounds"):
        class_loss(logits, torch.tensor([1, 2, 11]))
    with pytest.raises(DataError, match="one integer class index per example"):
        class_loss(logits, torch.zeros(3, 10))
    assert torch.isclose(class_loss(logits, torch.tensor([1, 2, 3])),
                         torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])))


def test_base_errors_name_base(ingredients: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    result = soup(ingredients, tmp_path / "o", "--base", str(junk))
    assert result.exit_code == 4 and f"error: --base {junk}: " in result.stderr, result.stderr
    assert "--exclude" not in result.stderr and "pass the pretrained weights" in result.stderr
    wide = tmp_path / "wide.safetensors"
    save_file(build_model("twa:cnn", (("in_channels", "1"), ("width", "8"))).state_dict(), str(wide))
    result = soup(ingredients, tmp_path / "o", "--base", str(wide))
    assert result.exit_code == 4 and f"error: --base {wide}: 1 of 1 checkpoints do not match" in result.stderr


def test_same_data_compares_file_specs_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twa_tool.soup import same_data

    monkeypatch.chdir(tmp_path)
    assert same_data("hd.py:same", "./hd.py:same") and same_data("hd.py:same", f"{tmp_path}/hd.py:same")
    assert not same_data("hd.py:same", "hd.py:other") and not same_data("HD2.py:good", "hd2.py:good")
    assert same_data(" Fashion_MNIST ", "fashion-mnist") and not same_data("mnist", "fashion-mnist")
    assert same_data("CIFAR-10", "cifar10") and same_data("FashionMNIST", "fashion-mnist")  # as --data reads them


def test_a_save_pretrained_base_folder_inside_the_folder_is_not_an_ingredient(ingredients: Path, demo_ckpts: Path,
                                                                               tmp_path: Path) -> None:
    """Hugging Face fine-tunes and their base as save_pretrained folders (model.safetensors + config.json), the
    base inside the fine-tunes' folder and passed as a folder, as `--base finetunes/base`: the ingredient is
    listed by its weight file, --base by the folder, and the two were not recognised as the same model."""
    folder = tmp_path / "ft"
    for name, source in [*((f"ft-{e}", ingredients / f"ft-{e}.safetensors") for e in range(1, 4)),
                         ("base", demo_ckpts / "0.safetensors")]:
        (folder / name).mkdir(parents=True)
        save_file(load_file(source), str(folder / name / "model.safetensors"))
        (folder / name / "config.json").write_text('{"model_type": "bert"}')
    result = soup(folder, tmp_path / "out", "--base", str(folder / "base"), "--method", "uniform", "--epochs", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ingredients"] == ["ft-1", "ft-2", "ft-3"]
    assert {"name": "base", "reason": "the --base model"} in report["excluded"]
    assert report["coefficients"]["uniform"] == [1 / 3] * 3


@pytest.mark.parametrize("sharded", [False, True])
def test_a_base_folder_that_is_the_output_folder_is_never_overwritten(sharded: bool, ingredients: Path,
                                                                      demo_ckpts: Path, tmp_path: Path) -> None:
    """`--base models/pretrained --out models/pretrained --overwrite`: the base's weight file (or its index and
    shards) is an input, so the run is refused (exit 7) as for a --base file, not written over (or, sharded,
    removed as an earlier output and replaced by the soup)."""
    base = tmp_path / "pretrained"
    base.mkdir()
    state = load_file(demo_ckpts / "0.safetensors")
    if sharded:  # save_pretrained's layout: an index naming two shards
        keys = sorted(state)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in parts.items():
            save_file({k: state[k] for k in part}, str(base / name))
        index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, str(base / "model.safetensors"))
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    result = soup(ingredients, base, "--base", str(base), "--overwrite", "--method", "uniform", "--epochs", "0")
    assert result.exit_code == 7, result.output
    verb = "remove (as an earlier run's output)" if sharded else "overwrite"
    assert f"writing there would {verb} the input" in result.stderr and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


@pytest.mark.parametrize("how, reason", [("hard link", "the --base model (hard link to the same file)"),
                                         ("copy", "the --base model (byte-identical copy)")])
def test_a_link_or_copy_of_the_base_in_the_folder_is_not_an_ingredient(how: str, reason: str, ingredients: Path,
                                                                       demo_ckpts: Path, tmp_path: Path) -> None:
    """The pretrained model copied or hard-linked into the folder is the --base, not a fourth fine-tune that the
    uniform soup would average in."""
    import os
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(ingredients, folder)
    base = tmp_path / "pretrained.safetensors"
    shutil.copyfile(demo_ckpts / "0.safetensors", base)
    if how == "hard link":
        os.link(base, folder / "pretrained.safetensors")
    else:
        shutil.copyfile(base, folder / "pretrained.safetensors")
    result = soup(folder, tmp_path / "out", "--base", str(base), "--method", "uniform")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ingredients"] == ["ft-1.safetensors", "ft-2.safetensors", "ft-3.safetensors"]
    assert {"name": "pretrained.safetensors", "reason": reason} in report["excluded"]
    assert report["coefficients"]["uniform"] == [1 / 3] * 3
    written = load_file(tmp_path / "out" / "model.safetensors")
    states = [load_file(folder / name) for name in report["ingredients"]]
    mean = torch.stack([s["head.weight"].double() for s in states]).mean(0).float()
    assert torch.equal(written["head.weight"], mean)


def test_too_few_distinct_ingredients_names_what_was_counted_once(ingredients: Path, tmp_path: Path) -> None:
    """Two files that are one fine-tune: the error says why only one ingredient was found, as twa average does."""
    import shutil

    folder = tmp_path / "ft"
    folder.mkdir()
    shutil.copyfile(ingredients / "ft-1.safetensors", folder / "a.safetensors")
    shutil.copyfile(ingredients / "ft-1.safetensors", folder / "b.safetensors")
    result = soup(folder, tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert (f"error: {folder}: 1 ingredient(s) found (b.safetensors: byte-identical copy of a.safetensors, counted "
            f"once); a soup needs at least 2 distinct fine-tunes") in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


FROZEN_MODEL = '''
import torch
from torch import nn

class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)
        self.a.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.a(x.flatten(1)[:, :16]))))

def frozen():
    return Frozen()
'''


def test_twa_soup_mixes_trainable_parameters_and_keeps_frozen_ones_uniform(tmp_path: Path) -> None:
    """README: λ mixes the trainable parameters (written = Σ λᵢ wᵢ with the reported λ); frozen ones keep the
    uniform soup's values (not (Σ λᵢ)·w, which would rescale them)."""
    import importlib.util

    (tmp_path / "frozen_model.py").write_text(FROZEN_MODEL)
    spec = importlib.util.spec_from_file_location("frozen_model", tmp_path / "frozen_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    folder = tmp_path / "ft"
    folder.mkdir()
    base = module.frozen().state_dict()
    states = []
    for i in range(3):
        state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        save_file(state, str(folder / f"ft-{i}.safetensors"))
        states.append(state)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["soup", str(folder), "--model", f"{tmp_path / 'frozen_model.py'}:frozen",
                                      "--data", "synthetic", "--epochs", "2", "--lr", "0.05", "--batch-size", "256",
                                      "--threads", "1", "--method", "twa", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lam = json.loads((out / "report.json").read_text())["coefficients"]["twa"]
    assert abs(sum(lam) - 1) > 1e-3  # the fit moved Σλ away from 1: Σ λᵢ wᵢ would rescale frozen weights
    written = load_file(out / "model.safetensors")
    mix = sum(a * s["head.weight"].double() for a, s in zip(lam, states))
    torch.testing.assert_close(written["head.weight"].double(), mix, atol=1e-6, rtol=1e-5)
    uniform = torch.stack([s["a.weight"].double() for s in states]).mean(0).float()
    assert torch.equal(written["a.weight"], uniform)


def test_hugging_face_fine_tunes_get_their_config_and_tokenizer_files_copied(ingredients: Path,
                                                                             tmp_path: Path) -> None:
    """As twa average does (README, Inputs): a soup of HF folders is loadable next to its config.json."""
    folder = tmp_path / "ft"
    for i in (1, 2):
        run = folder / f"ft-{i}"
        run.mkdir(parents=True)
        (run / "model.safetensors").write_bytes((ingredients / f"ft-{i}.safetensors").read_bytes())
        (run / "config.json").write_text(json.dumps({"run": i}))
        (run / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    result = soup(folder, out, "--method", "uniform")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text()) == {"run": 2}  # the last ingredient's, as its layout
    assert (out / "tokenizer_config.json").read_text() == "{}"
    for name in ("config.json", "tokenizer_config.json"):  # said as the dry run's `would write` says them
        assert f"wrote {out / name}  sha256 " in result.stderr, result.stderr
    for name in ("model.safetensors", "report.json", "report.md"):
        (out / name).unlink()
    result = soup(folder, out, "--method", "uniform")  # the copied files are outputs: refused without --overwrite
    assert result.exit_code == 7 and "config.json already exists" in result.stderr, result.output


def _second_sets_with_a_base(demo_ckpts: Path, folder: Path, base: Path, name: str,
                             container: Callable[[int, dict, dict], dict]) -> list[dict]:
    """Fine-tunes 1-3 of the demo run saved as ``container(epoch, raw, second)`` under ``name.format(epoch)``, where
    ``second`` is the raw weights halved (an EMA, a teacher); the init as a released safetensors ``base``. Returns
    the second sets."""
    folder.mkdir()
    seconds = []
    for epoch in range(1, 4):
        raw = load_file(demo_ckpts / f"{epoch}.safetensors")
        seconds.append({k: v * 0.5 if v.is_floating_point() else v for k, v in raw.items()})
        torch.save(container(epoch, raw, seconds[-1]), folder / name.format(epoch))
    save_file(load_file(demo_ckpts / "0.safetensors"), str(base))
    return seconds


def _assert_mean_of(path: Path, states: list[dict]) -> None:
    written = load_file(path)
    for key in ("features.0.weight", "head.weight"):
        assert torch.allclose(written[key], sum(t[key].double() for t in states).float() / len(states),
                              atol=1e-6), key


def test_ema_fine_tunes_on_a_base_with_one_set_of_weights(demo_ckpts: Path, tmp_path: Path) -> None:
    """`--weights ema` was applied to `--base` too: a released pretrained file (safetensors) holds no EMA copy, so
    every soup of EMA fine-tunes with a base failed (exit 4, 'use --weights raw', which would mix raw fine-tunes
    in). The base's one set of weights is now the base, said in a warning; the ingredients stay EMA."""
    folder, base = tmp_path / "ft", tmp_path / "pretrained.safetensors"
    emas = _second_sets_with_a_base(demo_ckpts, folder, base, "checkpoint-{}.pth.tar", lambda epoch, raw, ema: {
        "epoch": epoch, "arch": "cnn", "state_dict": raw, "state_dict_ema": ema})
    result = soup(folder, tmp_path / "out", "--weights", "ema", "--base", str(base), "--method", "uniform",
                  "--epochs", "0", "--json")
    assert result.exit_code == 0, result.output
    assert f"--base {base}: holds no EMA copy" in result.stderr
    report = json.loads(result.stdout)
    assert report["base"] == str(base) and any("holds no EMA copy" in w for w in report["warnings"])
    _assert_mean_of(tmp_path / "out" / "model.safetensors", emas)  # the EMA copies' mean, not the raw weights'
    raw_fine_tunes = soup(folder, tmp_path / "raw", "--weights", "raw", "--base", str(base), "--method", "uniform",
                          "--epochs", "0")
    assert raw_fine_tunes.exit_code == 0 and "holds no EMA copy" not in raw_fine_tunes.stderr


def test_keyed_fine_tunes_on_a_base_with_one_set_of_weights(demo_ckpts: Path, tmp_path: Path) -> None:
    """`--weights teacher` (DINO-style fine-tunes) on a released base with one set of weights: the base is read as
    that set, with a warning, as for `--weights ema`; the ingredients are the teachers."""
    folder, base = tmp_path / "ft", tmp_path / "pretrained.safetensors"
    teachers = _second_sets_with_a_base(demo_ckpts, folder, base, "ft-{}.pth",
                                        lambda epoch, raw, teacher: {"student": raw, "teacher": teacher})
    result = soup(folder, tmp_path / "out", "--weights", "teacher", "--base", str(base), "--method", "uniform",
                  "--epochs", "0", "--json")
    assert result.exit_code == 0, result.output
    assert f"--base {base}: holds no 'teacher' key" in " ".join(result.stderr.split())
    _assert_mean_of(tmp_path / "out" / "model.safetensors", teachers)


def test_strip_prefix_of_the_fine_tunes_and_a_base_without_it(demo_ckpts: Path, tmp_path: Path) -> None:
    """`--strip-prefix model.` (Lightning fine-tunes) was applied to a `--base` saved without the prefix: its keys
    then matched nothing (exit 4). The base is now matched to the model as it is, with a warning."""
    folder = tmp_path / "ft"
    folder.mkdir()
    for epoch in range(1, 4):
        state = load_file(demo_ckpts / f"{epoch}.safetensors")
        torch.save({"epoch": epoch, "global_step": 16 * epoch, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()}},
                   folder / f"epoch={epoch}-step={16 * epoch}.ckpt")
    base = tmp_path / "pretrained.safetensors"
    save_file(load_file(demo_ckpts / "0.safetensors"), str(base))
    result = soup(folder, tmp_path / "out", "--strip-prefix", "model.", "--base", str(base), "--method", "uniform",
                  "--epochs", "0")
    assert result.exit_code == 0, result.output
    assert f"--base {base}: its keys do not start with model., matched to the model as they are" in result.stderr
    prefixed = tmp_path / "prefixed.safetensors"  # a base with the prefix is read with the flag, no warning
    save_file({f"model.{k}": v for k, v in load_file(base).items()}, str(prefixed))
    same = soup(folder, tmp_path / "out2", "--strip-prefix", "model.", "--base", str(prefixed), "--method", "uniform",
                "--epochs", "0")
    assert same.exit_code == 0 and "--base" not in same.stderr, same.output
    wrong = tmp_path / "wrong.safetensors"  # a base that fits no way still names --base and the fix
    save_file({"other.weight": torch.zeros(2)}, str(wrong))
    refused = soup(folder, tmp_path / "out3", "--strip-prefix", "model.", "--base", str(wrong))
    assert refused.exit_code == 4 and f"--base {wrong}" in refused.stderr
    assert refused.stderr.count(str(wrong)) == 1, refused.stderr  # was '--base PATH: PATH: ...'
    assert "pass the pretrained weights the fine-tunes started from" in refused.stderr


def _training_save(state: dict, path: Path) -> None:
    """What a fine-tuning script saves at its end: the weights with the optimizer, the epoch and its accuracy."""
    momentum = {i: {"momentum_buffer": v * 0.1} for i, v in enumerate(state.values()) if v.is_floating_point()}
    torch.save({"model": state, "optimizer": {"state": momentum, "param_groups": [{"lr": 0.01, "params": [0]}]},
                "epoch": 2, "acc": 0.9}, path)


@pytest.mark.parametrize("names, kept", [
    (("ft_lr0.01.pt", "ft_lr0.03.pt", "ft_lr0.1.safetensors"), "ft_lr0.01.pt"),  # numbered: select's own rule
    (("ft_adam.pt", "ft_sgd.pt", "ft_swa.safetensors"), "ft_adam.pt"),  # all unnumbered: best.pt sorts first
])
def test_best_pt_holding_a_fine_tunes_weights_is_counted_once(names: tuple[str, ...], kept: str, demo_ckpts: Path,
                                                              tmp_path: Path) -> None:
    """`torch.save(model.state_dict(), 'best.pt')` beside the fine-tune saved with its optimizer: the same weights
    in another container. They were two ingredients, so the uniform soup weighed that fine-tune twice (1/4 + 1/4)
    and greedy tried it twice. Now it counts once, whether or not the names hold numbers, and the report and a
    warning say which file was kept."""
    folder = tmp_path / "ft"
    folder.mkdir()
    states = [load_file(demo_ckpts / f"{epoch}.safetensors") for epoch in (2, 3, 4)]
    _training_save(states[0], folder / names[0])
    torch.save(states[1], folder / names[1])
    save_file(states[2], str(folder / names[2]))
    torch.save(states[0], folder / "best.pt")
    dry = soup(folder, tmp_path / "out", "--method", "uniform", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    result = soup(folder, tmp_path / "out", "--method", "uniform")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ingredients"] == json.loads(dry.stdout)["ingredients"]
    assert sorted(report["ingredients"]) == list(names)
    reason = f"copy of the weights of {kept}"
    assert report["excluded"] == json.loads(dry.stdout)["excluded"] == [{"name": "best.pt", "reason": reason}]
    assert f"best.pt: {reason}; counted once" in report["warnings"]
    assert f"warning: best.pt: {reason}; counted once" in result.stderr
    assert report["coefficients"]["uniform"] == [1 / 3] * 3
    written = load_file(tmp_path / "out" / "model.safetensors")
    mean = torch.stack([s["head.weight"].double() for s in states]).mean(0).float()
    assert torch.equal(written["head.weight"], mean)


@pytest.mark.parametrize("copy, original, extra", [
    ("ft-2_copy.pt", "ft-2.safetensors", ()),  # a .pt of ft-2 beside its safetensors: ft-2 counted twice
    ("pretrained.pt", "--base model", ("--base", "BASE")),  # the pretrained model, not a fine-tune: would be one
])
def test_weights_repeated_in_another_format_are_refused_naming_the_copy(copy: str, original: str,
                                                                        extra: tuple[str, ...], ingredients: Path,
                                                                        demo_ckpts: Path, tmp_path: Path) -> None:
    """Same weights in another format (a .pt beside the safetensors it was converted to; the --base model saved
    as .pt in the folder) were one more ingredient, so the uniform soup weighed that model twice, with no word.
    Only their bytes show it, read by the run's first pass: refused there, naming both files and the fix."""
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(ingredients, folder)
    source = folder / "ft-2.safetensors" if copy == "ft-2_copy.pt" else demo_ckpts / "0.safetensors"
    torch.save(load_file(source), folder / copy)
    flags = [str(demo_ckpts / "0.safetensors") if a == "BASE" else a for a in extra]
    result = soup(folder, tmp_path / "out", *flags)
    assert result.exit_code == 4, result.output
    said = "the --base model's weights" if copy == "pretrained.pt" else "the same weights as"
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and said in line and f"--exclude {copy}" in line, result.stderr
    assert (original in line if copy == "ft-2_copy.pt" else True) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_fine_tunes_of_different_lengths_are_no_training_order(demo_ckpts: Path, tmp_path: Path) -> None:
    """Fine-tunes store the epoch each one ended at (`{'model': sd, 'epoch': 5}`), and a short one can sort after a
    long one. twa average's check of a training run's order warned `ft_lr0.01.pt (epoch 5) comes before
    ft_lr0.03.pt (epoch 2) in name order; the name order is used, rename the files`: soup has no training order,
    so there was nothing to rename."""
    folder = tmp_path / "ft"
    folder.mkdir()
    for name, epoch, source in (("ft_lr0.01.pt", 5, 2), ("ft_lr0.03.pt", 2, 3), ("ft_lr0.1.pt", 3, 4)):
        torch.save({"model": load_file(demo_ckpts / f"{source}.safetensors"), "epoch": epoch, "step": 100 * epoch},
                   folder / name)
    result = soup(folder, tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == [] and "warning" not in result.stderr, result.stderr


def test_a_model_mismatch_names_the_first_ingredient_in_the_runs_order(ingredients: Path, tmp_path: Path) -> None:
    """`(first: NAME)` was the alphabetically first file (ft-10 before ft-2) while the table below it and every
    list of the run go in numeric order (ft-2 .. ft-10)."""
    import shutil

    folder = tmp_path / "ft"
    folder.mkdir()
    shutil.copyfile(ingredients / "ft-1.safetensors", folder / "ft-2.safetensors")
    shutil.copyfile(ingredients / "ft-2.safetensors", folder / "ft-10.safetensors")
    args = ["soup", str(folder), "--model", "twa:cnn", "--model-arg", "in_channels=1", "--model-arg", "width=8",
            "--data", "synthetic", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 4, result.output
    assert "2 of 2 checkpoints do not match the model twa:cnn (first: ft-2.safetensors)" in result.stderr
    assert "ft-2.safetensors .. ft-10.safetensors (2 files)" in result.stderr, result.stderr
