"""P-SGD against a line-by-line reference of the paper's update; schedules; span; BN; evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyBN
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from twa_tool.config import TrainConfig
from twa_tool.errors import NumericalError
from twa_tool.models import flatten, trainable_names, write_flat
from twa_tool.subspace import build_subspace
from twa_tool.trainer import SCHEDULES, FlatGrad, evaluate, recalibrate_bn, train_projected

CPU = torch.device("cpu")


def checkpoints_and_model(k: int = 4, seed: int = 0) -> tuple[TinyBN, list[str], list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = TinyBN()
    names = trainable_names(model)
    base = flatten(dict(model.named_parameters()), names)
    vectors = [base + 0.1 * torch.randn_like(base) for _ in range(k)]
    return model, names, vectors


def data(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def reference_psgd(model: TinyBN, names: list[str], p: torch.Tensor, batches: list, lr_at, momentum: float,
                   wd: float) -> torch.Tensor:
    """The paper's update written out plainly: g <- P^T P g; d = g + wd*w; buf = m*buf + d; w -= lr*buf."""
    w = flatten(dict(model.named_parameters()), names)
    buf = None
    for i, (x, y) in enumerate(batches):
        write_flat(model, names, w.float())
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        params = dict(model.named_parameters())
        g = torch.cat([params[n].grad.reshape(-1) for n in names]).double()
        g = p.T @ (p @ g)
        d = g + wd * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr_at(i) * buf
    return w


@pytest.mark.parametrize("schedule", ["constant", "step", "linear", "cosine"])
def test_projected_sgd_equals_reference_update(schedule: str) -> None:
    model, names, vectors = checkpoints_and_model()
    sub = build_subspace(vectors, dtype=torch.float64)
    start = torch.stack(vectors).mean(0)
    write_flat(model, names, start.float())
    reference_model = copy.deepcopy(model)
    dataset = data()
    batches = [dataset[i:i + 16] for i in range(0, 64, 16)]
    config = TrainConfig(lr=0.5, momentum=0.9, weight_decay=1e-3, epochs=2, batch_size=16, schedule=schedule)
    train_projected(model, names, sub.basis.values.float(), batches, config, CPU)
    lr_at = lambda i: config.lr * SCHEDULES[schedule](i // 4, i % 4, 4, 2)  # noqa: E731
    expected = reference_psgd(reference_model, names, sub.basis.values, batches * 2, lr_at, 0.9, 1e-3)
    got = flatten(dict(model.named_parameters()), names)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got - expected).abs().max()
    assert not torch.allclose(got, start)  # it actually moved


def test_iterates_stay_in_the_span() -> None:
    model, names, vectors = checkpoints_and_model()
    sub = build_subspace(vectors)
    write_flat(model, names, vectors[-1])
    loader = DataLoader(data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_projected(model, names, sub.basis, loader, TrainConfig(lr=1.0, epochs=3, batch_size=8), CPU)
    w = flatten(dict(model.named_parameters()), names)
    p = sub.basis.values.double()
    assert torch.linalg.vector_norm(w - p.T @ (p @ w)) / torch.linalg.vector_norm(w) < 1e-5


def test_step_schedule_matches_reference_milestones() -> None:
    factors = [SCHEDULES["step"](e, 0, 1, 10) for e in range(10)]
    assert factors == pytest.approx([1] * 5 + [0.1] * 3 + [0.01] * 2)
    assert [SCHEDULES["step"](e, 0, 1, 2) for e in range(2)] == pytest.approx([1, 0.1])
    assert SCHEDULES["linear"](0, 0, 10, 1) == 1 and SCHEDULES["linear"](0, 5, 10, 1) == pytest.approx(0.5)
    assert SCHEDULES["cosine"](0, 5, 10, 1) == pytest.approx(0.5)


def test_gradients_are_views_into_one_buffer() -> None:
    model, names, _ = checkpoints_and_model()
    params = [dict(model.named_parameters())[n] for n in names]
    flat = FlatGrad(params)
    x, y = data()[:8]
    F.cross_entropy(model(x), y).backward()
    g = flat.gather()
    assert all(p.grad is v for p, v in zip(params, flat.views))
    assert torch.equal(g, torch.cat([p.grad.reshape(-1) for p in params]))
    assert g.abs().sum() > 0


def test_non_finite_loss_names_step_and_lr() -> None:
    model, names, vectors = checkpoints_and_model()
    sub = build_subspace(vectors)
    x, y = data()[:8]
    x[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"epoch 1 step 1 \(lr 2\); lower --lr"):
        train_projected(model, names, sub.basis, [(x, y)], TrainConfig(lr=2.0, epochs=1, schedule="constant"), CPU)


def test_bn_recalibration_equals_hand_computed_statistics() -> None:
    model, _, _ = checkpoints_and_model()
    model.bn.momentum = 0.3
    x, _ = data(n=48)[:]
    loader = DataLoader(TensorDataset(x, torch.zeros(48, dtype=torch.long)), batch_size=16)
    model.eval()
    assert recalibrate_bn(model, loader, CPU)
    with torch.no_grad():
        pre = model.fc1(x)
    batches = pre.split(16)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(model.bn.running_var, expected_var, atol=1e-6)
    assert model.bn.momentum == 0.3 and not model.training  # restored


def test_evaluate_counts_accuracy_and_loss() -> None:
    model, _, _ = checkpoints_and_model()
    dataset = data(n=40)
    model.eval()
    metrics = evaluate(model, DataLoader(dataset, batch_size=7), CPU)
    with torch.no_grad():
        logits = model(dataset.tensors[0])
    assert metrics.count == 40
    assert metrics.accuracy == pytest.approx((logits.argmax(1) == dataset.tensors[1]).float().mean().item())
    assert metrics.loss == pytest.approx(F.cross_entropy(logits, dataset.tensors[1]).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
def test_integer_labels_of_any_width_are_class_indices(dtype: torch.dtype) -> None:
    # cross_entropy takes only long or uint8 targets: int32 labels failed mid-run as an 'unexpected error'
    from twa_tool.trainer import class_loss

    logits, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert torch.equal(class_loss(logits, targets.to(dtype)), class_loss(logits, targets))


class FailsAt5(torch.utils.data.Dataset):
    """Eight examples; reading the sixth raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index == 5:
            raise self.error
        return torch.randn(6), index % 3


def test_a_batch_that_cannot_be_read_is_a_data_error() -> None:
    from twa_tool.errors import DataError
    from twa_tool.trainer import Sourced

    model = TinyBN()
    loader = DataLoader(FailsAt5(OSError("cannot identify image file 'val/cat/5.jpg'")), batch_size=4)
    for run in (lambda: evaluate(model, loader, torch.device("cpu")),
                lambda: recalibrate_bn(model, loader, torch.device("cpu"))):
        with pytest.raises(DataError, match=r"reading a batch of --data failed \(OSError: cannot identify image "
                                            r"file 'val/cat/5.jpg'\)"):
            run()
    held_out = Sourced(loader, "--holdout")  # twa soup's held-out split when --holdout gave it
    assert len(held_out) == 2
    with pytest.raises(DataError, match=r"reading a batch of --holdout failed \(OSError"):
        evaluate(model, held_out, torch.device("cpu"))


def test_a_batch_that_runs_out_of_memory_is_not_a_data_error() -> None:
    """A batch too big for the machine is the run's size, not the data's fault: it reaches the CLI as itself
    (exit 9, 'lower --batch-size'), not as 'reading a batch of --data failed' (exit 4, 'fix the example')."""
    huge = FailsAt5(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes."))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        evaluate(TinyBN(), DataLoader(huge, batch_size=4), torch.device("cpu"))


def test_a_label_outside_the_outputs_is_a_data_error_on_devices_where_cross_entropy_does_not_raise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU cross_entropy raises IndexError for a label >= C (or < 0, other than ignore_index -100); on CUDA
    it is a device-side assert instead, surfacing at the next sync as an unexpected RuntimeError that poisons the
    process. Simulated here with cross_entropy as CUDA behaves: the label must be refused before it is called."""
    from twa_tool.errors import DataError
    from twa_tool.trainer import class_loss

    real = F.cross_entropy

    def cuda_like(logits: torch.Tensor, targets: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if ((targets >= logits.shape[-1]) | ((targets < 0) & (targets != -100))).any():
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(logits, targets, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", cuda_like)
    logits = torch.randn(3, 10)
    for labels, named in (([1, 2, 11], 11), ([1, -1, 3], -1), ([10, 0, 0], 10)):
        with pytest.raises(DataError, match=rf"outside the model's 10 outputs \(Target {named} is out of bounds"):
            class_loss(logits, torch.tensor(labels))
    with pytest.raises(DataError, match=r"\(Target 200 is out of bounds"):
        class_loss(logits, torch.tensor([1, 200, 3], dtype=torch.uint8))
    # -100 is cross_entropy's ignore_index on every device: skipped, as before
    assert torch.isclose(class_loss(logits, torch.tensor([1, -100, 3])), real(logits[[0, 2]], torch.tensor([1, 3])))
