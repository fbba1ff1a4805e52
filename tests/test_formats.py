"""Framework layouts in their real on-disk formats: HF folders, Lightning, timm, fairseq, AveragedModel,
EMA selection, prefixes, refused layouts (PEFT, DeepSpeed, FSDP, TorchScript) and hostile files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from twa_tool.checkpoints import (
    HeaderInfo,
    discover,
    load_checkpoint,
    read_header,
    refusal_reason,
    sha256_file,
)
from twa_tool.errors import CheckpointError, ConfigError, UnsafeInputError


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g),
            "bn.running_mean": torch.randn(3, generator=g), "bn.num_batches_tracked": torch.tensor(7)}


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def trainer_state(step: int) -> dict:
    return {"global_step": step, "epoch": 2.0, "best_metric": 0.4, "log_history": [
        {"epoch": 1.0, "loss": 0.9, "learning_rate": 5e-5, "step": step // 2},
        {"epoch": 1.0, "eval_loss": 0.7, "step": step // 2},
        {"epoch": 2.0, "loss": 0.6, "grad_norm": 1.5, "learning_rate": 4e-5, "step": step},
        {"epoch": 2.0, "eval_loss": 0.4, "eval_accuracy": 0.81, "step": step},
    ]}


def hf_folder(root: Path, step: int, sd: dict[str, torch.Tensor], sharded: bool = False, legacy: bool = False) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state(step)))
    (folder / "training_args.bin").write_bytes(b"never unpickled")
    (folder / "optimizer.pt").write_bytes(b"never unpickled")
    keys = sorted(sd)
    if not sharded:
        if legacy:
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = f"model-{i:05d}-of-00002.safetensors" if not legacy else f"pytorch_model-{i:05d}-of-00002.bin"
        if legacy:
            torch.save({k: sd[k] for k in part}, folder / name)
        else:
            save_file({k: sd[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if not legacy else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
def test_hf_folders_round_trip_with_trainer_state(tmp_path: Path, sharded: bool, legacy: bool) -> None:
    sd = state(1)
    folder = hf_folder(tmp_path, 500, sd, sharded=sharded, legacy=legacy)
    [entry] = discover(tmp_path)
    assert entry.name == "checkpoint-500"
    assert entry.path == (folder if sharded else folder / ("pytorch_model.bin" if legacy else "model.safetensors"))
    for path in {entry.path, folder}:
        loaded = load_checkpoint(path)
        assert_same(loaded.state, sd)
        assert (loaded.producer, loaded.container, loaded.prefix, loaded.weights) == ("huggingface", None, None, "raw")
        assert (loaded.epoch, loaded.step) == (2, 500)
        assert loaded.metrics == {"loss": 0.6, "grad_norm": 1.5, "learning_rate": 4e-5, "eval_loss": 0.4,
                                  "eval_accuracy": 0.81}
    header = read_header(entry.path)
    assert header.tensors == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
    assert header.step == 500 and header.producer == "huggingface"
    if not legacy:
        assert header.metadata == {"format": "pt"}
    with pytest.raises(CheckpointError, match="no EMA copy"):
        load_checkpoint(entry.path, weights="ema")


def test_sharded_folder_digest_covers_every_shard(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, 10, state(0), sharded=True)
    before = sha256_file(folder)
    assert len(before) == 64 and before == sha256_file(folder)
    shard = folder / "model-00002-of-00002.safetensors"
    sd = load_checkpoint(folder).state
    save_file({k: sd[k] + 1 if k in ("fc.weight",) else sd[k] for k in ("fc.bias", "fc.weight")}, shard,
              metadata={"format": "pt"})
    assert sha256_file(folder) != before


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/tmp/evil.safetensors", "sub/../../evil.safetensors",
                                   "link.safetensors"])
def test_index_shards_must_stay_inside_the_folder(tmp_path: Path, shard: str) -> None:
    folder = hf_folder(tmp_path / "run", 10, state(0), sharded=True)
    save_file(state(0), tmp_path / "run" / "evil.safetensors")
    if shard == "link.safetensors":
        (folder / shard).symlink_to(tmp_path / "run" / "evil.safetensors")
    index = folder / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"]["fc.bias"] = shard
    index.write_text(json.dumps(document))
    for call in (load_checkpoint, read_header, sha256_file):
        with pytest.raises(CheckpointError, match=r"safetensors\.index\.json: shard .*(plain file name|outside)"):
            call(folder)


def test_index_problems_are_named(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, 10, state(0), sharded=True)
    index = folder / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*extra.weight"):
        load_checkpoint(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="index.json: shard 'model-00002-of-00002.safetensors' is missing"):
        load_checkpoint(folder)
    index.write_text('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        load_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# Lightning


def lightning_ckpt(sd: dict[str, torch.Tensor], file_name: str, **extra) -> dict:
    return {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.5.0",
        "state_dict": prefixed(sd, "model."),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.41),
                "best_model_path": "/runs/x/epoch=1-step=600.ckpt", "current_score": torch.tensor(0.52),
                "dirpath": "/runs/x", "kth_value": torch.tensor(0.52), "last_model_path": "",
                "best_k_models": {"/runs/x/epoch=1-step=600.ckpt": torch.tensor(0.41),
                                  f"/runs/x/{file_name}": torch.tensor(0.52)},
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 0, "best_score": torch.tensor(0.41)},
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1},
        **extra,
    }


def test_lightning_ckpt_metrics_and_prefix(tmp_path: Path) -> None:
    sd = state(2)
    name = "epoch=3-step=1200.ckpt"
    torch.save(lightning_ckpt(sd, name), tmp_path / name)
    plain = load_checkpoint(tmp_path / name)
    assert plain.state.keys() == prefixed(sd, "model.").keys() and plain.prefix is None  # no model: nothing guessed
    assert (plain.producer, plain.container, plain.weights) == ("lightning", "state_dict", "raw")
    assert (plain.epoch, plain.step) == (3, 1200)
    assert plain.metrics == pytest.approx({"val_loss": 0.52})

    matched = load_checkpoint(tmp_path / name, model_keys=list(sd))
    assert_same(matched.state, sd)
    assert matched.prefix == "model."
    other = load_checkpoint(tmp_path / name, model_keys=["something.else"])
    assert other.prefix is None and other.state.keys() == plain.state.keys()
    forced = load_checkpoint(tmp_path / name, strip_prefix="model")
    assert_same(forced.state, sd)
    with pytest.raises(CheckpointError, match="--strip-prefix 'net.': not every key starts with it"):
        load_checkpoint(tmp_path / name, strip_prefix="net.")
    with pytest.raises(CheckpointError, match="no EMA/averaged weights"):
        load_checkpoint(tmp_path / name, weights="ema")
    header = read_header(tmp_path / name, model_keys=list(sd))
    assert set(header.tensors) == set(sd) and header.metrics == pytest.approx({"val_loss": 0.52})


def test_lightning_module_with_other_stateful_attributes(tmp_path: Path) -> None:
    """`self.model = Net()` beside `self.criterion = nn.CrossEntropyLoss(weight=...)` (or a teacher network): the
    state dict holds `criterion.weight` too, so no prefix made every key the model's; the run refused the files
    ('do not match the model', all keys missing) and `--strip-prefix model.` refused them ('not every key starts
    with it'). The keys under the model's prefix are the model; the other attributes' state is left out. Two
    prefixes that both fit (model. and teacher. of one architecture) stay unmatched unless --strip-prefix names one."""
    sd, teacher = state(2), state(5)
    name = "epoch=3-step=1200.ckpt"
    ckpt = lightning_ckpt(sd, name)
    ckpt["state_dict"]["criterion.weight"] = torch.ones(3)
    torch.save(ckpt, tmp_path / name)
    matched = load_checkpoint(tmp_path / name, model_keys=list(sd))
    assert_same(matched.state, sd)
    assert matched.prefix == "model."
    assert set(read_header(tmp_path / name, model_keys=list(sd)).tensors) == set(sd)
    assert_same(load_checkpoint(tmp_path / name, strip_prefix="model.").state, sd)

    ckpt["state_dict"].update(prefixed(teacher, "teacher."))
    torch.save(ckpt, tmp_path / name)
    ambiguous = load_checkpoint(tmp_path / name, model_keys=list(sd))
    assert ambiguous.prefix is None and "criterion.weight" in ambiguous.state
    assert_same(load_checkpoint(tmp_path / name, strip_prefix="teacher").state, teacher)
    plain = tmp_path / "plain.pt"  # not a Lightning file: a model's keys among others are not guessed
    torch.save({"model": {**prefixed(sd, "model."), "criterion.weight": torch.ones(3)}}, plain)
    assert load_checkpoint(plain, model_keys=list(sd)).prefix is None


def test_lightning_compiled_module_inside_lightning_module(tmp_path: Path) -> None:
    sd = state(3)
    ckpt = lightning_ckpt(sd, "epoch=3-step=1200.ckpt")
    ckpt["state_dict"] = prefixed(sd, "net._orig_mod.")
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt", model_keys=set(sd))
    assert_same(loaded.state, sd)
    assert loaded.prefix == "net._orig_mod."
    assert loaded.metrics == {}  # last.ckpt is not in best_k_models


def test_lightning_weight_averaging_raw_and_ema_never_mix(tmp_path: Path) -> None:
    raw, averaged = state(4), state(5)
    ckpt = lightning_ckpt(averaged, "epoch=3-step=1200.ckpt", current_model_state=prefixed(raw, "model."),
                          averaging_state={"n_averaged": torch.tensor(40)})
    torch.save(ckpt, tmp_path / "epoch=3-step=1200.ckpt")
    got_raw = load_checkpoint(tmp_path / "epoch=3-step=1200.ckpt", strip_prefix="model.")
    got_ema = load_checkpoint(tmp_path / "epoch=3-step=1200.ckpt", weights="ema", strip_prefix="model.")
    assert_same(got_raw.state, raw)
    assert_same(got_ema.state, averaged)
    assert (got_raw.container, got_raw.weights) == ("current_model_state", "raw")
    assert (got_ema.container, got_ema.weights) == ("state_dict", "ema")


def test_lightning_swa_callback_state_is_the_ema_choice(tmp_path: Path) -> None:
    raw, averaged = state(6), state(7)
    ckpt = lightning_ckpt(raw, "a.ckpt")
    ckpt["callbacks"]["StochasticWeightAveraging"] = {
        "n_averaged": torch.tensor(3), "latest_update_epoch": 3, "scheduler_state": None,
        "average_model_state": {**prefixed(prefixed(averaged, "model."), "module."), "n_averaged": torch.tensor(3)}}
    torch.save(ckpt, tmp_path / "a.ckpt")
    assert_same(load_checkpoint(tmp_path / "a.ckpt", model_keys=list(raw)).state, raw)
    ema = load_checkpoint(tmp_path / "a.ckpt", weights="ema", model_keys=list(raw))
    assert_same(ema.state, averaged)
    assert ema.prefix == "module.model." and ema.container.endswith("average_model_state")


class AttributeDict(dict):
    """Stand-in for Lightning's dict subclass; pickled under Lightning's module path."""


def test_lightning_attribute_dict_hparams_load_without_lightning(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sd = state(8)
    with monkeypatch.context() as m:
        names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
        for name in names:
            m.setitem(sys.modules, name, types.ModuleType(name))
        m.setattr(AttributeDict, "__module__", "lightning.fabric.utilities.data")
        m.setattr(sys.modules["lightning.fabric.utilities.data"], "AttributeDict", AttributeDict, raising=False)
        torch.save(lightning_ckpt(sd, "a.ckpt", hyper_parameters=AttributeDict(lr=0.1, depth=3)), tmp_path / "a.ckpt")
    assert "lightning" not in sys.modules
    assert b"lightning.fabric.utilities.data" in (tmp_path / "a.ckpt").read_bytes()
    loaded = load_checkpoint(tmp_path / "a.ckpt", model_keys=list(sd))
    assert_same(loaded.state, sd)


# ---------------------------------------------------------------------------------------------
# timm, fairseq, AveragedModel, plain torch


def timm_ckpt(raw: dict, ema: dict) -> dict:
    np = pytest.importorskip("numpy")
    return {"epoch": 7, "arch": "resnet18", "version": 2, "state_dict": raw, "state_dict_ema": ema,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "args": argparse.Namespace(model="resnet18", eval_metric="top1", lr=0.1, amp=True),
            "metric": np.float64(0.93)}


def test_timm_pth_tar_raw_and_ema(tmp_path: Path) -> None:
    raw, ema = state(9), state(10)
    torch.save(timm_ckpt(prefixed(raw, "module."), ema), tmp_path / "checkpoint-7.pth.tar")
    got = load_checkpoint(tmp_path / "checkpoint-7.pth.tar")
    assert_same(got.state, raw)
    assert (got.producer, got.container, got.prefix, got.weights, got.epoch, got.step) == \
        ("timm", "state_dict", "module.", "raw", 7, None)
    assert got.metrics == {"metric": 0.93, "top1": 0.93} and got.metadata == {"arch": "resnet18"}
    got_ema = load_checkpoint(tmp_path / "checkpoint-7.pth.tar", weights="ema")
    assert_same(got_ema.state, ema)
    assert (got_ema.container, got_ema.weights, got_ema.prefix) == ("state_dict_ema", "ema", None)
    header = read_header(tmp_path / "checkpoint-7.pth.tar", weights="ema")
    assert isinstance(header, HeaderInfo) and header.container == "state_dict_ema" and header.epoch == 7
    assert header.tensors["fc.weight"] == ((3, 4), "float32")
    assert header.tensors["bn.num_batches_tracked"] == ((), "int64")


@pytest.mark.parametrize("args, recorded", [
    (argparse.Namespace(model="resnet18", num_classes=4), (("num_classes", "4"),)),
    ({"model": "resnet18", "num_classes": 4}, (("num_classes", "4"),)),
    (argparse.Namespace(model="resnet18", num_classes=None), ()),  # train.py without --num-classes
    (argparse.Namespace(model="resnet18", num_classes=True), ()),
    (None, ()),
    (argparse.Namespace(model="resnet18", num_classes=4, in_chans=1, input_size=None),
     (("num_classes", "4"), ("in_chans", "1"))),
    (argparse.Namespace(model="resnet18", num_classes=None, in_chans=None, input_size=[1, 28, 28]),
     (("in_chans", "1"),)),
    ({"model": "resnet18", "in_chans": 2, "input_size": [1, 28, 28]}, (("in_chans", "2"),)),  # --in-chans wins
    (argparse.Namespace(model="resnet18", in_chans=None, input_size=None), ()),  # timm's default: 3 channels
])
def test_timm_run_records_its_num_classes(tmp_path: Path, args: object, recorded: tuple) -> None:
    """timm's train.py fine-tunes with --num-classes (and --in-chans or --input-size C H W), kept in the checkpoint's
    ``args``; before, only ``arch`` was used without --model, so every fine-tune needed ``--model-arg`` to match."""
    from twa_tool.models import spec_from_metadata

    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state(12), "args": args}, tmp_path / "c.pth.tar")
    metadata = read_header(tmp_path / "c.pth.tar").metadata
    assert spec_from_metadata(metadata) == ("timm:resnet18", recorded)


def test_fairseq_checkpoint(tmp_path: Path) -> None:
    sd = state(11)
    torch.save({"args": None, "cfg": {"model": {"_name": "transformer"}, "optimization": {"lr": [0.0005]}},
                "model": sd, "criterion": None,
                "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                                       "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 3.1},
                                       "num_updates": 4500}],
                "task_state": {}, "extra_state": {"train_iterator": {"epoch": 5, "iterations_in_epoch": 0},
                                                  "val_loss": 3.1},
                "last_optimizer_state": {"state": {}}}, tmp_path / "checkpoint_5_4500.pt")
    got = load_checkpoint(tmp_path / "checkpoint_5_4500.pt")
    assert_same(got.state, sd)
    assert (got.producer, got.container, got.epoch, got.step, got.metrics) == \
        ("fairseq", "model", 5, 4500, {"val_loss": 3.1})


def test_plain_script_metrics_are_read_for_top_k(tmp_path: Path) -> None:
    """A plain training script's `torch.save({'epoch': e, 'model': ..., 'acc': 0.83, ...})`: its top-level
    floats are its metrics (twa inspect showed none, and `--top-k 2 --by acc` failed with 'no stored value');
    ints (seeds, counters) are not. PyTorch's ImageNet example (`arch` + `state_dict`, read as timm) keeps its
    `best_acc1` tensor beside timm's `metric`."""
    import numpy as np

    from twa_tool.config import AverageConfig, Selection
    from twa_tool.pipeline import select_checkpoints

    for e, acc in enumerate([0.7, 0.9, 0.8, 0.6]):
        torch.save({"epoch": e, "model": state(e), "optimizer": {"state": {}, "param_groups": []}, "acc": acc,
                    "val_loss": torch.tensor(1.0 - acc), "best_acc": np.float64(0.9), "seed": 3, "flag": True},
                   tmp_path / f"epoch_{e}.pth")
    got = read_header(tmp_path / "epoch_1.pth")
    assert got.metrics == pytest.approx({"acc": 0.9, "val_loss": 0.1, "best_acc": 0.9})
    chosen = select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic",
                                              selection=Selection(top_k=2, by="acc", mode="max")))
    assert [f.name for f in chosen.files] == ["epoch_1.pth", "epoch_2.pth"]
    imagenet = tmp_path / "imagenet" / "checkpoint.pth.tar"
    imagenet.parent.mkdir()
    torch.save({"epoch": 5, "arch": "resnet18", "state_dict": state(1), "best_acc1": torch.tensor(71.5),
                "optimizer": {"state": {}, "param_groups": []}}, imagenet)
    assert read_header(imagenet).metrics == {"best_acc1": 71.5}


def test_a_scripts_own_container_keys_are_read_when_unambiguous(tmp_path: Path) -> None:
    """`torch.save({'epoch': e, 'net': sd, 'ema_state_dict': ema, 'optim': ...})`: keys outside the known
    containers were refused ('no state dict found ... save model.state_dict()', 'no EMA/averaged weights'), with no
    flag to name them. The one dict of tensors under a key that does not name averaged weights is the raw model, the
    one under a key that does (ema, swa, averaged) the EMA; two candidates are refused naming both."""
    raw, ema = state(1), state(2)
    opt = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"epoch": 4, "net": raw, "ema_state_dict": ema, "optim": opt}, tmp_path / "ep4.pth")
    got = load_checkpoint(tmp_path / "ep4.pth")
    assert_same(got.state, raw)
    assert (got.container, got.epoch) == ("net", 4)
    got_ema = load_checkpoint(tmp_path / "ep4.pth", weights="ema")
    assert_same(got_ema.state, ema)
    assert got_ema.container == "ema_state_dict"
    assert read_header(tmp_path / "ep4.pth", weights="ema").container == "ema_state_dict"
    torch.save({"student": raw, "teacher": ema}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"two\.pth: dicts of tensors under student, teacher, none under "
                                              r"state_dict, model, model_state_dict, module; twa cannot tell"):
        load_checkpoint(tmp_path / "two.pth")


def test_a_scripts_own_key_is_read_beside_a_known_key_of_the_other_kind(tmp_path: Path) -> None:
    """The script's own key was only looked at when neither kind had a known key: `{'net': sd, 'ema': ema}` was
    refused under --weights raw as 'holds only averaged/EMA weights ..., no raw weights' (it holds them under net),
    and `{'model': sd, 'ema_state_dict': ema}` under --weights ema as 'no EMA/averaged weights in this file'. Beside
    an EMA copy, two raw candidates are named as such, not as 'no raw weights'."""
    raw, ema = state(1), state(2)
    assert_containers(tmp_path / "a.pth", {"net": raw, "ema": ema}, raw_key="net", ema_key="ema")
    assert_containers(tmp_path / "b.pth", {"model": raw, "ema_state_dict": ema}, raw_key="model",
                      ema_key="ema_state_dict")
    assert read_header(tmp_path / "b.pth", weights="ema").container == "ema_state_dict"
    torch.save({"student": raw, "teacher": state(3), "ema": ema}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth: dicts of tensors under student, teacher, none under "):
        load_checkpoint(tmp_path / "c.pth")


def test_weights_key_names_the_dict_that_holds_the_model(tmp_path: Path) -> None:
    """DINO's `{'student', 'teacher', 'dino_loss'}`, a GAN's `{'netG', 'netD'}`: several dicts of tensors and none
    under a known key were refused with 'save its state_dict under model', re-saving every checkpoint. `--weights
    KEY` reads the dict under that top-level key, headers and loads alike; the refusal names the flag."""
    student, teacher = state(1), state(2)
    torch.save({"student": student, "teacher": teacher, "dino_loss": {"center": torch.zeros(4)}, "epoch": 7},
               tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match=r"cannot tell which holds the model: name it with --weights KEY "
                                              r"\(e\.g\. --weights student\)"):
        load_checkpoint(tmp_path / "dino.pth")
    for key, want in (("teacher", teacher), ("student", student)):
        got = load_checkpoint(tmp_path / "dino.pth", weights=key)
        assert_same(got.state, want)
        assert (got.container, got.weights, got.epoch) == (key, key, 7)
        header = read_header(tmp_path / "dino.pth", weights=key)
        assert header.container == key and set(header.tensors) == set(want)
    assert_same(load_checkpoint(tmp_path / "dino.pth", weights="dino_loss").state, {"center": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"dino\.pth: --weights techer: no key 'techer' in this file; it holds "
                                              r"dicts of tensors under student, teacher, dino_loss"):
        load_checkpoint(tmp_path / "dino.pth", weights="techer")
    with pytest.raises(CheckpointError, match=r"--weights epoch: not a dict of tensors under 'epoch'"):
        read_header(tmp_path / "dino.pth", weights="epoch")
    torch.save(student, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain\.pt: --weights teacher: the file holds a bare state dict, no "
                                              r"top-level key to choose; leave it out with --exclude plain\.pt, or "
                                              r"use --weights raw if no file has the key"):
        load_checkpoint(tmp_path / "plain.pt", weights="teacher")
    save_file(student, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"a safetensors file holds one set of weights, no keys to choose from "
                                              r"\(--weights teacher\); use --weights raw"):
        read_header(tmp_path / "plain.safetensors", weights="teacher")
    for bad in ("", " ", "a\nb"):
        with pytest.raises(ConfigError, match="--weights .*: use raw, ema, or the top-level key"):
            load_checkpoint(tmp_path / "dino.pth", weights=bad)


def test_an_averaged_key_is_a_word_not_a_substring(tmp_path: Path) -> None:
    """`{'remap_net': sd, 'modelEma': ema}`: 'remap' holds 'ema' as letters, not as a word; it is the raw model, and
    the camelCase `modelEma` the EMA (a substring match read remap_net as a second EMA copy: neither kind found)."""
    assert_containers(tmp_path / "a.pth", {"remap_net": state(1), "modelEma": state(2)}, raw_key="remap_net",
                      ema_key="modelEma")


def assert_containers(path: Path, saved: dict, raw_key: str, ema_key: str) -> None:
    """``torch.save(saved, path)``: its raw weights are read from ``saved[raw_key]``, its EMA from
    ``saved[ema_key]``."""
    torch.save(saved, path)
    for weights, key in (("raw", raw_key), ("ema", ema_key)):
        got = load_checkpoint(path, weights=weights)
        assert_same(got.state, saved[key])
        assert got.container == key


def test_torchvision_reference_script_checkpoint(tmp_path: Path) -> None:
    """references/classification/train.py saves model_<epoch>.pth as below (model_ema: an AveragedModel's
    state dict); the ``args`` namespace beside ``model`` made it read as fairseq, losing the top-level epoch."""
    raw, ema = state(21), state(22)
    torch.save({"model": raw, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "lr_scheduler": {"step_size": 30, "last_epoch": 4}, "epoch": 3,
                "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=90, model_ema=True),
                "model_ema": {**prefixed(ema, "module."), "n_averaged": torch.tensor(40)}}, tmp_path / "model_3.pth")
    got = load_checkpoint(tmp_path / "model_3.pth")
    assert_same(got.state, raw)
    assert (got.producer, got.container, got.epoch, got.step, got.metrics) == ("torch", "model", 3, None, {})
    got_ema = load_checkpoint(tmp_path / "model_3.pth", weights="ema")
    assert_same(got_ema.state, ema)
    assert (got_ema.container, got_ema.prefix, got_ema.epoch) == ("model_ema", "module.", 3)


def test_averaged_model_dump_needs_weights_ema(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    swa = torch.optim.swa_utils.AveragedModel(model)
    swa.update_parameters(model)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    with pytest.raises(CheckpointError, match="only averaged/EMA weights.*AveragedModel.*--weights ema"):
        load_checkpoint(tmp_path / "swa.pt")
    got = load_checkpoint(tmp_path / "swa.pt", weights="ema")
    assert_same(got.state, model.state_dict())
    assert (got.producer, got.prefix, got.weights, got.container) == ("averaged-model", "module.", "ema", None)


def test_plain_torch_dict_with_epoch_and_step(tmp_path: Path) -> None:
    sd = state(12)
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 4, "step": 800}, tmp_path / "4.pt")
    got = load_checkpoint(tmp_path / "4.pt")
    assert_same(got.state, sd)
    assert (got.producer, got.container, got.epoch, got.step, got.weights) == ("torch", "model_state_dict", 4, 800,
                                                                              "raw")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(tmp_path / "legacy.pt").state, sd)
    assert read_header(tmp_path / "legacy.pt").tensors["fc.bias"] == ((3,), "float32")


def test_ema_is_never_substituted(tmp_path: Path) -> None:
    torch.save({"model_ema": state(13), "epoch": 1}, tmp_path / "only_ema.pt")
    with pytest.raises(CheckpointError, match="only averaged/EMA weights under model_ema.*--weights ema"):
        load_checkpoint(tmp_path / "only_ema.pt")
    assert_same(load_checkpoint(tmp_path / "only_ema.pt", weights="ema").state, state(13))
    torch.save(state(14), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no EMA/averaged weights"):
        load_checkpoint(tmp_path / "plain.pt", weights="ema")
    save_file(state(14), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no EMA copy"):
        load_checkpoint(tmp_path / "plain.safetensors", weights="ema")
    with pytest.raises(CheckpointError, match="--weights best: the file holds a bare state dict"):
        load_checkpoint(tmp_path / "plain.pt", weights="best")


# ---------------------------------------------------------------------------------------------
# Refused layouts


def refused_layouts(root: Path) -> None:
    peft = root / "checkpoint-100"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    save_file({"lora_A.weight": torch.zeros(2, 2)}, peft / "adapter_model.safetensors")
    deepspeed = root / "checkpoint-200"
    (deepspeed / "global_step200").mkdir(parents=True)
    (deepspeed / "global_step200" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (deepspeed / "global_step200" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (deepspeed / "latest").write_text("global_step200")
    (deepspeed / "zero_to_fp32.py").write_text("raise SystemExit('must never run')")
    fsdp = root / "checkpoint-300" / "pytorch_model_fsdp_0"
    fsdp.mkdir(parents=True)
    (fsdp / "__0_0.distcp").write_bytes(b"x")
    (fsdp / ".metadata").write_bytes(b"x")


@pytest.mark.parametrize(("name", "message"), [
    ("checkpoint-100", "PEFT adapter-only .*merge_and_unload"),
    ("checkpoint-200", "DeepSpeed ZeRO .*zero_to_fp32.py"),
    ("checkpoint-300", "FSDP sharded .*dcp_to_torch_save"),
])
def test_refused_layouts_are_listed_and_explained(tmp_path: Path, name: str, message: str) -> None:
    refused_layouts(tmp_path)
    entries = {e.name: e for e in discover(tmp_path)}
    assert list(entries) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    path = entries[name].path
    assert path == tmp_path / name
    assert refusal_reason(path) is not None and "\n" not in refusal_reason(path)
    with pytest.raises(CheckpointError, match=f"{name}: {message}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_refused_inner_paths(tmp_path: Path) -> None:
    refused_layouts(tmp_path)
    with pytest.raises(CheckpointError, match="FSDP sharded"):
        discover(tmp_path / "checkpoint-300" / "pytorch_model_fsdp_0")  # nothing else there: explain, not "none"
    step_dir = tmp_path / "checkpoint-200" / "global_step200"
    assert [e.name for e in discover(step_dir)] == ["mp_rank_00_model_states.pt",
                                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    with pytest.raises(CheckpointError, match="DeepSpeed ZeRO"):
        load_checkpoint(step_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="PEFT adapter-only"):
        load_checkpoint(tmp_path / "checkpoint-100" / "adapter_model.safetensors")
    assert refusal_reason(tmp_path / "checkpoint-100" / "adapter_config.json") is None  # not a weight file
    full = hf_folder(tmp_path / "other", 400, state(0))
    (full / "latest").write_text("global_step400")  # DeepSpeed with gathered weights: the full weights are read
    assert refusal_reason(full) is None
    assert_same(load_checkpoint(full).state, state(0))


def test_torchscript_is_refused(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    assert "model.state_dict()" in refusal_reason(tmp_path / "scripted.pt")
    for trust in (False, True):
        with pytest.raises(UnsafeInputError, match=r"scripted\.pt: TorchScript archive .*model\.state_dict\(\)"):
            load_checkpoint(tmp_path / "scripted.pt", trust_pickle=trust)
    torch.save(state(0), tmp_path / "fine.pt")
    assert refusal_reason(tmp_path / "fine.pt") is None


# ---------------------------------------------------------------------------------------------
# Hostile and corrupt files


def test_compressed_zip_member_is_refused(tmp_path: Path) -> None:
    torch.save(state(0), tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as src, \
            zipfile.ZipFile(tmp_path / "b.pt", "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    for call in (load_checkpoint, read_header):
        with pytest.raises(CheckpointError, match=r"b\.pt: zip member .* is compressed"):
            call(tmp_path / "b.pt")


def test_flipped_byte_fails_the_crc(tmp_path: Path) -> None:
    torch.save({"w": torch.full((64,), 1.5)}, tmp_path / "a.pt")
    data = bytearray((tmp_path / "a.pt").read_bytes())
    at = data.find(torch.full((16,), 1.5).numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x01
    (tmp_path / "a.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.pt: CRC mismatch in zip member a/data/0"):
        load_checkpoint(tmp_path / "a.pt")


def test_duplicate_names_in_safetensors_header_are_refused(tmp_path: Path) -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = b'{"a":' + entry + b',"a":' + entry + b"}"
    header += b" " * (-len(header) % 8)
    (tmp_path / "d.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\x80\x3f")
    with pytest.raises(CheckpointError, match="d.safetensors: .*duplicate key 'a'"):
        load_checkpoint(tmp_path / "d.safetensors")


def make_marker(path: str) -> None:
    Path(path).write_text("payload ran")


class Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (make_marker, (self.path,))


def test_unsafe_global_is_named_and_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"state_dict": state(0), "hook": Payload(marker)}, tmp_path / "evil.ckpt")
    torch.save({"state_dict": state(0), "hook": Payload(marker)}, tmp_path / "evil_legacy.pt",
               _use_new_zipfile_serialization=False)
    for name in ("evil.ckpt", "evil_legacy.pt"):
        for call in (load_checkpoint, read_header):
            with pytest.raises(UnsafeInputError, match=rf"{name}: refused to unpickle .*make_marker.*--trust-pickle"):
                call(tmp_path / name)
    assert not marker.exists()


class Harmless:
    def __init__(self) -> None:
        self.note = "kept by the trainer"


def test_trust_pickle_is_an_explicit_opt_in(tmp_path: Path) -> None:
    torch.save({"state_dict": state(0), "cfg": Harmless()}, tmp_path / "cfg.pt")
    with pytest.raises(UnsafeInputError, match="Harmless"):
        load_checkpoint(tmp_path / "cfg.pt")
    assert_same(load_checkpoint(tmp_path / "cfg.pt", trust_pickle=True).state, state(0))
    torch.save(nn.Linear(4, 3), tmp_path / "module.pt")  # whole-module pickles: their state_dict, trusted only
    with pytest.raises(UnsafeInputError):
        load_checkpoint(tmp_path / "module.pt")
    assert load_checkpoint(tmp_path / "module.pt", trust_pickle=True).state.keys() == {"weight", "bias"}


def test_read_header_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = {f"layer{i}.weight": torch.randn(8, 8).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(50)}
    for i in range(20):
        save_file(sd, tmp_path / f"{i}.safetensors", metadata={"format": "pt", "i": str(i)})

    def no_data(*args, **kwargs):
        raise AssertionError("read_header read tensor data")

    import twa_tool.checkpoints as ck

    real = ck.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            return types.SimpleNamespace(metadata=handle.metadata, keys=handle.keys, get_tensor=no_data,
                                         get_slice=no_data)

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(ck, "safe_open", HeaderOnly)
    headers = [read_header(e.path) for e in discover(tmp_path)]
    assert [h.metadata["i"] for h in headers] == [str(i) for i in range(20)]
    assert headers[0].tensors["layer1.weight"] == ((8, 8), "bfloat16")
    assert headers[0].producer == "safetensors" and headers[0].step is None


def test_missing_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt: cannot open"):
        load_checkpoint(tmp_path / "nope.pt")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="empty: no model weights in this folder"):
        load_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("flag", ["module.", "module"])
def test_strip_prefix_module_on_a_ddp_checkpoint_is_not_an_error(tmp_path: Path, flag: str) -> None:
    """DDP's module. is always stripped; a user who also passes --strip-prefix module. gets the same weights,
    not "not every key starts with it" about keys that all do."""
    sd = state(1)
    torch.save({"model": prefixed(sd, "module."), "optimizer": {}}, tmp_path / "ep1.pth")
    loaded = load_checkpoint(tmp_path / "ep1.pth", strip_prefix=flag)
    assert_same(loaded.state, sd)
    assert loaded.prefix == "module."
    assert set(read_header(tmp_path / "ep1.pth", strip_prefix=flag).tensors) == set(sd)
    torch.save(sd, tmp_path / "plain.pt")  # without the wrapper the flag is still checked
    with pytest.raises(CheckpointError, match="--strip-prefix 'module.': not every key starts with it"):
        load_checkpoint(tmp_path / "plain.pt", strip_prefix="module.")


def test_a_whole_model_pickle_names_every_global_to_allow(tmp_path: Path) -> None:
    """`torch.save(model)`: exit 5, and the message lists every class --allow-global needs (9, sorted), so allowing
    them all loads it; none is hidden behind "and N more"."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(), nn.Linear(2, 3), nn.Tanh())
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeInputError) as refused:
        load_checkpoint(tmp_path / "whole.pt")
    listed = str(refused.value).split("code objects (", 1)[1].split(")", 1)[0].split(", ")
    assert listed == sorted(listed) and len(listed) == 9 and "torch.nn.modules.activation.Tanh" in listed
    loaded = load_checkpoint(tmp_path / "whole.pt", allow_globals=tuple(listed))
    assert loaded.state.keys() == model.state_dict().keys()


@pytest.mark.parametrize("content, text", [
    (b"", "empty file (0 bytes): the save was interrupted"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 46827520\n",
     "a Git LFS pointer, not the weights: fetch them with `git lfs pull`"),
    (b"not a checkpoint at all", "unknown file format (not safetensors nor a torch checkpoint)"),
])
@pytest.mark.parametrize("name", ["3.pt", "3.safetensors"])
def test_a_file_named_like_a_checkpoint_without_weights_says_why(tmp_path: Path, content: bytes, text: str,
                                                                 name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert text in str(err.value) and "--exclude 3." in str(err.value)


def test_a_sharded_final_model_beside_the_checkpoint_folders_is_one_checkpoint(tmp_path: Path) -> None:
    """``Trainer.save_model`` writes the final model into output_dir itself, beside ``checkpoint-<step>/``; when
    it is sharded, each shard used to be listed as a checkpoint of its own (which matched no model)."""
    from twa_tool.catalog import inspect_directory
    from twa_tool.config import Selection

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(state(step), folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    final = state(3)
    keys = sorted(final)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, names in shards.items():
        save_file({k: final[k] for k in names}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}))
    (tmp_path / "config.json").write_text("{}")
    found = discover(tmp_path)
    assert [(f.name, f.path) for f in found] == [("checkpoint-1", tmp_path / "checkpoint-1" / "model.safetensors"),
                                                ("checkpoint-2", tmp_path / "checkpoint-2" / "model.safetensors"),
                                                ("model.safetensors.index.json", tmp_path)]
    assert_same(load_checkpoint(tmp_path).state, final)
    catalog = inspect_directory(tmp_path, Selection())
    assert catalog.ignored == ("config.json",)


# ---------------------------------------------------------------------------------------------
# Header memo: files of one save site are unpickled once


def test_header_memo_unpickles_one_save_site_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files whose pickle and member sizes match an earlier file's get its header without being unpickled,
    and it equals what a fresh read says; a file with another pickle (another epoch) is read on its own."""
    from twa_tool import checkpoints

    for i in range(4):
        torch.save({"epoch": 5, "state_dict": state(i)}, tmp_path / f"same-{i}.pt")
    torch.save({"epoch": 6, "state_dict": state(9)}, tmp_path / "other.pt")
    names = ["same-0.pt", "same-1.pt", "same-2.pt", "same-3.pt", "other.pt"]
    fresh = [read_header(tmp_path / n) for n in names]
    loads: list[str] = []
    real = checkpoints._torch_load

    def counted(path: Path, *args, **kwargs) -> object:
        loads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "_torch_load", counted)
    memo = checkpoints.HeaderMemo()
    memoized = [read_header(tmp_path / n, memo=memo) for n in names]
    assert memoized == fresh
    assert loads == ["same-0.pt", "other.pt"]
    assert [h.epoch for h in memoized] == [5, 5, 5, 5, 6]
    memoized[1].tensors.clear()  # what a caller does with its header never reaches the memo
    assert read_header(tmp_path / "same-3.pt", memo=memo) == fresh[3]


def test_header_memo_still_checks_every_file(tmp_path: Path) -> None:
    """A later file of the same save site that is truncated, or holds a member of another size, is not
    given the first file's header."""
    from twa_tool.checkpoints import HeaderMemo

    torch.save(state(0), tmp_path / "a.pt")
    torch.save(state(1), tmp_path / "b.pt")
    data = (tmp_path / "b.pt").read_bytes()
    (tmp_path / "b.pt").write_bytes(data[: len(data) // 2])
    torch.save({**state(2), "fc.bias": torch.zeros(5)}, tmp_path / "c.pt")
    memo = HeaderMemo()
    read_header(tmp_path / "a.pt", memo=memo)
    with pytest.raises(CheckpointError, match="b.pt"):
        read_header(tmp_path / "b.pt", memo=memo)
    assert read_header(tmp_path / "c.pt", memo=memo).tensors["fc.bias"] == ((5,), "float32")


def test_header_memo_never_shares_lightning_scores(tmp_path: Path) -> None:
    """Lightning scores are looked up by the file's own name in best_k_models: two files with byte-identical
    pickles still get their own score."""
    from twa_tool.checkpoints import HeaderMemo

    ckpt = lightning_ckpt(state(0), "b.ckpt")
    ckpt["callbacks"][next(iter(ckpt["callbacks"]))]["best_k_models"] = {"/runs/x/a.ckpt": torch.tensor(0.25),
                                                                         "/runs/x/b.ckpt": torch.tensor(0.5)}
    torch.save(ckpt, tmp_path / "a.ckpt")
    torch.save(ckpt, tmp_path / "b.ckpt")
    memo = HeaderMemo()
    scores = [read_header(tmp_path / n, memo=memo).metrics["val_loss"] for n in ("a.ckpt", "b.ckpt")]
    assert scores == pytest.approx([0.25, 0.5])


def test_header_memo_reads_tensor_valued_trainer_info_per_file(tmp_path: Path) -> None:
    """An epoch, step or metric saved as a tensor lies in the file's storage bytes, not its pickle: files of
    one save site then have byte-equal pickles but their own values (twa inspect showed e0 metric=0.5 for
    every file, and --top-k --by metric picked the wrong ones)."""
    from twa_tool.checkpoints import HeaderMemo

    for e in range(3):
        torch.save({"arch": "resnet18", "epoch": torch.tensor(e), "metric": torch.tensor(0.5 + e),
                    "state_dict": state(e)}, tmp_path / f"timm-{e}.pth.tar")
        torch.save({"model": state(e), "optimizer_history": [{"num_updates": torch.tensor(10 * e)}],
                    "extra_state": {"val_loss": torch.tensor(2.0 - e), "train_iterator": {"epoch": torch.tensor(e)}}},
                   tmp_path / f"fairseq-{e}.pt")
        torch.save({"epoch": torch.tensor(e), "step": torch.tensor(100 * e), "model": state(e)},
                   tmp_path / f"plain-{e}.pt")
    memo = HeaderMemo()
    for path in sorted(tmp_path.iterdir()):
        assert read_header(path, memo=memo) == read_header(path), path.name
    assert [read_header(tmp_path / f"timm-{e}.pth.tar", memo=memo).metrics["metric"] for e in range(3)] == \
        [0.5, 1.5, 2.5]
