"""Discovery order, safe loading, state-dict unwrapping, atomic bit-exact writing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from twa_tool.checkpoints import discover, load_checkpoint
from twa_tool.errors import CheckpointError, OutputError, UnsafeInputError
from twa_tool.writer import prepare_output_dir, save_safetensors


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def test_numeric_order_and_ignored_files(tmp_path: Path) -> None:
    for name in ["10.pt", "2.pt", "1.safetensors", "optimizer.pt", "rng_state_0.pth", "training_args.bin",
                 "notes.txt", "train.py"]:
        (tmp_path / name).write_bytes(b"x")
    names = [f.name for f in discover(tmp_path)]
    assert names == ["1.safetensors", "2.pt", "10.pt"]


def test_order_of_lightning_and_hf_names(tmp_path: Path) -> None:
    for name in ["epoch=10-step=4000.ckpt", "epoch=3-step=1200.ckpt", "epoch=3-step=900.ckpt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [f.name for f in discover(tmp_path)] == ["epoch=3-step=900.ckpt", "epoch=3-step=1200.ckpt",
                                                    "epoch=10-step=4000.ckpt"]
    hf = tmp_path / "hf"
    hf.mkdir()
    for step in (500, 1500, 1000):
        folder = hf / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    (hf / "checkpoint-9").mkdir()  # no weights inside: ignored
    found = discover(hf)
    assert [f.name for f in found] == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
    assert found[0].path == hf / "checkpoint-500" / "model.safetensors"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "compiled"])
def test_load_torch_state_dict_layouts(tmp_path: Path, wrap: str) -> None:
    state = small_state()
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}},
        "model": {"model": state, "args": None},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "1.pt")
    loaded = load_checkpoint(tmp_path / "1.pt").state
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_safetensors_metadata_is_read(tmp_path: Path) -> None:
    save_file(small_state(), tmp_path / "a.safetensors", metadata={"twa.model": "twa:cnn"})
    loaded = load_checkpoint(tmp_path / "a.safetensors")
    assert loaded.metadata["twa.model"] == "twa:cnn"


class Payload:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["TWA_TEST_MARKER"])),))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWA_TEST_MARKER", str(marker))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not weaken the explicit weights_only
    torch.save({"state_dict": small_state(), "evil": Payload()}, tmp_path / "1.pt")
    with pytest.raises(UnsafeInputError, match=r"1\.pt: refused to unpickle .*--trust-pickle"):
        load_checkpoint(tmp_path / "1.pt")
    assert not marker.exists()


class Gone:
    """Saved as a class of a module that is then no longer importable."""


def save_with_gone_class(path: Path, module_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint holding a ``Gone`` object saved as ``module_name.Gone``, a module importable only while saving."""
    import sys
    import types

    module = types.ModuleType(module_name)
    module.Gone = Gone
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module.__name__, module)
        patch.setattr(Gone, "__module__", module.__name__)
        torch.save({"state_dict": small_state(), "extra": Gone()}, path)


def test_trusted_pickle_of_missing_code_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_with_gone_class(tmp_path / "2.pt", "a_module_that_is_not_installed", monkeypatch)
    with pytest.raises(CheckpointError, match=r"2\.pt: unpickling it needs code that is not importable here "
                                              r"\(ModuleNotFoundError"):
        load_checkpoint(tmp_path / "2.pt", trust_pickle=True)


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"PK\x03\x04truncated zip"])
def test_corrupt_files_are_checkpoint_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "3.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="3.pt"):
        load_checkpoint(path)


def test_truncated_safetensors_is_an_error(tmp_path: Path) -> None:
    save_file(small_state(), tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="a.safetensors"):
        load_checkpoint(tmp_path / "a.safetensors")


def test_pickled_class_of_a_script_in_the_current_folder_names_pythonpath(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch.save(model, 'epoch_0.pt')` in a project whose model lives in train.py: run from that folder, twa (an
    installed script, without the current folder on sys.path) said only 'needs code that is not importable here
    ... run twa where that code is importable', and `--allow-global train.Net` 'cannot import it', while the user
    stood in the folder holding train.py. Both now name PYTHONPATH=."""

    from twa_tool.errors import ConfigError

    save_with_gone_class(tmp_path / "2.pt", "twa_qa_local_train", monkeypatch)
    here = tmp_path / "project"
    here.mkdir()
    (here / "twa_qa_local_train.py").write_text("class Gone:\n    pass\n")
    monkeypatch.chdir(here)  # the script beside the user, not importable: the current folder is not on sys.path
    fix = "twa_qa_local_train is in the current folder, which twa does not import from: run PYTHONPATH=. twa ..."
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "2.pt", trust_pickle=True)
    assert str(err.value).endswith(f"; {fix}, or convert the file to safetensors")
    with pytest.raises(ConfigError) as err:
        load_checkpoint(tmp_path / "2.pt", allow_globals=("twa_qa_local_train.Gone",))
    assert f"cannot import it (No module named 'twa_qa_local_train'); {fix}, or give the full module path" in str(
        err.value)


def test_non_tensor_dict_is_an_error(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "1.pt")
    with pytest.raises(CheckpointError, match="no state dict found") as err:
        load_checkpoint(tmp_path / "1.pt")
    assert str(err.value).endswith("save model.state_dict(), or, if it is not a checkpoint, pass --exclude 1.pt")


def test_optimizer_state_dict_beside_the_checkpoints_is_named_with_the_exclude(tmp_path: Path) -> None:
    """`torch.save(opt.state_dict(), f'optimizer_{e}.pt')` beside the weights: the error said 'no state dict
    found ... save model.state_dict()', which is wrong advice for a file that is not meant to hold weights."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    torch.save(opt.state_dict(), tmp_path / "optimizer_3.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "optimizer_3.pt")
    assert str(err.value) == (f"{tmp_path / 'optimizer_3.pt'}: an optimizer's state_dict (state, param_groups), "
                              f"not model weights; move it out of the folder or pass --exclude optimizer_3.pt")


def test_save_round_trip_is_bit_exact_with_metadata(tmp_path: Path) -> None:
    state = small_state()
    state["fc.half"] = torch.randn(5).half()
    state["tied"] = state["fc.weight"]  # aliasing must not break saving
    digest = save_safetensors(tmp_path / "m.safetensors", state, {"twa.method": "twa"})
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].view(torch.uint8).equal(value.contiguous().view(torch.uint8)) if value.dim() else \
            torch.equal(loaded[key], value)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "twa.method": "twa"}
    assert len(digest) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp leftovers


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("twa_tool.writer.save_file", boom)
    with pytest.raises(OutputError, match="m.safetensors: cannot write"):
        save_safetensors(tmp_path / "m.safetensors", small_state(), {})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"a": 1}\n')
    before = (tmp_path / "report.json").read_bytes()
    with pytest.raises(OutputError, match="report.json already exists; pass --overwrite"):
        prepare_output_dir(tmp_path, ("model.safetensors", "report.json"), overwrite=False)
    with prepare_output_dir(tmp_path, ("model.safetensors", "report.json"), overwrite=True):
        pass
    assert (tmp_path / "report.json").read_bytes() == before


def test_one_read_gives_the_digest_and_checks_every_member_crc(tmp_path: Path) -> None:
    import hashlib

    from twa_tool.checkpoints import sha256_file

    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(5000, dtype=torch.float32), "b": torch.ones(3)}, path)
    good = path.read_bytes()
    assert sha256_file(path, chunk=777, verify_zip_crc=True) == hashlib.sha256(good).hexdigest()
    state = load_checkpoint(path, crc_checked=True).state
    assert torch.equal(state["w"], torch.arange(5000, dtype=torch.float32))
    data = bytearray(good)
    data[good.index(b"data/0") + 4000] ^= 0x01  # inside the first tensor's bytes, past its local header
    path.write_bytes(bytes(data))
    assert sha256_file(path) == hashlib.sha256(bytes(data)).hexdigest()  # hashing alone does not look inside
    with pytest.raises(CheckpointError, match="CRC mismatch in zip member"):
        sha256_file(path, chunk=777, verify_zip_crc=True)
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        load_checkpoint(path)  # the loader checks on its own unless told the caller did


def test_an_unreadable_file_is_left_out_by_the_name_of_the_entry_that_holds_it(tmp_path: Path) -> None:
    """`--exclude` filters the folder's entries, not the files read for them: a file inside `checkpoint-500/` is left
    out with `--exclude checkpoint-500`, a shard of the sharded model saved in the folder itself with its index's
    name. `twa soup --base` is no entry, even inside the folder: its error keeps the fixes that apply to it, and so
    does a file outside the folder."""
    import json

    from twa_tool.checkpoints import excludable
    from twa_tool.errors import UnreadableCheckpoint

    root = tmp_path / "run"
    (root / "checkpoint-500").mkdir(parents=True)
    (root / "checkpoint-500" / "model.safetensors").write_bytes(b"x")
    (root / "checkpoint-500" / "trainer_state.json").write_text("{")
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        (root / shard).write_bytes(b"x")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for name in ("7.pt", "[1].pt", "base.pt"):
        (root / name).write_bytes(b"x")

    def reported(path: Path, besides: Path | None = None) -> str:
        with pytest.raises(UnreadableCheckpoint) as err, excludable(root, besides):
            raise UnreadableCheckpoint(path, "CRC mismatch in zip member 7/data/0", "re-copy or remove it")
        return str(err.value)

    head = "CRC mismatch in zip member 7/data/0; re-copy or remove it"
    assert reported(root / "7.pt") == f"{root / '7.pt'}: {head}, or leave it out with --exclude 7.pt"
    assert reported(root / "[1].pt").endswith(", or leave it out with --exclude '[[]1].pt'")  # a glob matching it
    for inside in ("model.safetensors", "trainer_state.json"):
        assert reported(root / "checkpoint-500" / inside).endswith(
            f"{head}, or leave checkpoint-500 out with --exclude checkpoint-500")
    assert reported(root / shards[1]).endswith(
        f"{head}, or leave model.safetensors.index.json out with --exclude model.safetensors.index.json")
    assert reported(root / "base.pt", besides=root / "base.pt") == f"{root / 'base.pt'}: {head}"
    assert reported(tmp_path / "7.pt") == f"{tmp_path / '7.pt'}: {head}"
    assert reported(root / "7.pt", besides=root / "base.pt").endswith("--exclude 7.pt")
