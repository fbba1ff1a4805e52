"""Fashion-MNIST split three ways for the soup example: pretrain, fine-tune, held-out (+ the test set).

A seeded permutation of the 60k training images gives disjoint parts:

    PRETRAIN  10,000 images  the "pretrained model" is trained on these
    FINETUNE  10,000 images  every fine-tune (ingredient) trains on these
    HELDOUT    2,000 images  never seen by any training: ranks greedy's ingredients, fits TWA's coefficients

and the 10k test images are the evaluation split. ``twa soup`` reads the parts through
``--data examples/soup/data.py:finetune`` (fit split for BN re-estimation, test split for evaluation)
and ``--holdout examples/soup/data.py:heldout`` (its second dataset is the held-out split).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from twa_tool.data import build_data

SIZES = {"pretrain": 10_000, "finetune": 10_000, "heldout": 2_000}
SEED = 0


@lru_cache(maxsize=2)  # pretrain() and finetune() in make_finetunes.py share one read of the files;
# twa soup runs this file once per spec, so --data and --holdout each read them
def _parts(root: Path | None) -> tuple[dict[str, Subset], Dataset]:
    data = build_data("fashion-mnist", root=root)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SEED)).tolist()
    parts, start = {}, 0
    for name, size in SIZES.items():
        parts[name] = Subset(data.train, sorted(order[start:start + size]))
        start += size
    return parts, data.eval


def pretrain(root: Path | None = None) -> tuple[Dataset, Dataset]:
    parts, test = _parts(root)
    return parts["pretrain"], test


def finetune(root: Path | None = None) -> tuple[Dataset, Dataset]:
    parts, test = _parts(root)
    return parts["finetune"], test


def heldout(root: Path | None = None) -> tuple[Dataset, Dataset]:
    parts, _ = _parts(root)
    return parts["heldout"], parts["heldout"]
