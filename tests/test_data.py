"""Tests for twa_tool.data: tiny files in the real on-disk formats, written under tmp_path and read back."""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from twa_tool import data as data_module
from twa_tool.data import DataSplits, build_data, list_data_names, split_holdout
from twa_tool.errors import ConfigError, DataError
from twa_tool.usercode import module_name

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- file writers


def write_cifar_batch(
    path: Path, rows: np.ndarray, labels: list[int], label_key: str, *, bytes_keys: bool = False
) -> None:
    """Writes a CIFAR python-version batch: pickled dict with 'data' (N x 3072 uint8) and labels."""
    batch = {"batch_label": "testing batch", label_key: labels, "data": rows, "filenames": [f"{i}.png" for i in labels]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def random_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random CIFAR rows (channel-major 3 x 32 x 32, flattened)."""
    return rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)


def write_cifar10(root: Path, rng: np.random.Generator) -> tuple[list[np.ndarray], list[list[int]]]:
    """Writes data_batch_1..5 (2 rows each) and test_batch (3 rows) under root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = 3 if name == "test_batch" else 2
        batch_rows, batch_labels = random_rows(rng, count), [int(x) for x in rng.integers(0, 10, count)]
        write_cifar_batch(folder / name, batch_rows, batch_labels, "labels")
        rows.append(batch_rows)
        labels.append(batch_labels)
    return rows, labels


def expected_cifar_image(row: np.ndarray) -> torch.Tensor:
    """The normalised CHW tensor a CIFAR row becomes without augmentation, computed by hand."""
    chw = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 255.0
    return (chw - CIFAR_MEAN) / CIFAR_STD


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encodes a uint8 array as an IDX file with the given magic number and big-endian dimensions."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, rng: np.random.Generator, *, gz: bool) -> dict[str, np.ndarray]:
    """Writes the four MNIST-format files (4 train, 3 test images of 28 x 28) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([5, 9, 2], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        payload = idx_bytes(array, 0x00000803 if "images" in stem else 0x00000801)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / stem).write_bytes(payload)
    return arrays


def write_image_tree(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int = 2) -> None:
    """Writes root/{train,val}/CLASS/i.png: solid-colour 12 x 10 RGB PNGs."""
    for split in ("train", "val"):
        for cls, colour in colours.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10), colour).save(folder / f"{i}.png")


# --------------------------------------------------------------------------- registry and spec parsing


def test_list_data_names_holds_every_registry_name() -> None:
    assert list_data_names() == ["cifar10", "cifar100", "mnist", "fashion-mnist", "svhn", "imagenet", "synthetic"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_data("cifar-11")
    message = str(info.value)
    assert "cifar-11" in message and "\n" not in message
    for name in list_data_names():
        assert name in message
    assert "imagefolder:PATH" in message


def test_registry_names_ignore_dashes_and_underscores(tmp_path: Path) -> None:
    """``CIFAR-10`` (how the dataset is written) and ``FashionMNIST`` (torchvision's class name) were unknown
    datasets (exit 2) although ``fashion_mnist`` and ``CIFAR10`` were accepted."""
    write_cifar10(tmp_path, np.random.default_rng(12))
    write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(13), gz=True)
    for spec, name in (("CIFAR-10", "cifar10"), ("cifar_10", "cifar10"), ("FashionMNIST", "fashion-mnist"),
                       ("fashionmnist", "fashion-mnist")):
        assert build_data(spec, root=tmp_path).name == name


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("cifr10", "(did you mean cifar10?)"),
        ("fasion-mnist", "(did you mean fashion-mnist?)"),
        ("my_data.py", "(to call a function in my_data.py, write my_data.py:FUNCTION"),
        ("my_data.py:make()", "(to call a function in my_data.py, write my_data.py:FUNCTION"),
    ],
)
def test_unknown_spec_says_what_was_probably_meant(spec: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_data(spec)
    assert hint in str(info.value) and "choose one of" in str(info.value)


def test_a_folder_given_as_spec_suggests_imagefolder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"write imagefolder:{tmp_path}"):
        build_data(str(tmp_path))


def test_empty_imagefolder_path_is_config_error() -> None:
    with pytest.raises(ConfigError, match="imagefolder:PATH"):
        build_data("imagefolder:")


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trip(tmp_path: Path) -> None:
    rows, labels = write_cifar10(tmp_path, np.random.default_rng(0))
    splits = build_data("cifar10", root=tmp_path)
    assert isinstance(splits, DataSplits)
    assert (splits.name, splits.num_classes) == ("cifar10", 10)
    assert len(splits.train) == 10 and len(splits.eval) == 3
    assert splits.train.targets == [label for batch in labels[:5] for label in batch]
    for i in range(3):
        image, target = splits.eval[i]
        assert target == labels[5][i]
        torch.testing.assert_close(image, expected_cifar_image(rows[5][i]), atol=1e-5, rtol=0)
    image, target = splits.train[0]
    assert image.shape == (3, 32, 32) and target == labels[0][0]


def test_cifar10_train_split_is_augmented(tmp_path: Path) -> None:
    write_cifar10(tmp_path, np.random.default_rng(1))
    train = build_data("cifar10", root=tmp_path).train
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_cifar10_root_may_be_the_batches_folder_and_name_is_case_insensitive(tmp_path: Path) -> None:
    rows, _ = write_cifar10(tmp_path, np.random.default_rng(2))
    splits = build_data("CIFAR10", root=tmp_path / "cifar-10-batches-py")
    torch.testing.assert_close(splits.eval[2][0], expected_cifar_image(rows[5][2]), atol=1e-5, rtol=0)


def test_cifar100_fine_labels_with_bytes_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    train_rows, test_rows = random_rows(rng, 4), random_rows(rng, 2)
    write_cifar_batch(folder / "train", train_rows, [0, 99, 50, 7], "fine_labels", bytes_keys=True)
    write_cifar_batch(folder / "test", test_rows, [98, 1], "fine_labels", bytes_keys=True)
    splits = build_data("cifar100", root=tmp_path)
    assert (splits.name, splits.num_classes) == ("cifar100", 100)
    assert splits.train.targets == [0, 99, 50, 7]
    image, target = splits.eval[0]
    assert target == 98
    torch.testing.assert_close(image, expected_cifar_image(test_rows[0]), atol=1e-5, rtol=0)


def test_cifar_missing_files_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_data("cifar10", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "--data-root" in message and "--download" in message and "\n" not in message


class _Touch:
    """Pickles to a call of Path.touch: loading it with plain pickle would create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.target,))


def test_cifar_pickle_with_foreign_globals_is_refused_without_running_them(tmp_path: Path) -> None:
    write_cifar10(tmp_path, np.random.default_rng(4))
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": _Touch(marker)}, protocol=2))
    with pytest.raises(DataError, match="test_batch"):
        build_data("cifar10", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps([1, 2, 3], protocol=2),
        pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, protocol=2),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2),
        b"not a pickle at all",
    ],
    ids=["not-a-dict", "float-data", "label-out-of-range", "no-labels", "garbage"],
)
def test_cifar_malformed_batch_is_data_error(tmp_path: Path, payload: bytes) -> None:
    write_cifar10(tmp_path, np.random.default_rng(5))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_3"):
        build_data("cifar10", root=tmp_path)


def test_cifar_download_uses_torchvision_then_reads_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root: str, download: bool, train: bool) -> None:
            calls.append((root, download))
            write_cifar10(Path(root), np.random.default_rng(6))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    splits = build_data("cifar10", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True)] and len(splits.eval) == 3
    build_data("cifar10", root=tmp_path, download=True)  # files present: no second download
    assert len(calls) == 1


def test_failed_download_is_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class OfflineMNIST:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    with pytest.raises(DataError, match="download into .* failed"):
        build_data("mnist", root=tmp_path, download=True)


def _refusing_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """A local URL whose port refuses connections: a download from it fails at once, as offline."""
    import socket

    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_a_failed_download_removes_the_folders_it_created_and_nothing_else(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision creates --data-root (and MNIST/raw) before it downloads: a failed --download left those empty
    folders behind. Now they go, with the parents they needed; folders and files that were there stay."""
    import torchvision.datasets

    url = _refusing_url(monkeypatch)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"{url}cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    root = tmp_path / "new" / "data"
    with pytest.raises(DataError, match=f"--data cifar10: download into {root} failed") as info:
        build_data("cifar10", root=root, download=True)
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == []  # new/ and new/data were the download's: both gone
    with pytest.raises(DataError, match=f"--data mnist: download into {root / 'MNIST' / 'raw'} failed"):
        build_data("mnist", root=root, download=True)
    assert sorted(tmp_path.iterdir()) == []
    # an existing root, with a file and an (empty) MNIST folder of its own: kept; only MNIST/raw goes
    (tmp_path / "keep" / "MNIST").mkdir(parents=True)
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="download into .* failed"):
        build_data("mnist", root=tmp_path / "keep", download=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "keep", "keep/MNIST", "keep/notes.txt"]
    with pytest.raises(DataError, match="download into .* failed"):
        build_data("cifar10", root=tmp_path / "keep", download=True)
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine" and len(list(tmp_path.rglob("*"))) == 3


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_a_failed_idx_download_names_the_folder_of_the_file_it_names(name: str, folder: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's error names the file it could not fetch, 'Error downloading train-images-idx3-ubyte.gz', and the
    line said 'download into ROOT failed': the file's place, ROOT/MNIST/raw (where a partial or stale copy of it
    sits, and where files fetched by hand may go), was named nowhere. Now the line names that folder."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [_refusing_url(monkeypatch)])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", torchvision.datasets.MNIST.mirrors)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=rf"^--data {name}: download into {root / folder / 'raw'} failed \(Error "
                                        rf"downloading train-images-idx3-ubyte\.gz: ") as info:
        build_data(name, root=root, download=True)
    assert "\n" not in str(info.value)


def test_a_failed_download_removes_its_partial_file_from_an_existing_root(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class CutOffCIFAR10:
        def __init__(self, root: str, download: bool, train: bool) -> None:
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b partial")
            (Path(root) / "cifar-10-batches-py").mkdir()
            raise OSError("Connection reset by peer")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", CutOffCIFAR10)
    (tmp_path / "other.tar.gz").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="Connection reset by peer"):
        build_data("cifar10", root=tmp_path, download=True)
    assert [p.name for p in tmp_path.iterdir()] == ["other.tar.gz"]


def test_download_on_a_stalled_network_fails_not_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network that accepts the connection but never answers (a firewall or proxy that swallows the request):
    torchvision's urlopen passes no timeout, so --download waited forever. It now fails after
    DOWNLOAD_TIMEOUT_S without progress, in one line naming the fix."""
    import socket
    import threading
    import time

    import torchvision.datasets

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_hold() -> None:  # answers nothing; lets go after 20 s so an old twa fails the test, not hangs
        server.settimeout(20)
        try:
            while True:
                held.append(server.accept()[0])
        except OSError:
            pass
        for connection in held:
            connection.close()

    threading.Thread(target=accept_and_hold, daemon=True).start()
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    port = server.getsockname()[1]
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.setattr(data_module, "DOWNLOAD_TIMEOUT_S", 0.5, raising=False)
    before = socket.getdefaulttimeout()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match="download into .* failed.*no answer from the network.*--data-root") as info:
            build_data("cifar10", root=tmp_path, download=True)
    finally:
        server.close()
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)
    assert socket.getdefaulttimeout() == before


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.parametrize(
    ("spec", "subdir", "gz", "mean", "std"),
    [
        ("mnist", "", True, 0.1307, 0.3081),
        ("mnist", "", False, 0.1307, 0.3081),
        ("mnist", "MNIST/raw", False, 0.1307, 0.3081),
        ("fashion-mnist", "", True, 0.2860, 0.3530),
        ("fashion-mnist", "FashionMNIST/raw", True, 0.2860, 0.3530),
    ],
)
def test_idx_round_trip(tmp_path: Path, spec: str, subdir: str, gz: bool, mean: float, std: float) -> None:
    arrays = write_idx_set(tmp_path / subdir, np.random.default_rng(7), gz=gz)
    splits = build_data(spec, root=tmp_path)
    assert (splits.name, splits.num_classes) == (spec, 10)
    assert len(splits.train) == 4 and len(splits.eval) == 3
    assert splits.train.targets == [3, 1, 4, 1]
    for i, label in enumerate([5, 9, 2]):
        image, target = splits.eval[i]
        assert target == label and image.shape == (1, 28, 28)
        expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"][i].astype(np.float32)) / 255.0 - mean) / std
        torch.testing.assert_close(image[0], expected, atol=1e-5, rtol=0)
    expected_train = (torch.from_numpy(arrays["train-images-idx3-ubyte"][2].astype(np.float32)) / 255.0 - mean) / std
    torch.testing.assert_close(splits.train[2][0][0], expected_train, atol=1e-5, rtol=0)


def test_idx_missing_files_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_data("mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte") in message and str(tmp_path / "MNIST" / "raw") in message
    assert "--data-root" in message and "--download" in message


def test_idx_partial_set_names_the_missing_file(tmp_path: Path) -> None:
    """Three of the four files in place: the message said "no MNIST files under DIR" and named the train images,
    which were there; it now names the file that is missing."""
    write_idx_set(tmp_path / "MNIST" / "raw", np.random.default_rng(14), gz=True)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        build_data("mnist", root=tmp_path)
    message = str(info.value)
    assert f"{tmp_path / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte'}[.gz] missing" in message
    assert "train-images" not in message and "\n" not in message


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path, np.random.default_rng(8), gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8), 0x00000801)[:4] + bad.read_bytes()[4:])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*0x00000801.*0x00000803"):
        build_data("mnist", root=tmp_path)


def test_idx_truncated_file_is_data_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, np.random.default_rng(9), gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-5]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        build_data("mnist", root=tmp_path)


def test_idx_label_count_mismatch_is_data_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, np.random.default_rng(10), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2], np.uint8), 0x00000801))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        build_data("mnist", root=tmp_path)


@pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST / f"{s}-idx3-ubyte.gz").is_file() for s in ("train-images", "t10k-images")),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # keep a user's ~/.cache/twa/data out of the way
    splits = build_data("fashion-mnist")
    assert len(splits.train) == 60000 and len(splits.eval) == 10000
    image, target = splits.eval[0]
    assert image.shape == (1, 28, 28) and 0 <= target < 10
    assert sorted(set(splits.train.targets)) == list(range(10))


# --------------------------------------------------------------------------- SVHN


def test_svhn_without_files_or_scipy_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_data("svhn", root=tmp_path)
    message = str(info.value)
    try:
        import scipy  # noqa: F401
    except ImportError:
        assert "pip install scipy" in message
    else:
        assert str(tmp_path / "train_32x32.mat") in message


def write_svhn_mat(path: Path, images: np.ndarray, digits: list[int]) -> None:
    """Writes an SVHN-format .mat file: X is 32 x 32 x 3 x N uint8, y is N x 1 with 10 for the digit 0."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.array([[10 if d == 0 else d] for d in digits], dtype=np.uint8)
    scipy.io.savemat(str(path), {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": labels})


def test_svhn_round_trip_from_mat_files(tmp_path: Path) -> None:
    """Files in SVHN's layout but not the official ones (md5): torchvision's SVHN called them missing
    ("no SVHN files under DIR") although they were there; they are now read and their contents checked."""
    pytest.importorskip("scipy")
    rng = np.random.default_rng(11)
    train = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_svhn_mat(tmp_path / "train_32x32.mat", train, [0, 1, 9, 0, 5])
    write_svhn_mat(tmp_path / "test_32x32.mat", test, [7, 0, 3])
    splits = build_data("svhn", root=tmp_path)
    assert (splits.name, splits.num_classes, len(splits.train), len(splits.eval)) == ("svhn", 10, 5, 3)
    assert splits.train.targets == [0, 1, 9, 0, 5] and splits.eval.targets == [7, 0, 3]
    mean, std = torch.tensor([0.4377, 0.4438, 0.4728]).view(3, 1, 1), torch.tensor([0.198, 0.201, 0.197]).view(3, 1, 1)
    for i in range(3):
        image, target = splits.eval[i]
        expected = (torch.from_numpy(test[i].astype(np.float32)).permute(2, 0, 1) / 255.0 - mean) / std
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    write_svhn_mat(tmp_path / "test_32x32.mat", test, [7, 0, 3])
    (tmp_path / "test_32x32.mat").write_bytes((tmp_path / "test_32x32.mat").read_bytes()[:200])
    with pytest.raises(DataError, match="test_32x32.mat is not an SVHN .mat file"):
        build_data("svhn", root=tmp_path)


# --------------------------------------------------------------------------- ImageFolder / ImageNet


def _solid_value(colour: tuple[int, int, int]) -> torch.Tensor:
    """The normalised 3 x 1 x 1 value of a solid colour under ImageNet normalisation."""
    rgb = torch.tensor(colour, dtype=torch.float32) / 255.0
    return ((rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


@pytest.mark.parametrize("form", ["imagefolder", "imagenet"])
def test_image_folder_round_trip(tmp_path: Path, form: str) -> None:
    colours = {"blue": (0, 0, 255), "olive": (128, 128, 0)}
    write_image_tree(tmp_path / "tree", colours)
    if form == "imagefolder":
        splits = build_data(f"imagefolder:{tmp_path / 'tree'}")
    else:
        splits = build_data("imagenet", root=tmp_path / "tree")
        assert splits.name == "imagenet"
    assert splits.num_classes == 2 and len(splits.train) == 4 and len(splits.eval) == 4
    for i, (image, target) in enumerate(splits.eval[i] for i in range(4)):
        colour = colours[["blue", "olive"][target]]
        assert target == i // 2 and image.shape == (3, 224, 224)
        torch.testing.assert_close(image, _solid_value(colour).expand(3, 224, 224), atol=1e-5, rtol=0)
    image, target = splits.train[3]
    assert image.shape == (3, 224, 224) and target == 1
    torch.testing.assert_close(image, _solid_value(colours["olive"]).expand(3, 224, 224), atol=1e-5, rtol=0)


def test_image_folder_missing_val_names_it(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "val")):
        build_data(f"imagefolder:{tmp_path}")


def test_imagenet_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'train'}.*--data-root"):
        build_data("imagenet", root=tmp_path)


def test_image_folder_class_mismatch_is_data_error(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=1)
    extra = tmp_path / "train" / "c"
    extra.mkdir()
    Image.new("RGB", (4, 4)).save(extra / "0.png")
    with pytest.raises(DataError, match="different class folders"):
        build_data(f"imagefolder:{tmp_path}")


def test_image_folder_class_mismatch_names_the_odd_folders(tmp_path: Path) -> None:
    # a stray .ipynb_checkpoints folder counts as a class: the message said only "(3 vs 3)"
    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=1)
    for split, name in (("train", "c"), ("val", ".ipynb_checkpoints")):
        (tmp_path / split / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / split / name / "0.png")
    with pytest.raises(DataError, match=r"\(3 vs 3; only in train: c; only in val: .ipynb_checkpoints\)"):
        build_data(f"imagefolder:{tmp_path}")


def test_image_folder_without_images_is_data_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="imagefolder:"):
        build_data(f"imagefolder:{tmp_path}")


def test_image_folder_empty_class_folder_names_its_split(tmp_path: Path) -> None:
    """A class folder without images in val/ only: torchvision's message ("Found no valid file for the classes
    b") did not say which of train/ and val/ held it; the split folder is now named."""
    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=1)
    (tmp_path / "val" / "b" / "0.png").unlink()
    with pytest.raises(DataError, match=f"{tmp_path / 'val'}: Found no valid file for the classes b"):
        build_data(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------------------- user functions


USER_FILE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset

    SEEN = {}

    def make(root=None):
        SEEN["root"] = root
        x = torch.arange(12, dtype=torch.float32).view(6, 2)
        y = torch.tensor([0, 1, 0, 1, 0, 1])
        return TensorDataset(x[:4], y[:4]), TensorDataset(x[4:], y[4:])

    def no_root():
        return make()

    def own_root(root="/data/own"):
        SEEN["own_root"] = root
        return make()

    def required_root(root):
        SEEN["required_root"] = root
        return make()

    def one():
        return make()[0]

    def empty():
        return TensorDataset(torch.zeros(0, 2), torch.zeros(0)), make()[1]

    def singles():
        return TensorDataset(torch.zeros(3, 2)), make()[1]

    def three():
        return make() + make()[:1]

    def loaders():  # what a training script's data function often returns
        from torch.utils.data import DataLoader

        return DataLoader(make()[0], batch_size=2), DataLoader(make()[1], batch_size=2)

    def triples():
        return TensorDataset(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3)), make()[1]

    def boom():
        raise ValueError("no such\\nshard")

    class Unreadable(TensorDataset):
        def __getitem__(self, index):
            raise OSError("shard 0 unreadable")

    def unreadable():
        return Unreadable(torch.zeros(2, 2)), make()[1]

    def exits():
        import sys

        sys.exit(3)

    NOT_CALLABLE = 3
    """
)


def test_file_function_spec_passes_root(tmp_path: Path) -> None:
    path = tmp_path / "my_data.py"
    path.write_text(USER_FILE)
    splits = build_data(f"{path}:make", root=tmp_path / "r")
    assert splits.num_classes is None and splits.name == f"{path}:make"
    assert len(splits.train) == 4 and len(splits.eval) == 2
    x, y = splits.eval[1]
    assert torch.equal(x, torch.tensor([10.0, 11.0])) and int(y) == 1
    assert sys.modules[module_name(path)].SEEN["root"] == tmp_path / "r"


def test_file_function_root_default_is_kept_without_data_root(tmp_path: Path) -> None:
    """A `root` parameter with a default keeps it when --data-root is not given (twa passed root=None, so
    `def data(root="/data/fmnist")` read 'None/train-images...'); --data-root still replaces it, and a
    required `root` still gets None."""
    path = tmp_path / "my_data.py"
    path.write_text(USER_FILE)
    for root, expected in ((None, "/data/own"), (tmp_path / "r", tmp_path / "r")):
        build_data(f"{path}:own_root", root=root)
        assert sys.modules[module_name(path)].SEEN["own_root"] == expected
    build_data(f"{path}:required_root")
    assert sys.modules[module_name(path)].SEEN["required_root"] is None


def test_module_spec_of_a_file_in_the_current_folder_says_file_py(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data mydata:make` beside mydata.py said 'no module named mydata; check the spelling or PYTHONPATH'."""
    (tmp_path / "twa_qa_data_here.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        build_data("twa_qa_data_here:make")
    assert str(err.value) == ("--data twa_qa_data_here:make: no module named twa_qa_data_here; twa_qa_data_here.py "
                              "is in the current folder, which twa does not import from: write "
                              "twa_qa_data_here.py:make, or run PYTHONPATH=. twa ...")


def test_unused_data_root_is_noted(tmp_path: Path) -> None:
    """--data-root that a spec does not read is named in DataSplits.notes (the run warns), never silently
    dropped; a spec that reads it, or no --data-root, has no note."""
    path = tmp_path / "my_data.py"
    path.write_text(USER_FILE)
    write_image_tree(tmp_path / "tree", {"blue": (0, 0, 255), "olive": (128, 128, 0)})
    root = tmp_path / "r"
    assert build_data(f"{path}:make", root=root).notes == ()
    assert build_data(f"{path}:no_root").notes == ()
    assert build_data(f"{path}:no_root", root=root).notes == (
        f"--data-root {root} is not used: {path}:no_root has no `root` parameter to receive it",)
    assert build_data(f"imagefolder:{tmp_path / 'tree'}", root=root).notes == (
        f"--data-root {root} is not used: --data imagefolder:{tmp_path / 'tree'} reads the train/ and val/ folders "
        f"under its own PATH",)
    assert build_data("synthetic", root=root).notes == (
        f"--data-root {root} is not used: --data synthetic is generated, not read",)
    assert build_data("imagenet", root=tmp_path / "tree").notes == ()


def test_file_function_spec_imports_the_modules_beside_it(tmp_path: Path) -> None:
    """As ``python my_data.py`` would: a data file may import its helper modules from its own folder."""
    (tmp_path / "twa_test_helpers_d.py").write_text(USER_FILE)
    path = tmp_path / "my_data_siblings.py"
    path.write_text("from twa_test_helpers_d import make\n")
    before = list(sys.path)
    splits = build_data(f"{path}:make", root=tmp_path)
    assert len(splits.train) == 4 and len(splits.eval) == 2
    assert sys.path == before
    path.write_text("import twa_test_no_such_helper_d\n\ndef make():\n    pass\n")
    with pytest.raises(DataError, match="running .*my_data_siblings.py failed.*twa_test_no_such_helper_d"):
        build_data(f"{path}:make")
    assert sys.path == before and module_name(path) not in sys.modules


def test_module_function_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "userpkg_twa_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loaders.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    splits = build_data("userpkg_twa_test.loaders:no_root", root=tmp_path)
    assert len(splits.train) == 4 and isinstance(splits.eval, TensorDataset)


@pytest.mark.parametrize(
    ("function", "pattern"),
    [
        ("one", r"must return \(fit_dataset, eval_dataset\)"),
        ("empty", "fit dataset is empty"),
        ("singles", r"\(input, target\) pairs, got a tuple of 1"),
        ("three", r"must return \(fit_dataset, eval_dataset\), got a tuple of 3"),  # said "got tuple"
        ("triples", r"\(input, target\) pairs, got a tuple of 3"),
        # said "is a DataLoader, not a map-style torch Dataset (needs __len__ and __getitem__)", not the fix
        ("loaders", r"the fit dataset is a DataLoader; return its dataset \(loader.dataset\): twa makes its own "
                    r"loaders \(--batch-size, --num-workers\)$"),
        ("boom", "raised ValueError: no such shard"),
        ("unreadable", r"reading the fit dataset's first example failed \(OSError: shard 0 unreadable\)"),
        ("exits", "raised SystemExit: 3"),
    ],
)
def test_file_function_bad_results_are_data_errors(tmp_path: Path, function: str, pattern: str) -> None:
    path = tmp_path / "bad_data.py"
    path.write_text(USER_FILE)
    with pytest.raises(DataError, match=pattern) as info:
        build_data(f"{path}:{function}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec_of", "pattern"),
    [
        (lambda p: f"{p}:missing", "has no function missing"),
        (lambda p: f"{p}:NOT_CALLABLE", "has no function NOT_CALLABLE"),
        (lambda p: f"{p.parent / 'absent.py'}:make", "absent.py does not exist"),
        (lambda p: "no_such_module_twa.sub:make", "no module named no_such_module_twa"),
    ],
)
def test_bad_function_specs_are_config_errors(tmp_path: Path, spec_of, pattern: str) -> None:
    path = tmp_path / "spec_data.py"
    path.write_text(USER_FILE)
    with pytest.raises(ConfigError, match=pattern):
        build_data(spec_of(path))


def test_a_missing_data_file_or_function_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for --model: `--data data.py:make` named neither where a relative data.py was looked for nor what the file
    defines instead of make."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^--data data\.py:make: data\.py does not exist; check the path of the file "
                                          r"that defines make \(a relative path is taken from the current folder, "):
        build_data("data.py:make")
    (tmp_path / "data.py").write_text(USER_FILE)
    with pytest.raises(ConfigError, match=r"^--data data\.py:mkae: data\.py has no function mkae; did you mean "
                                          r"data\.py:make\?$"):
        build_data("data.py:mkae")


# --------------------------------------------------------------------------- split_holdout


def test_split_holdout_sizes_disjoint_and_deterministic() -> None:
    dataset = TensorDataset(torch.arange(103))
    rest, holdout = split_holdout(dataset, 0.2, seed=7)
    assert len(holdout) == 21 and len(rest) == 82
    assert set(rest.indices).isdisjoint(holdout.indices)
    assert sorted(rest.indices + holdout.indices) == list(range(103))
    again_rest, again_holdout = split_holdout(dataset, 0.2, seed=7)
    assert again_rest.indices == rest.indices and again_holdout.indices == holdout.indices
    assert split_holdout(dataset, 0.2, seed=8)[1].indices != holdout.indices
    assert holdout.indices != list(range(82, 103)) and holdout.indices != list(range(21))  # actually shuffled
    assert rest.dataset is dataset


def test_split_holdout_keeps_at_least_one_sample_each_side() -> None:
    rest, holdout = split_holdout(TensorDataset(torch.arange(10)), 0.01, seed=0)
    assert len(holdout) == 1 and len(rest) == 9
    with pytest.raises(DataError, match="only 1 samples"):
        split_holdout(TensorDataset(torch.arange(1)), 0.5, seed=0)
    with pytest.raises(DataError):
        split_holdout(TensorDataset(torch.arange(2)), 0.9, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_holdout_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="--holdout-fraction"):
        split_holdout(TensorDataset(torch.arange(10)), fraction, seed=0)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_with_expected_shapes() -> None:
    first, second = build_data("synthetic"), build_data("synthetic", root=Path("/nonexistent"), download=True)
    assert (first.name, first.num_classes) == ("synthetic", 10)
    assert len(first.train) == 2000 and len(first.eval) == 500
    for a, b in zip(first.train.tensors + first.eval.tensors, second.train.tensors + second.eval.tensors):
        assert torch.equal(a, b)
    image, target = first.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and target.dtype == torch.int64
    counts = torch.bincount(first.train.tensors[1], minlength=10)
    assert counts.tolist() == [200] * 10
    assert not torch.equal(first.train.tensors[0][:500], first.eval.tensors[0])


def test_synthetic_is_learnable_but_not_trivial() -> None:
    """A nearest-class-mean classifier fitted on the training split scores well above chance, below 100%."""
    splits = build_data("synthetic")
    x_train, y_train = splits.train.tensors
    x_eval, y_eval = splits.eval.tensors
    means = torch.stack([x_train[y_train == c].mean(0).flatten() for c in range(10)])
    predictions = torch.cdist(x_eval.flatten(1), means).argmin(1)
    accuracy = (predictions == y_eval).float().mean().item()
    assert 0.4 < accuracy < 0.99


def test_registry_builders_share_the_builder_signature() -> None:
    for name, builder in data_module._REGISTRY.items():
        assert list(inspect.signature(builder).parameters) == ["root", "download"], name


def test_pre_normalised_gray_images_equal_the_per_sample_transform() -> None:
    from twa_tool.data import ArrayImageDataset, NormalizedGrayDataset, _normalized

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 7, 9), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4])
    fast = NormalizedGrayDataset(images, labels, 0.2860, 0.3530)
    slow = ArrayImageDataset(images, labels, _normalized((0.2860,), (0.3530,)))
    for i in range(5):
        assert torch.equal(fast[i][0], slow[i][0]) and fast[i][1] == slow[i][1]


def test_image_folder_skips_hidden_files_and_hidden_folders_without_images(tmp_path: Path) -> None:
    """macOS's ._NAME.png AppleDouble files were counted as images (and failed to load minutes into a run), and a
    .ipynb_checkpoints folder without images was a class that torchvision refused ("Found no valid file")."""
    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=2)
    (tmp_path / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "val" / ".ipynb_checkpoints" / "notes-checkpoint.ipynb").write_text("{}")
    (tmp_path / "train" / "b" / "README.txt").write_text("not an image")
    splits = build_data(f"imagefolder:{tmp_path}")
    assert splits.num_classes == 2 and len(splits.train) == 4 and len(splits.eval) == 4
    assert splits.train.classes == splits.eval.classes == ["a", "b"]
    assert all(splits.train_plain[i][0].shape == (3, 224, 224) for i in range(4))


def test_hidden_folder_check_skips_hidden_subfolders_and_symlink_loops(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a hidden class folder holds images was decided by walking all of it, links followed: into a .git
    inside it, and down every link back up (three links to .. made 3^40 folders: the run never started)."""
    import twa_tool.folders as folders

    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=1)
    for split in ("train", "val"):
        hidden = tmp_path / split / ".cache"
        (hidden / ".git" / "objects").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(hidden / ".git" / "objects" / "icon.png")  # not a class's image
        (hidden / "sub").mkdir()
        for i in range(3):
            (hidden / "sub" / f"up{i}").symlink_to("..", target_is_directory=True)
    walked: list[str] = []
    real_walk = os.walk

    def counted_walk(*args: object, **kwargs: object):
        for entry in real_walk(*args, **kwargs):
            walked.append(entry[0])
            if len(walked) > 1000:
                raise AssertionError("walked more than 1000 folders")
            yield entry

    monkeypatch.setattr(folders.os, "walk", counted_walk)
    assert folders._holds_images(tmp_path / "train" / ".cache") is False
    assert not any(".git" in Path(p).parts for p in walked)
    splits = build_data(f"imagefolder:{tmp_path}")
    assert splits.train.classes == splits.eval.classes == ["a", "b"]
    # a hidden folder with an image of its own (not in a hidden subfolder) stays a class, as torchvision has it
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / ".cache" / "sub" / "0.png")
    walked.clear()
    assert folders._holds_images(tmp_path / "train" / ".cache") is True


def test_image_folder_unreadable_image_is_named_when_read(tmp_path: Path) -> None:
    """A truncated PNG failed with PIL's "Truncated File Read", which does not say which of the files it was."""
    write_image_tree(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, per_class=2)
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    splits = build_data(f"imagefolder:{tmp_path}")
    with pytest.raises(OSError, match=f"cannot read image {bad}"):
        splits.train[3]


def test_image_folder_named_test_or_validation_is_pointed_at(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "tree", {"a": (1, 2, 3)}, per_class=1)
    (tmp_path / "tree" / "val").rename(tmp_path / "tree" / "validation")
    with pytest.raises(DataError, match=f"found {tmp_path / 'tree' / 'validation'}: rename or symlink it"):
        build_data(f"imagefolder:{tmp_path / 'tree'}")
    (tmp_path / "tree" / "validation").rename(tmp_path / "tree" / "val")
    with pytest.raises(DataError, match=f"{tmp_path / 'tree' / 'train'} is itself a split folder"):
        build_data(f"imagefolder:{tmp_path / 'tree' / 'train'}")


def test_cifar_archive_not_extracted_says_so(tmp_path: Path) -> None:
    import tarfile

    write_cifar10(tmp_path / "src", np.random.default_rng(11))
    (tmp_path / "root").mkdir()
    with tarfile.open(tmp_path / "root" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz is not extracted.*run tar -xzf"):
        build_data("cifar10", root=tmp_path / "root")


def test_data_root_one_level_too_high_names_the_folder_below(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar", np.random.default_rng(12))
    write_idx_set(tmp_path / "mnist" / "MNIST" / "raw", np.random.default_rng(13), gz=True)
    with pytest.raises(DataError, match=f"but {tmp_path / 'cifar'} holds them; pass --data-root {tmp_path / 'cifar'}$"):
        build_data("cifar10", root=tmp_path)
    with pytest.raises(DataError, match=f"pass --data-root {tmp_path / 'mnist'}$"):
        build_data("mnist", root=tmp_path)
    with pytest.raises(DataError, match="is a file; pass --data-root DIR"):
        build_data("cifar10", root=tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch")


def test_idx_root_may_be_torchvisions_class_folder(tmp_path: Path) -> None:
    """--data-root ~/data/MNIST (torchvision's MNIST/raw/ below it) was "no MNIST files"."""
    arrays = write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(14), gz=True)
    splits = build_data("fashion-mnist", root=tmp_path / "FashionMNIST")
    assert len(splits.train) == 4 and splits.eval.targets == arrays["t10k-labels-idx1-ubyte"].tolist()
    with pytest.raises(DataError, match="but it holds fashion-mnist's; use --data fashion-mnist"):
        build_data("mnist", root=tmp_path / "FashionMNIST")  # never MNIST read from torchvision's FashionMNIST/
    with pytest.raises(DataError, match="but it holds fashion-mnist's; use --data fashion-mnist"):
        build_data("mnist", root=tmp_path)


def test_cifar_root_holding_the_other_cifar_says_so(tmp_path: Path) -> None:
    write_cifar10(tmp_path, np.random.default_rng(23))
    with pytest.raises(DataError, match="but it holds cifar10's; use --data cifar10"):
        build_data("cifar100", root=tmp_path)


def test_split_without_images_names_its_file(tmp_path: Path) -> None:
    """An empty test_batch or t10k file was read as an empty split: the run then failed (exit 6) with "the evaluation
    split is empty; check --data", naming no file."""
    write_cifar10(tmp_path / "c", np.random.default_rng(15))
    empty = {"batch_label": "testing batch", "labels": [], "data": np.zeros((0, 3072), np.uint8), "filenames": []}
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(empty, protocol=4))
    with pytest.raises(DataError, match="test_batch holds no images"):
        build_data("cifar10", root=tmp_path / "c")
    write_idx_set(tmp_path / "m", np.random.default_rng(16), gz=False)
    (tmp_path / "m" / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x803))
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((0,), np.uint8), 0x801))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte holds no images"):
        build_data("mnist", root=tmp_path / "m")


def test_cifar_fractional_labels_are_refused(tmp_path: Path) -> None:
    """Labels [0.5, 1.7] were truncated to classes 0 and 1 without a word."""
    write_cifar10(tmp_path, np.random.default_rng(17))
    rows = np.zeros((2, 3072), np.uint8)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", rows, [0.5, 1.7], "labels")  # type: ignore[list-item]
    with pytest.raises(DataError, match="test_batch is not a CIFAR batch \\('labels' is not a list of integers\\)"):
        build_data("cifar10", root=tmp_path)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", rows, np.array([3, 4], np.uint8), "labels")
    assert build_data("cifar10", root=tmp_path).eval.targets == [3, 4]


def test_svhn_empty_split_fractional_labels_and_root_too_high(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(18)
    root = tmp_path / "svhn"
    write_svhn_mat(root / "train_32x32.mat", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), [1, 2, 3, 0])
    write_svhn_mat(root / "test_32x32.mat", np.zeros((0, 32, 32, 3), np.uint8), [])
    with pytest.raises(DataError, match="test_32x32.mat holds no images"):
        build_data("svhn", root=root)
    fractional = {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3.5], [1.0]])}
    scipy_io.savemat(str(root / "test_32x32.mat"), fractional)
    with pytest.raises(DataError, match=r"test_32x32.mat is not an SVHN .mat file \('y' is not a list of integers\)"):
        build_data("svhn", root=root)
    with pytest.raises(DataError, match=f"pass --data-root {root}$"):
        build_data("svhn", root=tmp_path)


def test_idx_train_and_test_images_of_different_sizes_are_refused(tmp_path: Path) -> None:
    """28x28 train and 32x32 t10k images were read as one dataset: a model that fits one fails on the other mid-run."""
    write_idx_set(tmp_path, np.random.default_rng(19), gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 32, 32), np.uint8), 0x803))
    with pytest.raises(DataError, match="train images of 28x28 pixels and t10k images of 32x32"):
        build_data("mnist", root=tmp_path)


def test_idx_files_with_dotted_names_are_read(tmp_path: Path) -> None:
    """The MNIST copy on Kaggle names its files train-images.idx3-ubyte...: they were "no MNIST files"."""
    arrays = write_idx_set(tmp_path, np.random.default_rng(20), gz=False)
    for stem in arrays:
        (tmp_path / stem).rename(tmp_path / stem.replace("-idx", ".idx"))
    splits = build_data("mnist", root=tmp_path)
    assert len(splits.train) == 4 and splits.eval.targets == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_imagenet_flat_val_and_unextracted_train_archives_are_explained(tmp_path: Path) -> None:
    """ImageNet's validation tarball extracts flat into val/ and its train tarball into one .tar per class:
    both were only "Couldn't find any class folder"."""
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n01440764" / f"{i}.JPEG")
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataError, match=f"{tmp_path / 'val'} holds 3 images directly, not in CLASS/ folders"):
        build_data("imagenet", root=tmp_path)
    for path in (tmp_path / "train" / "n01440764").iterdir():
        path.unlink()
    (tmp_path / "train" / "n01440764").rmdir()
    (tmp_path / "train" / "n01440764.tar").write_bytes(b"")
    with pytest.raises(DataError, match="holds 1 archives: extract each into a folder named after its class"):
        build_data("imagenet", root=tmp_path)


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("cifar10:/data/cifar", "write --data cifar10 --data-root /data/cifar)"),
        ("ImageNet:~/imagenet", "write --data imagenet --data-root ~/imagenet)"),
        ("torchvision:CIFAR10", "write --data cifar10 --data-root DIR)"),
        ("torchvision.datasets:FashionMNIST", "write --data fashion-mnist --data-root DIR)"),
    ],
)
def test_builtin_name_written_with_a_path_or_module_points_at_data_root(spec: str, hint: str) -> None:
    """imagefolder:PATH takes a path, so cifar10:PATH and torchvision:CIFAR10 are natural guesses: they were "unknown
    dataset", "torchvision has no function CIFAR10" or a TypeError from torchvision's class, without the fix."""
    with pytest.raises((ConfigError, DataError)) as info:
        build_data(spec)
    assert str(info.value).endswith(hint) or f"{hint};" in str(info.value), str(info.value)


def test_unreadable_data_files_say_to_check_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the user cannot read (chmod 000; simulated, as root reads anything): the IDX reader said "replace it
    with an intact copy", and the CIFAR reader gave no fix at all."""
    write_cifar10(tmp_path / "c", np.random.default_rng(21))
    write_idx_set(tmp_path / "m", np.random.default_rng(22), gz=True)
    real_open, real_read = Path.open, Path.read_bytes

    def refuse(path: Path) -> None:
        if path.name in ("data_batch_2", "train-labels-idx1-ubyte.gz"):
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: refuse(self) or real_open(self, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse(self) or real_read(self))
    with pytest.raises(DataError, match=r"cannot read .*data_batch_2 \(Permission denied\); check its permissions"):
        build_data("cifar10", root=tmp_path / "c")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz \(Permission denied\); check its permissions"):
        build_data("mnist", root=tmp_path / "m")


def test_download_beside_a_spec_that_never_downloads_is_noted(tmp_path: Path) -> None:
    """--download with synthetic, imagefolder:PATH, imagenet or a user function was dropped without a word, while
    an unused --data-root is warned about."""
    path = tmp_path / "my_data.py"
    path.write_text(USER_FILE)
    write_image_tree(tmp_path / "tree", {"blue": (0, 0, 255)}, per_class=1)
    assert build_data("synthetic", download=True).notes == (
        "--download is not used: --data synthetic is generated, not downloaded",)
    assert build_data(f"imagefolder:{tmp_path / 'tree'}", download=True).notes == (
        f"--download is not used: --data imagefolder:{tmp_path / 'tree'} reads the folders under its own PATH",)
    assert build_data("imagenet", root=tmp_path / "tree", download=True).notes[0].startswith(
        "--download is not used: --data imagenet cannot be downloaded automatically")
    assert build_data(f"{path}:no_root", download=True).notes == (
        f"--download is not used: --data {path}:no_root is a function of yours, which gets no download flag from twa",)
    assert build_data("synthetic").notes == ()
    write_cifar10(tmp_path / "c", np.random.default_rng(24))
    assert build_data("cifar10", root=tmp_path / "c", download=True).notes == ()


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_batches_pickled_by_python3_are_read(tmp_path: Path, protocol: int) -> None:
    """Protocol 5 (pickle's default from Python 3.14) stores a numpy array through numpy's _frombuffer, which the
    numpy-only unpickler refused: a CIFAR-format batch written by pickle.dump there was "not a CIFAR batch"."""
    rows, labels = write_cifar10(tmp_path, np.random.default_rng(25))
    batch = {"data": rows[5], "labels": np.array(labels[5], dtype=np.int64)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    splits = build_data("cifar10", root=tmp_path)
    assert splits.eval.targets == labels[5]
    torch.testing.assert_close(splits.eval[1][0], expected_cifar_image(rows[5][1]), atol=1e-5, rtol=0)


def test_cifar_binary_version_is_named(tmp_path: Path) -> None:
    """The binary version (cifar-10-batches-bin/*.bin) was only "no CIFAR-10 files"."""
    (tmp_path / "cifar-10-batches-bin").mkdir()
    (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").write_bytes(bytes(3073))
    with pytest.raises(DataError, match="holds the binary version of CIFAR-10 .*twa reads the python version"):
        build_data("cifar10", root=tmp_path)


def test_a_dataset_workers_cannot_receive_names_num_workers() -> None:
    """Workers started by spawn or forkserver (macOS, Python 3.14 on Linux) get the dataset pickled: one holding a
    lambda failed as "reading a batch of --data failed (...); fix or remove the example it names"."""
    from torch.utils.data import DataLoader

    from twa_tool.trainer import Batches

    dataset = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    dataset.hook = lambda x: x  # type: ignore[attr-defined]
    loader = DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(DataError, match=r"^--num-workers 1: --data's dataset cannot be sent to the worker processes "
                                        r"\(.*pickle.*\); make it picklable .*or use --num-workers 0$"):
        list(Batches(loader))


def test_cifar_nan_labels_are_refused_without_a_numpy_warning(tmp_path: Path) -> None:
    """A NaN label was refused, but numpy's cast printed 'RuntimeWarning: invalid value encountered in cast' on
    stderr first (library code never prints): the one-line error is all the user sees."""
    import warnings

    write_cifar10(tmp_path, np.random.default_rng(18))
    rows = np.zeros((2, 3072), np.uint8)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", rows, [float("nan"), 1e30], "labels")  # type: ignore[list-item]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="'labels' is not a list of integers"):
            build_data("cifar10", root=tmp_path)
    assert [str(w.message) for w in caught] == []


def test_a_function_of_yours_named_like_a_built_in_gets_no_built_in_hint(tmp_path: Path) -> None:
    # mydata.py:cifar10 is the user's own function: its failure said "(for the built-in dataset write --data cifar10
    # --data-root DIR)", pointing away from the user's code
    (tmp_path / "mydata.py").write_text("def cifar10():\n    raise RuntimeError('no shards here')\n"
                                        "def cifar100():\n    return 1\n")
    for function, expected in (("cifar10", "the function raised RuntimeError: no shards here"),
                               ("cifar100", "the function must return (fit_dataset, eval_dataset), got int"),
                               ("svhn", "has no function svhn")):
        with pytest.raises((ConfigError, DataError)) as info:
            build_data(f"{tmp_path / 'mydata.py'}:{function}")
        assert expected in str(info.value) and "built-in" not in str(info.value), str(info.value)


@pytest.mark.parametrize("spec, value, other", [
    ("mnist", 73, "fashion-mnist"),  # 73/255 = 0.286: Fashion-MNIST's mean pixel
    ("fashion-mnist", 33, "mnist"),  # 0.129: MNIST's
    ("mnist", 33, None), ("fashion-mnist", 73, None),  # its own
    ("mnist", 49, None), ("fashion-mnist", 49, None),  # 0.192: KMNIST-like, neither
])
def test_the_other_mnist_format_set_is_noted(tmp_path: Path, spec: str, value: int, other: str | None) -> None:
    """MNIST and Fashion-MNIST use the same four file names, so `--data mnist --data-root` at a flat folder of
    Fashion-MNIST files loaded silently (the wrong normalisation, a model evaluated on the wrong images). The
    training images' mean pixel tells them apart: a note, which the run prints as a warning."""
    write_idx_set(tmp_path, np.random.default_rng(9), gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.full((4, 28, 28), value, np.uint8), 0x803))
    notes = build_data(spec, root=tmp_path).notes
    names = {"mnist": ("MNIST", 0.1307), "fashion-mnist": ("Fashion-MNIST", 0.2860)}
    if other is None:
        assert notes == ()
    else:
        (mine, own_mean), (theirs, their_mean) = names[spec], names[other]
        assert notes == (f"--data {spec}: the training images in {tmp_path} have a mean pixel of {value / 255:.3f} "
                         f"({theirs}'s is {their_mean:.3f}, {mine}'s {own_mean:.3f}): they look like {theirs}; "
                         f"pass --data {other}, or --data-root pointing at {mine}'s files",)


@pytest.mark.parametrize("spec, into", [("cifar10", "."), ("cifar100", "."), ("mnist", "MNIST/raw"),
                                        ("fashion-mnist", "FashionMNIST/raw")])
def test_missing_data_names_the_folder_a_download_would_fill(tmp_path: Path, spec: str, into: str) -> None:
    """A dry run with --download and no files said only 'the run would download it'; the error behind it now
    carries the folder torchvision's download writes to (CIFAR: the root; the IDX sets: ROOT/<Class>/raw)."""
    from twa_tool.errors import MissingData

    with pytest.raises(MissingData) as caught:
        build_data(spec, root=tmp_path)
    assert caught.value.download_into == tmp_path / into
