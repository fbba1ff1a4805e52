"""The `twa average` command end to end through click's CliRunner, including its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_ARGS, model_flags
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twa_tool.cli import cli
from twa_tool.models import build_model, flatten, trainable_names
from twa_tool.selection import UNPLACED
from twa_tool.subspace import STORAGE_TOLERANCE

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "256", "--lr", "0.5"]


def run(*args: str | Path) -> object:
    return CliRunner().invoke(cli, ["average", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def full_run(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("out") / "twa"
    return run(demo_ckpts, *FAST, "--out", out, "--json"), out


def test_average_writes_model_and_report(full_run: tuple[object, Path], demo_ckpts: Path) -> None:
    result, out = full_run
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["checkpoints"] == [f"{i}.safetensors" for i in range(5)]
    assert len(report["coefficients"]) == 5
    for method in ("last", "best", "swa", "twa"):
        assert 0 <= report["metrics"][method]["accuracy"] <= 1
        assert report["metrics"][method]["loss"] > 0
    assert report["basis"]["orthonormality_error"] <= 1e-5
    assert report["basis"]["span_residual"] < 1e-5
    assert "Evaluation split" in result.stderr  # the human table goes to stderr


def test_output_model_matches_input_keys_and_coefficients(full_run: tuple[object, Path], demo_ckpts: Path) -> None:
    result, out = full_run
    report = json.loads(result.stdout)
    saved = load_file(out / "model.safetensors")
    model = build_model("twa:cnn", TINY_ARGS)
    inputs = [load_file(demo_ckpts / name) for name in report["checkpoints"]]
    assert saved.keys() == inputs[0].keys() == model.state_dict().keys()
    assert all(saved[k].dtype == inputs[0][k].dtype for k in saved)
    model.load_state_dict(saved, strict=True)
    names = trainable_names(model)
    w = flatten(saved, names)
    combo = sum(a * flatten(s, names) for a, s in zip(report["coefficients"], inputs))
    assert torch.linalg.vector_norm(w - combo) / torch.linalg.vector_norm(w) < 1e-5
    with safe_open(out / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["twa.model"] == "twa:cnn"
    assert json.loads(meta["twa.coefficients"]) == pytest.approx(report["coefficients"])
    assert [s["name"] for s in json.loads(meta["twa.sources"])] == report["checkpoints"]
    assert all(len(s["sha256"]) == 64 for s in json.loads(meta["twa.sources"]))


def test_same_seed_on_cpu_is_bit_identical(demo_ckpts: Path, tmp_path: Path) -> None:
    args = [demo_ckpts, *FAST, "--baselines", "none", "--device", "cpu"]
    assert run(*args, "--out", tmp_path / "a").exit_code == 0
    assert run(*args, "--out", tmp_path / "b").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_run_without_the_compiled_projection_says_so(demo_ckpts: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the compiled projection passes could not be used (here: the CPU standing in for the GPU, and a
    compiler that fails), the run takes the chunked passes, gives the same model, and its report says why."""
    from twa_tool import subspace

    args = [demo_ckpts, *FAST, "--baselines", "none", "--device", "cpu", "--basis-dtype", "int8", "--json"]
    plain = run(*args, "--out", tmp_path / "plain")
    assert plain.exit_code == 0 and json.loads(plain.stdout)["warnings"] == []
    fused = subspace._FusedPasses()
    fused.devices, fused.min_dim = ("cpu",), 1  # the demo CNN has fewer than 4096 parameters
    monkeypatch.setattr(subspace, "_FUSED", fused)
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a: (_ for _ in ()).throw(RuntimeError("no triton")))
    result = run(*args, "--out", tmp_path / "fallback")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["warnings"] == [
        "projection: torch.compile failed: RuntimeError: no triton; training took the chunked passes (the same "
        "projection, slower on a GPU)"]
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "fallback" / "model.safetensors").read_bytes()


def test_no_warning_for_a_failure_this_run_did_not_meet(demo_ckpts: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled passes' failure is kept for the process: a later run in it (library use: run_average called
    again, the test suite) was told "training took the chunked passes" even on the CPU, where the compiled
    passes never apply. Now the report warns only where this run's projections fell back."""
    from twa_tool import subspace

    args = [demo_ckpts, *FAST, "--baselines", "none", "--device", "cpu", "--basis-dtype", "int8", "--json"]
    earlier = subspace._FusedPasses()  # the real one: CUDA only
    earlier.failure = "torch.compile failed: RuntimeError: no triton"
    monkeypatch.setattr(subspace, "_FUSED", earlier)
    result = run(*args, "--out", tmp_path / "cpu")
    assert result.exit_code == 0 and json.loads(result.stdout)["warnings"] == []


def test_existing_output_needs_overwrite(full_run: tuple[object, Path], demo_ckpts: Path) -> None:
    _, out = full_run
    before = (out / "model.safetensors").read_bytes()
    result = run(demo_ckpts, *FAST, "--baselines", "none", "--out", out)
    assert result.exit_code == 7
    assert "model.safetensors already exists; pass --overwrite" in result.stderr
    assert "Traceback" not in result.output
    assert (out / "model.safetensors").read_bytes() == before


def test_selection_start_and_holdout(demo_ckpts: Path, tmp_path: Path) -> None:
    result = run(demo_ckpts, *FAST, "--range", "1:", "--last", "3", "--start", "last", "--fit-on", "holdout",
                 "--baselines", "swa,last", "--schedule", "cosine", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoints"] == ["2.safetensors", "3.safetensors", "4.safetensors"]
    assert set(report["metrics"]) == {"swa", "last", "twa"}
    assert report["train"]["start"] == "4.safetensors"
    assert report["data"]["fit_examples"] == 200  # 10% of the 2000 synthetic training examples


def test_an_unused_data_root_is_a_warning_in_the_run_and_the_dry_run(demo_ckpts: Path, tmp_path: Path) -> None:
    note = f"--data-root {tmp_path / 'data'} is not used: --data synthetic is generated, not read"
    for extra in (["--dry-run"], []):
        result = run(demo_ckpts, *FAST, "--data-root", tmp_path / "data", "--out", tmp_path / "o", "--json", *extra)
        assert result.exit_code == 0, result.output
        assert note in json.loads(result.stdout)["warnings"]
        assert note in " ".join(result.stderr.split())


def test_an_unused_download_is_a_warning_in_the_run_and_the_dry_run(demo_ckpts: Path, tmp_path: Path) -> None:
    note = "--download is not used: --data synthetic is generated, not downloaded"
    for extra in (["--dry-run"], []):
        result = run(demo_ckpts, *FAST, "--download", "--out", tmp_path / "o", "--json", "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        assert note in json.loads(result.stdout)["warnings"]
        assert note in " ".join(result.stderr.split())


def test_plain_pt_needs_model_flag(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    result = run(plain_pt_ckpts, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 4
    assert "does not record its architecture; pass --model" in result.stderr
    result = run(plain_pt_ckpts, *FAST, *model_flags(), "--baselines", "none", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_duplicates_are_counted_once_and_dependent_checkpoints_dropped(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    shutil.copytree(demo_ckpts, ckpts)
    shutil.copy(ckpts / "3.safetensors", ckpts / "5.safetensors")  # byte-identical copy
    state = load_file(ckpts / "2.safetensors")  # same weights, different bytes: caught by the rank check
    save_file(state, ckpts / "6.safetensors", metadata={"twa.model": "twa:cnn", "note": "re-saved"})
    result = run(ckpts, *FAST, "--baselines", "none", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert "5.safetensors: byte-identical copy of 3.safetensors; counted once" in result.stderr
    assert "6.safetensors: linearly dependent" in result.stderr
    report = json.loads(result.stdout)
    assert "5.safetensors" not in report["checkpoints"]
    assert report["excluded"] == [{"name": "5.safetensors", "reason": "byte-identical copy of 3.safetensors"}]
    assert report["dropped"] == ["6.safetensors"] and report["coefficients"][5] == 0


def test_an_ema_save_beside_the_epochs_is_left_out_with_a_warning(demo_ckpts: Path, tmp_path: Path) -> None:
    """ema_best.safetensors (no number, weights no epoch has) sorted last: it was averaged as the newest point and
    reported as the 'last' baseline. It is left out, in the run and the dry run, with the way to keep it."""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(demo_ckpts, ckpts)
    first, last = load_file(ckpts / "0.safetensors"), load_file(ckpts / "4.safetensors")
    save_file({k: (v + last[k]) / 2 if v.is_floating_point() else v for k, v in first.items()},
              ckpts / "ema_best.safetensors", metadata={"twa.model": "twa:cnn"})
    note = "ema_best.safetensors: left out, unnumbered, not a copy of a numbered checkpoint"
    for extra in (["--dry-run"], []):
        result = run(ckpts, *FAST, "--baselines", "last", "--out", tmp_path / "o", "--json", "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert "ema_best.safetensors" not in report["checkpoints"]
        assert {"name": "ema_best.safetensors", "reason": UNPLACED} in report["excluded"]
        assert any(w.startswith(note) for w in report["warnings"])
        assert note in " ".join(result.stderr.split())
    assert report["metrics"]["last"]["checkpoint"] == "4.safetensors"
    markdown = (tmp_path / "o" / "report.md").read_text()  # the run's warnings, for CI artifact readers too
    assert "Warnings:" in markdown and "safetensors: left out, unnumbered, not a copy" in markdown


def test_weights_key_averages_the_named_dict(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    """`{'net': sd, 'criterion': ..., 'epoch': e}` files: refused until re-saved; `--weights net` now gives the run
    the plain state dicts give, bit for bit, and the report records the key."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i, path in enumerate(sorted(plain_pt_ckpts.glob("*.pt"), key=lambda p: int(p.stem))):
        torch.save({"net": torch.load(path, weights_only=True), "criterion": {"weight": torch.ones(10)}, "epoch": i},
                   ckpts / path.name)
    flags = [*FAST, *model_flags(), "--baselines", "none", "--json"]
    refused = run(ckpts, *flags, "--out", tmp_path / "r")
    assert refused.exit_code == 4 and "name it with --weights KEY (e.g. --weights net)" in refused.stderr
    keyed = run(ckpts, *flags, "--weights", "net", "--out", tmp_path / "k")
    plain = run(plain_pt_ckpts, *flags, "--out", tmp_path / "p")
    assert keyed.exit_code == 0 and plain.exit_code == 0, keyed.output + plain.output
    report = json.loads(keyed.stdout)
    assert report["config"]["weights"] == "net"
    assert report["coefficients"] == json.loads(plain.stdout)["coefficients"]
    got, want = load_file(tmp_path / "k" / "model.safetensors"), load_file(tmp_path / "p" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_rank_rtol_keeps_checkpoints_closer_than_the_default(demo_ckpts: Path, tmp_path: Path) -> None:
    """Steps of 3e-6 of the weights' norm: the default --rank-rtol 1e-5 drops them, 1e-6 keeps every one."""
    first = load_file(demo_ckpts / "0.safetensors")
    params = trainable_names(build_model("twa:cnn", TINY_ARGS))
    norm = torch.cat([first[n].reshape(-1) for n in params]).norm()
    generator = torch.Generator().manual_seed(0)
    ckpts, state = tmp_path / "ckpts", dict(first)
    ckpts.mkdir()
    for i in range(4):
        if i:
            steps = {n: torch.randn(state[n].shape, generator=generator) for n in params}
            scale = 3e-6 * norm / torch.cat([v.reshape(-1) for v in steps.values()]).norm()
            state = {**state, **{n: state[n] + scale * steps[n] for n in params}}
        save_file(state, ckpts / f"{i}.safetensors", metadata={"twa.model": "twa:cnn"})
    default = run(ckpts, *FAST, *model_flags(), "--baselines", "none", "--out", tmp_path / "a")
    assert default.exit_code == 6, default.output
    assert "only 1 linearly independent checkpoint(s) among 4 (within --rank-rtol 1e-05)" in default.stderr
    assert "lower --rank-rtol (down to 1e-06)" in default.stderr
    shutil.copy(demo_ckpts / "4.safetensors", ckpts / "4.safetensors")  # a real step after them: rank 2
    kept = run(ckpts, *FAST, *model_flags(), "--baselines", "none", "--out", tmp_path / "a", "--json")
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["dropped"] == ["1.safetensors", "2.safetensors", "3.safetensors"]
    assert "within --rank-rtol 1e-05 of its norm" in kept.stderr
    lower = run(ckpts, *FAST, *model_flags(), "--baselines", "none", "--rank-rtol", "1e-6", "--out", tmp_path / "b",
                "--json")
    assert lower.exit_code == 0, lower.output
    report = json.loads(lower.stdout)
    assert report["dropped"] == [] and report["basis"]["rank"] == 5 and report["config"]["rank_rtol"] == 1e-6


@pytest.mark.parametrize("value", ["1e-7", "0", "1", "nan"])
def test_rank_rtol_out_of_range_is_a_usage_error(demo_ckpts: Path, tmp_path: Path, value: str) -> None:
    result = run(demo_ckpts, *FAST, "--rank-rtol", value, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert f"--rank-rtol {float(value)}: must be from 1e-06 to below 1" in result.stderr
    assert not (tmp_path / "o").exists()


def test_non_finite_checkpoint_exits_6(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    shutil.copytree(demo_ckpts, ckpts)
    state = load_file(ckpts / "2.safetensors")
    state["head.weight"][0, 0] = float("nan")
    save_file(state, ckpts / "2.safetensors", metadata={"twa.model": "twa:cnn"})
    result = run(ckpts, *FAST, *model_flags(), "--out", tmp_path / "o")
    assert result.exit_code == 6
    assert "2.safetensors: tensor head.weight has non-finite values" in result.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_wrong_model_lists_mismatch(demo_ckpts: Path, tmp_path: Path) -> None:
    result = run(demo_ckpts, *FAST, "--model", "twa:cnn", "--model-arg", "width=5", "--out", tmp_path / "o")
    assert result.exit_code == 4
    assert "5 of 5 checkpoints do not match the model twa:cnn (first: 0.safetensors); check --model" in result.stderr
    assert "features.0.weight" in result.stderr and "shape (4, 1, 3, 3)" in result.stderr  # the compact table
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, code, text", [
    (["--range", "3"], 2, "--range 3: expected A:B"),
    (["--range", "0:1"], 4, "TWA needs at least 2"),
    (["--baselines", "last,worst"], 2, "--baselines: unknown worst"),
    (["--start", "first"], 2, "--start first"),
    (["--start", "9"], 2, "--start 9: only 5 checkpoints"),
    (["--model-arg", "oops"], 2, "--model-arg oops: expected key=value"),
    (["--data", "nope"], 2, "nope"),
    (["--device", "cuda:7"], 2, "--device"),
    (["--holdout-fraction", "1.5"], 2, "--holdout-fraction"),
])
def test_bad_flags_give_one_line_errors(demo_ckpts: Path, tmp_path: Path, args: list[str], code: int,
                                        text: str) -> None:
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    result = run(demo_ckpts, *FAST, "--baselines", "none", *args, "--out", tmp_path / "o")
    assert result.exit_code == code, result.output
    assert text in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_missing_directory_and_verbose_traceback(tmp_path: Path) -> None:
    result = run(tmp_path / "nowhere", *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 4 and "no such directory" in result.stderr
    assert "Traceback" not in result.output
    result = run(tmp_path / "nowhere", *FAST, "--out", tmp_path / "o", "-v")
    assert result.exit_code == 4 and "Traceback" in result.stderr


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    result = run(tmp_path / "ckpts", *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 4 and "no checkpoints found" in result.stderr
    assert "*.pth.tar and checkpoint-<step>/ folders" in result.stderr  # every layout discover finds
    soup = CliRunner().invoke(cli, ["soup", str(tmp_path / "ckpts"), "--data", "synthetic", "--out",
                                    str(tmp_path / "s")])
    assert soup.exit_code == 4 and soup.stderr.strip().splitlines()[-1].endswith(
        "*.pth.tar and checkpoint-<step>/ folders); check the path")


def test_checkpoints_in_per_epoch_subfolders_are_named(tmp_path: Path) -> None:
    """`ckpts/epoch_1/checkpoint.pth, epoch_2/...`: 'no checkpoints found ...; check the path' while the path was
    right; the error now names what the subfolders hold and what to do."""
    for e in (1, 2, 10):
        (tmp_path / "ckpts" / f"epoch_{e}").mkdir(parents=True)
        torch.save({"w": torch.zeros(2)}, tmp_path / "ckpts" / f"epoch_{e}" / "checkpoint.pth")
        torch.save({"state": {}}, tmp_path / "ckpts" / f"epoch_{e}" / "optimizer.pt")  # never listed
    result = run(tmp_path / "ckpts", *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 4 and result.stderr.strip().splitlines()[-1].endswith(
        "folders); its subfolders hold epoch_1/checkpoint.pth, epoch_2/checkpoint.pth and 1 more, but twa reads the "
        "files of one folder: gather them in one (symlinks will do, named by epoch)")


def test_output_feeds_back_without_model_flag(full_run: tuple[object, Path], tmp_path: Path) -> None:
    """The written model records its architecture, so it can itself be an input without --model."""
    _, out = full_run
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copy(out / "model.safetensors", ckpts / "1.safetensors")
    state = load_file(out / "model.safetensors")
    save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
              ckpts / "2.safetensors",
              metadata={"twa.model": "twa:cnn", "twa.model_args": json.dumps(dict(TINY_ARGS))})
    result = run(ckpts, *FAST, "--baselines", "none", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(demo_ckpts: Path, tmp_path: Path, amp: str) -> None:
    result = run(demo_ckpts, *FAST, "--amp", amp, "--baselines", "swa", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metrics"]["twa"]["accuracy"] > 0.3  # still a working model
    assert load_file(tmp_path / "o" / "model.safetensors")["head.weight"].dtype == torch.float32


def test_quiet_still_prints_errors_and_env_defaults(demo_ckpts: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(tmp_path / "nowhere", *FAST, "--out", tmp_path / "o", "-q")
    assert result.exit_code == 4 and "no such directory" in result.stderr
    monkeypatch.setenv("TWA_AVERAGE_BASELINES", "none")
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(tmp_path / "e"), "--json"],
                                auto_envvar_prefix="TWA")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["metrics"]) == {"twa"}


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--train-epochs", "2", "--epochs", "1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoints"] == ["0.safetensors", "1.safetensors", "2.safetensors"]
    assert (tmp_path / "d" / "twa" / "model.safetensors").is_file()
    again = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--train-epochs", "2"])
    assert again.exit_code == 7 and "--overwrite" in again.stderr


def test_timm_arch_key_names_the_model(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for name in ("1.pt", "2.pt"):
        torch.save({"arch": "resnet18", "state_dict": torch.load(plain_pt_ckpts / f"{name[0]}.pt",
                                                                 weights_only=True)}, ckpts / name)
    result = run(ckpts, *FAST, "--out", tmp_path / "o")
    try:
        import timm  # noqa: F401
    except ImportError:
        assert result.exit_code == 4 and "timm:resnet18" in result.stderr and "pip install timm" in result.stderr
    else:
        assert result.exit_code == 4 and "do not match the model" in result.stderr


def test_a_recorded_arch_that_cannot_be_built_is_not_blamed_on_model(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    """timm's CheckpointSaver without ``args`` records ``type(model).__name__.lower()`` as ``arch`` ("resnet"):
    no timm model has that name. The error named ``--model timm:resnet``, a flag the user never passed."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "arch": "resnet", "version": 2, "metric": 90.0 + epoch,
                    "state_dict": torch.load(plain_pt_ckpts / f"{epoch}.pt", weights_only=True)},
                   ckpts / f"checkpoint-{epoch}.pth.tar")
    result = run(ckpts, "--data", "synthetic", "--out", tmp_path / "o")
    assert result.exit_code == 4, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {ckpts / 'checkpoint-1.pth.tar'}: the architecture it records, timm:resnet, "
                            f"cannot be built (") and "pass --model yourself" in error, result.stderr
    assert "--model timm:resnet:" not in result.stderr


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_low_precision_basis_end_to_end(full_run: tuple[object, Path], demo_ckpts: Path, tmp_path: Path,
                                        storage: str) -> None:
    result = run(demo_ckpts, *FAST, "--basis-dtype", storage, "--baselines", "swa", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reference = json.loads(full_run[0].stdout)
    basis = report["basis"]
    assert basis["storage"] == storage and basis["rank"] == reference["basis"]["rank"]
    assert basis["build"] == "columns" and reference["basis"]["build"] == "rows"  # the float32 basis never held
    assert not any("basis-dtype" in w for w in report["warnings"])
    ratio = reference["basis"]["bytes"] / basis["bytes"]
    assert ratio == 2 if storage == "bf16" else 3.9 < ratio < 4
    assert reference["basis"]["orthonormality_error"] < basis["orthonormality_error"] <= STORAGE_TOLERANCE[storage]
    # the swa baseline does not depend on the basis; twa still trains to a working model
    assert report["metrics"]["swa"] == reference["metrics"]["swa"]
    assert report["metrics"]["twa"]["accuracy"] > 0.3


def test_a_low_precision_basis_built_through_float32_says_why(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    result = run(plain_pt_ckpts, *FAST, *model_flags(), "--basis-dtype", "int8", "--baselines", "swa", "--trust-pickle",
                 "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["basis"]["build"] == "rows" and report["basis"]["storage"] == "int8"
    assert any(w.startswith("--basis-dtype int8: built through a float32 basis") and "--trust-pickle" in w
               for w in report["warnings"])


LOUD_DATA = '''
import torch
from twa_tool.data import build_data

print("loud: imported")


class Loud(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        print("loud: example", index)
        return self.dataset[index]


def splits():
    print("loud: building")
    data = build_data("synthetic")
    return Loud(data.train), data.eval
'''


def test_what_user_code_prints_goes_to_stderr_and_json_stays_alone_on_stdout(demo_ckpts: Path,
                                                                               tmp_path: Path) -> None:
    (tmp_path / "loud.py").write_text(LOUD_DATA)
    result = run(demo_ckpts, *FAST, "--data", f"{tmp_path / 'loud.py'}:splits", "--baselines", "none",
                 "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["twa"]["accuracy"] > 0  # one JSON document, nothing else
    assert "loud: imported" in result.stderr and "loud: building" in result.stderr
    assert "loud: example" in result.stderr


def test_what_user_data_code_prints_in_the_demo_goes_to_stderr(tmp_path: Path) -> None:
    """`twa demo --data file.py:function --json`, as `twa average`: stdout holds the JSON document alone."""
    (tmp_path / "loud.py").write_text(LOUD_DATA)
    result = CliRunner().invoke(cli, ["demo", "--data", f"{tmp_path / 'loud.py'}:splits", "--train-epochs", "1",
                                      "--epochs", "0", "--threads", "1", "--out", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoints"] == ["0.safetensors", "1.safetensors"]
    assert "loud: imported" in result.stderr and "loud: example" in result.stderr


def test_the_demo_warns_about_an_unused_download_as_twa_average_does(tmp_path: Path) -> None:
    """README: the demo's --download is "as twa average", which warns beside a --data that never downloads (its
    --data-root already did: the averaging step was built without the flag)."""
    result = CliRunner().invoke(cli, ["demo", "--download", "--train-epochs", "1", "--epochs", "0", "--threads", "1",
                                      "--out", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    note = "--download is not used: --data synthetic is generated, not downloaded"
    assert note in report["warnings"] and report["config"]["download"] is True
    assert note in " ".join(result.stderr.split())


def test_the_demo_says_one_epoch_in_the_singular(tmp_path: Path) -> None:
    (tmp_path / "loud.py").write_text(LOUD_DATA)
    result = CliRunner().invoke(cli, ["demo", "--data", f"{tmp_path / 'loud.py'}:splits", "--train-epochs", "1",
                                      "--epochs", "0", "--threads", "1", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert " for 1 epoch -> " in result.output  # was "for 1 epochs"


def test_twa_clearly_below_swa_suggests_a_lower_lr(demo_ckpts: Path, tmp_path: Path) -> None:
    """An lr that overshoots (TWA far below the SWA mean it started from) gets a warning naming --lr."""
    result = run(demo_ckpts, *FAST, "--lr", "50", "--baselines", "swa", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gap = report["metrics"]["swa"]["accuracy"] - report["metrics"]["twa"]["accuracy"]
    assert gap > 0.05
    hint = [w for w in report["warnings"] if "below SWA" in w]
    assert hint == [f"TWA ended {100 * gap:.2f} points below SWA ({report['metrics']['twa']['accuracy']:.2%} vs "
                    f"{report['metrics']['swa']['accuracy']:.2%}) with --lr 50: on checkpoints near convergence a "
                    f"lower --lr (e.g. 5) usually keeps TWA at or above SWA; --fail-if-worse-than swa --on-worse "
                    f"fallback would write SWA instead"]
    assert "points below SWA" in result.stderr and "lower --lr" in result.stderr


@pytest.mark.parametrize("swa, twa, epochs, hinted", [
    (0.80, 0.794, 10, True),  # 0.6 points below
    (0.80, 0.796, 10, False),  # 0.4 points: within LR_HINT_GAP
    (0.80, 0.85, 10, False),
    (0.80, 0.50, 0, False),  # no training: nothing an lr could change
])
def test_below_swa_hint_threshold(swa: float, twa: float, epochs: int, hinted: bool) -> None:
    from twa_tool.config import AverageConfig, TrainConfig
    from twa_tool.pipeline import below_swa_hint

    config = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic",
                           train=TrainConfig(epochs=epochs))
    metrics = {"swa": {"accuracy": swa}, "twa": {"accuracy": twa}}
    assert (below_swa_hint(config, metrics) is not None) == hinted
    assert below_swa_hint(config, {"twa": {"accuracy": twa}}) is None  # no SWA baseline evaluated
    if hinted:  # the gate is suggested only where no fallback gate is set already
        assert "--on-worse fallback would write SWA" in below_swa_hint(config, metrics)
        gated = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic",
                              train=TrainConfig(epochs=epochs), fail_if_worse_than="best", on_worse="fallback")
        assert below_swa_hint(gated, metrics).endswith("usually keeps TWA at or above SWA")
