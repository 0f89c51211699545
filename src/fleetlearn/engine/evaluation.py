"""Evaluation of the global model: centrally on the held-out test set, and
federated on the clients' local test splits (so global and local views of
accuracy are both visible).  Both are one batched forward pass."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import FederatedData
from ..learners.base import ClientData, FitConfig, Learner


def binary_f1(correct: torch.Tensor, y: torch.Tensor) -> float:
    """F1 of class 1 from per-example correctness and labels 0/1: 2 TP / (2 TP + FP + FN)
    (a wrong answer on a class-0 row is a false positive, on a class-1 row a false negative);
    nan when there are no positives at all, predicted or true."""
    c = correct.to(torch.bool)
    pos = y == 1
    tp = int((c & pos).sum())
    fn = int((~c & pos).sum())
    fp = int((~c & ~pos).sum())
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else math.nan


class Evaluator:
    def __init__(
        self, learner: Learner, data: FederatedData, eval_clients: int, seed: int, federated: bool = True,
        personalization=None, personal_states=None, chunk: int = 100,
    ):
        self.learner = learner
        self.data = data
        self.enabled_federated = federated
        self.seed = seed
        # Personalization (fleetlearn.client.personalization) and the clients' personal state.
        self.personalization = personalization
        self.personal_states = personal_states
        self.chunk = max(1, chunk)  # clients personalised at once: memory chunk x d, not population x d
        n = data.num_clients
        sizes = data.test_sizes()
        candidates = np.flatnonzero(sizes > 0)
        if eval_clients and len(candidates) > eval_clients:
            rng = np.random.default_rng([seed, 0xE7A1])
            candidates = np.sort(rng.choice(candidates, size=eval_clients, replace=False))
        self.clients = candidates
        # One index array over the sampled clients' test rows, and the owner of each row.
        parts = [data.test_indices(int(c)) for c in candidates]
        self.rows = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)
        self.owner = np.repeat(np.arange(len(candidates)), sizes[candidates]) if n else np.zeros(0, dtype=np.int64)
        self.counts = sizes[candidates].astype(np.float64)

    def central(self, params: torch.Tensor) -> tuple[float, float]:
        """(loss, accuracy) on the held-out central test set."""
        loss, acc, _ = self.central_scores(params)
        return loss, acc

    def central_scores(self, params: torch.Tensor) -> tuple[float, float, dict]:
        """(loss, accuracy, extra scores) on the held-out central test set; the extra scores of
        a binary task are ``{"f1": F1 of class 1}`` (spam, say), else empty."""
        if self.data.central_y.numel() == 0:
            return math.nan, math.nan, {}
        y = self.data.central_y
        loss, correct = self.learner.per_example(params, self.data.central_x, y)
        extra = {"f1": binary_f1(correct, y)} if self.data.num_classes == 2 else {}
        return float(loss.mean()), float(correct.mean()), extra

    def federated(self, params: torch.Tensor) -> tuple[float, float]:
        """(mean, 10th percentile) over clients of the global model's local test accuracy."""
        if self.rows.numel() == 0 or not self.enabled_federated:
            return math.nan, math.nan
        x, y = self.data.x[self.rows], self.data.y[self.rows]
        at_own_width = getattr(self.learner, "per_example_of_clients", None)
        if at_own_width is not None:  # HeteroFL: each client evaluates the sub-model it would run
            _, correct = at_own_width(params, x, y, self.clients[self.owner])
        else:
            _, correct = self.learner.per_example(params, x, y)
        per_client = np.bincount(self.owner, weights=correct.numpy(), minlength=len(self.clients)) / self.counts
        return float(per_client.mean()), float(np.percentile(per_client, 10))

    def _client_data(self, c: int) -> ClientData:
        tr = torch.from_numpy(self.data.train_indices(c))
        te = torch.from_numpy(self.data.test_indices(c))
        return ClientData(self.data.x[tr], self.data.y[tr], self.data.x[te], self.data.y[te])

    def personal(self, params: torch.Tensor, hp: FitConfig) -> dict | None:
        """Personal vs global accuracy on the local test splits of the federated-evaluation
        clients, `chunk` clients at a time (each chunk one batched computation).  None when
        personalization is off or the server cannot see clients' data."""
        pers = self.personalization
        if pers is None or not self.enabled_federated or len(self.clients) == 0:
            return None
        from ..transport.simulation import client_seed

        personal, global_ = [], []
        with_state = 0
        for lo in range(0, len(self.clients), self.chunk):
            ids = [int(c) for c in self.clients[lo : lo + self.chunk]]
            cohort = [self._client_data(c) for c in ids]
            seeds = [client_seed(self.seed, 0x7E57, c) for c in ids]
            p, g = pers.evaluate(self.learner, params, ids, cohort, hp, seeds, self.personal_states)
            personal.append(np.asarray(p, dtype=np.float64))
            global_.append(np.asarray(g, dtype=np.float64))
            with_state += pers.has_state(self.personal_states, ids)
        p_all, g_all = np.concatenate(personal), np.concatenate(global_)
        return {
            "method": pers.name,
            "clients": int(len(p_all)),
            "clients_with_state": int(with_state),
            "personal_accuracy": float(np.nanmean(p_all)),
            "global_accuracy": float(np.nanmean(g_all)),
            "gain": float(np.nanmean(p_all) - np.nanmean(g_all)),
            "clients_improved": float(np.mean(p_all > g_all)),
        }


class ClusteredEvaluator(Evaluator):
    """Evaluation of clustered FL: each client is scored with the model of its cluster.

    Central test accuracy of k models has no single meaning; the central set is scored
    like a new client would be: by the active model with the lowest loss on it.
    Federated: each sampled client's cluster is the one it would train (lowest loss on its
    local *training* split among the clusters the server allows it, `clustering.allowed`),
    and its accuracy is that model's on its local test split.  `last_extra` holds, per
    evaluation, the mean accuracy per cluster and the best a single one of the models
    reaches on every client (`single_model_fed_accuracy`, the "one global model" view);
    `last_choice` each sampled client's cluster (clients in `self.clients`)."""

    def __init__(self, learner, data: FederatedData, eval_clients: int, seed: int, clustering, state_fn, federated: bool = True):
        super().__init__(learner, data, eval_clients, seed, federated)
        self.clustering = clustering
        self.state_fn = state_fn  # -> the coordinator's current server state
        train = [data.train_indices(int(c)) for c in self.clients]
        self.train_rows = torch.from_numpy(np.concatenate(train)) if train else torch.zeros(0, dtype=torch.long)
        self.train_owner = np.repeat(np.arange(len(self.clients)), data.train_sizes()[self.clients])
        self.last_extra: dict = {}
        self.last_choice = np.zeros(0, dtype=np.int64)

    def central(self, params: torch.Tensor) -> tuple[float, float]:
        if self.data.central_y.numel() == 0:
            return math.nan, math.nan
        active = self.clustering.active(self.state_fn())
        loss, correct = self.learner.per_example(params, self.data.central_x, self.data.central_y, models=range(active))
        return float(loss.mean()), float(correct.mean())

    def federated(self, params: torch.Tensor) -> tuple[float, float]:
        if self.rows.numel() == 0 or not self.enabled_federated:
            return math.nan, math.nan
        state = self.state_fn()
        n = len(self.clients)
        allowed = self.clustering.allowed(state, self.clients)
        models = np.flatnonzero(allowed.any(0))
        x, y = self.data.x, self.data.y
        losses = self.learner.cluster_losses(params, x[self.train_rows], y[self.train_rows], self.train_owner, n, models)
        choice = self.learner.choose(losses, allowed)
        blocks = self.learner.blocks(params)
        acc = np.full((n, self.learner.k), np.nan)
        for j in models:  # one forward pass per model over the sampled clients' test rows
            _, correct = self.learner.base.per_example(blocks[j], x[self.rows], y[self.rows])
            acc[:, j] = np.bincount(self.owner, weights=correct.numpy(), minlength=n) / self.counts
        per_client = acc[np.arange(n), choice]
        active = self.clustering.active(state)
        self.last_choice = choice
        self.last_extra = {
            "cluster_fed_accuracy": [float(per_client[choice == j].mean()) if (choice == j).any() else None for j in range(active)],
            "cluster_eval_clients": np.bincount(choice, minlength=active).tolist(),
            "single_model_fed_accuracy": float(np.nanmax(np.nanmean(acc[:, models], axis=0))),
        }
        return float(per_client.mean()), float(np.percentile(per_client, 10))
