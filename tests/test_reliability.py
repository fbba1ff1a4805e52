"""The reliability checklist (../shared/reference/reliability.md section 6) through the CLI.

Every bad-input case checks the universal promise: the documented exit code, one error line naming
the file and the reason, no traceback, inputs byte-identical, a pre-existing output byte-identical,
no temp leftovers, no file created by a payload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import Payload, assert_refused_cleanly, model_flags
from safetensors.torch import load_file, save_file

from twa_tool.cli import cli

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--baselines", "none"]


def good(demo_ckpts: Path, i: int) -> dict[str, torch.Tensor]:
    return load_file(demo_ckpts / f"{i}.safetensors")


def st_bytes(sd: dict) -> bytes:
    from safetensors.torch import save

    return save(sd)


def with_header(sd: dict, edit: Callable[[dict], dict]) -> bytes:
    raw = st_bytes(sd)
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def case_payload_named_safetensors(root: Path, demo: Path) -> None:
    torch.save({"state_dict": good(demo, 2), "x": Payload()}, root / "2.safetensors")


def case_payload_named_bin(root: Path, demo: Path) -> None:
    torch.save({"state_dict": good(demo, 2), "x": Payload()}, root / "2.bin")


def case_empty(root: Path, demo: Path) -> None:
    (root / "2.pt").write_bytes(b"")


def case_truncated_zip(root: Path, demo: Path) -> None:
    torch.save(good(demo, 2), root / "2.pt")
    data = (root / "2.pt").read_bytes()
    (root / "2.pt").write_bytes(data[: len(data) // 2])


def case_truncated_safetensors(root: Path, demo: Path) -> None:
    (root / "2.safetensors").write_bytes(st_bytes(good(demo, 2))[:-100])


def case_junk_appended(root: Path, demo: Path) -> None:
    (root / "2.safetensors").write_bytes(st_bytes(good(demo, 2)) + b"\0" * 16)


def case_huge_header(root: Path, demo: Path) -> None:
    raw = st_bytes(good(demo, 2))
    (root / "2.safetensors").write_bytes(struct.pack("<Q", 200 << 20) + raw[8:])


def case_header_2_63(root: Path, demo: Path) -> None:
    raw = st_bytes(good(demo, 2))
    (root / "2.safetensors").write_bytes(struct.pack("<Q", 2 ** 63) + raw[8:])


def case_metadata_not_string(root: Path, demo: Path) -> None:
    (root / "2.safetensors").write_bytes(with_header(good(demo, 2), lambda h: {**h, "__metadata__": {"a": 1}}))


def case_missing_key(root: Path, demo: Path) -> None:
    sd = good(demo, 2)
    del sd["features.1.running_var"]
    save_file(sd, root / "2.safetensors")


def case_inf(root: Path, demo: Path) -> None:
    sd = good(demo, 2)
    sd["features.0.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, root / "2.safetensors")


def case_only_duplicates(root: Path, demo: Path) -> None:
    shutil.copy(root / "1.safetensors", root / "2.safetensors")
    (root / "3.safetensors").unlink()


def case_dependent(root: Path, demo: Path) -> None:
    save_file(good(demo, 1), root / "2.safetensors", metadata={"copy": "same weights, other bytes"})
    (root / "3.safetensors").unlink()


def case_only_unsupported(root: Path, demo: Path) -> None:
    for path in list(root.iterdir()):
        path.unlink()
    (root / "notes.txt").write_text("x")
    (root / "optimizer.pt").write_bytes(b"never read")


CASES = {
    "payload-as-.safetensors (row 3)": (case_payload_named_safetensors, 5, "2.safetensors: refused to unpickle"),
    "payload-as-.bin (row 3)": (case_payload_named_bin, 5, "2.bin: refused to unpickle"),
    "empty file (row 4)": (case_empty, 4, "2.pt"),
    "truncated zip (row 5)": (case_truncated_zip, 4, "2.pt"),
    "truncated safetensors (row 6)": (case_truncated_safetensors, 4, "2.safetensors"),
    "junk appended (row 6)": (case_junk_appended, 4, "2.safetensors"),
    "header 200 MB (row 7)": (case_huge_header, 4, "2.safetensors"),
    "header 2^63 (row 7)": (case_header_2_63, 4, "2.safetensors"),
    "metadata not a string (row 9)": (case_metadata_not_string, 4, "2.safetensors"),
    "missing key (row 16)": (case_missing_key, 4, "(first: 2.safetensors)"),
    "+Inf (row 20)": (case_inf, 6, "2.safetensors: tensor features.0.weight has non-finite values"),
    "only duplicates (row 21)": (case_only_duplicates, 4,
                                 "(1 of them links or byte-identical copies of others, counted once); TWA needs"),
    "dependent (row 21)": (case_dependent, 6, "linearly independent"),
    "only unsupported files (row 28)": (case_only_unsupported, 4, "no checkpoints found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_keeps_the_universal_promise(case: str, demo_ckpts: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    build, code, text = CASES[case]
    monkeypatch.setenv("TWA_TEST_MARKER", str(tmp_path / "pwned"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # row 2: must not weaken the loader
    root = tmp_path / "ckpts"
    root.mkdir()
    for i in (1, 3):
        shutil.copy(demo_ckpts / f"{i}.safetensors", root / f"{i}.safetensors")
    build(root, demo_ckpts)
    result = assert_refused_cleanly(root, tmp_path, code, text, FAST)
    if case.startswith("missing key"):
        assert "2.safetensors  features.1.running_var  missing" in result.stderr  # the compact table


def case_crc_mismatch(root: Path, demo: Path) -> None:
    import zipfile

    torch.save(good(demo, 2), root / "2.pt")
    data = bytearray((root / "2.pt").read_bytes())
    with zipfile.ZipFile(root / "2.pt") as zf:
        member = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 8)
    # one byte of a tensor flipped (after the local header's own extra field): the zip is intact, its CRC is not
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + 4] ^= 0xFF
    (root / "2.pt").write_bytes(bytes(data))


def case_not_a_state_dict(root: Path, demo: Path) -> None:
    torch.save([1, 2, 3], root / "2.pt")


UNREADABLE = {
    "truncated zip": (case_truncated_zip, "2.pt: corrupt torch checkpoint"),
    "CRC mismatch": (case_crc_mismatch, "2.pt: CRC mismatch in zip member"),
    "not a state dict": (case_not_a_state_dict, "2.pt: no state dict found (the file holds a list"),
    "truncated safetensors": (case_truncated_safetensors, "2.safetensors: unreadable safetensors file"),
}


@pytest.mark.parametrize("command", ["average", "soup"])
@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_checkpoint_names_the_exclude_that_leaves_it_out(case: str, command: str, demo_ckpts: Path,
                                                                       tmp_path: Path) -> None:
    """A corrupt file among the checkpoints (fine-tunes) was one line naming it and 're-save or remove it': the
    other way out, `--exclude NAME` (both commands take it), was left to the user to find. Now the line ends with
    it, with the file's own name, and that flag does leave the file out."""
    build, text = UNREADABLE[case]
    root = tmp_path / "ckpts"
    root.mkdir()
    for i in (1, 3, 4):
        shutil.copy(demo_ckpts / f"{i}.safetensors", root / f"{i}.safetensors")
    build(root, demo_ckpts)
    name = next(p.name for p in root.iterdir() if p.name.startswith("2."))
    args = [command, str(root), *model_flags(), *FAST[:4], "--threads", "1"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert errors[0].endswith(f", or leave it out with --exclude {name}"), errors[0]
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, [*args, "--exclude", name, "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output


def test_non_weight_files_beside_weights_are_ignored(demo_ckpts: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 15: training_args.bin, zero_to_fp32.py, rng_state.pth are never unpickled or imported."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWA_TEST_MARKER", str(marker))
    root = tmp_path / "ckpts"
    shutil.copytree(demo_ckpts, root)
    torch.save({"x": Payload()}, root / "training_args.bin")
    torch.save({"x": Payload()}, root / "rng_state.pth")
    (root / "zero_to_fp32.py").write_text(f"import os; os.mkdir({str(marker)!r})")
    result = CliRunner().invoke(cli, ["average", str(root), *FAST, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_output_symlink_is_replaced_not_followed(demo_ckpts: Path, tmp_path: Path) -> None:
    """Row 26: the link is replaced (with --overwrite); its target is untouched."""
    important = tmp_path / "important.bin"
    important.write_bytes(b"precious")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(important, out / "model.safetensors")
    refused = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(out)])
    assert refused.exit_code == 7
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert important.read_bytes() == b"precious"
    assert not (out / "model.safetensors").is_symlink()


def test_sigterm_while_writing_removes_the_temp_file(demo_ckpts: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """F2: SIGTERM during the write exits 143, the temp file is removed, the old output is intact."""
    import twa_tool.writer as writer

    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    original = writer.save_file

    def interrupted(tensors, path, metadata):
        original(tensors, path, metadata)
        assert Path(path).exists()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(writer, "save_file", interrupted)
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(out), "--overwrite"])
    assert result.exit_code == 143, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"old"


def test_file_size_limit_fails_cleanly(tmp_path: Path) -> None:
    """F3: EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored) gives a clear error, no partial file, no temp."""
    script = f"""
import resource, signal, sys, torch
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from twa_tool.writer import save_safetensors
from twa_tool.errors import OutputError
try:
    save_safetensors(Path({str(tmp_path)!r}) / "m.safetensors", {{"w": torch.zeros(1_000_000)}}, {{}})
except OutputError as err:
    print(err); sys.exit(7)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "m.safetensors: cannot write" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_refused_before_work(demo_ckpts: Path, tmp_path: Path) -> None:
    """F5: an output path whose parent is not a directory fails before any heavy work."""
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(tmp_path / "file" / "o")])
    assert result.exit_code == 7 and "is not a directory" in result.stderr
    assert "reading checkpoints" not in result.stderr


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_through_a_dangling_symlink_is_refused_before_work(demo_ckpts: Path, tmp_path: Path,
                                                                   below: str) -> None:
    """An --out that is (or lies under) a symlink to a missing folder is named with its target in the dry run
    and the run (exit 7), not 'File exists' from mkdir after the work; the link is left as it was."""
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    out = tmp_path / "out" / below if below else tmp_path / "out"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--out", str(out), *extra])
        assert result.exit_code == 7, result.output
        assert f"{tmp_path / 'out'} is a symlink to {tmp_path / 'missing'}, which does not exist" in result.stderr
        assert "reading checkpoints" not in result.stderr
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "missing").exists()


def test_basis_that_does_not_fit_falls_back_to_host_memory(demo_ckpts: Path, tmp_path: Path) -> None:
    """F9, simulated on CPU: an OOM placing the basis keeps it in host memory; the result is identical."""
    args = ["average", str(demo_ckpts), *FAST, "--device", "cpu"]
    plain = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    faulty = CliRunner().invoke(cli, [*args, "--fault", "oom-basis", "--out", str(tmp_path / "b")])
    assert plain.exit_code == faulty.exit_code == 0, faulty.output
    assert "does not fit on cpu; keeping it in host memory" in faulty.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_sigkill_during_the_write_then_a_clean_rerun(demo_ckpts: Path, tmp_path: Path) -> None:
    """F1: kill -9 while the temp file exists: the old output is intact; a rerun removes the stale temp."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    args = [sys.executable, "-m", "twa_tool", "average", str(demo_ckpts), *FAST, "--out", str(out), "--overwrite"]
    proc = subprocess.Popen([*args, "--fault", "pause-write"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(out.glob(".twa-tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(out.glob(".twa-tmp-*")), "the run never reached the write"
    proc.kill()
    proc.wait(timeout=30)
    assert (out / "model.safetensors").read_bytes() == b"old"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.glob(".twa-tmp-*"))
    load_file(out / "model.safetensors")


class Config:
    """Pickled as ``__main__.Config``, as a class defined in a training script is (see the test below)."""

    def __init__(self) -> None:
        self.lr = 0.1


def test_a_class_of_the_saving_script_gets_the_fix_that_works(demo_ckpts: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch.save({"model": ..., "config": Config()})` in a training script pickles `__main__.Config`, which no
    other program can import: the refusal advised --allow-global __main__.Config (exit 2, "cannot import it") and
    --trust-pickle (exit 4, "run twa where that code is importable"). Each now gives the fix that works."""
    import __main__

    monkeypatch.setattr(Config, "__module__", "__main__")
    monkeypatch.setattr(__main__, "Config", Config, raising=False)
    root = tmp_path / "ckpts"
    root.mkdir()
    for i in (1, 2):
        torch.save({"model": good(demo_ckpts, i), "config": Config()}, root / f"{i}.pt")
    monkeypatch.delattr(__main__, "Config")  # as in twa's process: its __main__ is not the training script
    args = ["average", str(root), *model_flags(), *FAST, "--out", str(tmp_path / "o")]
    fix = "load it where that class is defined (the training script) and save the state dict alone"
    for extra, code in (([], 5), (["--allow-global", "__main__.Config"], 2), (["--trust-pickle"], 4)):
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == code, result.output
        assert fix in result.stderr and "pass --trust-pickle" not in result.stderr, result.stderr
        assert not (tmp_path / "o").exists()


def test_unknown_class_in_hparams_needs_an_explicit_allow(demo_ckpts: Path, tmp_path: Path) -> None:
    """Row 13: a Lightning-like checkpoint whose hparams hold a class is refused naming it, never loaded by a
    silent fallback; --allow-global for exactly that name loads it."""
    root = tmp_path / "ckpts"
    root.mkdir()
    for i in (1, 2):
        torch.save({"state_dict": {f"model.{k}": v for k, v in good(demo_ckpts, i).items()}, "epoch": i,
                    "global_step": i, "hyper_parameters": {"loss": torch.nn.MSELoss()}}, root / f"epoch={i}.ckpt")
    args = ["average", str(root), *model_flags(), *FAST, "--out", str(tmp_path / "o")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 5
    assert "torch.nn.modules.loss.MSELoss" in refused.stderr and "--allow-global" in refused.stderr
    allowed = CliRunner().invoke(cli, [*args, "--allow-global", "torch.nn.modules.loss.MSELoss"])
    assert allowed.exit_code == 0, allowed.output
    bad_name = CliRunner().invoke(cli, [*args, "--allow-global", "no.such.Thing", "--overwrite"])
    assert bad_name.exit_code == 2 and "--allow-global no.such.Thing: cannot import it" in bad_name.stderr


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_through_a_symlink_loop_is_refused_before_work(demo_ckpts: Path, tmp_path: Path, below: str) -> None:
    """An --out that is (or lies under) a symlink loop was 'unexpected error: RuntimeError: Symlink loop' (exit 1,
    from resolve()); it is refused like a dangling link (exit 7, the link named), for average, soup and demo."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    out = tmp_path / "a" / below if below else tmp_path / "a"
    for command in (["average", str(demo_ckpts), *FAST, "--dry-run"],
                    ["soup", str(demo_ckpts), "--data", "synthetic"], ["demo", "--train-epochs", "1"]):
        result = CliRunner().invoke(cli, [*command, "--out", str(out)])
        assert result.exit_code == 7, result.output
        assert f"{tmp_path / 'a'} is a symlink loop" in result.stderr and "Traceback" not in result.output


def _in_a_child(script: str, path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (with ``path`` as ``p``) in a fresh interpreter: a SIGBUS would kill pytest itself."""
    return subprocess.run([sys.executable, "-c", f"from pathlib import Path\np = Path({str(path)!r})\n{script}"],
                          capture_output=True, text=True, timeout=120)


def test_a_loaded_safetensors_checkpoint_survives_its_file_being_truncated(tmp_path: Path) -> None:
    # the run holds the last checkpoint for the whole run: a trainer rewriting that file (truncated first) killed it
    # with SIGBUS (exit 135, no line, an empty --out left), since safe_open's tensors map the file
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}, str(path))
    proc = _in_a_child("from twa_tool.checkpoints import load_checkpoint\n"
                       "state = load_checkpoint(p).state\n"
                       "open(p, 'r+b').truncate(64)\n"
                       "print(float(state['w'].sum()), float(state['b'].sum()))", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(float(sum(range(1 << 20)))), "3.0"]


@pytest.mark.parametrize("mapped", [False, True])
def test_the_kept_torch_zip_checkpoint_survives_its_file_being_truncated(tmp_path: Path, mapped: bool) -> None:
    # torch.load(mmap=True) maps a torch zip: the state a run keeps to its end (the last checkpoint) is read into
    # memory (``mapped=False``), so a trainer truncating that file (torch.save rewrites last.ckpt in place) no
    # longer kills it, neither after nor during that load
    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3)}, path)
    proc = _in_a_child("from twa_tool.checkpoints import load_checkpoint\n"
                       f"state = load_checkpoint(p, mapped={mapped}).state\n"
                       "open(p, 'r+b').truncate(64)\n"
                       "print(float(state['w'].sum()), float(state['b'].sum()))", path)
    if mapped:  # what the copy prevents: the mapping's next access past the new end is SIGBUS
        assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(float(sum(range(1 << 20)))), "3.0"]


def test_a_checkpoint_truncated_while_hashed_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(os.urandom(3 << 20))
    proc = _in_a_child("import hashlib\n"
                       "from twa_tool import checkpoints\n"
                       "from twa_tool.errors import CheckpointError\n"
                       "class Truncating:\n"
                       "    def __init__(self): self.inner = hashlib.sha256()\n"
                       "    def update(self, data): self.inner.update(data); open(p, 'r+b').truncate(1 << 20)\n"
                       "    def hexdigest(self): return self.inner.hexdigest()\n"
                       "checkpoints.hashlib = type('H', (), {'sha256': staticmethod(Truncating)})\n"
                       "try:\n"
                       "    checkpoints.sha256_file(p)\n"
                       "except CheckpointError as err:\n"
                       "    print(err)", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: changed while it was read") and "re-copy or remove it" in proc.stdout
