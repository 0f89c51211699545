"""MIFA: reuse the latest update of clients absent this round.

Gu, Huang, Zhang & Zhang, "Fast Federated Learning in the Presence of Arbitrary Device
Unavailability", NeurIPS 2021, Algorithm 1.  The server keeps, for every client ``i`` that
has ever participated, its most recent update ``G^i``; each round the clients that reply
overwrite theirs (``G^i <- delta_i^t`` for ``i in A(t)``) and the server moves along the
average over *all* stored updates,

    Delta_t = sum_{i in S} w_i G^i / sum_{i in S} w_i,          (Alg. 1, line 9, w_i = 1/N)

so a device that is rarely online keeps pulling the model toward its data between its
appearances instead of dropping out of the objective (FedAvg over the replies alone is
biased toward frequently available devices).  ``w_i`` is the weight the engine gives the
client's latest reply (its capped example count); uniform weights give the paper's rule.

Differences from the paper, on purpose:

- The paper stores ``G^i`` for all ``N`` clients, starting at 0, and divides by ``N``; here
  only clients seen so far are stored and averaged (``S`` = stored clients), so the first
  rounds are not damped by zeros of clients never seen.  (Dividing by ``N`` is the same
  direction scaled by ``|S| / N``, which a server learning rate can absorb.)
- Memory is bounded: at most ``max_clients`` updates are stored, ``max_clients x d`` values
  of ``dtype`` (float32: ``4 max_clients d`` bytes; float16 halves it, with ~3 significant
  digits per stored coordinate) plus O(max_clients) bookkeeping.  When a new client arrives
  with the store full, the least recently *updated* client is evicted (LRU): its
  contribution is lost until it replies again.  The trade-off: a small store forgets the
  rarest devices first (exactly those MIFA exists for) and drifts back toward FedAvg on the
  available clients; ``max_clients >= population`` is the paper's algorithm.
- ``max_age`` (optional) drops stored updates older than that many rounds, for runs where
  very old updates (computed from a much older model) would hurt more than help.

Stored deltas are relative to the model each client started from; MIFA's analysis covers
that staleness (Sec. 4: the error of a stale update is bounded by the model's movement since).
With a learning-rate schedule, old deltas carry the old client learning rate: the paper
stores ``G^i`` in gradient units (``delta / (eta_t K)``); with a constant client lr the two
differ by a constant factor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["MIFA"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class MIFA:
    """Stateful MIFA aggregator: ``aggregate_round(client_ids, matrix (n, d), weights (n,)) -> (d,)``.

    The store is a ``(slots, d)`` buffer (grown by doubling up to ``max_clients``) plus, per slot, the client id,
    its weight and the round it was last updated.  Everything is vectorised: a round is one
    scatter into the buffer and one weighted matrix-vector product over the occupied slots.
    State round-trips through `state_dict` / `load_state_dict` (plain tensors, so it goes
    into a safetensors checkpoint as is).
    """

    name = "mifa"
    needs_individual_updates = True  # it stores each client's update: incompatible with secure aggregation
    needs_client_ids = True  # the engine must call aggregate_round, not aggregate

    def __init__(self, dim: int, max_clients: int = 1000, dtype: str = "float32", max_age: int | None = None):
        if dim < 1:
            raise ValueError(f"MIFA: dim must be >= 1, got {dim}")
        if max_clients < 1:
            raise ValueError(f"MIFA: max_clients must be >= 1, got {max_clients}")
        if dtype not in _DTYPES:
            raise ValueError(f"MIFA: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_age is not None and max_age < 1:
            raise ValueError(f"MIFA: max_age must be >= 1 round or None, got {max_age}")
        self.dim = int(dim)
        self.max_clients = int(max_clients)
        self.dtype = dtype
        self.max_age = max_age
        self.round = 0  # rounds aggregated so far
        self.evictions = 0  # clients evicted to make room, over the run
        self._slot: dict[int, int] = {}  # client id -> slot
        self._allocate(min(self.max_clients, self.INITIAL_SLOTS))

    INITIAL_SLOTS = 64  # the buffer starts this small and doubles up to max_clients

    def _allocate(self, slots: int) -> None:
        """(Re)allocate the per-slot arrays to `slots` rows, keeping what is stored."""
        old = getattr(self, "updates", None)
        keep = 0 if old is None else old.shape[0]
        updates = torch.zeros(slots, self.dim, dtype=_DTYPES[self.dtype])
        ids = torch.full((slots,), -1, dtype=torch.int64)  # -1 = empty slot
        weights = torch.zeros(slots, dtype=torch.float64)
        last_round = torch.full((slots,), -1, dtype=torch.int64)
        if keep:
            updates[:keep], ids[:keep], weights[:keep], last_round[:keep] = self.updates, self.ids, self.weights, self.last_round
        self.updates, self.ids, self.weights, self.last_round = updates, ids, weights, last_round

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_stored(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Bytes held now: the update buffer plus per-slot id, weight and round.  The buffer
        grows by doubling with the number of distinct clients seen, so this is at most about
        twice ``bytes_needed(dim, clients seen)`` and never above ``bytes_needed(dim, max_clients)``."""
        t = (self.updates, self.ids, self.weights, self.last_round)
        return int(sum(x.numel() * x.element_size() for x in t))

    @staticmethod
    def bytes_needed(dim: int, max_clients: int, dtype: str = "float32") -> int:
        """The memory bound of a full store, to state before building one."""
        return max_clients * (dim * (2 if dtype == "float16" else 4) + 8 + 8 + 8)

    def stored_clients(self) -> list[int]:
        return sorted(self._slot)

    def stored_update(self, client_id: int) -> torch.Tensor:
        return self.updates[self._slot[int(client_id)]].to(torch.float32)

    # -- the aggregator --------------------------------------------------------------------
    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise TypeError("MIFA needs to know which client sent each update: call aggregate_round(client_ids, matrix, weights)")

    def aggregate_round(self, client_ids: Sequence[int], updates: torch.Tensor, weights) -> torch.Tensor:
        """Store this round's updates (replacing each client's previous one, evicting the least
        recently updated clients if the store is full) and return the weighted mean over every
        stored update (Gu et al. 2021, Alg. 1, lines 7-9).

        An empty round (no replies) changes nothing in the store and returns the mean of the
        stored updates (MIFA still moves on stored updates); with an empty store it raises."""
        ids = [int(c) for c in client_ids]
        u = torch.as_tensor(updates)
        if u.ndim != 2 or u.shape[1] != self.dim or u.shape[0] != len(ids):
            raise ValueError(f"MIFA: updates must be ({len(ids)}, {self.dim}), got {tuple(u.shape)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"MIFA: a client appears twice in one round: {sorted(c for c in set(ids) if ids.count(c) > 1)}")
        if any(c < 0 for c in ids):
            raise ValueError("MIFA: client ids must be >= 0")
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape != (len(ids),) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"MIFA: weights must be {len(ids)} finite non-negative numbers")
        if len(ids) and not bool(torch.isfinite(u).all()):
            raise ValueError("MIFA: updates contain NaN or inf")
        if len(ids) and self.dtype == "float16" and float(u.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError("MIFA: an update exceeds the float16 range (65504); use dtype = 'float32'")
        if len(ids) > self.max_clients:
            raise ValueError(f"MIFA: {len(ids)} updates in one round exceed max_clients = {self.max_clients}")

        self.round += 1
        if ids:
            slots = self._slots_for(ids)
            s = torch.tensor(slots, dtype=torch.int64)
            self.updates[s] = u.to(self.updates.dtype)
            self.ids[s] = torch.tensor(ids, dtype=torch.int64)
            self.weights[s] = w
            self.last_round[s] = self.round
        if self.max_age is not None:
            self._expire()
        return self.current()

    def forget(self, client_ids: Sequence[int]) -> int:
        """Drop the stored updates of these clients (those not stored are ignored); returns how
        many were dropped.  For a client a guardrail excluded or flagged as malicious (its
        stored update would otherwise keep being applied every round), and for undoing a round
        that was rolled back."""
        slots = [self._slot[int(c)] for c in client_ids if int(c) in self._slot]
        if slots:
            self._clear(torch.tensor(slots, dtype=torch.int64))
        return len(slots)

    def current(self) -> torch.Tensor:
        """The weighted mean over the stored updates (what the last round returned)."""
        if not self._slot:
            raise ValueError("MIFA: no stored update to aggregate")
        total = float(self.weights.sum())
        if total <= 0:
            raise ValueError("MIFA: stored weights sum to zero")
        # Empty slots hold zeros with weight 0, so the whole buffer can be summed without
        # gathering the occupied rows; rows go through in blocks so that upcasting a float16
        # store never makes a full float32 copy.
        w = (self.weights / total).to(torch.float32)
        out = torch.zeros(self.dim, dtype=torch.float32)
        for lo in range(0, self.updates.shape[0], self.ROW_BLOCK):
            hi = lo + self.ROW_BLOCK
            out += w[lo:hi] @ self.updates[lo:hi].to(torch.float32)
        return out

    ROW_BLOCK = 256

    def _slots_for(self, ids: list[int]) -> list[int]:
        new = [c for c in ids if c not in self._slot]
        free = torch.nonzero(self.ids < 0).flatten()
        if len(new) > free.numel() and self.updates.shape[0] < self.max_clients:
            grow = max(self.num_stored + len(new), 2 * self.updates.shape[0])
            self._allocate(min(self.max_clients, grow))
            free = torch.nonzero(self.ids < 0).flatten()
        need = len(new) - free.numel()
        if need > 0:
            # LRU: evict the stored clients updated longest ago that are not in this round;
            # ties broken by client id, so eviction is deterministic.
            here = torch.tensor(ids, dtype=torch.int64)
            cand = torch.nonzero((self.ids >= 0) & ~torch.isin(self.ids, here)).flatten()
            order = np.lexsort((self.ids[cand].numpy(), self.last_round[cand].numpy()))
            self._clear(cand[torch.from_numpy(order[:need])])
            self.evictions += need
            free = torch.nonzero(self.ids < 0).flatten()
        free_list = free.tolist()
        for c, sl in zip(new, free_list):
            self._slot[c] = sl
        return [self._slot[c] for c in ids]

    def _clear(self, slots: torch.Tensor) -> None:
        for cid in self.ids[slots].tolist():
            del self._slot[int(cid)]
        self.ids[slots] = -1
        self.weights[slots] = 0.0
        self.last_round[slots] = -1
        self.updates[slots] = 0

    def _expire(self) -> None:
        old = (self.ids >= 0) & (self.last_round <= self.round - self.max_age)
        if bool(old.any()):
            self._clear(torch.nonzero(old).flatten())

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-ready); only the occupied slots are saved."""
        occ = torch.nonzero(self.ids >= 0).flatten()
        return {
            "ids": self.ids[occ].clone(),
            "updates": self.updates[occ].clone(),
            "weights": self.weights[occ].clone(),
            "last_round": self.last_round[occ].clone(),
            "meta": torch.tensor([self.round, self.dim, self.max_clients, self.evictions], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        meta = state["meta"].tolist()
        rnd, dim, _, evictions = (int(v) for v in meta)
        if dim != self.dim:
            raise ValueError(f"MIFA: the state is for dim {dim}, this aggregator has dim {self.dim}")
        ids = state["ids"].to(torch.int64)
        k = ids.numel()
        if k > self.max_clients:
            raise ValueError(f"MIFA: the state holds {k} clients, more than max_clients = {self.max_clients}")
        if state["updates"].shape != (k, self.dim):
            raise ValueError(f"MIFA: state updates have shape {tuple(state['updates'].shape)}, expected ({k}, {self.dim})")
        self.updates = self.ids = self.weights = self.last_round = None  # type: ignore[assignment]
        self._allocate(min(self.max_clients, max(k, self.INITIAL_SLOTS)))
        self.updates[:k] = state["updates"].to(self.updates.dtype)
        self.ids[:k] = ids
        self.weights[:k] = state["weights"].to(torch.float64)
        self.last_round[:k] = state["last_round"].to(torch.int64)
        self.round, self.evictions = rnd, evictions
        self._slot = {int(c): i for i, c in enumerate(ids.tolist())}

    def ages(self) -> dict[int, int]:
        """Rounds since each stored client's update was refreshed (0 = this round)."""
        return {c: self.round - int(self.last_round[s]) for c, s in self._slot.items()}

