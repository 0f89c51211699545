"""Built-in models and the import-path hook for users' own."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn


def mlp(num_features: int, num_classes: int, hidden: list[int] | tuple[int, ...] = (128,)) -> nn.Module:
    """A ReLU multi-layer perceptron, e.g. 64-128-10 on digits."""
    layers: list[nn.Module] = []
    width = num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def logistic(num_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the model of FedProx's Synthetic experiments)."""
    return nn.Linear(num_features, num_classes)


def import_object(path: str) -> Any:
    """``"pkg.module:name"`` -> the object.  Raises ImportError with the path in the message."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import {module_name!r} (from {path!r}): {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{module_name!r} has no attribute {attr!r} (from {path!r})") from None


def model_factory(name: str, num_features: int, num_classes: int, hidden: list[int], kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    """A zero-argument constructor for the configured model."""
    if name == "mlp":
        return lambda: mlp(num_features, num_classes, hidden)
    if name == "logistic":
        return lambda: logistic(num_features, num_classes)
    if name in ("char_gru", "char_lstm"):
        from .text_models import char_gru, char_lstm

        make_rnn = char_gru if name == "char_gru" else char_lstm
        width = hidden[0] if hidden else 64
        make_rnn(num_features, num_classes, hidden=width, **kwargs)  # bad kwargs fail here, at build time
        return lambda: make_rnn(num_features, num_classes, hidden=width, **kwargs)
    fn = import_object(name)
    if not callable(fn):
        raise TypeError(f"model {name!r} is not callable")

    def make() -> nn.Module:
        module = fn(num_features, num_classes, **kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"model {name!r} returned {type(module).__name__}, not a torch.nn.Module")
        return module

    return make
