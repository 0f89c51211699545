"""The `Learner` protocol: what a client runs, in simulation, on Ray or on a phone.

A learner turns (global params, local data, hyper-parameters) into a delta and the
client's own measurements.  It sees flat float32 vectors at its boundary; how it
maps them onto a model is its own business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..params import ParamSpec


@dataclass(frozen=True)
class FitConfig:
    """Local-training hyper-parameters for one round (sent inside the Task)."""

    local_epochs: int = 1
    local_steps: int | None = None  # if set, overrides local_epochs
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Local objective terms (docs/architecture.md, section 4.2: the local objective modifies the step).
    prox_mu: float = 0.0  # FedProx proximal term mu/2 ||w - w_global||^2 (Li et al., MLSys 2020)

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ClientData:
    """One client's local data: training examples and a local test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])


@dataclass
class FitResult:
    delta: torch.Tensor  # (d,) local params minus the params received
    num_examples: int
    # From the training pass (docs/architecture.md 4.2): the received model's loss on the first
    # mini-batch, and the size-weighted mean batch loss of the last epoch (nan: no step taken).
    loss_before: float
    loss_after: float
    accuracy: float  # local model on the local test split (nan if empty)
    steps: int
    samples: int  # examples processed, what the virtual clock charges compute for
    compute_seconds: float
    # Personalization (fleetlearn.client.personalization): the client's personal model and
    # the global model it received, each on its local test split (nan: not measured).
    personal_accuracy: float = math.nan
    global_accuracy: float = math.nan
    # Clustered FL (fleetlearn.learners.clustered): the block of the stacked models this
    # client trained (delta is zero elsewhere), and how many blocks there are.
    cluster: int | None = None
    clusters: int = 1


@runtime_checkable
class Learner(Protocol):
    spec: ParamSpec

    def init_params(self, seed: int) -> torch.Tensor:
        """A fresh flat parameter vector, deterministic in `seed`."""
        ...

    def fit(
        self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int,
        correction: torch.Tensor | None = None, max_steps: int | None = None,
    ) -> FitResult:
        """Train locally from `params`; deterministic in `seed`.  `correction` is a
        constant added to every gradient (SCAFFOLD's c - c_i); `max_steps` cuts
        training short (partial work)."""
        ...

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
        anchor: torch.Tensor | None = None,
    ) -> list[FitResult]:
        """Train every client of a cohort from `params`, the same (d,) vector or one (n, d)
        row per client (may be batched); `corrections` is an optional (n, d) matrix, one
        gradient correction per client; `step_limits` caps each client's steps; `anchor`
        is the centre of the prox term (default: each client's start point)."""
        ...

    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and correctness (float 0/1) of `params` on (x, y)."""
        ...


class SingleClientLearner:
    """Base for a learner that trains one client at a time: implement `fit` (and `spec`);
    `fit_cohort`, which the client device calls, trains the cohort client by client."""

    needs_client_ids = False

    def fit(self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int,
            correction: torch.Tensor | None = None, max_steps: int | None = None) -> FitResult:
        raise NotImplementedError

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
    ) -> list[FitResult]:
        limits = step_limits if step_limits is not None else [None] * len(cohort)
        return [
            self.fit(params, data, hp, seed, None if corrections is None else corrections[i], limits[i])
            for i, (data, seed) in enumerate(zip(cohort, seeds))
        ]
