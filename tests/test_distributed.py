"""`twa average` under torchrun (2 processes, gloo on CPU) against one process, and the sharding parts alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import model_flags
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from twa_tool.cli import cli
from twa_tool.distributed import Dist, RankBatches, RankStride
from twa_tool.pipeline import _column_parts
from twa_tool.subspace import BasisBuilder

#: lr small enough that the 40 steps are not chaotic: a chaotic trajectory (the default lr 2 on this tiny
#: model) amplifies float reordering to ~1e-3 whatever the implementation.
ARGS = ["--data", "synthetic", "--device", "cpu", "--threads", "1", "--epochs", "2", "--batch-size", "99",
        "--lr", "0.05", "--baselines", "last,swa", "--json", "-q"]


def twa(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--max-restarts=0"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "twa_tool", "average", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for n in (1, 2):
        started = time.monotonic()
        proc = twa([str(demo_ckpts), *model_flags(), *ARGS, "--out", str(root / f"n{n}")], nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = {"dir": root / f"n{n}", "stdout": proc.stdout, "stderr": proc.stderr,
                  "seconds": time.monotonic() - started}
    return out


def test_two_processes_match_one(runs: dict) -> None:
    one, two = (load_file(runs[n]["dir"] / "model.safetensors") for n in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key].double(), two[key].double()
        assert torch.linalg.vector_norm(a - b) <= 1e-5 * torch.linalg.vector_norm(a) + 1e-12, key
    r1, r2 = (json.loads((runs[n]["dir"] / "report.json").read_text()) for n in (1, 2))
    assert r1["train"]["steps"] == r2["train"]["steps"] == 2 * 21  # 2000 examples in global batches of 99
    for method in ("last", "swa", "twa"):
        assert r2["metrics"][method]["count"] == r1["metrics"][method]["count"] == 500
        assert r2["metrics"][method]["accuracy"] == pytest.approx(r1["metrics"][method]["accuracy"], abs=1e-9)
        assert r2["metrics"][method]["loss"] == pytest.approx(r1["metrics"][method]["loss"], rel=1e-5)
    # the coefficients over nearby checkpoints are a = R^-1 beta: R^-1 amplifies float32 rounding of the
    # basis (the ranks sum their Gram partials in another order) to ~3e-5 relative on the smallest ones
    assert r2["coefficients"] == pytest.approx(r1["coefficients"], rel=1e-4, abs=1e-5)
    assert r2["basis"]["rank"] == r1["basis"]["rank"] and r2["basis"]["orthonormality_error"] < 1e-5


def test_each_rank_holds_half_of_the_basis(runs: dict) -> None:
    r1, r2 = (json.loads((runs[n]["dir"] / "report.json").read_text()) for n in (1, 2))
    assert "distributed" not in r1
    dist = r2["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert sum(dist["columns_per_rank"]) == dist["dim"] == r1["model"]["parameters"]
    per_rank, whole = dist["basis_bytes_per_rank"], r1["basis"]["bytes"]
    assert sum(per_rank) == whole == r2["basis"]["bytes"]
    assert all(abs(b - whole / 2) <= 4 * r1["basis"]["rank"] for b in per_rank)  # within one column


def test_only_rank_zero_talks_and_writes(runs: dict) -> None:
    report = json.loads(runs[2]["stdout"])  # exactly one JSON document: rank 1 printed nothing
    assert report["distributed"]["world_size"] == 2
    assert sorted(p.name for p in runs[2]["dir"].iterdir()) == sorted(p.name for p in runs[1]["dir"].iterdir())


def test_a_dead_rank_fails_the_run_cleanly(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    proc = twa([str(demo_ckpts), *model_flags(), *ARGS, "--out", str(out), "--fault", "kill-rank1",
                "--dist-timeout", "30"], nproc=2, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 90
    assert not out.exists() or list(out.iterdir()) == []  # no model, no report, no temp file
    assert "exitcode  : 13" in proc.stderr  # torchrun names the rank that died


def test_rank_zero_failure_fails_every_rank(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    proc = twa([str(demo_ckpts), *model_flags(), *ARGS, "--out", str(out), "--dist-timeout", "30"], nproc=2,
               timeout=120)
    assert proc.returncode != 0
    assert "already exists; pass --overwrite" in proc.stderr
    assert "rank 1: error: rank 0 failed" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == b"previous"


def test_start_passes_torchrun_as_the_readme_says(demo_ckpts: Path, tmp_path: Path) -> None:
    """torchrun's parser refuses --start (a prefix of its --start-method) anywhere on the line; the README's form
    (`-m -- twa_tool`) passes it to twa, and 2 ranks then match one process from the last checkpoint."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "-m -- twa_tool average ... --start last" in readme
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    args = ["average", str(demo_ckpts), *model_flags(), *ARGS, "--epochs", "1", "--start", "last"]
    plain = subprocess.run([*torchrun, "-m", "twa_tool", *args, "--out", str(tmp_path / "x")], capture_output=True,
                           text=True, env=env, timeout=240)
    assert plain.returncode == 2 and "ambiguous option: --start" in plain.stderr  # torchrun's, before twa runs
    one = subprocess.run([sys.executable, "-m", "twa_tool", *args, "--out", str(tmp_path / "n1")],
                         capture_output=True, text=True, env=env, timeout=240)
    two = subprocess.run([*torchrun, "-m", "--", "twa_tool", *args, "--out", str(tmp_path / "n2")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    assert r1["config"]["start"] == r2["config"]["start"] == "last"
    assert r2["distributed"]["world_size"] == 2
    assert r2["coefficients"] == pytest.approx(r1["coefficients"], rel=1e-4, abs=1e-5)
    assert r2["metrics"]["twa"]["accuracy"] == pytest.approx(r1["metrics"]["twa"]["accuracy"], abs=1e-9)


def test_a_failed_gate_under_torchrun_writes_and_reads_as_the_readme_says(demo_ckpts: Path, tmp_path: Path) -> None:
    """Every rank exits 3 on a failed gate, rank 0 writes the outputs once, and torchrun itself exits 1: the
    README must say so, since a CI job reading the launcher's code cannot tell the gate from a crash."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`torchrun` itself exits 1" in readme and "quality_gate.passed" in readme
    out = tmp_path / "out"
    proc = twa([str(demo_ckpts), *model_flags(), *ARGS, "--epochs", "1", "--lr", "0.0001", "--baselines",
                "last,best,swa", "--fail-if-worse-than", "best", "--tolerance", "0", "--out", str(out)], nproc=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(re.findall(r"exitcode\s*: 3 ", proc.stderr)) == 2  # both ranks exited 3
    assert proc.stderr.count("error: quality gate failed:") == 1  # rank 0 alone printed it
    report = json.loads((out / "report.json").read_text())
    assert report["quality_gate"]["passed"] is False and report["distributed"]["world_size"] == 2
    assert "Quality gate vs best" in (out / "report.md").read_text()
    assert sorted(Path(p).name for p in report["outputs"]["human"]) == sorted(
        p.name for p in out.iterdir() if p.suffix in (".md", ".png"))


# ---------------------------------------------------------------------------------------------
# The parts, without processes


def test_sharded_build_equals_the_whole_build() -> None:
    """Two column shards built in lockstep (threads summing their inner products) give the column slices of
    the single build: same kept/dropped, same R, same rows."""
    torch.manual_seed(0)
    base = torch.randn(1001)
    vectors = [base + 0.01 * torch.randn(1001).cumsum(0) * i for i in range(7)]
    vectors.insert(4, vectors[2].clone())  # a duplicate: dropped
    vectors.append(0.5 * vectors[1] + 0.5 * vectors[3])  # a combination: dropped
    whole = BasisBuilder(capacity=len(vectors), block=3, track_mean=True)
    for v in vectors:
        whole.push(v)
    reference = whole.finish()

    barrier, slots = threading.Barrier(2), [None, None]

    def summed(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    results: list = [None, None]

    def build(rank: int) -> None:
        columns = Dist(rank=rank, world_size=2).columns(1001)
        builder = BasisBuilder(capacity=len(vectors), block=3, track_mean=True, reduce=summed(rank))
        for v in vectors:
            builder.push(_column_parts([v[:400], v[400:]], columns))
        results[rank] = (columns, builder.mean(), builder.finish())

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for columns, mean, shard in results:
        assert shard.kept == reference.kept and shard.dropped == reference.dropped == (4, 8)
        # R to float32 rounding of its scale (the checkpoints' norms): the shards sum their Gram partials
        # in another order than the whole build does
        assert torch.allclose(shard.r, reference.r, rtol=1e-6, atol=1e-6 * reference.r.abs().max())
        assert torch.allclose(shard.basis.values, reference.basis.values[:, columns], atol=1e-6)
        assert torch.allclose(mean, torch.stack(vectors).double().mean(0)[columns])
    assert results[0][0] == slice(0, 501) and results[1][0] == slice(501, 1001)


def test_rank_batches_partition_the_single_process_batches() -> None:
    data = TensorDataset(torch.arange(23.0), torch.arange(23))
    single = [b[1].tolist() for b in DataLoader(data, batch_size=5, shuffle=True,
                                                generator=torch.Generator().manual_seed(3))]
    parts = []
    for rank in range(3):  # built as pipeline._loader builds it: the same generator drives the same draws
        generator = torch.Generator().manual_seed(3)
        sampler = RankBatches(BatchSampler(RandomSampler(data, generator=generator), 5, False),
                              Dist(rank=rank, world_size=3))
        parts.append([b[1].tolist() for b in DataLoader(data, batch_sampler=sampler, generator=generator)])
        assert len(sampler) == len(single)
    assert [sum((p[i] for p in parts), []) for i in range(len(single))] == single
    assert [len(p[-1]) for p in parts] == [1, 1, 1]  # the last batch of 3 split evenly
    strided = [list(RankStride(BatchSampler(range(23), 5, False), Dist(rank=r, world_size=2))) for r in range(2)]
    assert [len(s) for s in strided] == [3, 2] and sorted(sum(strided[0] + strided[1], [])) == list(range(23))


def test_a_rank_that_never_joins_is_a_process_group_failure(demo_ckpts: Path, tmp_path: Path) -> None:
    """Rank 0 of a group of 2 whose rank 1 never starts: the rendezvous times out after --dist-timeout, which is
    exit 8 and one line (it was an 'unexpected error: DistStoreError', exit 1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "twa_tool", "average", str(demo_ckpts), *model_flags(), *ARGS,
                           "--out", str(out), "--dist-timeout", "2"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 8, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: the torchrun process group failed"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.fixture
def signals_restored() -> object:
    """A command failing in this process under a torchrun environment ignores SIGINT/SIGTERM until its exit
    (``cli._final_under_torchrun``); the test process gets its handlers back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("command", ["soup", "demo"])
@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.usefixtures("signals_restored")
def test_soup_and_demo_refuse_torchrun(demo_ckpts: Path, tmp_path: Path, command: str, rank: str) -> None:
    """Under torchrun every rank ran the whole soup (or demo), printed it, printed --json N times and wrote the
    same folder; they run on one process, so each rank refuses with one usage error (printed by rank 0 only)."""
    args = {"soup": ["soup", str(demo_ckpts), *model_flags(), "--data", "synthetic", "--device", "cpu", "--json"],
            "demo": ["demo", "--json"]}[command]
    env = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "out")], env=env)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and not (tmp_path / "out").exists()
    lines = result.stderr.splitlines()
    if rank == "0":
        assert len(lines) == 1 and lines[0].startswith(f"error: twa {command} runs on one process"), lines
    else:
        assert lines == []


@pytest.mark.parametrize("verbose", [False, True])
def test_torchrun_failure_summary_has_the_one_line_error(tmp_path: Path, verbose: bool) -> None:
    """torchrun's failure summary prints the error file each failed rank leaves: the one-line error, with the
    traceback only under -v (it printed twa's traceback for every input error)."""
    error_file = tmp_path / "error.json"
    args = ["average", str(tmp_path / "missing"), "--data", "synthetic", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args + (["-v"] if verbose else []),
                                env={"TORCHELASTIC_ERROR_FILE": str(error_file)})
    assert result.exit_code == 4
    message = json.loads(error_file.read_text())["message"]
    assert message["message"].startswith("CheckpointError: ") and "no such directory" in message["message"]
    assert int(message["extraInfo"]["timestamp"]) > 0
    assert ("Traceback" in message["extraInfo"].get("py_callstack", "")) == verbose


FAIL_THEN_SIGTERM = """
import os, signal, sys
import twa_tool.cli as cli
exit = sys.exit
def exit_after_sigterm(code=None):  # torchrun's SIGTERM (another rank failed) lands while this rank exits
    os.kill(os.getpid(), signal.SIGTERM)
    exit(code)
sys.exit = exit_after_sigterm
sys.argv = ["twa", "average", "ckpts", "--data", "synthetic", "--out", "out", "--lr", "-1"]
cli.main()
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_failed_rank_keeps_its_line_and_code_when_torchrun_stops_it(tmp_path: Path, rank: str) -> None:
    """A rank that failed keeps its exit code and its one line when torchrun's SIGTERM lands while it exits
    (it printed a second line, 'terminated: nothing was written', and exited 143)."""
    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
    proc = subprocess.run([sys.executable, "-c", FAIL_THEN_SIGTERM], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    expected = ["error: --lr -1.0: must be a finite number > 0"] if rank == "0" else []
    assert proc.stderr.splitlines() == expected


RANKWISE = """
import os, sys
from pathlib import Path
from twa_tool import cli
if os.environ["RANK"] == "1":  # rank 1 launched with other flags or another folder than rank 0
    sys.argv = [arg.replace(os.environ["RANK1_FROM"], os.environ["RANK1_TO"]) for arg in sys.argv]
end_rank_now = cli.end_rank_now

def recorded(code):  # each rank's own code (torch 2.6's torchrun lists only the rank that ended first)
    Path(os.environ["CODES"], os.environ["RANK"]).write_text(str(code))
    end_rank_now(code)

cli.end_rank_now = recorded  # a rank ends there, skipping the interpreter's teardown
cli.main()
"""


@pytest.fixture(scope="module")
def other_folders(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo checkpoints with one file's bytes changed (same size), and without the first file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("other")
    changed, fewer = root / "changed", root / "fewer"
    for folder in (changed, fewer):
        folder.mkdir()
        for path in demo_ckpts.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    with safe_open(changed / "2.safetensors", "pt") as f:
        metadata = f.metadata()
    state = load_file(changed / "2.safetensors")
    state["head.bias"] = state["head.bias"] + 0.01
    save_file(state, changed / "2.safetensors", metadata=metadata)
    (fewer / "0.safetensors").unlink()
    return {"changed": changed, "fewer": fewer}


@pytest.mark.parametrize("swap, code, text", [
    (("--seed=0", "--seed=1"), 2, "torchrun rank 1 was started with other settings than rank 0 (seed 1 vs 0)"),
    (("--lr=0.05", "--lr=0.5"), 2, "(train.lr 0.5 vs 0.05)"),
    ("changed", 4, "torchrun rank 1 read other bytes for 2.safetensors than rank 0"),
    ("fewer", 4, "torchrun rank 1 selected other checkpoints than rank 0 (4 vs 5"),
])
def test_ranks_started_differently_refuse_together(demo_ckpts: Path, other_folders: dict[str, Path],
                                                   tmp_path: Path, swap: tuple | str, code: int, text: str) -> None:
    """A rank started with another seed or lr, or given another folder, silently walked other batches or took
    other steps (exit 0, rank 0's result written) or broke a collective (SIGABRT); now every rank refuses."""
    old, new = swap if isinstance(swap, tuple) else (str(demo_ckpts), str(other_folders[swap]))
    script = tmp_path / "rankwise.py"
    script.write_text(RANKWISE)
    codes_dir = tmp_path / "codes"
    codes_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK1_FROM": old, "RANK1_TO": new, "CODES": str(codes_dir)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=0", str(script), "average", str(demo_ckpts), *model_flags(), *ARGS,
                           "--epochs", "1", "--seed=0", "--lr=0.05", "--out", str(out), "--dist-timeout", "30"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "rank 1: error:"))]
    assert len(errors) == 1 and errors[0].startswith("error: torchrun rank 1 "), proc.stderr[-3000:]
    assert text in errors[0]
    # torchrun names the rank that failed first (newer torchrun, e.g. 2.14, also the one it stopped after it)
    assert str(code) in re.findall(r"exitcode  : (-?\d+) ", proc.stderr), proc.stderr[-3000:]
    # both ranks, the same code (or 143: torchrun stopped a rank that was still leaving the check), as each
    # rank recorded it itself: torch 2.6's torchrun does not list a rank it stopped once another had failed
    codes = sorted(path.read_text() for path in codes_dir.iterdir())
    assert codes in ([str(code)] * 2, sorted([str(code), "143"])), (codes, proc.stderr[-3000:])
    assert not out.exists()


SMALL_DATA = """
import torch
from torch.utils.data import TensorDataset

def make():
    x = torch.randn(25, 16, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])
"""


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_single_example_batchnorm_split_is_refused(tmp_path: Path, dry_run: bool) -> None:
    """A held-out split of one example under a BatchNorm model: one process failed with 'unexpected error:
    ValueError: Expected more than 1 value per channel' (exit 1) while torchrun ran (its global-batch BN
    normalises one example to zero variance); both now refuse it before reading a checkpoint (exit 4)."""
    from safetensors.torch import save_file

    from twa_tool.models import MLP

    torch.manual_seed(0)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    state = MLP(in_features=16, num_classes=2, hidden=4).state_dict()
    for i in range(3):
        save_file({k: v + 0.1 * (i + 1) * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in state.items()}, ckpts / f"{i}.safetensors")
    (tmp_path / "small.py").write_text(SMALL_DATA)
    args = ["average", str(ckpts), "--model", "twa:mlp", "--model-arg", "in_features=16", "--model-arg",
            "num_classes=2", "--model-arg", "hidden=4", "--data", f"{tmp_path / 'small.py'}:make", "--device", "cpu",
            "--epochs", "1", "--batch-size", "8", "--fit-on", "holdout", "--holdout-fraction", "0.05",
            "--out", str(tmp_path / "out")] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 4, result.output
    assert result.stderr.splitlines() == ["error: the held-out split (--fit-on holdout) has 1 example; the model's "
                                          "BatchNorm layers need at least 2 in training mode: use more data, or "
                                          "raise --holdout-fraction"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code, expected, message", [(4, 4, ""), (None, 0, ""), ("error: why", 1, "error: why")])
def test_a_rank_ends_without_the_interpreter_teardown(code: object, expected: int, message: str) -> None:
    """After its command, a torchrun rank exits with its code and flushed output but skips the interpreter's
    teardown, where gloo objects outliving destroy_process_group aborted ~1 run in 10 on a loaded machine
    ('terminate called without an active exception', SIGABRT: torchrun failed the whole job)."""
    script = ("import atexit, sys\n"
              "from twa_tool import distributed\n"
              "from twa_tool.cli import end_rank_now\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "sys.stdout.write('{\"ok\": true}')\n"  # no newline: only an explicit flush gets it out
              f"end_rank_now({code!r})\n")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == expected, run.stderr
    assert run.stdout == '{"ok": true}' and "teardown ran" not in run.stdout
    assert run.stderr.strip() == message


def test_main_ends_a_torchrun_rank_without_the_teardown(demo_ckpts: Path) -> None:
    script = ("import atexit, sys\n"
              "from twa_tool import distributed\n"
              "from twa_tool.cli import main\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              f"sys.argv = ['twa', 'inspect', {str(demo_ckpts)!r}, '--json']\n"
              "main()\n")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ranked = {**base, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    for env, teardown in ((ranked, False), (base, True)):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        assert run.stdout.lstrip().startswith("{") and ("teardown ran" in run.stdout) is teardown, run.stdout[-200:]


def test_a_shard_on_an_accelerator_projects_in_large_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard.project (torchrun) used the CPU's cache-sized chunks (~1M entries) for a bf16/int8 shard on the GPU too:
    at K=100 and 5.6M columns per rank, ~680 chunks per pass, thousands of small kernel launches per step. Now the
    accelerator's chunks, as Basis.project. The meta device stands in for the GPU (a one-process Dist whose
    collectives are no-ops, on that device); the dequantized chunks are counted."""
    from dataclasses import dataclass

    from twa_tool.distributed import Shard
    from twa_tool.subspace import _ACCELERATOR_CHUNK_ENTRIES, QUANT_BLOCK, Basis, Subspace

    @dataclass(frozen=True)
    class OnMeta(Dist):
        @property
        def comm_device(self) -> torch.device:
            return torch.device("meta")

    calls = []
    chunk = Basis.chunk
    monkeypatch.setattr(Basis, "chunk", lambda self, cols, *a, **k: calls.append(cols) or chunk(self, cols, *a, **k))
    k, d = 8, _ACCELERATOR_CHUNK_ENTRIES // 8
    meta = torch.device("meta")
    for values, scales in ((torch.empty(k, d, dtype=torch.bfloat16, device=meta), None),
                           (torch.empty(k, d, dtype=torch.int8, device=meta),
                            torch.empty(k, d // QUANT_BLOCK, device=meta))):
        calls.clear()
        subspace = Subspace(Basis(values, scales), torch.eye(k, dtype=torch.float64), tuple(range(k)), (), k)
        out = Shard(subspace, slice(0, d), d, OnMeta()).project(torch.empty(d, device=meta))
        assert out.shape == (d,) and out.device.type == "meta"
        assert len(calls) == 2  # one chunk per pass (was 2 x 32 with the CPU's chunks)


def test_global_batchnorm_normalises_half_precision_inputs_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun with --amp, the global BatchNorm gets bf16 activations: its statistics are computed in
    float32 as torch's own batch_norm does under autocast (on one rank the all-reduces are the identity), not
    in bf16 (off by ~1e-2)."""
    from twa_tool import distributed

    monkeypatch.setattr(distributed, "all_reduce", lambda t: t)
    torch.manual_seed(0)
    x = (3 + 2 * torch.randn(6, 4, 5, 5)).to(torch.bfloat16)
    ours, native = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    out = distributed._global_bn_forward(ours, x)
    expected = native(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, native.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.running_var, native.running_var, rtol=0, atol=1e-5)
