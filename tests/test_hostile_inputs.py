"""Hostile or malformed files against twa's own parsers: each one is a one-line error with the documented exit
code, never code run, a hang or a traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from twa_tool.checkpoints import sha256_file
from twa_tool.cli import cli
from twa_tool.errors import CheckpointError


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=generator), "fc.bias": torch.randn(3, generator=generator)}


def twa(*args: str) -> object:
    return CliRunner().invoke(cli, [*map(str, args)])


def one_error(result: object) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("recorded", ["module", "file", "loading-arg"])
def test_a_model_spec_recorded_in_a_checkpoint_never_runs_code(tmp_path: Path, recorded: str) -> None:
    """Without --model the architecture comes from the first checkpoint's ``twa.model`` metadata. Before, a
    file recording ``os:mkdir`` (any ``module:function``) or ``evil.py:build`` had twa import and call it,
    even for --dry-run; now only the registered builders are taken from a file, and arguments that load
    weights (timm's ``checkpoint_path`` unpickles a file) are not: exit 5, nothing runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import os\nos.mkdir({str(marker)!r})\ndef build():\n    return None\n")
    spec, args = {"module": ("os:mkdir", {"path": str(marker)}),
                  "file": (f"{evil}:build", {}),
                  "loading-arg": ("timm:resnet18", {"checkpoint_path": str(tmp_path / "evil.pt")})}[recorded]
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(3):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors",
                  metadata={"twa.model": spec, "twa.model_args": json.dumps(args)})
    result = twa("average", ckpts, "--data", "synthetic", "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 5, result.output
    assert "0.safetensors" in one_error(result) and "--model" in one_error(result)
    assert not marker.exists()
    result = twa("soup", ckpts, "--data", "synthetic", "--out", tmp_path / "out")
    assert result.exit_code == 5, result.output
    assert not marker.exists()


def test_a_recorded_model_larger_than_its_file_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Before, ``twa.model_args`` asking for a huge model (here 10^6 x 10^6 weights, 4 TB) had twa allocate it
    before any header check; now the recorded model is built on the meta device first and refused when it has
    more values than the file holds: exit 4, naming the file, the model and the fix."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(3):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors",
                  metadata={"twa.model": "twa:mlp", "twa.model_args": json.dumps({"in_features": 10**6,
                                                                                  "hidden": 10**6})})
    for command in ("average", "soup"):
        result = twa(command, ckpts, "--data", "synthetic", "--out", tmp_path / "out")
        assert result.exit_code == 4, result.output
        error = one_error(result)
        assert "0.safetensors: the model it records (twa:mlp in_features=1000000, hidden=1000000) has" in error
        assert "values but the file holds 15; pass --model and --model-arg" in error
        assert not (tmp_path / "out").exists()


def test_a_recorded_model_the_size_of_its_file_is_still_built(tmp_path: Path) -> None:
    from twa_tool.checkpoints import CheckpointFile
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import resolve_model_spec

    path = tmp_path / "0.safetensors"
    save_file({"w": torch.zeros(2, 3)}, path, metadata={"twa.model": "twa:mlp", "twa.model_args": "{}"})
    entry = CheckpointFile(path=path, name=path.name)
    config = AverageConfig(checkpoint_dir=tmp_path, out_dir=tmp_path / "o", data="synthetic")
    with pytest.raises(CheckpointError, match="the model it records"):
        resolve_model_spec(config, entry)  # twa:mlp at its defaults has far more than 6 values
    from twa_tool.models import build_model

    state = build_model("twa:mlp", (("hidden", "2"),)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path,
              metadata={"twa.model": "twa:mlp", "twa.model_args": '{"hidden": 2}'})
    assert resolve_model_spec(config, entry) == ("twa:mlp", (("hidden", "2"),))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_named_like_a_checkpoint_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    """Before, a FIFO named ``2.pt`` made ``twa inspect`` and ``twa average`` wait forever for a writer (the
    format sniff opened it); now any non-regular file is a one-line error naming it, exit 4."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors")
    if kind == "fifo":
        os.mkfifo(ckpts / "2.pt")
    else:
        (ckpts / "2.pt").symlink_to("/dev/zero")
    for command in (["inspect", ckpts], ["average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run",
                                         "--out", tmp_path / "out"]):
        run = subprocess.run([sys.executable, "-m", "twa_tool", *map(str, command)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "COLUMNS": "300"})
        assert run.returncode == 4, run.stderr
        assert "2.pt: not a regular file" in run.stderr and "Traceback" not in run.stderr


def hf_folders(root: Path, k: int = 3) -> None:
    for i in range(k):
        folder = root / f"checkpoint-{i + 1}"
        folder.mkdir(parents=True)
        save_file(tiny_state(i), folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": i + 1, "log_history": [{"step": i + 1, "loss": 0.5}]}))


@pytest.mark.parametrize("case", ["deep trainer_state", "deep index", "huge integer metric"])
def test_hostile_json_side_files_are_named_errors(tmp_path: Path, case: str) -> None:
    """Before, a ``trainer_state.json`` or index nested 100,000 deep was ``unexpected error: RecursionError`` and
    a metric of 400 digits ``unexpected error: OverflowError`` (exit 1, no file named); now the deep file is a
    one-line error naming it (exit 4) and a metric beyond float's range is not a metric."""
    ckpts = tmp_path / "ckpts"
    hf_folders(ckpts)
    folder = ckpts / "checkpoint-2"
    deep = "[" * 100_000 + "]" * 100_000
    if case == "deep trainer_state":
        (folder / "trainer_state.json").write_text(deep)
    elif case == "deep index":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(deep)
    else:
        (folder / "trainer_state.json").write_text(
            '{"global_step": 2, "log_history": [{"step": 2, "loss": 1' + "0" * 400 + ', "acc": 0.5}]}')
    result = twa("inspect", ckpts, "--json")
    if case == "huge integer metric":
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)["checkpoints"][1]
        assert row["metrics"] == {"acc": 0.5}
        return
    assert result.exit_code == 4, result.output
    assert "nested too deeply" in result.output and "Traceback" not in result.output
    result = twa("average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "checkpoint-2" in one_error(result) and "nested too deeply" in one_error(result)


@pytest.mark.parametrize("shard", ["training_args.bin", "optimizer.pt", "trainer_state.json"])
def test_an_index_naming_a_non_weight_file_as_a_shard_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 shard: str) -> None:
    """The README promises that training_args.bin and optimizer files are never unpickled. Before, an index
    naming one as a shard had it unpickled: through the safe unpickler, and fully with --trust-pickle, so a
    payload in training_args.bin ran. Now such a shard name is refused (exit 4) and nothing runs."""
    from conftest import Payload

    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWA_TEST_MARKER", str(marker))
    ckpts = tmp_path / "ckpts"
    hf_folders(ckpts)
    folder = ckpts / "checkpoint-2"
    state = tiny_state(1)
    (folder / "model.safetensors").unlink()
    torch.save({"state_dict": state, "x": Payload()}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in state}}))
    result = twa("average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--trust-pickle",
                 "--out", tmp_path / "out")
    assert not marker.exists()
    assert result.exit_code == 4, result.output
    assert f"shard name '{shard}' is not a weight file" in one_error(result)


def central_directory(data: bytes) -> list[tuple[int, str]]:
    """(offset of the central directory entry, member name) of each member of a small zip."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, position = struct.unpack("<HII", data[eocd + 10:eocd + 20])
    entries = []
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[position + 28:position + 34])
        entries.append((position, data[position + 46:position + 46 + name_len].decode()))
        position += 46 + name_len + extra_len + comment_len
    return entries


def test_a_zip_member_pointing_at_another_members_bytes_is_not_read_directly(tmp_path: Path) -> None:
    """Before, a later checkpoint whose central directory sent one storage member (with the CRC to match) to
    another member's local header passed ``ZipLayout.matches`` and was read straight into the basis, though
    the safe load (``zipfile.testzip``) refuses it; now the member table is checked like zipfile does (local
    header names, members inside the file, no overlap), so the direct read refuses it too."""
    from test_direct_reads import run, write_trajectory

    root = tmp_path / "ckpts"
    model = write_trajectory(root, k=6)
    hostile = root / "step_14.pt"
    data = bytearray(hostile.read_bytes())
    by_size: dict[int, list[int]] = {}
    for position, name in central_directory(bytes(data)):
        if "/data/" in name:
            by_size.setdefault(struct.unpack("<I", data[position + 20:position + 24])[0], []).append(position)
    first, second = next(positions for positions in by_size.values() if len(positions) > 1)[:2]
    data[second + 42:second + 46] = data[first + 42:first + 46]  # its local header offset: the other member's
    data[second + 16:second + 20] = data[first + 16:first + 20]  # and that member's CRC
    hostile.write_bytes(bytes(data))
    assert torch.load(hostile, weights_only=True)  # torch itself reads it (the same bytes twice)
    with pytest.raises(CheckpointError, match="step_14.pt: zip member .* local header disagrees"):
        run(root, model)
    with pytest.raises(CheckpointError, match="step_14.pt"):
        sha256_file(hostile, verify_zip_crc=True)


def safetensors_with(state: dict[str, torch.Tensor], edit) -> bytes:
    from safetensors.torch import save

    raw = save(state)
    length = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8:8 + length]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def negative_offset(header: dict) -> dict:
    begin, end = header["fc.weight"]["data_offsets"]
    header["fc.weight"]["data_offsets"] = [begin - 8, end - 8]
    return header


def overlapping(header: dict) -> dict:
    header["fc.bias"]["data_offsets"] = header["fc.weight"]["data_offsets"][:1] + \
        [header["fc.weight"]["data_offsets"][0] + 12]
    return header


@pytest.mark.parametrize("case", ["negative offset", "overlapping offsets", "header length 2^62", "nested header"])
def test_column_reads_of_a_safetensors_file_validate_it_first(tmp_path: Path, case: str) -> None:
    """``column_file`` (the bf16/int8 column build) read a middle safetensors file's places from its header with
    its own JSON parse, never validated: a negative or overlapping ``data_offsets`` was read (header bytes as
    weights), a header length of 2^62 asked for that much memory (MemoryError) and a deeply nested header
    was a RecursionError. A file swapped after the pre-flight check gets there. Now the file is validated as a
    load validates it: a CheckpointError naming it."""
    from twa_tool.checkpoints import column_file

    first = {k: v.float() for k, v in tiny_state(0).items()}
    path = tmp_path / "1.safetensors"
    content = {"negative offset": lambda: safetensors_with(tiny_state(1), negative_offset),
               "overlapping offsets": lambda: safetensors_with(tiny_state(1), overlapping),
               "header length 2^62": lambda: struct.pack("<Q", 2 ** 62) + b"{" + b" " * 63,
               "nested header": lambda: safetensors_with(tiny_state(1), lambda h: b"{\"a\": " + b"[" * 100_000)}[case]()
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="1.safetensors"):
        column_file(path, ["fc.weight"], first, None)


def test_a_blocked_global_in_a_legacy_pickle_is_refused_as_unsafe(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A legacy (non-zip) torch pickle calling ``os.mkdir``: torch cannot list its globals statically, and its
    refusal names a module it always blocks. Before, that was exit 4 'cannot read torch checkpoint (Weights
    only load failed. ... Re-running torch.load with weights_only set to False will likely succeed...)', torch's
    advice to load it unsafely; now it is the unsafe-global refusal (exit 5) naming the global, and nothing ran."""
    from conftest import Payload

    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWA_TEST_MARKER", str(marker))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors")
    torch.save({"state_dict": tiny_state(2), "x": Payload()}, ckpts / "2.pt", _use_new_zipfile_serialization=False)
    result = twa("average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 5, result.output
    error = one_error(result)
    assert "2.pt: refused to unpickle code objects (posix.mkdir)" in error and "weights_only" not in error
    assert not marker.exists()
    # the fix was 'allow each with --allow-global NAME', which torch refuses for posix whatever is allowed
    assert "posix.mkdir call into the operating system; no checkpoint needs these" in error
    assert "allow each with --allow-global" not in error
    allowed = twa("average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--out", tmp_path / "out",
                  "--allow-global", "posix.mkdir")
    assert allowed.exit_code == 2, allowed.output
    assert one_error(allowed).startswith("error: --allow-global posix.mkdir: torch's safe unpickler never allows the "
                                         "posix module")
    assert not marker.exists()


def test_bytes_before_a_zips_first_member_are_refused(tmp_path: Path) -> None:
    """zipfile reads an archive with bytes prepended (a self-extractor) and shifts every offset; torch refuses it.
    The direct reader's member table must refuse it too, rather than read at the shifted offsets."""
    from twa_tool.checkpoints import ZipLayout, _zip_member_ranges, zip_layout

    first, second = tmp_path / "0.pt", tmp_path / "1.pt"
    torch.save(tiny_state(0), first)
    torch.save(tiny_state(1), second)
    layout = zip_layout(first, torch.load(first, mmap=True, weights_only=True))
    assert isinstance(layout, ZipLayout) and layout.matches(second) is not None
    second.write_bytes(b"PK\x03\x04" + bytes(60) + second.read_bytes())
    with pytest.raises(CheckpointError, match="64 bytes before the zip's first member"):
        _zip_member_ranges(second)
    with pytest.raises(CheckpointError, match="before the zip's first member"):
        layout.matches(second)


@pytest.mark.parametrize("command", ["average", "soup", "inspect"])
@pytest.mark.parametrize("name, message", [
    ("posix.mkdir", "torch's safe unpickler never allows the posix module"),
    ("__main__.Net", "a class defined in the script that saved the file (__main__)"),
])
def test_an_allow_global_no_file_can_use_is_a_usage_error_without_pickle_files(
        tmp_path: Path, command: str, name: str, message: str) -> None:
    """The README: an --allow-global of os/posix/sys/nt is a usage error (torch's safe unpickler never allows them),
    and so is one of __main__. Before, the names were only checked when a pickle file was read: over safetensors
    checkpoints the same flag was accepted without a word (exit 0), over .pt files refused (exit 2)."""
    from twa_tool.models import MLP

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        save_file(MLP(hidden=4).state_dict(), ckpts / f"{i}.safetensors")
    rest = {"inspect": [], "average": ["--dry-run"], "soup": ["--epochs", "0"]}[command]
    if command != "inspect":
        rest += ["--model", "twa:mlp", "--model-arg", "hidden=4", "--data", "synthetic", "--out", tmp_path / "out"]
    result = twa(command, ckpts, *rest, "--allow-global", name)
    assert result.exit_code == 2, result.output
    assert one_error(result).startswith(f"error: --allow-global {name}: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["average", "soup", "inspect"])
def test_a_loop_of_symlinks_named_like_a_checkpoint_is_an_input_error(tmp_path: Path, command: str) -> None:
    """Two links named like checkpoints pointing at each other: Path.resolve raised 'RuntimeError: Symlink loop'
    (OSError ELOOP from Python 3.13) and every command ended in 'unexpected error' (exit 1, 'a bug'). It is the
    file's fault, as a link to nothing is: exit 4 naming the link and --exclude; excluded, the run goes on."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors")
    os.symlink(ckpts / "3.safetensors", ckpts / "2.safetensors")
    os.symlink(ckpts / "2.safetensors", ckpts / "3.safetensors")
    run = [] if command == "inspect" else ["--model", "twa:mlp", "--data", "synthetic", "--out", tmp_path / "out"]
    result = twa(command, ckpts, *run, *(["--dry-run"] if command == "average" else []))
    assert result.exit_code == 4, result.output
    assert f"{ckpts / '2.safetensors'}: a symlink loop (2.safetensors -> {ckpts / '3.safetensors'} -> ... never " \
           f"reaches a file); remove the link or pass --exclude 2.safetensors" in one_error(result)
    excluded = twa("inspect", ckpts, "--exclude", "2.safetensors", "--exclude", "3.safetensors")
    assert excluded.exit_code == 0, excluded.output


PERMISSION_CASES = """
import json, sys
from click.testing import CliRunner
from twa_tool.cli import cli
results = {}
for name, args in json.loads(sys.argv[1]).items():
    result = CliRunner().invoke(cli, args)
    results[name] = [result.exit_code, [line for line in result.stderr.splitlines() if "error" in line]]
print(json.dumps(results))
"""


def test_what_this_user_may_not_read_is_a_one_line_input_or_output_error(tmp_path: Path) -> None:
    """Files and folders the user may not read (chmod 000) were 'unexpected error: PermissionError' (exit 1, 'a
    bug') for a checkpoint, a checkpoint-<step>/ folder, --data-root, imagefolder:PATH, --base and an --out to
    replace; and click's own check made an unreadable CHECKPOINT_DIR, --base or --data-root a usage error (exit 2)
    where a missing one is exit 4. Each is one line naming the path and the fix: exit 4 for an input, 7 for --out.
    Run as root without the capabilities that bypass file permissions (setpriv), as root reads everything."""
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every file, and setpriv is not here to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    from twa_tool.models import build_model

    def mlp(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model("twa:mlp").state_dict()

    ckpts = tmp_path / "ckpts"
    (ckpts / "checkpoint-9").mkdir(parents=True)
    for i in range(3):
        save_file(mlp(i), ckpts / f"{i}.safetensors")
    save_file(mlp(9), ckpts / "checkpoint-9" / "model.safetensors")
    closed = {name: tmp_path / name for name in ("closed_ckpts", "closed_root", "closed_out", "base.safetensors")}
    shutil.copytree(ckpts, closed["closed_ckpts"])
    closed["closed_root"].mkdir()
    closed["closed_out"].mkdir()
    save_file(mlp(7), closed["base.safetensors"])
    run = ["--model", "twa:mlp", "--data", "synthetic", "--out", str(tmp_path / "out")]
    cases = {
        "file": (["average", str(ckpts), *run, "--dry-run"], 4, f"{ckpts / '1.safetensors'}: permission denied "
                 f"reading it; make it readable (chmod a+r) or pass --exclude 1.safetensors"),
        "file soup": (["soup", str(ckpts), *run], 4, f"{ckpts / '1.safetensors'}: permission denied"),
        "file inspect": (["inspect", str(ckpts)], 4, "2 of the 4 selected checkpoints cannot be read (first: "
                         f"{ckpts / '1.safetensors'}: permission denied"),
        "folder": (["inspect", str(closed["closed_ckpts"])], 4, f"{closed['closed_ckpts']}: permission denied "
                   "listing the folder"),
        "data-root": (["average", str(ckpts), "--exclude", "1.safetensors", "--exclude", "checkpoint-9", *run,
                       "--data", "cifar10", "--data-root", str(closed["closed_root"]), "--dry-run"], 4,
                      "--data cifar10: permission denied reading"),
        "imagefolder": (["average", str(ckpts), "--exclude", "1.safetensors", "--exclude", "checkpoint-9", *run,
                         "--data", f"imagefolder:{closed['closed_root']}", "--dry-run"], 4,
                        f"--data imagefolder:{closed['closed_root']}: permission denied reading"),
        "base": (["soup", str(ckpts), "--exclude", "1.safetensors", "--exclude", "checkpoint-9", *run, "--base",
                  str(closed["base.safetensors"])], 4, f"--base {closed['base.safetensors']}: permission denied"),
        "out": (["average", str(ckpts), "--exclude", "1.safetensors", "--exclude", "checkpoint-9", *run[:-1],
                 str(closed["closed_out"]), "--overwrite", "--dry-run"], 7,
                f"{closed['closed_out']}: permission denied (this user may not read or enter it); choose another "
                f"--out"),
    }
    (ckpts / "1.safetensors").chmod(0)
    (ckpts / "checkpoint-9").chmod(0)
    for path in closed.values():
        path.chmod(0)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", PERMISSION_CASES,
                               json.dumps({name: args for name, (args, _, _) in cases.items()})],
                              capture_output=True, text=True, timeout=300)
    finally:
        for path in (ckpts / "1.safetensors", ckpts / "checkpoint-9", *closed.values()):
            path.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, (_, code, text) in cases.items():
        exit_code, errors = results[name]
        assert (name, exit_code) == (name, code), errors
        assert len(errors) == 1 and errors[0].startswith(f"error: {text}"), (name, errors)
    inspect_folder = results["file inspect"]
    assert "checkpoint-9" not in inspect_folder[1][0]  # the first unreadable one is named, in selection order


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_whose_name_is_not_utf8_is_told_to_be_renamed_not_re_saved(tmp_path: Path, suffix: str) -> None:
    """The safetensors library and torch.load open only UTF-8 paths: a checkpoint named in another encoding (a
    Latin-1 name from an old archive) was 'unreadable safetensors file (Path ... is not valid UTF-8); re-save or
    remove it' / 'cannot read torch checkpoint (... surrogates not allowed); the file may be truncated': the advice
    for a damaged file. Still exit 4, now saying what to change: the name."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        save_file(tiny_state(i), ckpts / f"{i}.safetensors")
    odd = os.fsdecode(os.fsencode(str(ckpts)) + b"/2-\xe9t\xe9" + suffix.encode())
    try:
        if suffix == ".pt":
            torch.save(tiny_state(2), odd)
        else:
            save_file(tiny_state(2), ckpts / "2.safetensors")
            os.rename(ckpts / "2.safetensors", odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    result = twa("average", ckpts, "--model", "twa:mlp", "--data", "synthetic", "--dry-run", "--out", tmp_path / "o")
    assert result.exit_code == 4, result.output
    library = "torch" if suffix == ".pt" else "safetensors"
    error = one_error(result)  # the name as the console can print it (the undecodable bytes escaped)
    assert error.startswith(f"error: {ckpts}/2-") and error.endswith(
        f"{suffix}: its path is not valid UTF-8, which the {library} library cannot open; rename the file (or the "
        f"folder holding it) to a UTF-8 name"), error
    listed = twa("inspect", ckpts, "--json")
    assert listed.exit_code == 4 and "not valid UTF-8" in json.loads(listed.stdout)["checkpoints"][-1]["error"]


@pytest.mark.parametrize("where, code", [("--out", 7), ("CHECKPOINT_DIR", 4), ("--base", 4), ("--data-root", 4),
                                         ("imagefolder", 4), ("--model", 2), ("--data", 2)])
def test_a_path_with_a_name_too_long_for_the_file_system_is_a_one_line_error(tmp_path: Path, where: str,
                                                                               code: int) -> None:
    """A path with a name over 255 bytes (a generated run name, say) made the file system refuse it (ENAMETOOLONG)
    and every command end in 'unexpected error: OSError: [Errno 36] File name too long' (exit 1), or 'building the
    model failed' (4) for --model. One line naming the path: an output's is exit 7, an input's 4, and a --model or
    --data file, a spec that names nothing there, a usage error (2) as a missing one is."""
    from twa_tool.models import build_model

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        save_file(build_model("twa:mlp").state_dict(), ckpts / f"{i}.safetensors")
    long = tmp_path / ("a" * 300)
    command, source = ["average", ckpts], ["--model", "twa:mlp", "--data", "synthetic"]
    out = ["--out", tmp_path / "o", "--dry-run"]
    flag = f"--data {source[-1]}: "
    if where == "--out":
        out, flag = ["--out", long, "--dry-run"], ""
    elif where == "CHECKPOINT_DIR":
        command, flag = ["inspect", long], ""
        source = out = []
    elif where == "--base":
        command, out, flag = ["soup", ckpts], ["--out", tmp_path / "o", "--base", long], f"--base {long}: "
    elif where == "--data-root":
        source, flag = ["--model", "twa:mlp", "--data", "cifar10", "--data-root", long], "--data cifar10: "
    elif where == "imagefolder":
        source = ["--model", "twa:mlp", "--data", f"imagefolder:{long}"]
        flag = f"--data imagefolder:{long}: "
    elif where == "--model":
        source, flag = ["--model", f"{long}.py:make", "--data", "synthetic"], f"--model {long}.py:make: "
    else:
        source, flag = ["--model", "twa:mlp", "--data", f"{long}.py:data"], f"--data {long}.py:data: "
    result = twa(*command, *source, *out)
    assert result.exit_code == code, result.output
    error = one_error(result)
    assert error.startswith(f"error: {flag}") and str(long) in error, error
    assert "a name in this path is longer than the file system allows (255 bytes on most)" in error
