"""The server's parts of clustered FL, on the one round engine.

The global vector is k models stacked (`fleetlearn.learners.clustered.ClusteredLearner`).
A client trains one block and uploads only that block, tagged with its index
(`fleetlearn.compression.blocks`).  On the server:

- `Clustering` (held by the Coordinator as ``coordinator.clustering``) decodes tagged
  payloads, notes each accepted client's cluster, and writes the task's clustering entry
  (how many clusters are active; CFL: each cohort client's candidate clusters);
- `ClusteredAggregator` aggregates each block over the clients that trained it, with the
  run's aggregator and the clients' weights renormalised within the cluster;
- `ClusteredServerOptimizer` steps the wrapped server optimizer and carries the
  clustering state (``clustering/*`` tensors) in the server state, so checkpoints, resume
  and rollback keep models and assignment consistent;
- `ClusteringHook` records per-cluster measurements and, for CFL, splits clusters.

Clustering state (in ``coordinator.server_state``):
  ``clustering/active``  (1,) int64: clusters in use (IFCA: k from the start; CFL: 1 and growing);
  ``clustering/mask``    (population,) int64, CFL only: bit j set if client may be in
                         cluster j; one bit once the server knows the client's cluster,
                         several for a client absent when its cluster was split, 0 if never seen.
"""

from __future__ import annotations

import numpy as np
import torch

from ..compression.blocks import decode_block, read_block_header
from ..task_spec import ClusteringEntry
from .cfl import bipartition, cosine_similarities, separation_gap, split_criterion

PREFIX = "clustering/"
ACTIVE = PREFIX + "active"
MASK = PREFIX + "mask"
MODES = ("ifca", "cfl")


class Clustering:
    """What the Coordinator asks of clustered FL: decode, note, task entry, state."""

    def __init__(
        self, mode: str, clusters: int, block_dim: int, population: int, eps1: float = 0.7, eps2: float = 2.0,
        min_gap: float = 0.3, linkage: str = "complete",
    ):
        if mode not in MODES:
            raise ValueError(f"unknown clustering {mode!r}; allowed: none, {', '.join(MODES)}")
        if not 1 <= clusters <= 62:  # CFL keeps candidate sets as int64 bit masks
            raise ValueError(f"clusters must be in 1..62, got {clusters}")
        if mode == "cfl" and eps1 >= eps2:
            raise ValueError(f"cfl_eps1 = {eps1} must be below cfl_eps2 = {eps2}")
        self.mode, self.k, self.d, self.population = mode, int(clusters), int(block_dim), int(population)
        self.eps1, self.eps2, self.min_gap, self.linkage = float(eps1), float(eps2), float(min_gap), linkage
        self.tags: dict[int, int] = {}  # this round's accepted client -> cluster (cohort-sized)

    # -- state --------------------------------------------------------------------------
    def init_state(self) -> dict[str, torch.Tensor]:
        state = {ACTIVE: torch.tensor([self.k if self.mode == "ifca" else 1], dtype=torch.int64)}
        if self.mode == "cfl":
            state[MASK] = torch.zeros(self.population, dtype=torch.int64)
        return state

    @staticmethod
    def active(state: dict) -> int:
        return int(state[ACTIVE][0])

    def allowed(self, state: dict, clients: np.ndarray) -> np.ndarray:
        """(n, k) boolean: the clusters each client may be in (every active one if unknown)."""
        active = self.active(state)
        out = np.zeros((len(clients), self.k), dtype=bool)
        if self.mode != "cfl":
            out[:, :active] = True
            return out
        mask = state[MASK][torch.as_tensor(np.asarray(clients, dtype=np.int64))].numpy()
        bits = ((mask[:, None] >> np.arange(self.k)) & 1).astype(bool)
        out[:] = np.where((mask == 0)[:, None], np.arange(self.k) < active, bits)
        return out

    def task_entry(self, state: dict, cohort) -> ClusteringEntry:
        """The task's `clustering` entry: active clusters and (CFL) each cohort client's
        candidates; only the clients whose cluster the server knows are listed."""
        candidates = None
        if self.mode == "cfl" and len(cohort):
            ids = np.asarray(cohort, dtype=np.int64)
            mask = state[MASK][torch.from_numpy(ids)].numpy()
            known = mask != 0
            bits = ((mask[known, None] >> np.arange(self.k)) & 1).astype(bool)
            candidates = {str(int(c)): np.flatnonzero(b).tolist() for c, b in zip(ids[known], bits)}
        return ClusteringEntry(mode=self.mode, clusters=self.k, active=self.active(state), blocks=self.broadcast_blocks(state), candidates=candidates)

    # -- downlink -----------------------------------------------------------------------
    def broadcast_blocks(self, state: dict) -> int:
        """Models the broadcast Task carries: IFCA all k, CFL the active ones (blocks 0..active-1)."""
        return self.k if self.mode == "ifca" else self.active(state)

    def broadcast(self, params: torch.Tensor, state: dict) -> torch.Tensor:
        return params[: self.broadcast_blocks(state) * self.d]

    # -- uplink -------------------------------------------------------------------------
    def decode(self, payload: bytes, chain) -> torch.Tensor:
        """The (k * d,) update of a tagged block payload (zeros outside the block)."""
        vec, _ = decode_block(chain, payload, self.k, self.d)
        return vec

    def accepted(self, client_id: int, payload: bytes) -> int:
        """Note an accepted client's cluster (from its payload's tag) for this round's aggregation."""
        index, _ = read_block_header(payload)
        self.tags[int(client_id)] = index
        return index

    def clusters_of(self, client_ids) -> np.ndarray:
        try:
            return np.array([self.tags[int(c)] for c in client_ids], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"client {exc.args[0]} has no cluster tag this round") from None


class ClusteredAggregator:
    """Each block is aggregated, by the wrapped aggregator, over the clients that trained it
    (their weights renormalised within the cluster); blocks nobody trained stay unchanged.
    IFCA's model averaging (Ghosh et al. 2020, Algorithm 2): theta_j += sum_{i in S_j} w_i dtheta_i / sum_{i in S_j} w_i."""

    needs_client_ids = True

    def __init__(self, base, clustering: Clustering):
        self.base = base
        self.clustering = clustering
        self.name = f"clustered({getattr(base, 'name', type(base).__name__)})"
        self.needs_individual_updates = getattr(base, "needs_individual_updates", False)

    def aggregate_round(self, client_ids, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k, d = self.clustering.k, self.clustering.d
        clusters = self.clustering.clusters_of(client_ids)
        blocks = matrix.reshape(len(clusters), k, d)
        out = torch.zeros(k, d, dtype=matrix.dtype)
        for j in np.unique(clusters):  # a loop over clusters, each one matrix operation
            rows = torch.from_numpy(np.flatnonzero(clusters == j))
            w = weights[rows]
            out[j] = self.base.aggregate(blocks[rows, int(j)], w / w.sum())
        return out.reshape(-1)

    def aggregate(self, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise ValueError("clustered aggregation needs each update's cluster (aggregate_round)")


class ClusteredServerOptimizer:
    """The run's server optimizer on the stacked vector, carrying ``clustering/*`` state along."""

    def __init__(self, base, clustering: Clustering):
        self.base = base
        self.clustering = clustering
        self.name = getattr(base, "name", type(base).__name__)
        self.server_lr = base.server_lr
        self.lr = base.lr  # the learning rate and its schedule: entries of the same state

    def init(self, params: torch.Tensor) -> dict:
        return {**self.base.init(params), **self.clustering.init_state()}

    def step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: dict):
        own = {k: v for k, v in state.items() if k.startswith(PREFIX)}
        rest = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        new_params, new_state = self.base.step(params, pseudo_gradient, rest)
        return new_params, {**new_state, **own}


class ClusteringHook:
    """After each round: every accepted client's cluster and weight within it, cluster sizes,
    the cluster count; the evaluator's per-cluster accuracies; CFL's splits."""

    def __init__(self, clustering: Clustering, evaluator=None):
        self.clustering = clustering
        self.evaluator = evaluator

    def after_round(self, record, coordinator) -> None:
        cl = self.clustering
        state = coordinator.server_state
        accepted = [c for c in record.clients if c.status == "accepted"]
        if record.status == "ok" and coordinator.last_updates is not None and accepted:
            clusters = np.array([c.cluster for c in accepted], dtype=np.int64)
            w = np.array([c.weight for c in accepted])
            totals = np.bincount(clusters, weights=w, minlength=cl.k)
            for c, wc in zip(accepted, w / totals[clusters]):
                c.weight = float(wc)  # the weight the update had in its cluster's aggregate
            record.extra["cluster_sizes"] = np.bincount(clusters, minlength=cl.active(state)).tolist()
            if cl.mode == "cfl":
                self._cfl(record, coordinator, accepted, clusters, w)
        cl.tags.clear()
        state = coordinator.server_state
        record.clusters = cl.active(state)
        extra = getattr(self.evaluator, "last_extra", None)
        if extra:
            record.extra.update(extra)
            self.evaluator.last_extra = {}

    def _cfl(self, record, coordinator, accepted, clusters: np.ndarray, w: np.ndarray) -> None:
        """Sattler et al. 2020, Algorithm 1: split each cluster whose mean update is small while
        some client's update is large, by the cosine similarities of its clients' updates."""
        cl = self.clustering
        state = dict(coordinator.server_state)  # new dicts and tensors: kept versions stay intact
        mask = state[MASK].clone()
        ids = torch.tensor([c.client_id for c in accepted], dtype=torch.int64)
        mask[ids] = torch.from_numpy(np.left_shift(1, clusters))
        active = cl.active(state)
        blocks = coordinator.last_updates.reshape(len(accepted), cl.k, cl.d)
        params = coordinator.params
        norms, splits = {}, []
        for c in range(active):
            rows = np.flatnonzero(clusters == c)
            if not len(rows):
                continue
            updates = blocks[torch.from_numpy(rows), c]
            mean_norm, max_norm = split_criterion(updates, w[rows])
            norms[str(c)] = [round(mean_norm, 6), round(max_norm, 6)]
            if active >= cl.k or len(rows) < 2 or not (mean_norm < cl.eps1 and max_norm > cl.eps2):
                continue
            sim = cosine_similarities(updates)
            side = bipartition(sim, cl.linkage)
            intra, cross = separation_gap(sim, side)
            norms[str(c)] += [round(intra, 4), round(cross, 4)]
            if intra - cross < cl.min_gap:
                continue  # not two separated groups: the large updates are noise, not incongruence
            new = active
            active += 1
            if params is coordinator.params:
                params = params.clone()
            pb = params.reshape(cl.k, cl.d)
            pb[new] = pb[c]  # both halves start from the cluster's model
            for key, t in list(state.items()):  # server-optimizer moments follow their model
                if not key.startswith(PREFIX) and t.numel() == cl.k * cl.d:
                    t = t.clone()
                    t.reshape(cl.k, cl.d)[new] = t.reshape(cl.k, cl.d)[c]
                    state[key] = t
            # Members absent this round may now be in either half; they choose when next seen.
            absent = ((mask >> c) & 1).bool()
            absent[ids[torch.from_numpy(rows)]] = False
            mask[absent] |= 1 << new
            moved = ids[torch.from_numpy(rows[side])]
            mask[moved] = 1 << new
            splits.append({"cluster": c, "new": new, "moved": moved.tolist(), "mean_norm": mean_norm, "max_norm": max_norm, "gap": intra - cross})
        state[MASK] = mask
        state[ACTIVE] = torch.tensor([active], dtype=torch.int64)
        record.extra["cfl_norms"] = norms  # cluster -> [mean norm, max norm(, mean intra-, mean cross-half similarity of a tried split)]
        if splits:
            record.extra["cfl_splits"] = splits
        coordinator.params = params
        coordinator.server_state = state
