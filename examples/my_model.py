"""A custom model and a custom dataset for fleetlearn, loaded by import path.

    fleetlearn run examples/custom_model.toml

fleetlearn calls `make_model(num_features, num_classes, **model.kwargs)` and
`make_data(seed)`; the config names them as "my_model:make_model" and
"my_model:make_data": import paths resolve next to the config file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A small CNN for 8x8 single-channel images (scikit-learn's digits)."""

    def __init__(self, num_classes: int, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(x.flatten(1))


def make_model(num_features: int, num_classes: int, channels: int = 8) -> nn.Module:
    assert num_features == 64, "TinyConvNet expects 8x8 inputs"
    return TinyConvNet(num_classes, channels)


def make_data(seed: int) -> dict:
    """Digits, with each example owned by one of 20 'hospitals' (its natural device)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    return {
        "x": (d.data / 16.0).astype(np.float32),
        "y": d.target.astype(np.int64),
        "client": rng.integers(0, 20, size=len(d.target)),
    }
