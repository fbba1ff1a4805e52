"""Direct reads: files sharing the first file's zip layout are read straight into the basis rows.

The fast path must give bit-for-bit what safe loading gives, check every member's CRC on the way,
and step aside (to ``load_checkpoint``) for any file whose pickle or member table differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from twa_tool import pipeline
from twa_tool.checkpoints import discover, load_checkpoint, zip_layout
from twa_tool.config import AverageConfig
from twa_tool.errors import CheckpointError
from twa_tool.models import trainable_names
from twa_tool.pipeline import Reader, stream_checkpoints


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.ReLU(), nn.Linear(30, 5))


def write_trajectory(root: Path, k: int = 12) -> nn.Module:
    """``k`` state dicts along a trajectory; names of different lengths shift every member's offset."""
    root.mkdir(exist_ok=True)
    model = small_model()
    state = {n: v.clone() for n, v in model.state_dict().items()}
    for i in range(k):
        for value in state.values():
            if value.is_floating_point():
                value += 1e-2 * torch.randn_like(value)
        state["1.num_batches_tracked"] += 1
        torch.save(state, root / f"step_{i * 7}.pt")
    return model


def run(root: Path, model: nn.Module) -> pipeline.Stream:
    files = discover(root)
    reader = Reader.for_run(AverageConfig(checkpoint_dir=root, out_dir=root, data="synthetic"), model)
    return stream_checkpoints(files, model, trainable_names(model), 1e-5, reader, lambda e: None, block=4)


def count_loads(monkeypatch: pytest.MonkeyPatch, how: dict[Path, bool] | None = None) -> list[Path]:
    """The paths ``Reader.load`` is given, in order (and in ``how``, whether each was loaded mapped)."""
    loaded: list[Path] = []
    original = Reader.load

    def load(self: Reader, path: Path, crc_checked: bool = False, mapped: bool = True) -> dict[str, torch.Tensor]:
        loaded.append(path)
        if how is not None:
            how[path] = mapped
        return original(self, path, crc_checked, mapped)

    monkeypatch.setattr(Reader, "load", load)
    return loaded


def assert_same_stream(a: pipeline.Stream, b: pipeline.Stream) -> None:
    assert torch.equal(a.subspace.basis.values, b.subspace.basis.values)
    assert torch.equal(a.subspace.r, b.subspace.r) and a.subspace.kept == b.subspace.kept
    assert a.sha256 == b.sha256
    for theirs, ours in ((a.mean_state, b.mean_state), (a.last_state, b.last_state)):
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_files_sharing_the_first_layout_are_read_straight_into_the_rows(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_trajectory(tmp_path / "ckpts")
    loaded = count_loads(monkeypatch)
    direct = run(tmp_path / "ckpts", model)
    files = discover(tmp_path / "ckpts")
    assert loaded == [files[0].path, files[-1].path]  # the first (for its layout) and the last (its full state)
    loaded.clear()
    monkeypatch.setattr(pipeline, "zip_layout", lambda path, state: None)
    safe = run(tmp_path / "ckpts", model)
    assert len(loaded) == len(files)
    assert_same_stream(direct, safe)


def test_a_flipped_byte_in_a_directly_read_file_fails_its_crc(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_trajectory(tmp_path / "ckpts", k=5)
    middle = discover(tmp_path / "ckpts")[2].path
    data = bytearray(middle.read_bytes())
    data[data.index(b"data/0") + 100] ^= 0x01  # inside the first storage's bytes, past its local header
    middle.write_bytes(bytes(data))
    loaded = count_loads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{middle.name}: CRC mismatch in zip member data/0"):
        run(tmp_path / "ckpts", model)
    assert middle not in loaded  # it was read directly, and the direct read caught it


def test_a_file_with_another_layout_is_loaded_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_trajectory(tmp_path / "ckpts", k=6)
    files = discover(tmp_path / "ckpts")
    state = torch.load(files[3].path, weights_only=True)
    torch.save({"epoch": 3, "state_dict": state}, files[3].path)  # another pickle, the same weights
    loaded = count_loads(monkeypatch)
    mixed = run(tmp_path / "ckpts", model)
    assert loaded == [files[0].path, files[3].path, files[-1].path]
    monkeypatch.setattr(pipeline, "zip_layout", lambda path, state: None)
    assert_same_stream(mixed, run(tmp_path / "ckpts", model))
    torch.save({**state, "extra": torch.ones(2)}, files[3].path)  # an unexpected key is still caught
    with pytest.raises(CheckpointError, match="unexpected 1 keys"):
        run(tmp_path / "ckpts", small_model())


def test_the_layout_places_views_and_shared_storages_or_declines(tmp_path: Path) -> None:
    base = torch.arange(100, dtype=torch.float32)
    torch.save({"a": base[:40], "b": base[40:].view(6, 10), "c": torch.ones(3, dtype=torch.float64)},
               tmp_path / "x.pt")
    torch.save({"a": -base[:40].clone(), "b": (2 * base[40:]).view(6, 10), "c": torch.zeros(3, dtype=torch.float64)},
               tmp_path / "other.pt")  # another pickle (no shared storage): its layout differs
    shared = (3 * base).clone()
    torch.save({"a": shared[:40], "b": shared[40:].view(6, 10), "c": torch.full((3,), 2.0, dtype=torch.float64)},
               tmp_path / "y.pt")
    torch.save({"z": shared[:40], "b": shared[40:].view(6, 10), "c": torch.full((3,), 2.0, dtype=torch.float64)},
               tmp_path / "renamed.pt")  # the same member table: only the pickle's bytes tell them apart
    state = load_checkpoint(tmp_path / "x.pt").state  # memory-mapped, as the pipeline loads the first file
    layout = zip_layout(tmp_path / "x.pt", state)
    assert layout is not None
    assert layout.matches(tmp_path / "other.pt") is None and layout.matches(tmp_path / "renamed.pt") is None
    members = layout.matches(tmp_path / "y.pt")
    assert members is not None
    targets = {"a": torch.empty(40), "b": torch.empty(6, 10), "c": torch.empty(3, dtype=torch.float64)}
    layout.read_into(tmp_path / "y.pt", members, targets)
    expected = load_checkpoint(tmp_path / "y.pt").state
    assert all(torch.equal(targets[k], expected[k]) for k in targets)
    with pytest.raises(ValueError, match="target for c"):
        layout.read_into(tmp_path / "y.pt", members, {"c": torch.empty(3)})
    # tensors not mapped from the file (a copy, or a plain load): no layout rather than a wrong one
    assert zip_layout(tmp_path / "x.pt", {k: v.clone() for k, v in state.items()}) is None
    assert zip_layout(tmp_path / "x.pt", torch.load(tmp_path / "x.pt", weights_only=True)) is None


@pytest.mark.parametrize("storage", ["float32", "bf16"])
def test_files_of_other_formats_after_a_torch_zip_are_loaded_not_called_corrupt(tmp_path: Path,
                                                                                storage: str) -> None:
    """A folder mixing formats: a safetensors file, a legacy (non-zip) pickle and a sharded Hugging Face
    folder after the first torch zip are other layouts, read safely, not "corrupt torch checkpoints"."""
    import json

    from safetensors.torch import save_file

    model = write_trajectory(tmp_path / "ckpts", k=6)
    files = discover(tmp_path / "ckpts")
    states = [torch.load(f.path, weights_only=True) for f in files]
    save_file(states[1], str(files[1].path.with_suffix(".safetensors")))
    files[1].path.unlink()
    torch.save(states[2], files[2].path, _use_new_zipfile_serialization=False)
    folder = files[3].path.with_suffix("")
    folder.mkdir()
    save_file(states[3], str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in states[3]}}))
    files[3].path.unlink()
    mixed = stream_checkpoints(discover(tmp_path / "ckpts"), model, trainable_names(model), 1e-5,
                               Reader.for_run(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path,
                                                            data="synthetic"), model),
                               lambda e: None, block=4, storage=storage)
    assert list(mixed.subspace.kept) == list(range(6))
    expected = torch.stack([torch.cat([s[n].reshape(-1) for n in trainable_names(model)]) for s in states])
    mean = torch.cat([mixed.mean_state[n].reshape(-1) for n in trainable_names(model)])
    torch.testing.assert_close(mean, expected.double().mean(0).float())


def test_a_sharded_folder_is_named_as_the_reason_for_the_float32_build(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    model = write_trajectory(tmp_path / "ckpts", k=4)
    files = discover(tmp_path / "ckpts")
    state = torch.load(files[1].path, weights_only=True)
    folder = files[1].path.with_suffix("")
    folder.mkdir()
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}))
    files[1].path.unlink()
    stream = stream_checkpoints(discover(tmp_path / "ckpts"), model, trainable_names(model), 1e-5,
                                Reader.for_run(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path,
                                                             data="synthetic"), model),
                                lambda e: None, block=4, storage="int8")
    assert stream.not_by_columns == f"{folder.name} is a sharded folder, which is read whole"


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_only_the_last_file_kept_to_the_end_is_read_into_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  storage: str) -> None:
    # the last state lives to the end of the run: a mapping of its file would die by SIGBUS if a trainer rewrote
    # it; the others are short-lived and may map their files (no copy)
    model = write_trajectory(tmp_path / "ckpts", k=6)
    mapped: dict[Path, bool] = {}
    count_loads(monkeypatch, mapped)
    modes: list[bool] = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: modes.append(kw.get("mmap", False)) or load(*a, **kw))
    files = discover(tmp_path / "ckpts")
    reader = Reader.for_run(AverageConfig(checkpoint_dir=tmp_path / "ckpts", out_dir=tmp_path, data="synthetic"),
                            model)
    stream_checkpoints(files, model, trainable_names(model), 1e-5, reader, lambda e: None, block=4, storage=storage)
    assert mapped[files[-1].path] is False
    assert all(mapped[f.path] for f in files[:-1] if f.path in mapped)
    assert False in modes  # torch.load really read it (mmap=False), not a mapping copied afterwards


def record_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, bool]]:
    """Every ``Reader.load`` call as (path, mapped)."""
    calls: list[tuple[Path, bool]] = []
    original = Reader.load

    def load(self: Reader, path: Path, crc_checked: bool = False, mapped: bool = True) -> dict[str, torch.Tensor]:
        calls.append((Path(path), mapped))
        return original(self, path, crc_checked, mapped)

    monkeypatch.setattr(Reader, "load", load)
    return calls


@pytest.mark.parametrize("flags", [
    ["--start", "-1", "--baselines", "best,last"],  # --start INDEX at the last file; every checkpoint evaluated
    ["--baselines", "last", "--fail-if-worse-than", "last", "--on-worse", "fallback"],  # the last file written
], ids=["start-index-and-best", "fallback-to-last"])
def test_the_last_file_is_never_mapped_by_a_later_load(plain_pt_ckpts: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    """The streaming read keeps the last checkpoint in memory (a trainer rewriting last.ckpt would kill a mapping
    with SIGBUS), but --start INDEX, the per-checkpoint evaluation and a fallback to it mapped that file again."""
    from click.testing import CliRunner
    from conftest import model_flags

    from twa_tool.cli import cli

    if "fallback" in flags:  # TWA always "worse" than the last checkpoint: the fallback writes it
        real = pipeline.quality_gate
        monkeypatch.setattr(pipeline, "quality_gate", lambda config, metrics: {**real(config, metrics),
                                                                                "passed": False})
    calls = record_loads(monkeypatch)
    result = CliRunner().invoke(cli, ["average", str(plain_pt_ckpts), *model_flags(), "--data", "synthetic",
                                      "--epochs", "1", "--batch-size", "512", "--threads", "1", *flags,
                                      "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == (3 if "fallback" in flags else 0), result.output
    last = sorted(plain_pt_ckpts.glob("*.pt"), key=lambda p: int(p.stem))[-1]
    assert [mapped for path, mapped in calls if path == last] == [False], calls
    if "fallback" in flags:
        import json

        assert json.loads(result.stdout)["written_method"] == "last"


def test_the_finiteness_reload_of_the_last_file_is_not_mapped(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from twa_tool.errors import NumericalError

    model = write_trajectory(tmp_path / "ckpts", k=4)
    files = discover(tmp_path / "ckpts")
    state = torch.load(files[-1].path, weights_only=True)
    state["0.weight"][0, 0] = float("inf")
    torch.save(state, files[-1].path)
    calls = record_loads(monkeypatch)
    with pytest.raises(NumericalError, match=str(files[-1].path)):
        run(tmp_path / "ckpts", model)
    assert [mapped for path, mapped in calls if path == files[-1].path] == [False, False], calls
