"""Personalization: each client keeps a personal model next to the global one.

The parts (``[personalization] method``):

- ``finetune``: the client fine-tunes the global model for a few SGD steps on its own
  data (the "local adaptation" baseline of e.g. Yu et al. 2020, arXiv:2002.04758).
  Stateless: the personal model is always derived from the current global model.
- ``fedper`` (Arivazhagan et al. 2019, arXiv:1912.00818): the model is a shared body
  and a personal head.  A client trains body and head from (global body, its own head);
  it keeps the head and uploads the body's delta only: the head's coordinates of the
  delta are zero, so they never leave the device and the aggregate leaves the server's
  head untouched.  Personal model = (global body, own head).
- ``ditto`` (Li et al., ICML 2021, Algorithm 1): global training is unchanged; each
  selected client also takes local steps on its personal model v_k for
  ``F_k(v) + lambda/2 ||v - w||^2`` around the global model w it received.
  Personal model = v_k.

Personal state (FedPer heads, Ditto models) lives in a `ClientStateStore` keyed by
client id and is read and written only for the clients trained or evaluated, in
cohort-sized batches; the cohort trains as one batched computation
(`Learner.fit_cohort` with one start point per client).  Each part reports, per
client, the accuracy of its personal model and of the global model on the client's
local test split (`FitResult.personal_accuracy` / `global_accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from ..learners.base import ClientData, FitConfig, FitResult
from ..params import ParamSpec


def personal_seed(seed: int) -> int:
    """A second per-client stream for the personal step, distinct from the training seed."""
    return int(np.random.SeedSequence([int(seed), 0x9E450]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Personalization:
    """The `none` part and the shared machinery; subclasses say what the personal model is."""

    name = "none"
    state_key = ""  # the ClientStateStore entry this part keeps ("" = stateless)

    def fit_cohort(
        self, learner, params: torch.Tensor, clients: list[int], cohort: list[ClientData], hp: FitConfig,
        seeds: list[int], store, step_limits: list[int | None] | None = None,
    ) -> list[FitResult]:
        """Global training of the cohort (what is uploaded) plus the personal step;
        sets each result's `personal_accuracy` and `global_accuracy`."""
        results = learner.fit_cohort(params, cohort, hp, seeds, step_limits=step_limits)
        self._measure(learner, params, clients, cohort, hp, seeds, store, results)
        return results

    def _measure(self, learner, params, clients, cohort, hp, seeds, store, results) -> None:
        if not results:
            return
        personal = self.personal_step(learner, params, clients, cohort, hp, seeds, store, results)
        global_acc = learner.cohort_test_accuracy(params, cohort)
        for r, p, g in zip(results, personal, global_acc):
            r.personal_accuracy, r.global_accuracy = float(p), float(g)

    def personal_step(self, learner, params, clients, cohort, hp, seeds, store, results) -> np.ndarray:
        """Update the cohort's personal state after a round; personal accuracies (n,)."""
        return np.full(len(cohort), math.nan)

    def evaluate(self, learner, params, clients, cohort, hp, seeds, store) -> tuple[np.ndarray, np.ndarray]:
        """(personal, global) accuracy of each client on its local test split for the global
        model `params`, without changing any state (the end-of-run evaluation)."""
        return np.full(len(cohort), math.nan), learner.cohort_test_accuracy(params, cohort)

    def outgoing(self, delta: torch.Tensor) -> torch.Tensor:
        """The part of a delta that leaves the device (all of it, except FedPer's head)."""
        return delta

    def has_state(self, store, clients: list[int]) -> int:
        if not self.state_key:
            return len(clients)
        return sum(store.get(int(c)) is not None for c in clients)

    def _stacked(self, store, clients: list[int], default: torch.Tensor) -> torch.Tensor:
        """(n, k) state rows of `clients`, `default` for those without state."""
        rows = []
        for c in clients:  # one dict lookup per cohort member; the maths below is batched
            st = store.get(int(c))
            rows.append(st[self.state_key] if st is not None else default)
        return torch.stack(rows)

    def _store(self, store, clients: list[int], rows: torch.Tensor) -> None:
        for c, row in zip(clients, rows):
            store.put(int(c), {self.state_key: row.detach().clone()})


class FineTune(Personalization):
    name = "finetune"

    def __init__(self, steps: int, lr: float | None = None):
        self.steps = steps
        self.lr = lr

    def _hp(self, hp: FitConfig) -> FitConfig:
        return replace(hp, local_steps=self.steps, lr=self.lr or hp.lr, prox_mu=0.0)

    def _finetuned(self, learner, params, cohort, hp, seeds) -> np.ndarray:
        res = learner.fit_cohort(params, cohort, self._hp(hp), [personal_seed(s) for s in seeds])
        return np.array([r.accuracy for r in res])

    def personal_step(self, learner, params, clients, cohort, hp, seeds, store, results) -> np.ndarray:
        return self._finetuned(learner, params, cohort, hp, seeds)

    def evaluate(self, learner, params, clients, cohort, hp, seeds, store):
        return self._finetuned(learner, params, cohort, hp, seeds), learner.cohort_test_accuracy(params, cohort)


def head_indices(spec: ParamSpec, head: str) -> torch.Tensor:
    """Flat-vector coordinates of the personal head: "last" = the tensors of the last
    layer (those sharing the last tensor's module path), else the tensors whose name
    starts with `head`.  Raises ValueError naming the tensors when the choice is empty
    or leaves nothing to share."""
    names = spec.names
    if head == "last":
        chosen = list(spec.last_layer())
    else:
        chosen = [n for n in names if n.startswith(head)]
    if not chosen:
        raise ValueError(f"no parameter name starts with {head!r}; the model's tensors are {list(names)}")
    if len(chosen) == len(names):
        raise ValueError(f"{head!r} selects every tensor ({list(names)}); FedPer needs a shared body")
    parts = [torch.arange(o, o + s) for n, o, s in zip(names, spec.offsets, spec.sizes) if n in chosen]
    return torch.cat(parts)


class FedPer(Personalization):
    name = "fedper"
    state_key = "head"

    def __init__(self, spec: ParamSpec, head: str = "last"):
        self.index = head_indices(spec, head)
        self.mask = torch.ones(spec.dim)
        self.mask[self.index] = 0.0  # 1 on the shared body, 0 on the personal head

    def _with_heads(self, params: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        starts = params.detach().to(torch.float32).expand(heads.shape[0], -1).clone()
        starts[:, self.index] = heads
        return starts

    def fit_cohort(self, learner, params, clients, cohort, hp, seeds, store, step_limits=None):
        if not cohort:
            return []
        heads = self._stacked(store, clients, params[self.index])
        results = learner.fit_cohort(self._with_heads(params, heads), cohort, hp, seeds, step_limits=step_limits)
        new_heads = heads + torch.stack([r.delta[self.index] for r in results])
        self._store(store, clients, new_heads)
        personal = learner.cohort_test_accuracy(self._with_heads(params, new_heads), cohort)
        global_acc = learner.cohort_test_accuracy(params, cohort)
        for r, p, g in zip(results, personal, global_acc):
            r.personal_accuracy, r.global_accuracy = float(p), float(g)
        return results

    def evaluate(self, learner, params, clients, cohort, hp, seeds, store):
        heads = self._stacked(store, clients, params[self.index])
        return learner.cohort_test_accuracy(self._with_heads(params, heads), cohort), learner.cohort_test_accuracy(params, cohort)

    def outgoing(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.mask  # the head stays on the device


class Ditto(Personalization):
    name = "ditto"
    state_key = "personal"

    def __init__(self, lam: float, epochs: int | None = None):
        self.lam = lam
        self.epochs = epochs

    def _hp(self, hp: FitConfig) -> FitConfig:
        if self.epochs is not None:
            hp = replace(hp, local_epochs=self.epochs, local_steps=None)
        return replace(hp, prox_mu=self.lam)

    def personal_step(self, learner, params, clients, cohort, hp, seeds, store, results) -> np.ndarray:
        w = params.detach().to(torch.float32)
        v = self._stacked(store, clients, w)  # a client's first personal model starts at w
        res = learner.fit_cohort(v, cohort, self._hp(hp), [personal_seed(s) for s in seeds], anchor=w)
        self._store(store, clients, v + torch.stack([r.delta for r in res]))
        return np.array([r.accuracy for r in res])

    def evaluate(self, learner, params, clients, cohort, hp, seeds, store):
        w = params.detach().to(torch.float32)
        return learner.cohort_test_accuracy(self._stacked(store, clients, w), cohort), learner.cohort_test_accuracy(w, cohort)


PERSONALIZATION_METHODS = ("none", "finetune", "fedper", "ditto")


def build_personalization(settings: dict, spec: ParamSpec) -> Personalization | None:
    """The `[personalization]` part, or None for method "none".  ValueError on a bad head."""
    method = settings.get("method", "none")
    if method == "none":
        return None
    if method == "finetune":
        return FineTune(int(settings["finetune_steps"]), settings.get("finetune_lr"))
    if method == "fedper":
        return FedPer(spec, settings.get("head", "last"))
    if method == "ditto":
        return Ditto(float(settings["ditto_lambda"]), settings.get("ditto_epochs"))
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(PERSONALIZATION_METHODS)}")


def personalization_for_run(config, learner) -> Personalization | None:
    """The run's `[personalization]` part for `learner` (None for method "none"), built the
    same way by the server's factory and by `fleetlearn client`.  Raises `ConfigError`
    naming the key on a setting that cannot work."""
    from ..config import ConfigError

    p = config.personalization
    if p.method == "none":
        return None
    if not hasattr(learner, "cohort_test_accuracy"):
        raise ConfigError(f"personalization.method = {p.method!r} needs a learner with per-client start points (TorchLearner)")
    key = "personalization.head" if p.method == "fedper" else "personalization.method"
    value = p.head if p.method == "fedper" else p.method
    try:
        return build_personalization(p.model_dump(), learner.spec)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key} = {value!r}: {exc}") from None
