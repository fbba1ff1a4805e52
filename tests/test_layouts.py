"""Every layout the reader supports, written for real and averaged end to end; every refusal through the CLI."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import Payload, assert_refused_cleanly, model_flags
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twa_tool.cli import cli

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--baselines", "none"]


def states(demo_ckpts: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(demo_ckpts / f"{e}.safetensors") for e in (1, 2, 4)]


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def hf(root: Path, i: int, sd: dict, sharded: bool = False, legacy: bool = False) -> None:
    folder = root / f"checkpoint-{100 * (i + 1)}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "step": i}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100 * (i + 1), "log_history": []}))
    (folder / "optimizer.pt").write_bytes(b"never unpickled")
    if not sharded:
        if legacy:
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(sd)
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2]), start=1):
        name = f"model-{n:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def lightning(root: Path, i: int, sd: dict) -> None:
    torch.save({"epoch": i, "global_step": 10 * i, "pytorch-lightning_version": "2.5.0",
                "state_dict": prefixed(sd, "net."), "callbacks": {}, "optimizer_states": []},
               root / f"epoch={i}-step={10 * i}.ckpt")


def lightning_weight_averaging(root: Path, i: int, sd: dict) -> None:
    averaged = {k: v + 0.5 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"epoch": i, "global_step": 10 * i, "pytorch-lightning_version": "2.5.0",
                "state_dict": prefixed(averaged, "model."), "current_model_state": prefixed(sd, "model."),
                "averaging_state": {"n_averaged": torch.tensor(3)}}, root / f"epoch={i}-step={10 * i}.ckpt")


def timm(root: Path, i: int, sd: dict) -> None:
    torch.save({"epoch": i, "arch": "cnn", "state_dict": sd, "metric": 0.5 + i / 10,
                "state_dict_ema": {k: v * 0.9 if v.is_floating_point() else v for k, v in sd.items()}},
               root / f"checkpoint-{i}.pth.tar")


def fairseq(root: Path, i: int, sd: dict) -> None:
    torch.save({"args": None, "model": sd, "optimizer_history": [{"num_updates": 100 * i}],
                "extra_state": {"train_iterator": {"epoch": i}, "val_loss": 3.0 - i}}, root / f"checkpoint{i}.pt")


def averaged_model(root: Path, i: int, sd: dict) -> None:
    torch.save({**prefixed(sd, "module."), "n_averaged": torch.tensor(i + 1)}, root / f"swa_{i}.pt")


LAYOUTS: dict[str, tuple[Callable[[Path, int, dict], None], list[str]]] = {
    "plain-pt": (lambda r, i, sd: torch.save(sd, r / f"{i}.pt"), []),
    "plain-pth": (lambda r, i, sd: torch.save(sd, r / f"{i}.pth"), []),
    "plain-bin": (lambda r, i, sd: torch.save(sd, r / f"{i}.bin"), []),
    "state_dict-key": (lambda r, i, sd: torch.save({"state_dict": sd, "epoch": i}, r / f"{i}.pt"), []),
    "model-key": (lambda r, i, sd: torch.save({"model": sd}, r / f"{i}.pt"), []),
    "model_state_dict-key": (lambda r, i, sd: torch.save({"model_state_dict": sd}, r / f"{i}.pt"), []),
    "module-key": (lambda r, i, sd: torch.save({"module": sd}, r / f"{i}.pt"), []),
    "ddp-prefix": (lambda r, i, sd: torch.save(prefixed(sd, "module."), r / f"{i}.pt"), []),
    "compile-prefix": (lambda r, i, sd: torch.save(prefixed(sd, "_orig_mod."), r / f"{i}.pt"), []),
    "safetensors": (lambda r, i, sd: save_file(sd, r / f"{i}.safetensors"), []),
    "forced-prefix": (lambda r, i, sd: torch.save(prefixed(sd, "backbone."), r / f"{i}.pt"),
                      ["--strip-prefix", "backbone."]),
    "hf": (hf, []),
    "hf-sharded": (lambda r, i, sd: hf(r, i, sd, sharded=True), []),
    "hf-legacy-bin": (lambda r, i, sd: hf(r, i, sd, legacy=True), []),
    "lightning": (lightning, []),
    "lightning-weight-averaging": (lightning_weight_averaging, []),
    "timm": (timm, []),
    "timm-ema": (timm, ["--weights", "ema"]),
    "fairseq": (fairseq, []),
    "averaged-model": (averaged_model, ["--weights", "ema"]),
}


def expected(layout: str, sd: dict) -> dict:
    if layout == "timm-ema":
        return {k: v * 0.9 if v.is_floating_point() else v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_is_read_and_averaged(layout: str, demo_ckpts: Path, tmp_path: Path) -> None:
    writer, flags = LAYOUTS[layout]
    root = tmp_path / "ckpts"
    root.mkdir()
    inputs = states(demo_ckpts)
    for i, sd in enumerate(inputs):
        writer(root, i, sd)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(root), *model_flags(), *FAST, *flags, "--epochs", "0",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["checkpoints"]) == 3
    # zero TWA epochs from the mean: the output's parameters are the mean of what the layout stores
    saved = load_file(out / "model.safetensors")
    want = [expected(layout, sd) for sd in inputs]
    assert saved.keys() == want[0].keys()
    mean = sum(w["head.weight"].double() for w in want) / 3
    assert torch.allclose(saved["head.weight"].double(), mean, atol=1e-6)
    assert report["coefficients"] == pytest.approx([1 / 3] * 3, abs=1e-5)
    if layout.startswith("hf"):
        assert json.loads((out / "config.json").read_text())["step"] == 2  # from the last folder
        assert (out / "tokenizer.json").is_file()


def test_sharded_output_and_out_dtype(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--max-shard-size", "1KB",
                                      "--out-dtype", "bfloat16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    merged = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    assert set(index["weight_map"]) == set(merged) == set(load_file(demo_ckpts / "0.safetensors"))
    assert merged["head.weight"].dtype == torch.bfloat16
    assert merged["features.1.num_batches_tracked"].dtype == torch.int64  # integers never cast
    report = json.loads(result.stdout)
    assert report["outputs"]["model"]["path"].endswith("model.safetensors.index.json")
    with safe_open(out / shards[0], framework="pt") as f:
        assert f.metadata()["format"] == "pt"


def refusal_peft(root: Path, sd: dict) -> None:
    for step in (100, 200):
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        save_file({"lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")


def refusal_deepspeed(root: Path, sd: dict) -> None:
    for step in (100, 200):
        folder = root / f"checkpoint-{step}" / f"global_step{step}"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
        (folder.parent / "latest").write_text(f"global_step{step}")
        (folder.parent / "zero_to_fp32.py").write_text("raise SystemExit('must never run')")


def refusal_fsdp(root: Path, sd: dict) -> None:
    for step in (100, 200):
        folder = root / f"checkpoint-{step}" / "pytorch_model_fsdp_0"
        folder.mkdir(parents=True)
        (folder / "__0_0.distcp").write_bytes(b"x")
        (folder / ".metadata").write_bytes(b"x")


def refusal_torchscript(root: Path, sd: dict) -> None:
    torch.save(sd, root / "1.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), root / "2.pt")


def refusal_pickle(root: Path, sd: dict) -> None:
    torch.save(sd, root / "1.pt")
    torch.save({"state_dict": sd, "hook": Payload()}, root / "2.pt")


def refusal_traversal(root: Path, sd: dict) -> None:
    hf(root, 0, sd)
    hf(root, 1, sd, sharded=True)
    index = root / "checkpoint-200" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../evil.safetensors" for k in data["weight_map"]}
    index.write_text(json.dumps(data))


def refusal_compressed(root: Path, sd: dict) -> None:
    torch.save(sd, root / "1.pt")
    torch.save(sd, root / "tmp.pt")
    with zipfile.ZipFile(root / "tmp.pt") as src, zipfile.ZipFile(root / "2.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    (root / "tmp.pt").unlink()


def refusal_crc(root: Path, sd: dict) -> None:
    torch.save(sd, root / "1.pt")
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, root / "2.pt")
    data = bytearray((root / "2.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "2.pt").write_bytes(bytes(data))


REFUSALS = {
    "peft": (refusal_peft, 4, "PEFT adapter-only"),
    "deepspeed": (refusal_deepspeed, 4, "zero_to_fp32.py"),
    "fsdp": (refusal_fsdp, 4, "dcp_to_torch_save"),
    "torchscript": (refusal_torchscript, 5, "TorchScript archive"),
    "unsafe-pickle": (refusal_pickle, 5, "--trust-pickle"),
    "index-traversal": (refusal_traversal, 4, "model.safetensors.index.json"),
    "compressed-zip": (refusal_compressed, 4, "2.pt"),
    "bad-crc": (refusal_crc, 4, "2.pt"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_keep_inputs_and_existing_output(case: str, demo_ckpts: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    build, code, text = REFUSALS[case]
    monkeypatch.setenv("TWA_TEST_MARKER", str(tmp_path / "pwned"))
    root = tmp_path / "ckpts"
    root.mkdir()
    build(root, states(demo_ckpts)[0])
    assert_refused_cleanly(root, tmp_path, code, text, FAST)


def test_copied_hf_files_are_planned_outputs_never_overwritten_without_the_flag(demo_ckpts: Path,
                                                                                tmp_path: Path) -> None:
    root = tmp_path / "hf"
    for i, sd in enumerate(states(demo_ckpts)):
        hf(root, i, sd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    base = ["average", str(root), *model_flags(), *FAST, "--epochs", "0", "--out", str(out)]
    plan = CliRunner().invoke(cli, [*base, "--dry-run", "--overwrite", "--json"])
    assert plan.exit_code == 0, plan.output
    assert {str(out / "config.json"), str(out / "tokenizer.json")} <= set(json.loads(plan.stdout)["would_write"])
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 7 and f"{out / 'config.json'} already exists; pass --overwrite" in result.stderr
    assert json.loads((out / "config.json").read_text()) == {"mine": 1}


def test_an_overwrite_removes_the_earlier_runs_unchanged_config_copies(demo_ckpts: Path, tmp_path: Path) -> None:
    """An HF run copies config.json/tokenizer.json (recorded with their sha256 in report.json); a later run over
    the same --out from plain files removes them, so no stale config sits beside another model, but keeps a
    copy the user changed since. Without --overwrite nothing is touched."""
    root = tmp_path / "hf"
    for i, sd in enumerate(states(demo_ckpts)):
        hf(root, i, sd)
    out = tmp_path / "out"
    first = CliRunner().invoke(cli, ["average", str(root), *model_flags(), *FAST, "--epochs", "0", "--out", str(out),
                                     "--json"])
    assert first.exit_code == 0, first.output
    copies = {Path(e["path"]).name for e in json.loads(first.stdout)["outputs"]["side_files"]}
    assert copies == {"config.json", "tokenizer.json"}
    (out / "tokenizer.json").write_text('{"edited": true}')
    plain = ["average", str(demo_ckpts), *FAST, "--epochs", "0", "--out", str(out)]
    refused = CliRunner().invoke(cli, plain)
    assert refused.exit_code == 7 and (out / "config.json").is_file()
    second = CliRunner().invoke(cli, [*plain, "--overwrite", "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["outputs"]["side_files"] == []
    assert not (out / "config.json").exists()  # unchanged copy of the earlier run: removed
    assert json.loads((out / "tokenizer.json").read_text()) == {"edited": True}  # changed since: the user's


TIED_MODEL = '''
import torch
from torch import nn


class Tied(nn.Module):
    """A model whose output layer is tied to another (one Parameter under two state-dict keys)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Linear(256, 32)
        self.head = nn.Linear(32, num_classes, bias=False)
        self.lm = nn.Linear(32, num_classes, bias=False)
        self.lm.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(torch.relu(self.body(x.flatten(1))))


def build(num_classes: int = 10) -> nn.Module:
    return Tied(num_classes)
'''


@pytest.mark.parametrize("sharded", [False, True])
def test_tied_weights_stored_once_are_read_under_both_keys(tmp_path: Path, sharded: bool) -> None:
    """safetensors' save_model and Hugging Face's save_pretrained store a tied weight once (`lm.weight` is
    dropped for `head.weight`): the model's alias is filled from its twin, not reported missing."""
    from safetensors.torch import save_model

    (tmp_path / "tied.py").write_text(TIED_MODEL)
    import importlib.util
    spec = importlib.util.spec_from_file_location("tied_model", tmp_path / "tied.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path / "ckpts"
    heads = []
    for i in range(3):
        torch.manual_seed(i)
        model = module.build()
        torch.nn.init.normal_(model.head.weight)
        heads.append(model.head.weight.detach().clone())
        folder = root / f"checkpoint-{i + 1}"
        folder.mkdir(parents=True)
        save_model(model, str(folder / "model.safetensors"))
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert "lm.weight" not in f.keys()  # stored once, under the first name
        if sharded:
            (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
            with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
                keys = list(f.keys())
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["average", str(root), "--model", f"{tmp_path / 'tied.py'}:build", *FAST,
                                      "--epochs", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = load_file(out / "model.safetensors")
    mean = (sum(h.double() for h in heads) / 3).float()
    assert torch.allclose(saved["head.weight"], mean, atol=1e-6)
    assert set(saved) == set(keys if sharded else safe_open(str(root / "checkpoint-3" / "model.safetensors"),
                                                              "pt").keys())  # the input's keys: no second copy
    from safetensors.torch import load_model
    fresh = module.build()
    load_model(fresh, str(out / "model.safetensors"))  # strict: the tie restores the alias
    assert torch.equal(fresh.lm.weight, saved["head.weight"])
    souped = CliRunner().invoke(cli, ["soup", str(root), "--model", f"{tmp_path / 'tied.py'}:build", "--data",
                                      "synthetic", "--epochs", "1", "--batch-size", "256", "--threads", "1",
                                      "--method", "uniform", "--out", str(tmp_path / "soup")])
    assert souped.exit_code == 0, souped.output
    assert set(load_file(tmp_path / "soup" / "model.safetensors")) == set(saved)
