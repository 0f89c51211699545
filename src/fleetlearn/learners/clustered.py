"""Clustered FL on the client: k models stacked in one vector, each client trains one.

IFCA (Ghosh, Chung, Yin & Ramchandran, "An Efficient Framework for Clustered Federated
Learning", NeurIPS 2020, Algorithm 2 with model averaging): the server holds k models
theta_1..theta_k; a selected client computes the empirical loss F_i(theta_j) of every
model on its local training data, picks j^ = argmin_j F_i(theta_j), trains theta_j^ and
sends back its update together with j^ (here: as the block tag of its uplink payload).

CFL (Sattler, Mueller & Samek, IEEE TNNLS 2020) uses the same client with the server's
assignment: the task lists each client's candidate clusters (one when the server knows
it, several for a client that has not been seen since its cluster was split), and the
client takes the lowest-loss candidate.

`ClusteredLearner` wraps any learner of `d` parameters into one of `k * d`: the global
vector is the k models stacked (block j = model j).  The cluster choice of the whole cohort
is one forward pass per model over the cohort's rows (an (n, k) loss matrix), and each
cluster's members then train as one batched `fit_cohort` of the wrapped learner.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..params import ParamSpec
from .base import ClientData, FitConfig, FitResult


def stacked_spec(spec: ParamSpec, k: int) -> ParamSpec:
    """The spec of k copies of `spec`, model j's tensors prefixed ``cluster{j}.``."""
    return ParamSpec(
        tuple(f"cluster{j}.{n}" for j in range(k) for n in spec.names),
        tuple(s for _ in range(k) for s in spec.shapes),
    )


class ClusteredLearner:
    """k stacked copies of `base`'s model; each client trains the block of its cluster."""

    def __init__(self, base, clusters: int, identical_init: bool = False):
        if clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {clusters}")
        self.base = base
        self.k = int(clusters)
        self.block_spec = base.spec
        self.block_dim = base.spec.dim
        self.spec = stacked_spec(base.spec, self.k)
        # IFCA starts from k different random models; CFL from one model (its splits copy it).
        self.identical_init = identical_init

    @classmethod
    def for_run(cls, base, clustering: str, clusters: int) -> "ClusteredLearner":
        """The run's model for `server.clustering` / `server.clusters`: the same on the
        server (engine.factory) and on a gRPC client (transport.grpc.local_data), so both
        build one stacked spec (one model digest)."""
        return cls(base, clusters, identical_init=clustering == "cfl")

    def blocks(self, params: torch.Tensor) -> torch.Tensor:
        """The (k, d) view of a stacked vector."""
        if params.numel() != self.k * self.block_dim:
            raise ValueError(f"stacked params have {params.numel()} entries, {self.k} clusters x {self.block_dim} need {self.k * self.block_dim}")
        return params.reshape(self.k, self.block_dim)

    def init_params(self, seed: int) -> torch.Tensor:
        """Model 0 is the wrapped learner's init for `seed` (the one FedAvg starts from);
        models 1..k-1 are inits from seeds derived from (seed, j), or copies of model 0."""
        first = self.base.init_params(seed)
        if self.identical_init:
            return first.repeat(self.k)
        others = [self.base.init_params(int(np.random.SeedSequence([seed, 0xC1A5, j]).generate_state(1)[0])) for j in range(1, self.k)]
        return torch.cat([first, *others])

    # -- choosing a cluster -------------------------------------------------------------
    @torch.no_grad()
    def cluster_losses(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, owner: np.ndarray, n: int, models: Sequence[int] | None = None) -> np.ndarray:
        """(n, k) mean loss of each model on each owner's rows (nan where an owner has none,
        inf for models not in `models`): one forward pass per model over all rows."""
        blocks = self.blocks(params)
        counts = np.bincount(owner, minlength=n).astype(np.float64)
        out = np.full((n, self.k), np.inf)
        for j in range(self.k) if models is None else models:
            loss, _ = self.base.per_example(blocks[j], x, y)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, j] = np.bincount(owner, weights=loss.double().numpy(), minlength=n) / counts
        return out

    def allowed(self, candidates: Sequence[Sequence[int] | None] | None, n: int, active: int | None = None) -> np.ndarray:
        """(n, k) boolean: which clusters each client may pick (None: the first `active`, default k)."""
        out = np.zeros((n, self.k), dtype=bool)
        out[:, : self.k if active is None else active] = True
        if candidates is not None:
            for i, cand in enumerate(candidates):  # cohort-sized, a few entries each
                if cand is not None:
                    out[i] = False
                    out[i, np.asarray(cand, dtype=np.int64)] = True
        return out

    @staticmethod
    def choose(losses: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """Each row's lowest-loss cluster among the allowed ones (ties: the lowest index; a
        row whose allowed losses are all nan or inf: its first allowed cluster)."""
        masked = np.where(np.isnan(losses), np.inf, losses)
        if allowed is None:
            allowed = np.ones(losses.shape, dtype=bool)
        masked = np.where(allowed, masked, np.inf)
        best = np.argmin(masked, axis=1)
        first = np.argmax(allowed, axis=1)
        return np.where(np.isfinite(masked[np.arange(len(best)), best]), best, first)

    # -- training ------------------------------------------------------------------------
    def fit(self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int, correction: torch.Tensor | None = None, max_steps: int | None = None, candidates: Sequence[int] | None = None) -> FitResult:
        return self.fit_cohort(
            params, [data], hp, [seed],
            corrections=None if correction is None else correction.reshape(1, -1),
            step_limits=[max_steps], candidates=[candidates],
        )[0]

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
        candidates: Sequence[Sequence[int] | None] | None = None,
    ) -> list[FitResult]:
        """Pick each client's cluster (lowest loss on its training data among its
        `candidates`; None: all k), then train each cluster's members on their block."""
        n = len(cohort)
        if n == 0:
            return []
        if candidates is not None and len(candidates) != n:
            raise ValueError(f"candidates has {len(candidates)} entries for a cohort of {n}")
        params = params.detach().to(torch.float32)
        blocks = self.blocks(params)
        sizes = np.array([c.num_examples for c in cohort])
        owner = np.repeat(np.arange(n), sizes)
        x_all = torch.cat([c.x for c in cohort])
        y_all = torch.cat([c.y for c in cohort])
        allowed = self.allowed(candidates, n)
        needed = np.flatnonzero(allowed.any(0))  # models no one may pick are not evaluated
        choice = self.choose(self.cluster_losses(params, x_all, y_all, owner, n, needed), allowed)
        limits = step_limits if step_limits is not None else [None] * n
        out: list[FitResult | None] = [None] * n
        for j in np.unique(choice):  # a loop over clusters; each cluster trains as one batch
            members = np.flatnonzero(choice == j)
            corr = None
            if corrections is not None:
                corr = corrections[torch.from_numpy(members)].reshape(len(members), self.k, self.block_dim)[:, j]
            results = self.base.fit_cohort(
                blocks[j], [cohort[i] for i in members], hp, [seeds[i] for i in members],
                corrections=corr, step_limits=[limits[i] for i in members] if step_limits is not None else None,
            )
            full = torch.zeros(len(members), self.k, self.block_dim)
            full[:, j] = torch.stack([r.delta for r in results])
            for row, i, r in zip(full, members, results):
                r.delta = row.reshape(-1)
                r.cluster, r.clusters = int(j), self.k
                out[i] = r
        return out  # type: ignore[return-value]

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, models: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and correctness of the model (among `models`, default all) with
        the lowest mean loss on (x, y): the model a new client holding (x, y) would pick."""
        if y.numel() == 0:
            return torch.zeros(0), torch.zeros(0)
        blocks = self.blocks(params)
        best: tuple[float, tuple[torch.Tensor, torch.Tensor]] | None = None
        for j in range(self.k) if models is None else models:
            loss, correct = self.base.per_example(blocks[j], x, y)
            mean = float(loss.mean())
            if best is None or mean < best[0] or (math.isnan(best[0]) and not math.isnan(mean)):
                best = (mean, (loss, correct))
        assert best is not None
        return best[1]
