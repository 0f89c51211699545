"""Learners: the code a client runs.  `TorchLearner` wraps any `torch.nn.Module`."""

from .base import ClientData, CohortData, FitConfig, FitResult, Learner, SingleClientLearner, cohort_rows, cohort_sizes
from .models import import_object, logistic, mlp, model_factory
from .torch_learner import TorchLearner, batch_schedule, resolve_device

__all__ = [
    "ClientData",
    "CohortData",
    "cohort_rows",
    "cohort_sizes",
    "FitConfig",
    "FitResult",
    "Learner",
    "SingleClientLearner",
    "TorchLearner",
    "batch_schedule",
    "import_object",
    "logistic",
    "mlp",
    "model_factory",
    "resolve_device",
]
