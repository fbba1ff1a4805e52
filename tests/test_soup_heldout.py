"""The held-out split of ``twa soup`` is scored as model soups score theirs: without training augmentation.

Model soups (Wortsman et al. 2022, ``main.py``) rank and accept greedy ingredients by their accuracy on
ImageNet2p, 2% of the *training* images read with the evaluation preprocessing. A held-out split carved from
``--data``'s fit split must likewise be scored on the plain images, not on random crops and flips (which
make every held-out accuracy, and so greedy's choices, depend on the augmentation draws).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_data import expected_cifar_image, write_cifar10

from twa_tool.config import SoupConfig
from twa_tool.data import build_data
from twa_tool.soup import soup_data


def test_carved_heldout_is_scored_without_augmentation(tmp_path: Path) -> None:
    rows, labels = write_cifar10(tmp_path, np.random.default_rng(5))
    train_rows, train_labels = np.concatenate(rows[:5]), sum(labels[:5], [])
    config = SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "out", data="cifar10", data_root=tmp_path,
                        holdout_fraction=0.3)
    splits = soup_data(config)
    scored = splits.heldout_eval
    assert len(scored) == len(splits.heldout_fit) == 3
    torch.manual_seed(0)
    for position, index in enumerate(splits.heldout_fit.indices):
        image, target = scored[position]
        assert target == train_labels[index]
        # the evaluation transform of that training image, exactly, every time it is read
        torch.testing.assert_close(image, expected_cifar_image(train_rows[index]), atol=1e-5, rtol=0)
        assert all(torch.equal(image, scored[position][0]) for _ in range(4))
    # fitting the coefficients keeps the training augmentation, as fitting on --data's fit split does
    views = [splits.heldout_fit[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    # and the rest of the fit split (BN re-estimation) is disjoint from the held-out examples
    assert not set(splits.fit.indices) & set(splits.heldout_fit.indices)


def test_imagefolder_plain_view_reads_training_images_as_the_eval_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
    for c in ("a", "b"):
        for i in range(2):
            pixels = Image.fromarray(rng.integers(0, 256, size=(240, 300, 3), dtype=np.uint8))
            for split in ("train", "val"):  # the same files in both: the plain view must equal the eval split
                pixels.save(tmp_path / split / c / f"{i}.png")
    config = SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "out", data=f"imagefolder:{tmp_path}",
                        holdout_fraction=0.5)
    splits = soup_data(config)
    eval_split = build_data(f"imagefolder:{tmp_path}").eval
    for position, index in enumerate(splits.heldout_fit.indices):
        image, target = splits.heldout_eval[position]
        expected, expected_target = eval_split[index]
        assert image.shape == (3, 224, 224) and target == expected_target
        torch.testing.assert_close(image, expected, atol=0, rtol=0)
    assert splits.heldout_fit[0][0].shape == (3, 224, 224)  # fitting: RandomResizedCrop, as the fit split


def test_holdout_image_folders_with_other_classes_are_refused(tmp_path: Path) -> None:
    """--holdout imagefolder:P2 whose class folders were a subset of --data's: class c was numbered 1 there and 2
    in --data, and every held-out example of it was scored against the wrong label, without an error."""
    import pytest

    from twa_tool.errors import DataError

    for root, classes in ((tmp_path / "data", ("a", "b", "c")), (tmp_path / "held", ("a", "c"))):
        for split in ("train", "val"):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(root / split / c / "0.png")
    config = SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "out", data=f"imagefolder:{tmp_path / 'data'}",
                        holdout=f"imagefolder:{tmp_path / 'held'}")
    with pytest.raises(DataError, match=r"its classes differ from --data .*\(2 vs 3; only in --data: b\)"):
        soup_data(config)
    same = SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "out", data=f"imagefolder:{tmp_path / 'data'}",
                      holdout=f"imagefolder:{tmp_path / 'data'}")
    assert len(soup_data(same).heldout_eval) == 3


def test_a_holdout_of_another_built_in_dataset_is_a_usage_error(finetunes: Path, tmp_path: Path) -> None:
    """--data mnist --holdout fashion-mnist (same shapes, 10 classes each) ran to the end: every held-out example was
    scored against the digit its clothing label's number names, and the soups chosen on that, without a word."""
    from click.testing import CliRunner
    from conftest import model_flags
    from test_data import write_idx_set

    from twa_tool.cli import cli

    rng = np.random.default_rng(0)
    write_idx_set(tmp_path / "data" / "MNIST" / "raw", rng, gz=False)
    write_idx_set(tmp_path / "data" / "FashionMNIST" / "raw", rng, gz=False)
    result = CliRunner().invoke(cli, ["soup", str(finetunes), *model_flags(), "--data", "mnist", "--holdout",
                                      "Fashion-MNIST", "--data-root", str(tmp_path / "data"), "--epochs", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --holdout Fashion-MNIST's labels stand for Fashion-MNIST's 10 clothing classes, --data "
                     "mnist's for the digits 0-9: the held-out examples would be scored against the wrong classes; "
                     "drop --holdout (a part of --data's fit split is held out) or give a --holdout with --data's "
                     "classes"]
    assert not (tmp_path / "out").exists()


def test_holdout_labels_agree_only_between_built_ins_that_number_the_same_classes(tmp_path: Path) -> None:
    import pytest

    from twa_tool.data import label_meaning, list_data_names
    from twa_tool.errors import ConfigError
    from twa_tool.soup import check_holdout_labels

    assert all(label_meaning(name) for name in list_data_names())  # a new built-in says what its labels are
    for data, holdout in (("cifar10", "svhn"), ("cifar10", "cifar100"), ("imagenet", "cifar10"),
                          ("synthetic", "mnist")):
        with pytest.raises(ConfigError, match=f"--holdout {holdout}'s labels .* --data {data}'s"):
            check_holdout_labels(SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "o", data=data, holdout=holdout))
    for data, holdout in (("mnist", "svhn"), ("CIFAR-10", "cifar10"), ("imagenet", f"imagefolder:{tmp_path}"),
                          ("cifar10", "heldout.py:load"), ("cifar10", None)):
        check_holdout_labels(SoupConfig(finetunes_dir=tmp_path, out_dir=tmp_path / "o", data=data, holdout=holdout))
