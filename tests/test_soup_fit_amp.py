"""``twa soup --amp fp16`` scales the loss before back-propagating, as ``twa average`` does (GradScaler).

Without loss scaling, float16 activation gradients below 6e-8 flush to zero and the mixing coefficients
stop moving; the float32 fit is the known answer the fp16 fit must follow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twa_tool.config import CoefficientTrainConfig
from twa_tool.models import flatten, trainable_names
from twa_tool.soup import Directions, fit_coefficients, segments_of


def confident(scale: float) -> nn.Linear:
    """A linear classifier of the sign of x[:, 0], more confident the larger ``scale`` (tiny loss gradients)."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1, 0], layer.weight[0, 0] = scale, -scale
        layer.bias.zero_()
        layer.weight.add_(0.01 * torch.randn(2, 4))
    return layer


def fitted_change(amp: str) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    ingredients = [confident(s) for s in (80.0, 100.0, 120.0)]
    model = confident(1.0)
    names = trainable_names(model)
    rows = [flatten(dict(m.named_parameters()), names, torch.float32) for m in ingredients]
    center = torch.stack(rows).mean(0)
    directions = Directions(center, center, segments_of(model, names), len(rows))
    for i, row in enumerate(rows):
        directions.set_row(i, row)
    config = CoefficientTrainConfig(optimizer="sgd", lr=1.0, epochs=1, batch_size=64, schedule="constant", warmup=0.0)
    fit = fit_coefficients(model, names, directions, [0, 0], [(x, y)], config, torch.device("cpu"), amp=amp)
    return fit.coefficients[:, 0] - 1 / 3


def test_fp16_fit_follows_the_float32_fit_where_gradients_are_below_float16s_range() -> None:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(1, 2) @ torch.ones(2, 1)
    except RuntimeError:
        pytest.skip("no float16 autocast on this CPU build")
    reference = fitted_change("off")
    assert reference.abs().min() > 5e-7  # the float32 fit moves every coefficient
    torch.testing.assert_close(fitted_change("fp16"), reference, rtol=0.05, atol=0)
