"""The column-pass build (``build_by_columns``, ``stream_by_columns``): the bf16/int8 basis without the
float32 one. It must decide, orthonormalise and average as ``BasisBuilder`` does, round exactly as
``quantize`` rounds, never allocate the float32 basis, and hand over to the usual path when it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_direct_reads import count_loads, small_model, write_trajectory
from tests.test_subspace import trajectory
from twa_tool import checkpoints, pipeline, subspace
from twa_tool.checkpoints import discover
from twa_tool.config import AverageConfig
from twa_tool.errors import CheckpointError, NumericalError
from twa_tool.models import trainable_names
from twa_tool.pipeline import Reader, stream_checkpoints
from twa_tool.subspace import (
    PROJECTION_TOLERANCE,
    QUANT_BLOCK,
    STORAGE_TOLERANCE,
    build_by_columns,
    build_subspace,
    orthonormality_error,
    quantize,
)


def reader_of(vectors: list[torch.Tensor]):
    rows = torch.stack(vectors)

    def read(index: int, cols: slice, out: torch.Tensor) -> None:
        out.copy_(rows[index, cols])

    return read


def with_duplicate_and_zero_step(k: int = 20, d: int = 3 * QUANT_BLOCK + 123) -> list[torch.Tensor]:
    vectors = trajectory(k, d, step=1e-2)
    vectors[6] = vectors[5].clone()  # a duplicate: dropped, its step owed to the next vector
    vectors[-1] = vectors[-2].clone()  # the last one dropped (owed to nobody)
    return vectors


@pytest.mark.parametrize("storage", ["float32", "bf16", "int8"])
def test_column_build_equals_the_buffered_build(storage: str) -> None:
    vectors = with_duplicate_and_zero_step()
    d = vectors[0].numel()
    built = build_by_columns(len(vectors), d, reader_of(vectors), storage=storage, block=QUANT_BLOCK)
    assert built is not None
    ours, theirs = built.subspace, build_subspace(vectors, storage=storage)
    exact = build_subspace([v.double() for v in vectors], dtype=torch.float64, block=1)
    assert ours.kept == theirs.kept == exact.kept and ours.dropped == (6, len(vectors) - 1)
    assert ours.basis.storage == storage and ours.basis.values.shape == (len(ours.kept), d)
    assert orthonormality_error(ours.basis) <= (1e-6 if storage == "float32" else STORAGE_TOLERANCE[storage])
    assert torch.allclose(ours.r, exact.r, rtol=1e-6, atol=1e-6 * exact.r.abs().max())
    # the same span: projections agree with the float64 build's to the storage's documented bound
    g = torch.randn(d, generator=torch.Generator().manual_seed(1))
    expected = exact.project(g.double())
    error = torch.linalg.vector_norm(ours.project(g).double() - expected) / torch.linalg.vector_norm(expected)
    assert error <= PROJECTION_TOLERANCE[storage]
    assert torch.equal(built.mean, torch.stack(vectors).double().mean(0))  # float32 sums are exact in float64
    w = 0.25 * vectors[2] + 0.75 * vectors[9]
    a = ours.checkpoint_coefficients(w)
    assert a[6] == 0 and a[-1] == 0
    rebuilt = sum(c * v.double() for c, v in zip(a, vectors))
    assert torch.linalg.vector_norm(rebuilt - w.double()) <= 2e-2 * torch.linalg.vector_norm(w)


def test_low_precision_column_bases_round_the_float32_one_exactly_and_threads_change_no_bit() -> None:
    vectors = trajectory(12, 2 * QUANT_BLOCK + 77, step=1e-1)
    read, d = reader_of(vectors), vectors[0].numel()
    single = build_by_columns(12, d, read, storage="float32", block=QUANT_BLOCK, threads=1)
    assert single is not None
    for storage in ("bf16", "int8"):
        rounded = quantize(single.subspace.basis.values, storage)
        for threads in (1, 3):
            built = build_by_columns(12, d, read, storage=storage, block=QUANT_BLOCK, threads=threads)
            assert built is not None
            assert torch.equal(built.subspace.basis.values, rounded.values)
            if storage == "int8":
                assert torch.equal(built.subspace.basis.scales, rounded.scales)
    wide = build_by_columns(12, d, read, storage="float32", threads=2)  # one block holds every column
    assert wide is not None and torch.allclose(wide.subspace.basis.values, single.subspace.basis.values, atol=1e-6)


def test_a_trajectory_needing_the_second_cholesky_qr_gets_it() -> None:
    g = torch.Generator().manual_seed(0)
    w, common, vectors = torch.randn(2 * QUANT_BLOCK, generator=g), torch.randn(2 * QUANT_BLOCK, generator=g), []
    for _ in range(30):  # steps sharing one direction: ill-conditioned, one Cholesky-QR is not enough
        w = w + common + 0.03 * torch.randn(2 * QUANT_BLOCK, generator=g)
        vectors.append(w.clone())
    passes: list[str] = []
    built = build_by_columns(30, vectors[0].numel(), reader_of(vectors), block=QUANT_BLOCK, on_pass=passes.append)
    assert built is not None and passes == ["gram", "orthonormal", "second"]
    assert orthonormality_error(built.subspace.basis) <= 1e-6
    easy = trajectory(5, QUANT_BLOCK, step=1.0)
    passes.clear()
    assert build_by_columns(5, QUANT_BLOCK, reader_of(easy), on_pass=passes.append) is not None
    assert passes == ["gram", "orthonormal"]


def test_a_vector_the_gram_matrix_cannot_decide_is_left_to_the_buffered_build() -> None:
    g = torch.Generator().manual_seed(3)
    d = QUANT_BLOCK
    w0, step = torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)
    vectors = [w0, w0 + step, w0 + 2 * step + 3e-4 * torch.randn(d, generator=g)]  # a step 0.3% off the last
    assert build_by_columns(3, d, reader_of(vectors)) is None
    assert build_subspace(vectors).rank == 3  # the general path keeps it


def test_non_finite_and_bad_arguments_are_errors() -> None:
    vectors = trajectory(4, QUANT_BLOCK)
    vectors[2][7] = float("inf")
    with pytest.raises(ValueError, match="vector 2 has non-finite entries"):
        build_by_columns(4, QUANT_BLOCK, reader_of(vectors))
    with pytest.raises(ValueError, match="storage 'float64'"):
        build_by_columns(4, QUANT_BLOCK, reader_of(vectors), storage="float64")
    with pytest.raises(ValueError, match="multiple of QUANT_BLOCK"):
        build_by_columns(4, QUANT_BLOCK, reader_of(vectors), block=1000)


# -- the pipeline ---------------------------------------------------------------------------------

def stream(root: Path, storage: str, model: torch.nn.Module | None = None) -> pipeline.Stream:
    model = model or small_model()
    reader = Reader.for_run(AverageConfig(checkpoint_dir=root, out_dir=root, data="synthetic"), model)
    return stream_checkpoints(discover(root), model, trainable_names(model), 1e-5, reader, lambda e: None,
                              block=4, storage=storage)


def as_safetensors(folder: Path) -> None:
    for path in discover(folder):
        save_file(torch.load(path.path, weights_only=True), str(path.path.with_suffix(".safetensors")))
        path.path.unlink()


@pytest.mark.parametrize("storage, fmt", [("bf16", "pt"), ("int8", "pt"), ("bf16", "safetensors")])
def test_low_precision_stream_reads_columns_and_never_allocates_the_float32_basis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str, fmt: str) -> None:
    write_trajectory(tmp_path / "ckpts", k=9)
    if fmt == "safetensors":
        as_safetensors(tmp_path / "ckpts")
    files = discover(tmp_path / "ckpts")
    allocated: list[tuple[int, int, torch.dtype]] = []
    original = subspace._preallocated

    def preallocated(rows: int, cols: int, dtype: torch.dtype, **kwargs: bool) -> tuple[torch.Tensor, object]:
        allocated.append((rows, cols, dtype))
        return original(rows, cols, dtype, **kwargs)

    monkeypatch.setattr(subspace, "_preallocated", preallocated)
    loaded = count_loads(monkeypatch)
    ours = stream(tmp_path / "ckpts", storage)
    assert loaded == [files[0].path, files[-1].path]  # the others: buffers once, weights by column blocks
    assert ours.build == "columns" and ours.not_by_columns is None
    assert allocated == [(9, ours.subspace.basis.dim, subspace.STORAGE_DTYPES[storage])]
    monkeypatch.setattr(pipeline, "COLUMN_BUILD_STORAGE", ())
    theirs = stream(tmp_path / "ckpts", storage)  # the one-read build: float32 basis, rounded at the end
    assert allocated[-1][2] == torch.float32
    assert ours.subspace.kept == theirs.subspace.kept and ours.sha256 == theirs.sha256
    assert torch.allclose(ours.subspace.r, theirs.subspace.r, rtol=1e-5)
    for mine, other in ((ours.mean_state, theirs.mean_state), (ours.last_state, theirs.last_state)):
        assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    difference = (ours.subspace.basis.chunk(slice(0, ours.subspace.basis.dim))
                  - theirs.subspace.basis.chunk(slice(0, theirs.subspace.basis.dim))).abs().max()
    assert difference <= 2 * STORAGE_TOLERANCE[storage]


def test_a_flipped_byte_in_a_column_read_file_fails_its_crc(tmp_path: Path) -> None:
    write_trajectory(tmp_path / "ckpts", k=5)
    middle = discover(tmp_path / "ckpts")[2].path
    data = bytearray(middle.read_bytes())
    data[data.index(b"data/0") + 100] ^= 0x01  # inside the first storage's bytes, past its local header
    middle.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{middle.name}: CRC mismatch in zip member"):
        stream(tmp_path / "ckpts", "bf16")


def test_another_layout_or_an_undecidable_gram_matrix_falls_back_to_the_usual_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_trajectory(tmp_path / "ckpts", k=6)
    files = discover(tmp_path / "ckpts")
    expected = stream(tmp_path / "ckpts", "bf16")
    calls: list[int] = []
    original = pipeline.build_by_columns

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_by_columns", spy)
    state = torch.load(files[3].path, weights_only=True)
    torch.save(state, files[3].path, _use_new_zipfile_serialization=False)  # not a zip: no places to read
    mixed = stream(tmp_path / "ckpts", "bf16")
    assert calls == [] and mixed.subspace.kept == expected.subspace.kept and mixed.build == "rows"
    assert mixed.not_by_columns.startswith(f"{files[3].name} cannot be read in place")
    torch.save(state, files[3].path)
    monkeypatch.setattr(pipeline, "build_by_columns", lambda *args, **kwargs: spy(*args, **kwargs) and None)
    fallback = stream(tmp_path / "ckpts", "bf16")
    assert calls == [1] and fallback.subspace.kept == expected.subspace.kept
    assert "too close to each other" in fallback.not_by_columns


def test_non_finite_weights_in_a_column_read_file_name_it(tmp_path: Path) -> None:
    write_trajectory(tmp_path / "ckpts", k=5)
    middle = discover(tmp_path / "ckpts")[2].path
    state = torch.load(middle, weights_only=True)
    state["0.weight"][0, 0] = float("nan")
    torch.save(state, middle)
    with pytest.raises(NumericalError, match=rf"{middle.name}: tensor 0.weight has non-finite values"):
        stream(tmp_path / "ckpts", "int8")


def test_the_dry_run_estimate_counts_the_narrow_basis_for_column_builds() -> None:
    model = torch.nn.Linear(3 * QUANT_BLOCK, 10)
    wide = pipeline.memory_estimate(model, 40)
    bf16 = pipeline.memory_estimate(model, 40, storage="bf16", threads=2)
    int8 = pipeline.memory_estimate(model, 40, storage="int8", threads=2)
    assert 2 * bf16["basis_bf16"] == wide["basis_float32"] and "basis_float32" not in bf16
    assert int8["basis_int8"] == 40 * (122890 + 4 * 31)  # a byte per entry, a float32 scale per 4096 columns
    assert bf16["column_blocks"] == int8["column_blocks"] == 2 * 4 * 40 * subspace.column_block(40) * 4
    assert pipeline.memory_estimate(model, 40, ranks=2, storage="int8")["basis_float32"] == 40 * 61445 * 4


def test_the_dry_run_estimate_of_the_column_blocks_is_no_wider_than_the_model() -> None:
    """``build_by_columns`` allocates its per-thread buffers ``min(block, D)`` columns wide: a model smaller than one
    block (D = 35 here) was estimated a whole block wide (128 MiB for K = 5 and 2 threads)."""
    model = torch.nn.Linear(6, 5)
    estimate = pipeline.memory_estimate(model, 5, storage="int8", threads=2)
    assert estimate["column_blocks"] == 2 * 4 * 5 * 35 * 4
    assert estimate["total"] < 1 << 20


def test_a_safetensors_file_with_other_keys_or_dtypes_is_loaded_the_usual_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_trajectory(tmp_path / "ckpts", k=5)
    as_safetensors(tmp_path / "ckpts")
    files = discover(tmp_path / "ckpts")
    expected = stream(tmp_path / "ckpts", "bf16")
    state = load_file(str(files[2].path))
    save_file({f"module.{k}": v for k, v in state.items()}, str(files[2].path))  # a DDP prefix: stripped on load
    loaded = count_loads(monkeypatch)
    prefixed = stream(tmp_path / "ckpts", "bf16")
    assert files[2].path in loaded and prefixed.subspace.kept == expected.subspace.kept
    assert torch.equal(prefixed.mean_state["0.weight"], expected.mean_state["0.weight"])
    save_file({**state, "0.weight": state["0.weight"].double()}, str(files[2].path))
    assert checkpoints.column_file(files[2].path, ["0.weight"], load_file(str(files[0].path)), None) is None
    save_file(state, str(files[2].path))
    flat, others = checkpoints.column_file(files[2].path, ["3.bias", "0.weight"], load_file(str(files[0].path)),
                                           None)
    out = torch.empty(5 + 600)
    flat.read(slice(0, 605), out)
    assert torch.equal(out, torch.cat([state["3.bias"], state["0.weight"].reshape(-1)]))
    flat.read(slice(3, 9), out[:6])
    assert torch.equal(out[:6], torch.cat([state["3.bias"], state["0.weight"].reshape(-1)])[3:9])
    assert set(others()) == set(state) - {"3.bias", "0.weight"}


def test_a_file_replaced_between_the_passes_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_trajectory(tmp_path / "ckpts", k=5)
    middle = discover(tmp_path / "ckpts")[2].path
    original = pipeline.build_by_columns

    def build_then_replace(*args, **kwargs):
        built = original(*args, **kwargs)
        state = torch.load(middle, weights_only=True)
        torch.save(state, tmp_path / "new.pt")
        (tmp_path / "new.pt").replace(middle)  # the same bytes, another file: the passes may have mixed them
        return built

    monkeypatch.setattr(pipeline, "build_by_columns", build_then_replace)
    with pytest.raises(CheckpointError, match=rf"{middle.name}: changed while it was being read"):
        stream(tmp_path / "ckpts", "bf16")


def test_ordered_sum_adds_in_block_order_and_holds_only_early_results() -> None:
    values = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([1e16], dtype=torch.float64),
              torch.tensor([-1e16], dtype=torch.float64)]
    total = subspace._OrderedSum((1,))
    total.add(2, values[2])
    total.add(1, values[1])
    assert total.total.item() == 0 and len(total._early) == 2  # waiting for block 0
    total.add(0, values[0])
    assert total.total.item() == 0.0 and not total._early  # (1 + 1e16) - 1e16: in block order (as arrived: 1)


def test_trainer_files_whose_pickles_all_differ_are_read_by_columns(tmp_path: Path) -> None:
    """Lightning (and timm) store an epoch, step or metric in every file, so no two pickles are alike: each
    file is placed by its own layout and still read in place; the basis is bit-identical to that of the
    same weights saved as plain state dicts, and a corrupt file still fails its CRC."""
    write_trajectory(tmp_path / "plain", k=6)
    (tmp_path / "lightning").mkdir()
    for i, entry in enumerate(discover(tmp_path / "plain")):
        state = torch.load(entry.path, weights_only=True)
        torch.save({"epoch": i, "global_step": 7 * i, "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(1.0 / (i + 1))}}},
                   tmp_path / "lightning" / f"epoch={i}-step={7 * i}.ckpt")
    plain, trainer = stream(tmp_path / "plain", "int8"), stream(tmp_path / "lightning", "int8")
    assert trainer.build == "columns" and trainer.not_by_columns is None
    assert torch.equal(trainer.subspace.basis.values, plain.subspace.basis.values)
    assert torch.equal(trainer.subspace.basis.scales, plain.subspace.basis.scales)
    assert all(torch.equal(trainer.mean_state[k], plain.mean_state[k]) for k in plain.mean_state)
    middle = discover(tmp_path / "lightning")[2].path
    data = bytearray(middle.read_bytes())
    at = data.find(torch.load(middle, weights_only=True)["state_dict"]["model.0.weight"].numpy().tobytes()[:64])
    data[at + 8] ^= 0xFF  # one byte of a weight: the member's CRC no longer matches
    middle.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        stream(tmp_path / "lightning", "int8")
