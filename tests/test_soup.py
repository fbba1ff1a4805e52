"""`twa soup`: known answers for uniform, greedy and the coefficient parametrisation, and the CLI contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import TINY_ARGS, TinyBN, model_flags
from twa_tool.cli import cli
from twa_tool.config import CoefficientTrainConfig
from twa_tool.models import build_model, flatten, trainable_names
from twa_tool.report import size_text
from twa_tool.soup import (
    GRANULARITIES,
    Directions,
    GreedyStep,
    StateSum,
    fit_coefficients,
    greedy_soup,
    lr_factor,
    per_ingredient,
    segments_of,
    uniform_soup,
)


def tiny_states(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` fine-tunes of one TinyBN: the same init plus a random perturbation each."""
    torch.manual_seed(seed)
    base = TinyBN().state_dict()
    out = []
    for i in range(count):
        state = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v + i for k, v in base.items()}
        out.append(state)
    return out


def test_uniform_equals_the_float64_mean() -> None:
    states = tiny_states(5)
    soup = uniform_soup(iter(states))
    for key, value in soup.items():
        if value.is_floating_point():
            expected = torch.stack([s[key].double() for s in states]).mean(0).to(value.dtype)
            assert torch.equal(value, expected), key
        else:
            assert torch.equal(value, states[0][key])  # integer buffers: never averaged


def test_candidate_is_the_running_mean_with_one_more() -> None:
    states = tiny_states(3)
    total = StateSum()
    total.add(states[0])
    total.add(states[1])
    candidate = total.candidate(states[2])
    assert total.count == 2  # not added
    assert torch.equal(candidate["fc1.weight"], uniform_soup(states)["fc1.weight"])


def test_greedy_follows_the_procedure_step_by_step() -> None:
    """Scripted held-out accuracies: ranking by accuracy (ties in name order), strict improvement only."""
    ids = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}
    heldout = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.7}  # rank: b, d (tie, after b), c, a
    # the candidate soups the procedure must try, identified by the mean of the ids, and their scripted accuracy
    script = {5.0: 0.7, 3.0: 0.75, 7.0 / 3: 0.75}  # b+d ties the best (rejected), b+c improves, b+c+a ties
    loaded, scored = [], []

    def load(name: str) -> dict[str, torch.Tensor]:
        loaded.append(name)
        return {"w": torch.tensor([ids[name]], dtype=torch.float32)}

    def score(state: dict[str, torch.Tensor]) -> float:
        value = state["w"].item()
        scored.append(value)
        return next(acc for mean, acc in script.items() if abs(mean - value) < 1e-6)

    result = greedy_soup(heldout, load, score)
    assert loaded == ["b", "d", "c", "a"]
    assert scored == pytest.approx([5.0, 3.0, 7.0 / 3])
    assert result.trace == (GreedyStep("b", 0.7, True, ("b",)), GreedyStep("d", 0.7, False, ("b",)),
                            GreedyStep("c", 0.75, True, ("b", "c")), GreedyStep("a", 0.75, False, ("b", "c")))
    assert result.soup == ("b", "c")
    assert result.state["w"].item() == 3.0


def test_greedy_keeps_the_best_alone_when_nothing_helps() -> None:
    result = greedy_soup({"x": 0.9, "y": 0.8}, lambda n: {"w": torch.tensor([1.0 if n == "x" else 3.0])},
                         lambda state: 0.1)
    assert result.soup == ("x",) and result.state["w"].item() == 1.0


def _directions(dtype: str = "float32", base: bool = True, count: int = 3) -> tuple[Directions, list, torch.Tensor,
                                                                                     torch.Tensor]:
    model = TinyBN()
    names = trainable_names(model)
    states = tiny_states(count)
    flats = [flatten(s, names, torch.float64) for s in states]
    center = torch.stack(flats).mean(0)
    origin = flatten(model.state_dict(), names, torch.float64) if base else torch.zeros_like(center)
    directions = Directions(center.float(), (center - origin).float(), segments_of(model, names), count, dtype)
    for i, flat in enumerate(flats):
        directions.set_row(i, flat)
    return directions, flats, origin, center


@pytest.mark.parametrize("base", [True, False])
def test_directions_give_the_span_combination(base: bool) -> None:
    directions, flats, origin, center = _directions(base=base)
    lam = torch.tensor([[0.5], [-0.2], [0.9]])
    expected = origin + sum(a * (w - origin) for a, w in zip(lam[:, 0].double(), flats))
    torch.testing.assert_close(directions.weights(lam, GRANULARITIES["model"](len(directions.segments))).double(),
                               expected, atol=1e-6, rtol=1e-5)
    uniform = torch.full((3, 1), 1 / 3)
    assert torch.allclose(directions.weights(uniform, [0] * len(directions.segments)).double(), center, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [("bf16", 2e-2), ("int8", 2e-2)])
def test_low_precision_directions_keep_the_start_exact(dtype: str, tolerance: float) -> None:
    directions, flats, origin, center = _directions(dtype)
    columns = [0] * len(directions.segments)
    start = directions.weights(torch.full((3, 1), 1 / 3), columns)
    delta = directions.weights(torch.tensor([[1.0], [0.0], [0.0]]), columns).double() - center
    exact = flats[0] - center
    assert torch.allclose(start.double(), center, atol=1e-6)  # δ only moves the point away from c
    assert (delta - exact).norm() / exact.norm() < tolerance


def test_tied_layer_coefficients_reduce_to_per_model() -> None:
    """Per-layer λ equal across tensors give the per-model weights, and the per-model gradient is their sum."""
    directions, *_ = _directions()
    tensors = len(directions.segments)
    model_cols, layer_cols = GRANULARITIES["model"](tensors), GRANULARITIES["layer"](tensors)
    lam = torch.tensor([[0.2], [0.5], [0.4]])
    tied = lam.repeat(1, tensors)
    assert torch.allclose(directions.weights(lam, model_cols), directions.weights(tied, layer_cols), atol=1e-7)
    grad = torch.randn(directions.center.numel())
    per_model = directions.coefficient_grad(grad, model_cols, 1)
    per_layer = directions.coefficient_grad(grad, layer_cols, tensors)
    torch.testing.assert_close(per_model[:, 0], per_layer.sum(1), atol=1e-5, rtol=1e-5)
    assert per_ingredient(tied.double(), directions.segments, layer_cols) == pytest.approx(lam[:, 0].tolist())


def _fit(granularity: str, config: CoefficientTrainConfig, seed: int = 0) -> tuple[torch.Tensor, object, list]:
    directions, flats, origin, _ = _directions()
    model = TinyBN()
    names = trainable_names(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    loader = DataLoader(data, batch_size=32, shuffle=False)
    columns = GRANULARITIES[granularity](len(directions.segments))
    torch.manual_seed(seed)
    fit = fit_coefficients(model, names, directions, columns, loader, config, torch.device("cpu"))
    weights = flatten({n: p for n, p in model.named_parameters()}, names, torch.float64)
    return weights, fit, [directions, columns, flats, origin]


def test_tied_fits_agree_at_zero_epochs_and_layer_fit_moves_per_tensor() -> None:
    config = CoefficientTrainConfig(epochs=0)
    w_model, fit_model, _ = _fit("model", config)
    w_layer, fit_layer, _ = _fit("layer", config)
    assert torch.allclose(w_model, w_layer, atol=1e-7)
    assert torch.allclose(fit_layer.coefficients, torch.full_like(fit_layer.coefficients, 1 / 3))
    _, fitted, (directions, *_) = _fit("layer", CoefficientTrainConfig(epochs=3, lr=0.05))
    assert fitted.coefficients.shape == (3, len(directions.segments))
    assert fitted.coefficients.std(dim=1).max() > 1e-3  # tensors got different coefficients


@pytest.mark.parametrize("optimizer, lr", [("adamw", 0.05), ("sgd", 0.05)])
def test_fit_lowers_the_loss_and_stays_in_the_span(optimizer: str, lr: float) -> None:
    config = CoefficientTrainConfig(optimizer=optimizer, lr=lr, epochs=8, warmup=0.1, schedule="constant")
    weights, fit, (directions, columns, flats, origin) = _fit("model", config)
    assert fit.epoch_losses[-1] < fit.epoch_losses[0]
    lam = fit.coefficients[:, 0]
    expected = origin + sum(a * (w - origin) for a, w in zip(lam, flats))
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)


def test_warmup_then_schedule() -> None:
    config = CoefficientTrainConfig(epochs=10, warmup=0.2, schedule="constant")
    assert lr_factor(config, 0, 0, 10) == pytest.approx(1 / 20)
    assert lr_factor(config, 1, 9, 10) == pytest.approx(1.0)
    assert lr_factor(config, 5, 0, 10) == 1.0


# --------------------------------------------------------------------------------------------- CLI


def soup_args(finetunes: Path, out: Path, *extra: str) -> list[str]:
    return ["soup", str(finetunes), *model_flags(), "--data", "synthetic", "--epochs", "1", "--batch-size", "256",
            "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def soup_run(finetunes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("soup_out") / "soup"
    result = CliRunner().invoke(cli, soup_args(finetunes, out, "--base", str(finetunes / "base.safetensors"),
                                               "--method", "uniform", "--json"))
    return result, out


def test_soup_warns_about_an_unused_data_root(finetunes: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, soup_args(finetunes, tmp_path / "o", "--base", str(finetunes / "base.safetensors"),
                                               "--method", "uniform", "--epochs", "0", "--json",
                                               "--data-root", str(tmp_path / "d")))
    assert result.exit_code == 0, result.output
    note = f"--data-root {tmp_path / 'd'} is not used: --data synthetic is generated, not read"
    assert note in json.loads(result.stdout)["warnings"] and note in " ".join(result.stderr.split())


def test_soup_writes_model_and_report(soup_run: tuple[object, Path], finetunes: Path) -> None:
    result, out = soup_run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout) == report
    assert report["ingredients"] == [f"ft-{e}.safetensors" for e in range(1, 5)]  # the base is not an ingredient
    assert {"name": "base.safetensors", "reason": "the --base model"} in report["excluded"]
    for method in ("uniform", "greedy", "twa", "best_single"):
        for split in ("heldout", "eval"):
            assert 0 <= report["metrics"][method][split]["accuracy"] <= 1
    assert set(report["metrics"]["ingredients"]) == set(report["ingredients"])
    assert set(report["coefficients"]) == {"uniform", "greedy", "twa"}
    assert report["coefficients"]["uniform"] == [0.25] * 4
    assert report["coefficients_of"] == "task_vectors"
    base_sha256 = hashlib.sha256((finetunes / "base.safetensors").read_bytes()).hexdigest()
    assert report["base"] == str(finetunes / "base.safetensors") and report["base_sha256"] == base_sha256
    assert report["inputs"] == [{"name": name, "path": str(finetunes / name),  # hashed on a thread, in file order
                                 "sha256": hashlib.sha256((finetunes / name).read_bytes()).hexdigest()}
                                for name in report["ingredients"]]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["twa.base"]) == {"name": "base.safetensors", "sha256": base_sha256}
    assert report["greedy"]["trace"][0]["accepted"] and report["greedy"]["soup"][0] == report["greedy"]["trace"][0][
        "candidate"]
    assert report["written_method"] == "uniform" and report["chosen_by"] == "--method"
    assert (out / "report.md").read_text().startswith("# twa soup report")


def test_the_soup_summary_gives_each_size_in_a_unit_that_shows_it(soup_run: tuple[object, Path]) -> None:
    """The tiny model's directions were printed as 'directions 0.0 MiB' (as if there were none) and the peak RSS in
    whole MiB: each is now in the largest unit that keeps it at least 1, as the dry run's plan is."""
    result, out = soup_run
    memory = json.loads((out / "report.json").read_text())["memory"]
    assert 1024 <= memory["directions_bytes"] < 2**20  # a few KiB: the case that read 0.0 MiB
    line = next(x for x in result.stderr.splitlines() if x.startswith("written: "))
    assert (f"; directions {size_text(memory['directions_bytes'])} (float32), peak RSS "
            f"{size_text(memory['peak_rss_bytes'])}") in line, line
    assert " KiB (float32)" in line and "0.0 MiB" not in line, line


def test_written_uniform_soup_is_the_mean_with_bn_re_estimated(soup_run: tuple[object, Path],
                                                               finetunes: Path) -> None:
    _, out = soup_run
    written = load_file(out / "model.safetensors")
    states = [load_file(finetunes / f"ft-{e}.safetensors") for e in range(1, 5)]
    mean = uniform_soup(states)
    for key, value in written.items():
        if "running" in key or "num_batches" in key:
            continue  # BN statistics are re-estimated on the fit split
        assert torch.equal(value, mean[key]), key
    assert not torch.equal(written["features.1.running_mean"], mean["features.1.running_mean"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["twa.method"] == "soup-uniform" and metadata["twa.model"] == "twa:cnn"
    assert json.loads(metadata["twa.coefficients"]) == [0.25] * 4


def test_soup_refuses_to_overwrite(soup_run: tuple[object, Path], finetunes: Path) -> None:
    _, out = soup_run
    before = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(cli, soup_args(finetunes, out))
    assert result.exit_code == 7
    assert "already exists; pass --overwrite" in result.stderr and "Traceback" not in result.output
    assert (out / "model.safetensors").read_bytes() == before


def test_soup_output_inside_the_fine_tunes_folder_is_refused(finetunes: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(finetunes, folder)
    names = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(cli, soup_args(folder, folder / "soup"))
    assert result.exit_code == 7, result.output
    assert "--out" in result.stderr and "is inside the input folder" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == names


def test_soup_layer_granularity_int8_and_holdout_spec(finetunes: Path, tmp_path: Path) -> None:
    holdout = tmp_path / "holdout.py"
    holdout.write_text("from twa_tool.data import build_data\n\n"
                       "def heldout():\n    data = build_data('synthetic')\n    return data.eval, data.eval\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, soup_args(finetunes, out, "--exclude", "base*", "--granularity", "layer",
                                               "--basis-dtype", "int8", "--holdout", f"{holdout}:heldout",
                                               "--lr", "0.01"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["coefficients_of"] == "ingredients"
    assert report["data"]["heldout_examples"] == 500 and report["data"]["fit_examples"] == 2000
    from twa_tool.models import build_model

    tensors = trainable_names(build_model("twa:cnn", TINY_ARGS))
    assert list(report["twa"]["by_tensor"]) == tensors
    assert all(len(v) == 4 for v in report["twa"]["by_tensor"].values())
    assert "a summary. The exact mix is `twa.by_tensor`" in (out / "report.md").read_text()
    best = max(("uniform", "greedy", "twa"), key=lambda m: report["metrics"][m]["heldout"]["accuracy"])
    assert report["metrics"][report["written_method"]]["heldout"]["accuracy"] == \
        report["metrics"][best]["heldout"]["accuracy"]


@pytest.mark.parametrize("extra, code, text", [
    (["--include", "ft-1*"], 4, "a soup needs at least 2"),
    (["--base", "missing.safetensors"], 4, "--base missing.safetensors: not found"),
    (["--method", "soupy"], 2, "--method"),
    (["--holdout-fraction", "1.5"], 2, "--holdout-fraction 1.5"),
    (["--holdout", "synthetic", "--holdout-fraction", "0.3"], 2,
     "--holdout-fraction 0.3 has no effect with --holdout"),
    (["--momentum", "0.5"], 2, "--momentum 0.5 has no effect without --optimizer sgd: add it, or drop --momentum"),
])
def test_soup_bad_input_one_line(finetunes: Path, tmp_path: Path, extra: list[str], code: int, text: str) -> None:
    result = CliRunner().invoke(cli, soup_args(finetunes, tmp_path / "out", *extra))
    assert result.exit_code == code, result.output
    assert text in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_soup_wrong_model_is_refused(finetunes: Path, tmp_path: Path) -> None:
    args = soup_args(finetunes, tmp_path / "out")
    args[args.index("width=4")] = "width=8"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 4 and "do not match the model" in result.stderr


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_blocked_conversion_gives_the_same_weights_and_gradient(dtype: str) -> None:
    directions, *_ = _directions(dtype)
    columns = GRANULARITIES["layer"](len(directions.segments))
    lam = torch.rand(3, len(directions.segments))
    grad = torch.randn(directions.center.numel())
    whole = directions.weights(lam, columns), directions.coefficient_grad(grad, columns, len(columns))
    directions.BLOCK_ENTRIES = 7  # blocks of 2 columns: every tensor is cut into several
    assert len(list(directions.blocks(0))) > 1
    torch.testing.assert_close(directions.weights(lam, columns), whole[0])
    torch.testing.assert_close(directions.coefficient_grad(grad, columns, len(columns)), whole[1])


def test_directions_moved_to_a_device_keep_one_centre_without_a_base() -> None:
    """Without --base, c and ū are one tensor (``nbytes`` counts it once). ``to`` moved each attribute on its own,
    so on --device cuda they became two copies of D floats: twice the memory, and a ``directions_bytes`` in the
    report larger than on the CPU. The meta device stands in for the GPU."""
    model = TinyBN()
    names = trainable_names(model)
    center = flatten(model.state_dict(), names, torch.float32)
    shared = Directions(center, center, segments_of(model, names), 3)
    assert shared.offset is shared.center
    moved = shared.to(torch.device("meta"))
    assert moved.center.device.type == "meta" and moved.offset is moved.center
    separate = Directions(center, center.clone(), segments_of(model, names), 3).to(torch.device("meta"))
    assert separate.offset is not separate.center and separate.offset.device.type == "meta"


def test_soup_plans_its_output_from_the_stored_dtypes(finetunes: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 fine-tunes give a bf16 soup (``--out-dtype auto``): the free-space check and the shard plan count
    its bf16 bytes, not the float32 model's twice as many."""
    from collections import namedtuple

    from safetensors.torch import save_file

    from twa_tool.writer import _SPACE_MARGIN

    folder = tmp_path / "bf16"
    folder.mkdir()
    for source in sorted(finetunes.glob("ft-*.safetensors")):
        state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(source).items()}
        save_file(state, str(folder / source.name))
    floating = [v for v in state.values() if v.is_floating_point()]
    bf16_bytes = sum(v.numel() * v.element_size() for v in state.values())
    float32_bytes = bf16_bytes + sum(v.numel() * 2 for v in floating)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("twa_tool.writer.shutil.disk_usage",
                        lambda p: usage(0, 0, _SPACE_MARGIN + (bf16_bytes + float32_bytes) // 2))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, soup_args(folder, out, "--method", "uniform", "--epochs", "0",
                                               "--max-shard-size", str(bf16_bytes + 64)))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "report.md"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.bfloat16}


def test_the_soup_lists_its_report_md(soup_run: tuple[object, Path]) -> None:
    result, out = soup_run
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["human"] == [str(out / "report.md")]
    assert (out / "report.md").is_file()


def test_soup_dry_run_plans_without_touching_anything(finetunes: Path, tmp_path: Path) -> None:
    """`twa soup --dry-run`: the ingredients, the data (one example through the model), a memory estimate from the
    headers and the files it would write; no folder created, no ingredient read past its header."""
    out = tmp_path / "o"
    before = {p: p.stat().st_mtime_ns for p in finetunes.iterdir()}
    result = CliRunner().invoke(cli, soup_args(finetunes, out, "--base", str(finetunes / "base.safetensors"),
                                               "--dry-run", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["command"] == "soup"
    assert report["ingredients"] == ["ft-1.safetensors", "ft-2.safetensors", "ft-3.safetensors", "ft-4.safetensors"]
    assert report["base"] == str(finetunes / "base.safetensors")
    model = build_model("twa:cnn", TINY_ARGS)
    d = sum(p.numel() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    memory = report["memory_estimate_bytes"]
    assert report["model"]["parameters"] == d
    assert memory["directions"] == 4 * d * 4 and memory["total"] == 4 * d * 4 + 8 * d + 14 * state
    assert report["data"]["would_download"] is False and report["data"]["heldout_examples"] > 0
    assert report["would_write"] == [str(out / n) for n in ("model.safetensors", "report.json", "report.md")]
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for p in finetunes.iterdir()} == before
    human = CliRunner().invoke(cli, soup_args(finetunes, out, "--dry-run", "--basis-dtype", "int8"))
    assert human.exit_code == 0, human.output
    assert "dry run: 5 ingredients" in human.stderr and "nothing was written" in human.stderr
    assert not out.exists()


def test_soup_dry_run_prints_the_whole_process_beside_the_formula(finetunes: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The formula covers what the run adds to torch and the data; the dry run printed only that as "peak memory
    about" (0.6-0.7 of the peak RSS of resnet18 soups), and now adds what its process holds (torch, the model, the
    data): ``whole_process``, with the formula's ``total`` unchanged (report.json's ``memory.estimate``)."""
    import twa_tool.soup as soup

    monkeypatch.setattr(soup, "process_bytes", lambda: 600 * 2**20)
    args = soup_args(finetunes, tmp_path / "o", "--dry-run")
    memory = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)["memory_estimate_bytes"]
    formula = memory["directions"] + memory["center_and_offset"] + memory["states_and_workspace"]
    assert memory["total"] == formula and memory["torch_model_data"] == 600 * 2**20
    assert memory["whole_process"] == 600 * 2**20 + formula
    human = CliRunner().invoke(cli, args)
    assert human.exit_code == 0, human.output
    assert (f"peak memory about {memory['whole_process'] / 2**20:.1f} MiB for the whole process: 600.0 MiB that this "
            f"process holds now (torch, the model, the data) + {size_text(formula)} beyond torch and the data "
            f"(K*D*4 + 8*D + 14*S (S: bytes of one state dict))") in human.stderr


def test_soup_dry_run_fails_as_the_run_would(finetunes: Path, tmp_path: Path) -> None:
    """The dry run's refusals are the run's: an existing output without --overwrite (exit 7), missing data."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.json").write_text("{}")
    result = CliRunner().invoke(cli, soup_args(finetunes, tmp_path / "o", "--dry-run"))
    assert result.exit_code == 7, result.output
    result = CliRunner().invoke(cli, ["soup", str(finetunes), *model_flags(), "--data", "mnist", "--data-root",
                                      str(tmp_path / "none"), "--dry-run", "--out", str(tmp_path / "p")])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and not (tmp_path / "p").exists()


def test_soup_dry_run_with_download_plans_the_download(finetunes: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["soup", str(finetunes), *model_flags(), "--data", "mnist", "--data-root",
                                      str(tmp_path / "none"), "--download", "--dry-run", "--json",
                                      "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] == {"spec": "mnist", "would_download": True,
                                                 "download_into": str(tmp_path / "none" / "MNIST" / "raw")}
    assert not (tmp_path / "none").exists() and not (tmp_path / "p").exists()
