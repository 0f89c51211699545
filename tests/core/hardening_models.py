"""Model factories for tests/core/test_config_hardening.py, named by import path."""

import torch


def ok(num_features, num_classes, **kwargs):
    return torch.nn.Linear(num_features, num_classes)


def raises(num_features, num_classes, **kwargs):
    raise ValueError("no such architecture")


def exits(num_features, num_classes, **kwargs):
    raise SystemExit(3)


def wrong_shape(num_features, num_classes, **kwargs):
    return torch.nn.Linear(num_features, num_classes + 3)


def float64(num_features, num_classes, **kwargs):
    return torch.nn.Linear(num_features, num_classes).double()


def no_parameters(num_features, num_classes, **kwargs):
    return torch.nn.Identity()
