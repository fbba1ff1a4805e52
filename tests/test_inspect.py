"""`twa inspect` and `twa average` on trainer layouts (Lightning prefixes, timm EMA), through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import model_flags
from safetensors.torch import load_file, save_file

from twa_tool.cli import cli


@pytest.fixture(scope="module")
def lightning_dir(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lightning-style .ckpt files: `model.` attribute prefix, epoch/global_step, a last.ckpt symlink."""
    out = tmp_path_factory.mktemp("lightning")
    for epoch in range(5):
        state = load_file(demo_ckpts / f"{epoch}.safetensors")
        torch.save({"epoch": epoch, "global_step": 16 * epoch, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()}},
                   out / f"epoch={epoch}-step={16 * epoch}.ckpt")
    os.symlink(out / "epoch=4-step=64.ckpt", out / "last.ckpt")
    (out / "hparams.yaml").write_text("lr: 0.05\n")
    return out


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_lists_selection_in_order_with_steps(lightning_dir: Path) -> None:
    result = invoke("inspect", lightning_dir, "--json", "--range", "1:")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    rows = listing["checkpoints"]
    assert [r["name"] for r in rows] == [f"epoch={e}-step={16 * e}.ckpt" for e in range(1, 5)]
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, 16 * e) for e in range(1, 5)]
    assert all(r["path"].endswith(r["name"]) and r["producer"] == "lightning" for r in rows)
    assert rows[0]["parameters"] > 0 and rows[0]["dtypes"]
    left_out = {r["name"]: r["status"] for r in listing["not_selected"]}
    assert left_out["last.ckpt"] == "symlink to the same file as epoch=4-step=64.ckpt"
    assert left_out["epoch=0-step=0.ckpt"].startswith("outside")
    assert listing["ignored_files"] == ["hparams.yaml"]
    human = invoke("inspect", lightning_dir)
    assert human.exit_code == 0 and "selected" in human.stderr and "hparams.yaml" in human.stderr


def test_inspect_listing_carries_the_schema_version_as_the_reports_do(demo_ckpts: Path) -> None:
    """A CI script checks `schema_version` before it reads any document; the listing lacked it (and tool, version,
    command), which every report and dry-run plan has as its first four keys."""
    from twa_tool import SCHEMA_VERSION, __version__

    result = invoke("inspect", demo_ckpts, "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert list(listing.items())[:4] == [("schema_version", SCHEMA_VERSION), ("tool", "twa"),
                                         ("version", __version__), ("command", "inspect")]


def test_average_strips_the_lightning_prefix(lightning_dir: Path, tmp_path: Path) -> None:
    result = invoke("average", lightning_dir, *model_flags(), "--data", "synthetic", "--epochs", "1",
                    "--baselines", "none", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["checkpoints"]) == 5 and "last.ckpt" not in report["checkpoints"]
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "o" / "model.safetensors"))


def test_ema_weights_are_chosen_explicitly(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "timm"
    ckpts.mkdir()
    for epoch in range(1, 4):
        state = load_file(demo_ckpts / f"{epoch}.safetensors")
        ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"epoch": epoch, "arch": "cnn", "state_dict": state, "state_dict_ema": ema,
                    "metric": 0.5 + epoch / 10}, ckpts / f"checkpoint-{epoch}.pth.tar")
    listing = json.loads(invoke("inspect", ckpts, "--json", "--top-k", "2", "--by", "metric", "--mode", "max").stdout)
    assert [r["name"] for r in listing["checkpoints"]] == ["checkpoint-2.pth.tar", "checkpoint-3.pth.tar"]
    assert listing["checkpoints"][0]["metrics"] == {"metric": pytest.approx(0.7)}
    result = invoke("average", ckpts, *model_flags(), "--weights", "ema", "--data", "synthetic", "--epochs", "0",
                    "--baselines", "last", "--start", "last", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "o" / "model.safetensors")
    raw_last = load_file(demo_ckpts / "3.safetensors")
    assert torch.allclose(saved["head.weight"], raw_last["head.weight"] + 1)  # 0 TWA epochs from the last EMA


def test_inspect_errors(tmp_path: Path) -> None:
    result = invoke("inspect", tmp_path / "missing")
    assert result.exit_code == 4 and "no such directory" in result.stderr
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"x")
    result = invoke("average", tmp_path / "peft", "--data", "synthetic", "--out", tmp_path / "o")
    assert result.exit_code == 4 and "adapter" in result.stderr.lower()


def test_order_and_dtype_warnings(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i, step in ((1, 300), (2, 200), (3, 400)):
        sd = load_file(demo_ckpts / f"{i}.safetensors")
        if i == 3:
            sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        torch.save({"state_dict": sd, "global_step": step}, ckpts / f"{i}.pt")
    listing = json.loads(invoke("inspect", ckpts, "--json").stdout)
    assert listing["warnings"][0].startswith("1.pt (step 300) comes before 2.pt (step 200)")
    assert listing["warnings"][1].startswith("mixed dtypes: ")
    result = invoke("average", ckpts, *model_flags(), "--data", "synthetic", "--epochs", "0", "--baselines", "none",
                    "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert "comes before 2.pt" in result.stderr and "mixed dtypes" in result.stderr
    saved = load_file(tmp_path / "o" / "model.safetensors")
    assert saved["head.weight"].dtype == torch.float16  # the last checkpoint's dtype


def test_integer_buffers_are_copied_not_averaged(demo_ckpts: Path) -> None:
    from conftest import TINY_ARGS

    from twa_tool.checkpoints import discover
    from twa_tool.config import AverageConfig
    from twa_tool.models import build_model, trainable_names
    from twa_tool.pipeline import Reader, stream_checkpoints

    files = discover(demo_ckpts)
    model = build_model("twa:cnn", TINY_ARGS)
    reader = Reader.for_run(AverageConfig(checkpoint_dir=demo_ckpts, out_dir=demo_ckpts, data="synthetic"), model)
    stream = stream_checkpoints(files, model, trainable_names(model), 1e-5, reader, lambda e: None)
    states = [load_file(f.path) for f in files]
    key = "features.1.num_batches_tracked"
    assert stream.mean_state[key].dtype == torch.int64
    assert stream.mean_state[key] == states[-1][key] != sum(s[key] for s in states) // len(states)
    mean = sum(s["features.1.running_mean"].double() for s in states) / len(states)
    assert torch.allclose(stream.mean_state["features.1.running_mean"].double(), mean, atol=1e-6)


def test_inspect_lists_an_unreadable_selected_checkpoint_and_fails(demo_ckpts: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for path in demo_ckpts.iterdir():
        (ckpts / path.name).write_bytes(path.read_bytes())
    (ckpts / "2.safetensors").write_bytes(b"garbage")
    result = invoke("inspect", ckpts, "--json")
    assert result.exit_code == 4, result.output
    listed = json.loads(result.stdout)["checkpoints"]
    assert [c["name"] for c in listed if c["error"]] == ["2.safetensors"]  # the listing still comes first
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of the 5 selected checkpoints cannot be read" in errors[0]
    assert "2.safetensors" in errors[0] and "--exclude" in errors[0]
    assert invoke("inspect", ckpts, "--exclude", "2.safetensors").exit_code == 0


def test_inspect_with_a_key_no_file_has_names_the_flag_not_the_files(demo_ckpts: Path, tmp_path: Path) -> None:
    """`--weights nett` (a typo) fails on every file: the advice was 'replace them, or leave them out with
    --exclude', which would leave nothing; when every selected file fails, the fix is what the error names."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i in range(3):
        torch.save({"net": load_file(demo_ckpts / f"{i}.safetensors"), "criterion": {"w": torch.ones(2)}},
                   folder / f"{i}.pth")
    result = invoke("inspect", folder, "--weights", "nett")
    assert result.exit_code == 4
    message = " ".join(result.stderr.split())
    assert "3 of the 3 selected checkpoints cannot be read" in message and "no key 'nett'" in message
    assert "change what the error names (a reading flag applies to every file)" in message
    assert "--exclude" not in message.split("twa average would fail on them")[1]
    assert invoke("inspect", folder, "--weights", "net").exit_code == 0


def test_inspect_of_a_folder_without_checkpoints_fails_like_average(tmp_path: Path) -> None:
    """A CI pre-check must not pass on a folder `twa average` refuses ("no checkpoints found", exit 4)."""
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "notes.txt").write_text("no weights here")
    result = invoke("inspect", tmp_path / "ckpts", "--json")
    assert result.exit_code == 4 and "no checkpoints found" in result.stderr
    assert json.loads(result.stdout)["checkpoints"] == []  # the JSON is still printed first


def test_inspect_of_a_selection_average_refuses_fails_like_it(demo_ckpts: Path, tmp_path: Path) -> None:
    """Fewer than 2 distinct selected checkpoints: `twa average` exits 4, so the pre-check does too, same line."""
    refused = invoke("inspect", demo_ckpts, "--last", "1", "--json")
    assert refused.exit_code == 4
    listing = json.loads(refused.stdout)  # printed first
    assert len(listing["checkpoints"]) == 1 and "TWA needs at least 2 distinct ones" in listing["refusal"]
    assert listing["refusal"] in refused.stderr
    average = invoke("average", demo_ckpts, "--last", "1", "--data", "synthetic", "--out", tmp_path / "o")
    assert average.exit_code == 4 and listing["refusal"] in average.stderr
    passed = invoke("inspect", demo_ckpts, "--last", "2", "--json")
    assert passed.exit_code == 0 and json.loads(passed.stdout)["refusal"] is None


def test_inspect_table_in_a_log_is_not_squeezed_to_80_columns(demo_ckpts: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr that is not a terminal (a CI log) gets a wide table: long file names stay on one line."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    names = [f"run-{'x' * 40}-epoch={i:03d}.safetensors" for i in range(3)]
    for source, name in zip(sorted(demo_ckpts.glob("*.safetensors")), names):
        os.link(source, folder / name)
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert all(any(name in line for line in result.stderr.splitlines()) for name in names), result.stderr
    monkeypatch.setenv("COLUMNS", "80")  # an explicit width still wins
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert max(len(line) for line in result.stderr.splitlines()) <= 80, result.stderr


def test_inspect_names_a_bad_allow_global_as_average_does(plain_pt_ckpts: Path, tmp_path: Path) -> None:
    """A flag that cannot be imported is a usage error (exit 2) naming the flag, not every pickle file listed as
    unreadable with "replace them" (exit 4)."""
    line = "error: --allow-global nodots: cannot import it"
    average = invoke("average", plain_pt_ckpts, *model_flags(), "--data", "synthetic", "--allow-global", "nodots",
                     "--out", tmp_path / "o")
    assert average.exit_code == 2 and line in average.stderr
    result = invoke("inspect", plain_pt_ckpts, "--allow-global", "nodots")
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), result.stderr


def test_inspect_lists_a_symlink_to_nothing_then_exits_4(demo_ckpts: Path, tmp_path: Path) -> None:
    """A dangling link failed `twa inspect` before its table or JSON (stdout empty under --json, so a CI pre-check
    had nothing to parse); now it is a row with its error, and the exit is still 4, as `twa average` refuses."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("0.safetensors", "1.safetensors", "2.safetensors"):
        (folder / name).write_bytes((demo_ckpts / name).read_bytes())
    (folder / "3.safetensors").symlink_to(tmp_path / "gone.safetensors")
    line = f"{folder / '3.safetensors'}: a symlink to {tmp_path / 'gone.safetensors'}, which does not exist"
    average = invoke("average", folder, *model_flags(), "--data", "synthetic", "--out", tmp_path / "o", "--dry-run")
    assert average.exit_code == 4 and line in average.stderr
    result = invoke("inspect", folder, "--json")
    assert result.exit_code == 4, result.output
    listing = json.loads(result.stdout)
    assert [c["name"] for c in listing["checkpoints"]] == ["0.safetensors", "1.safetensors", "2.safetensors",
                                                           "3.safetensors"]
    assert listing["checkpoints"][-1]["error"].startswith(line) and listing["checkpoints"][0]["error"] is None
    assert "1 of the 4 selected checkpoints cannot be read" in result.stderr and line in result.stderr
    excluded = invoke("inspect", folder, "--exclude", "3.safetensors", "--json")
    assert excluded.exit_code == 0, excluded.output  # as `twa average --exclude 3.safetensors` runs
    listing = json.loads(excluded.stdout)
    assert len(listing["checkpoints"]) == 3
    assert [(c["name"], c["status"]) for c in listing["not_selected"]] == [("3.safetensors", "matched by --exclude")]
    last = invoke("inspect", folder, "--last", "2", "--json")  # average refuses whatever --last picks
    assert last.exit_code == 4 and json.loads(last.stdout)["checkpoints"][-1]["name"] == "3.safetensors"


def test_inspect_shows_the_prefix_it_strips(lightning_dir: Path, tmp_path: Path) -> None:
    """Issue 3: inspect's table (and --json) says which key prefix is stripped: DDP's `module.` always, a
    LightningModule attribute prefix when --strip-prefix names it."""
    folder = tmp_path / "ddp"
    folder.mkdir()
    state = torch.load(next(lightning_dir.glob("epoch=1-*.ckpt")), weights_only=True)["state_dict"]
    for epoch in range(2):
        torch.save({"epoch": epoch, "model": {f"module.{k}": v + epoch for k, v in state.items()}},
                   folder / f"ep{epoch}.pth")
    result = invoke("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    assert [r["prefix"] for r in json.loads(result.stdout)["checkpoints"]] == ["module.", "module."]
    human = invoke("inspect", folder)
    assert "prefix" in human.stderr and "module." in human.stderr, human.stderr
    forced = invoke("inspect", lightning_dir, "--json", "--strip-prefix", "model.")
    assert {r["prefix"] for r in json.loads(forced.stdout)["checkpoints"]} == {"model."}
    plain = invoke("inspect", lightning_dir, "--json")
    assert {r["prefix"] for r in json.loads(plain.stdout)["checkpoints"]} == {None}


def test_inspect_reads_the_epoch_and_step_a_safetensors_file_records(demo_ckpts: Path, tmp_path: Path) -> None:
    """`twa demo` writes `twa.epoch` into each checkpoint's safetensors metadata, and other tools write plain
    `epoch` / `global_step` / `step` keys there; inspect's epoch/step column was empty for every safetensors file,
    so the name order went unchecked. Values that are not whole numbers are not positions and stay null."""
    demo = json.loads(invoke("inspect", demo_ckpts, "--json").stdout)["checkpoints"]
    assert [(r["epoch"], r["step"]) for r in demo] == [(e, None) for e in range(5)]
    human = invoke("inspect", demo_ckpts)
    assert all(f" e{e} " in human.stderr for e in range(5)), human.stderr
    folder = tmp_path / "generic"
    folder.mkdir()
    state = load_file(demo_ckpts / "1.safetensors")
    recorded = [{"epoch": "1", "global_step": "100", "step": "7"}, {"twa.epoch": "2", "epoch": "9", "step": "200"},
                {"epoch": "3.5", "step": "-1"}, {"epoch": " 4", "global_step": "many"}]
    for i, metadata in enumerate(recorded):
        save_file(state, str(folder / f"model_{i}.safetensors"), {"format": "pt", **metadata})
    listing = json.loads(invoke("inspect", folder, "--json").stdout)
    assert [(r["epoch"], r["step"]) for r in listing["checkpoints"]] == [(1, 100), (2, 200), (None, None),
                                                                         (None, None)]
    hf = tmp_path / "hf"  # save_pretrained-like folders: no trainer_state.json, whose step would win
    for epoch in (1, 2):
        (hf / f"checkpoint-{epoch}").mkdir(parents=True)
        (hf / f"checkpoint-{epoch}" / "config.json").write_text("{}")
        save_file(state, str(hf / f"checkpoint-{epoch}" / "model.safetensors"), {"twa.epoch": str(epoch), "step": "5"})
    (hf / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 40, "epoch": None}))
    listing = json.loads(invoke("inspect", hf, "--json").stdout)
    assert [(r["epoch"], r["step"]) for r in listing["checkpoints"]] == [(1, 5), (2, 40)]


def test_inspect_warns_when_the_recorded_epochs_disagree_with_the_names(demo_ckpts: Path, tmp_path: Path) -> None:
    """The order check `twa average` and `twa inspect` make (name order against the epochs or steps files record)
    covers safetensors files too, through their metadata."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name, epoch in (("1.safetensors", 5), ("2.safetensors", 3), ("3.safetensors", 7)):
        save_file(load_file(demo_ckpts / name), str(folder / name), {"format": "pt", "twa.epoch": str(epoch)})
    listing = json.loads(invoke("inspect", folder, "--json").stdout)
    assert listing["warnings"] == ["1.safetensors (epoch 5) comes before 2.safetensors (epoch 3) in name order; the "
                                   "name order is used, rename the files or select with --include"]


def test_inspect_counts_tensor_values_and_says_they_are_not_the_trainable_parameters(demo_ckpts: Path,
                                                                                      tmp_path: Path) -> None:
    """inspect's `parameters` counts every tensor value a file holds, buffers and integer counters included, where
    the reports' `model.parameters` is the trainable values D: 704 against 678 for the demo CNN. The listing now
    has `tensor_values` (the same count, null when unreadable: 0 said the file was empty) beside the old key, and
    the table's column says values, not 'entries' (which reads as the number of tensors), with '-' for a file that
    cannot be read."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("0.safetensors", "1.safetensors"):
        (folder / name).write_bytes((demo_ckpts / name).read_bytes())
    (folder / "2.safetensors").write_bytes(b"garbage")
    rows = json.loads(invoke("inspect", folder, "--json").stdout)["checkpoints"]
    state = load_file(demo_ckpts / "0.safetensors")
    count = sum(v.numel() for v in state.values())
    assert [(r["tensor_values"], r["parameters"]) for r in rows] == [(count, count), (count, count), (None, 0)]
    plan = json.loads(invoke("average", demo_ckpts, *model_flags(), "--data", "synthetic", "--out", tmp_path / "o",
                             "--dry-run", "--json").stdout)
    assert plan["model"]["parameters"] < count  # the buffers (BN statistics, num_batches_tracked) are not trained
    human = CliRunner().invoke(cli, ["inspect", str(folder)], env={"COLUMNS": "300"})
    lines = human.stderr.splitlines()
    header = next(line for line in lines if "file" in line and "producer" in line)
    cells = [c.strip() for c in header.split("┃")]
    assert "entries" not in cells and "values" in cells, header
    column = cells.index("values")
    values = {cells[2]: cells[column] for cells in ([c.strip() for c in line.split("│")] for line in lines)
              if len(cells) > column and cells[2].endswith(".safetensors")}
    assert values == {"0.safetensors": f"{count:,}", "1.safetensors": f"{count:,}", "2.safetensors": "-"}, values
    note = " ".join(human.stderr.split())
    assert "values: every tensor value a file holds, parameters and buffers" in note


@pytest.mark.parametrize("files, code", [
    ({"2.pt": "pickled code"}, 5),
    ({"2.pt": "torchscript"}, 5),
    ({"2.pt": "pickled code", "3.safetensors": "garbage"}, 5),  # the first file average fails on is the unsafe one
    ({"1a.safetensors": "garbage", "2.pt": "pickled code"}, 4),  # ... is the corrupt one
])
def test_inspect_exits_with_the_code_twa_average_gives_for_the_first_unreadable_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], code: int) -> None:
    """A checkpoint refused as unsafe (pickled code, TorchScript) is exit 5 under `twa average` and `twa soup`, but
    `twa inspect` listed it and exited 4, so a CI pre-check with inspect read it as a corrupt file. inspect exits
    with the code average gives: that of the first unreadable selected file, the one its line names; the listing
    gives each file's (`error_exit_code`)."""
    from conftest import Payload
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWA_TEST_MARKER", str(marker))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file({"w": torch.full((3,), float(i))}, ckpts / f"{i}.safetensors")
    for name, kind in files.items():
        if kind == "pickled code":
            torch.save({"state_dict": {"w": torch.zeros(3)}, "x": Payload()}, ckpts / name)
        elif kind == "torchscript":
            torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), ckpts / name)
        else:
            (ckpts / name).write_bytes(b"garbage")
    inspect = invoke("inspect", ckpts, "--json")
    assert inspect.exit_code == code, inspect.output
    listed = {c["name"]: c["error_exit_code"] for c in json.loads(inspect.stdout)["checkpoints"]}
    assert listed == {"0.safetensors": None, "1.safetensors": None} | {
        name: 5 if kind != "garbage" else 4 for name, kind in files.items()}
    first = next(name for name in listed if listed[name])
    errors = [line for line in inspect.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"(first: {ckpts / first}: " in errors[0]
    run = ["--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--out", tmp_path / "o"]
    average = invoke("average", ckpts, *run)
    assert average.exit_code == code and f"error: {ckpts / first}: " in average.stderr, average.output
    soup = invoke("soup", ckpts, *run)
    assert soup.exit_code == code, soup.output
    assert not marker.exists()


def test_inspect_running_out_of_memory_reading_a_header_is_exit_9(plain_pt_ckpts: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory that ran out while `twa inspect` read a torch checkpoint's header was listed as that file's error and
    exit 4 ('cannot read torch checkpoint'), where `twa average` exits 9: inspect lets it through too."""
    oom = "unable to mmap 44801035 bytes from file <ckpts/0.pt>: Cannot allocate memory (12)"

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(oom)

    monkeypatch.setattr(torch, "load", fail)
    result = invoke("inspect", plain_pt_ckpts, "--json")
    assert result.exit_code == 9, result.output
    assert result.stderr.startswith("error: out of host memory allocating 42.73 MiB: ") and not result.stdout
