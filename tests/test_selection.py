"""Selection: globs, slices, every, last, top-k, and alias de-duplication."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from twa_tool.checkpoints import discover
from twa_tool.config import Selection
from twa_tool.errors import ConfigError
from twa_tool.selection import UNPLACED, find_aliases, same_file, select, unplaced_warning


def write_run(folder: Path, epochs: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for e in range(epochs):
        torch.save({"w": torch.full((300_000,), float(e))}, folder / f"{e}.pt")


def names(chosen) -> list[str]:
    return [f.name for f in chosen.files]


def test_slices_every_last(tmp_path: Path) -> None:
    write_run(tmp_path)
    files = discover(tmp_path)
    assert names(select(files, Selection(start=1, stop=5))) == ["1.pt", "2.pt", "3.pt", "4.pt"]
    assert names(select(files, Selection(every=2))) == ["1.pt", "3.pt", "5.pt"]  # the last one always in
    assert names(select(files, Selection(start=0, stop=-1, last=2))) == ["3.pt", "4.pt"]
    chosen = select(files, Selection(include=("[0-3].pt",), exclude=("2.pt",)))
    assert names(chosen) == ["0.pt", "1.pt", "3.pt"]
    reasons = {d.name: d.reason for d in chosen.dropped}
    assert reasons == {"2.pt": "matched by --exclude", "4.pt": "not matched by --include",
                       "5.pt": "not matched by --include"}


def test_aliases_are_counted_once(tmp_path: Path) -> None:
    write_run(tmp_path)
    os.symlink(tmp_path / "5.pt", tmp_path / "last.pt")
    os.link(tmp_path / "4.pt", tmp_path / "model_best.pt")
    shutil.copy(tmp_path / "3.pt", tmp_path / "copy_of_3.pt")
    chosen = select(discover(tmp_path), Selection())
    assert names(chosen) == [f"{e}.pt" for e in range(6)]
    aliases = {d.name: (d.alias_of, d.reason) for d in chosen.dropped}
    assert aliases == {
        "last.pt": ("5.pt", "symlink to the same file as 5.pt"),
        "model_best.pt": ("4.pt", "hard link to the same file as 4.pt"),
        "copy_of_3.pt": ("3.pt", "byte-identical copy of 3.pt"),
    }


def test_same_size_different_content_is_not_an_alias(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=2)
    data = bytearray((tmp_path / "1.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # differs only in the middle: the cheap probe matches, the full hash does not
    (tmp_path / "2.pt").write_bytes(bytes(data))
    assert find_aliases(discover(tmp_path)) == {}


def test_same_torch_save_under_another_name_is_an_alias(tmp_path: Path) -> None:
    """torchvision's reference scripts save each epoch's dict as model_<E>.pth and again as checkpoint.pth:
    torch.save names the zip's archive folder after the file, so the bytes differ, the contents do not."""
    for e in range(3):
        saved = {"model": {"w": torch.full((1000,), float(e))}, "epoch": e}
        torch.save(saved, tmp_path / f"model_{e}.pth")
        torch.save(saved, tmp_path / "checkpoint.pth")
    torch.save({"model": {"w": torch.full((1000,), 2.0)}, "epoch": 3}, tmp_path / "other.pth")  # pickle differs
    assert (tmp_path / "checkpoint.pth").read_bytes() != (tmp_path / "model_2.pth").read_bytes()
    chosen = select(discover(tmp_path), Selection(include=("model_*", "other.pth", "checkpoint.pth")))
    assert names(chosen) == ["model_0.pth", "model_1.pth", "model_2.pth", "other.pth"]
    assert {d.name: (d.alias_of, d.reason) for d in chosen.dropped} == {
        "checkpoint.pth": ("model_2.pth", "identical torch save of model_2.pth")}
    assert same_file(tmp_path / "checkpoint.pth", tmp_path / "model_2.pth") == "identical torch save"
    assert same_file(tmp_path / "other.pth", tmp_path / "model_2.pth") is None


def test_top_k_by_metric(tmp_path: Path) -> None:
    write_run(tmp_path)
    files = discover(tmp_path)
    loss = {"0.pt": 3.0, "1.pt": 1.0, "2.pt": 2.0, "3.pt": 0.5, "4.pt": 0.7, "5.pt": 0.6}
    metric = lambda f: loss[f.name]  # noqa: E731
    assert names(select(files, Selection(top_k=3, by="loss", mode="min"), metric)) == ["3.pt", "4.pt", "5.pt"]
    assert names(select(files, Selection(top_k=2, by="loss", mode="max"), metric)) == ["0.pt", "2.pt"]
    with pytest.raises(ConfigError, match="--by acc: no stored value for 0.pt and 5 more"):
        select(files, Selection(top_k=2, by="acc", mode="max"), lambda f: None)


@pytest.mark.parametrize("kwargs, text", [
    ({"top_k": 2}, "--top-k needs --by METRIC and --mode"),
    ({"top_k": 2, "by": "loss"}, "--top-k needs --by METRIC and --mode"),
    ({"by": "loss"}, "--by needs --top-k"),
    ({"mode": "max"}, "--mode max needs --top-k"),
    ({"every": 0}, "--every 0: must be a positive number"),
])
def test_selection_flag_errors(kwargs: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        Selection(**kwargs)


def test_the_exclude_hint_matches_exactly_the_named_file() -> None:
    import shlex

    from twa_tool.errors import exclude_hint
    from twa_tool.selection import _matches

    names = ["ft-[3].safetensors", "ft-3.safetensors", "a b.pt", "x*.pt", "xy.pt", "plain.pt"]
    for name in names:
        flag, pattern = shlex.split(exclude_hint(name))
        assert flag == "--exclude"
        assert [n for n in names if _matches(n, (pattern,))] == [name]


def test_top_k_reads_the_metric_with_the_runs_pickle_options(tmp_path: Path) -> None:
    """`--top-k --by` reads each file's stored metric with --allow-global / --trust-pickle, as the run and
    `twa inspect` read the file: a Lightning checkpoint whose hparams hold a PosixPath is not refused."""
    from twa_tool.config import AverageConfig
    from twa_tool.errors import UnsafeInputError
    from twa_tool.pipeline import select_checkpoints

    for epoch, loss in enumerate([0.5, 0.1, 0.4, 0.2]):
        name = f"epoch={epoch}-step={epoch * 10}.ckpt"
        monitor = {"monitor": "val_loss", "best_k_models": {str(tmp_path / name): torch.tensor(loss)}}
        torch.save({"epoch": epoch, "global_step": epoch * 10, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {"model.w": torch.full((3,), float(epoch))},
                    "hyper_parameters": {"data_dir": Path("/data")},
                    "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": monitor}}, tmp_path / name)
    top2 = Selection(top_k=2, by="val_loss", mode="min")
    with pytest.raises(UnsafeInputError, match="PosixPath"):
        select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic",
                                         selection=top2))
    for options in ({"allow_globals": ("pathlib.PosixPath",)}, {"trust_pickle": True}):
        chosen = select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic",
                                                  selection=top2, **options))
        assert names(chosen) == ["epoch=1-step=10.ckpt", "epoch=3-step=30.ckpt"]


def test_unnumbered_file_holding_an_epochs_weights_is_an_alias(tmp_path: Path) -> None:
    """The common script: `torch.save({'epoch': e, 'model': sd, 'optimizer': ...}, f'epoch_{e}.pth')` and, beside
    it, `torch.save(model.state_dict(), 'best.pth')` / `'last.pth'`. Those were selected as two more checkpoints:
    the SWA mean (and TWA's start) counted the best and last epochs twice, and the 'last' checkpoint was whichever
    unnumbered name sorted last (model_best.pth after last.pth). Same weights in another container are counted
    once, like byte-identical copies; an unnumbered file holding other weights (the EMA, saved as a plain state
    dict beside an epoch file that stores it under 'ema') is left out with its own reason (``unplaced``)."""
    from twa_tool.catalog import inspect_directory
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import select_checkpoints

    for e in range(4):
        sd = {"w": torch.full((1000,), float(e)), "b": torch.full((10,), -float(e))}
        ema = {"w": torch.full((1000,), e + 0.5), "b": torch.full((10,), -e - 0.5)}
        torch.save({"epoch": e, "model": sd, "ema": ema, "optimizer": {"state": {0: {"momentum_buffer": sd["w"] * 0.1}},
                                                                       "param_groups": [{"lr": 0.1, "params": [0]}]}},
                   tmp_path / f"epoch_{e}.pth")
        if e == 2:
            torch.save(sd, tmp_path / "model_best.pth")
            torch.save(ema, tmp_path / "ema_best.pth")
        torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "last.pth")  # a DDP model's state
    config = AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic")
    chosen = select_checkpoints(config)
    assert names(chosen) == ["epoch_0.pth", "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    assert {d.name: (d.alias_of, d.reason) for d in chosen.dropped} == {
        "last.pth": ("epoch_3.pth", "copy of the weights of epoch_3.pth"),
        "model_best.pth": ("epoch_2.pth", "copy of the weights of epoch_2.pth"),
        "ema_best.pth": (None, UNPLACED)}
    listing = inspect_directory(tmp_path, Selection())
    assert [e.name for e in listing.selected] == names(chosen)
    assert {e.name: e.status for e in listing.others} == {d.name: d.reason for d in chosen.dropped}
    assert unplaced_warning("ema_best.pth") in listing.warnings
    assert find_aliases(discover(tmp_path)) == {}  # without a same-weights test: byte-level aliases only


def test_the_weights_comparison_never_maps_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unnumbered file compared with the epoch files is typically last.pth, which a running trainer rewrites in
    place each epoch: read through a mapping (as the comparison did), a file truncated meanwhile kills twa with
    SIGBUS, which the streaming read and every later use of the last checkpoint avoid by reading it unmapped."""
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import select_checkpoints

    for e in range(3):
        sd = {"w": torch.full((1000,), float(e))}
        torch.save({"epoch": e, "model": sd, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / f"ep_{e}.pth")
    torch.save(sd, tmp_path / "last.pth")
    loads: list[tuple[str, bool]] = []
    real_load = torch.load

    def load(f: object, *args: object, **kwargs: object) -> object:
        loads.append((Path(str(f)).name, bool(kwargs.get("mmap"))))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    chosen = select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic"))
    assert {d.name: d.reason for d in chosen.dropped} == {"last.pth": "copy of the weights of ep_2.pth"}
    assert ("last.pth", False) in loads and ("ep_2.pth", False) in loads
    assert not any(mapped for _, mapped in loads), loads


def _unnumbered_beside_epochs(folder: Path, extra: tuple[str, ...]) -> None:
    """Three numbered epochs and unnumbered files holding weights none of them has."""
    write_run(folder, epochs=3)
    for i, name in enumerate(extra):
        torch.save({"w": torch.full((300_000,), 10.0 + i)}, folder / name)


@pytest.mark.parametrize("name", ["ema_best.pth", "best.pt", "swa.pt", "model_ema.pt", "last_ema.pt", "init.pt",
                                  "pretrained_checkpoint.pth", "init_checkpoint.pt"])
def test_an_unnumbered_non_copy_among_numbered_ones_is_left_out(tmp_path: Path, name: str) -> None:
    """It sorted after the numbered ones, so an EMA or best-so-far save became the 'last' checkpoint (the last
    baseline, the end of --last/--every slices) and a point of the trajectory. It is left out, with a reason."""
    _unnumbered_beside_epochs(tmp_path, (name,))
    chosen = select(discover(tmp_path), Selection())
    assert names(chosen) == ["0.pt", "1.pt", "2.pt"]
    assert [(d.name, d.reason, d.unplaced, d.alias_of) for d in chosen.dropped] == [(name, UNPLACED, True, None)]
    assert names(select(discover(tmp_path), Selection(last=2))) == ["1.pt", "2.pt"]


@pytest.mark.parametrize("name", ["last.pt", "latest.pth", "model_final.pth", "checkpoint_last.pt", "final_model.pt",
                                  "checkpoint.pth", "lastCheckpoint.pt", "model.safetensors"])
def test_an_unnumbered_file_named_as_the_newest_save_stays_last(tmp_path: Path, name: str) -> None:
    """A trainer's rolling save of the newest weights (Lightning's last.ckpt, detectron2's model_final.pth,
    Hugging Face's final model.safetensors beside checkpoint-<step>/) is the end of the trajectory."""
    write_run(tmp_path, epochs=3)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({"w": torch.full((300_000,), 10.0)}, str(path))
    else:
        torch.save({"w": torch.full((300_000,), 10.0)}, path)
    chosen = select(discover(tmp_path), Selection())
    assert names(chosen) == ["0.pt", "1.pt", "2.pt", name]
    assert chosen.dropped == ()


def test_an_unnumbered_file_is_kept_when_include_names_it(tmp_path: Path) -> None:
    """The way back in: an --include pattern that names the file exactly (as the warning prints it, glob characters
    escaped), beside a pattern for the numbered ones; a wildcard that happens to match it does not count."""
    _unnumbered_beside_epochs(tmp_path, ("ema[x].pt", "best.pt"))
    chosen = select(discover(tmp_path), Selection(include=("[0-9].pt", "ema[[]x].pt")))
    assert names(chosen) == ["0.pt", "1.pt", "2.pt", "ema[x].pt"]
    assert {d.name: d.reason for d in chosen.dropped} == {"best.pt": "not matched by --include"}
    chosen = select(discover(tmp_path), Selection(include=("*.pt",)))
    assert names(chosen) == ["0.pt", "1.pt", "2.pt"]
    assert "--include 'ema[[]x].pt' beside an --include pattern" in unplaced_warning("ema[x].pt")


def test_unnumbered_files_stay_without_a_numbered_trajectory_and_for_fine_tunes(tmp_path: Path) -> None:
    """With fewer than two numbered files there is no order to place them in, and fine-tunes (soup) have none."""
    torch.save({"w": torch.full((300_000,), 1.0)}, tmp_path / "1.pt")
    for i, name in enumerate(("a.pt", "best.pt")):
        torch.save({"w": torch.full((300_000,), 10.0 + i)}, tmp_path / name)
    assert names(select(discover(tmp_path), Selection())) == ["1.pt", "a.pt", "best.pt"]
    _unnumbered_beside_epochs(tmp_path / "run", ("ft_lr_high.pt",))
    chosen = select(discover(tmp_path / "run"), Selection(), trajectory=False)
    assert names(chosen) == ["0.pt", "1.pt", "2.pt", "ft_lr_high.pt"]


def test_weight_copies_keep_the_training_save_then_the_first_name(tmp_path: Path) -> None:
    """Soup ingredients have no numbers to prefer: of two torch files holding the same weights, the one saved with
    more than the weights (the optimizer) is kept over the weights-only copy, wherever it sorts; of two holding
    only the weights, the first; other weights, and files that are not torch zips, are never compared."""
    from functools import partial

    from twa_tool.checkpoints import same_weights
    from twa_tool.selection import weight_copies

    adam, sgd = {"w": torch.full((1000,), 1.0)}, {"w": torch.full((1000,), 2.0)}
    torch.save({"model": adam, "optimizer": {"state": {0: {"exp_avg": adam["w"] * 0.1}}, "param_groups": []}},
               tmp_path / "z_adam.pt")
    torch.save(adam, tmp_path / "best.pt")
    torch.save(sgd, tmp_path / "sgd.pt")
    torch.save({"model": sgd}, tmp_path / "sgd_wrapped.pt")
    torch.save({"w": torch.full((1000,), 3.0)}, tmp_path / "other.pt")
    files = discover(tmp_path)
    assert weight_copies(files, partial(same_weights)) == {"best.pt": ("z_adam.pt", "copy of the weights"),
                                                           "sgd_wrapped.pt": ("sgd.pt", "copy of the weights")}
    assert find_aliases(files, partial(same_weights)) == {}  # average's rule: unnumbered files against numbered ones


def test_lightnings_versioned_last_ckpt_is_no_epoch_number(tmp_path: Path) -> None:
    """Lightning names a second rolling save `last-v1.ckpt` (a resumed run, `last.ckpt` already there): the 1 is a
    version, not an epoch. It was read as one, so the file sorted between epoch 0 and epoch 1, was averaged as a
    point of the trajectory there, and counted epoch 2's weights twice. Unnumbered, it is the newest save,
    compared with the epoch files like `last.ckpt` and counted once."""
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import select_checkpoints

    def save(epoch: int, last_path: str, name: str) -> None:
        torch.save({"epoch": epoch, "global_step": 10 * epoch, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {"model.w": torch.full((1000,), float(epoch))},
                    "callbacks": {"ModelCheckpoint": {"last_model_path": last_path}}}, tmp_path / name)

    for epoch in range(3):
        save(epoch, "", f"epoch={epoch}-step={10 * epoch}.ckpt")
    save(2, "last.ckpt", "last.ckpt")  # the same weights, another callback state: not byte-identical
    save(2, "last-v1.ckpt", "last-v1.ckpt")
    chosen = select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic"))
    assert names(chosen) == ["epoch=0-step=0.ckpt", "epoch=1-step=10.ckpt", "epoch=2-step=20.ckpt"]
    assert {d.name: d.reason for d in chosen.dropped} == {
        "last.ckpt": "copy of the weights of epoch=2-step=20.ckpt",
        "last-v1.ckpt": "copy of the weights of epoch=2-step=20.ckpt"}
    save(3, "last-v1.ckpt", "last-v1.ckpt")  # newer than every epoch file kept: the end of the trajectory
    chosen = select_checkpoints(AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic"))
    assert names(chosen)[-2:] == ["epoch=2-step=20.ckpt", "last-v1.ckpt"]
    from twa_tool.checkpoints import CheckpointFile
    numbers = {n: CheckpointFile(n, tmp_path / n).numbers for n in ("last-v12.ckpt", "ft-v2.ckpt", "last-v1.pt")}
    assert numbers == {"last-v12.ckpt": (), "ft-v2.ckpt": (2,), "last-v1.pt": (1,)}  # other names: as before


def test_best_pt_identical_to_last_pt_keeps_the_newest_save(tmp_path: Path) -> None:
    """ultralytics writes the same bytes to best.pt and last.pt when the last epoch is the best one, beside
    `epoch10.pt`, `epoch20.pt` (save_period). best.pt sorted first, so last.pt was dropped as its copy ('counted
    once'), and then best.pt was left out as a best-so-far save: the newest weights were in neither, and the
    warning said they were counted. The file named as the newest save is the one kept; a copy of a file that is
    left out is left out with it, never 'counted once'."""
    write_run(tmp_path, epochs=0)
    for epoch in (10, 20):
        torch.save({"epoch": epoch, "model": {"w": torch.full((1000,), float(epoch))}}, tmp_path / f"epoch{epoch}.pt")
    torch.save({"epoch": 24, "model": {"w": torch.full((1000,), 24.0)}}, tmp_path / "last.pt")
    shutil.copyfile(tmp_path / "last.pt", tmp_path / "best.pt")
    chosen = select(discover(tmp_path), Selection())
    assert names(chosen) == ["epoch10.pt", "epoch20.pt", "last.pt"]
    assert {d.name: (d.alias_of, d.reason) for d in chosen.dropped} == {
        "best.pt": ("last.pt", "byte-identical copy of last.pt")}
    (tmp_path / "last.pt").unlink()
    torch.save({"epoch": 24, "model": {"w": torch.full((1000,), 25.0)}}, tmp_path / "last.pt")
    shutil.copyfile(tmp_path / "best.pt", tmp_path / "ema_best.pt")
    chosen = select(discover(tmp_path), Selection())
    assert names(chosen) == ["epoch10.pt", "epoch20.pt", "last.pt"]
    assert {d.name: (d.alias_of, d.reason, d.unplaced) for d in chosen.dropped} == {
        "best.pt": (None, UNPLACED, True), "ema_best.pt": (None, UNPLACED, True)}


def test_a_file_left_out_by_a_slice_names_the_flag_that_left_it_out(tmp_path: Path) -> None:
    """Every file a slice or --top-k left out read "outside --range/--every/--last/--top-k", naming flags the run
    was not given; the reason now names the one that left it out, with its value."""
    for i in range(8):
        (tmp_path / f"{i}.pt").write_bytes(bytes([i]) * 4)
    files = discover(tmp_path)
    chosen = select(files, Selection(start=1, every=2, last=3, top_k=2, by="acc", mode="max"),
                    lambda f: float(f.numbers[0]) if f.numbers[0] != 7 else 0.0)
    assert [f.name for f in chosen.files] == ["3.pt", "5.pt"]
    assert {d.name: d.reason for d in chosen.dropped} == {
        "0.pt": "outside --range 1:",
        "2.pt": "not every 2nd from the last (--every 2)", "4.pt": "not every 2nd from the last (--every 2)",
        "6.pt": "not every 2nd from the last (--every 2)",
        "1.pt": "not among the last 3 (--last 3)",
        "7.pt": "not among the 2 best by acc (--top-k 2 --by acc --mode max)",
    }
    only_last = select(files, Selection(last=2))
    assert {d.reason for d in only_last.dropped} == {"not among the last 2 (--last 2)"}
    ranged = select(files, Selection(start=-3, stop=-1))
    assert {d.reason for d in ranged.dropped} == {"outside --range -3:-1"}
