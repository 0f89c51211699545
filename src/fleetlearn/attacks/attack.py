"""The attack part: which clients are malicious, and what they do to their data and updates.

A seeded fixed subset of the population (``round(fraction * population)`` clients,
chosen with the run seed) is malicious, so the same clients attack every round they
are selected, from ``start_round`` on.  The transport calls two hooks:

- `Attack.poison_data(client, data, round)` before training (data poisoning:
  label_flip trains on labels ``y -> C - 1 - y``);
- `Attack.apply(ids, deltas, round)` after training, before encoding (model
  poisoning on the (n, d) delta matrix of the cohort; honest rows pass untouched).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch

from ..learners.base import ClientData, FitResult
from .updates import UPDATE_ATTACKS, AttackContext

ATTACK_KINDS = ("none", *UPDATE_ATTACKS)


def malicious_clients(population: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted ids of the malicious clients: ``round(fraction * population)`` of them
    (half rounds up), drawn without replacement with the run seed.  Deterministic in
    (population, fraction, seed), independent of rounds and cohorts."""
    if population < 0 or not (0.0 <= fraction <= 1.0):
        raise ValueError(f"malicious_clients: need population >= 0 and 0 <= fraction <= 1, got {population}, {fraction}")
    count = min(population, int(math.floor(fraction * population + 0.5)))
    rng = np.random.default_rng([seed, 0xBAD])
    return np.sort(rng.choice(population, size=count, replace=False)).astype(np.int64)


def flip_labels(data: ClientData, num_classes: int) -> ClientData:
    """Label flipping (Tolpegin et al., ESORICS 2020; Fang et al., USENIX Security
    2020): train on ``C - 1 - y``.  The local test split keeps its true labels."""
    return dataclasses.replace(data, y=(num_classes - 1) - data.y)


class Attack:
    """Simulated malicious clients; ``kind`` is one of `ATTACK_KINDS`.

    `malicious(ids)` says which of `ids` are in the malicious set (any round);
    `attackers(ids, round)` which of them attack in `round` (from `start_round`)."""

    def __init__(
        self,
        kind: str,
        malicious_ids: Sequence[int],
        *,
        start_round: int = 1,
        collude: bool = True,
        scale: float = 10.0,
        noise_std: float = 1.0,
        alie_z: float | None = None,
        value: float = 100.0,
        num_classes: int | None = None,
        seed: int = 0,
    ):
        if kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack {kind!r}; allowed: {', '.join(ATTACK_KINDS)}")
        if kind == "label_flip" and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_flip needs the number of classes (>= 2), got {num_classes!r}")
        if int(start_round) < 1:
            raise ValueError(f"start_round must be >= 1, got {start_round!r}")
        for key, v in (("scale", scale), ("noise_std", noise_std)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{key} must be finite and > 0, got {v!r}")
        if alie_z is not None and not (math.isfinite(alie_z) and alie_z > 0):
            raise ValueError(f"alie_z must be finite and > 0 (or None for the paper's z_max), got {alie_z!r}")
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        self.name = kind
        self.kind = kind
        self.malicious_ids = np.unique(np.asarray(malicious_ids, dtype=np.int64))
        self.start_round = int(start_round)
        self.collude = bool(collude)
        self.scale = float(scale)
        self.noise_std = float(noise_std)
        self.alie_z = None if alie_z is None else float(alie_z)
        self.value = float(value)
        self.num_classes = num_classes
        self.seed = int(seed)

    # -- who ----------------------------------------------------------------------
    def malicious(self, ids: Sequence[int]) -> np.ndarray:
        """Boolean mask over `ids`: in the malicious set (whatever the round)."""
        return np.isin(np.asarray(ids, dtype=np.int64), self.malicious_ids)

    def active(self, round: int) -> bool:
        return self.kind != "none" and round >= self.start_round

    def attackers(self, ids: Sequence[int], round: int) -> np.ndarray:
        """Boolean mask over `ids`: malicious and attacking in `round`."""
        mask = self.malicious(ids)
        return mask if self.active(round) else np.zeros_like(mask)

    # -- what ---------------------------------------------------------------------
    @property
    def replaces_updates(self) -> bool:
        """True when attackers replace their trained deltas (`apply_results` changes them);
        label_flip only poisons the data they train on."""
        return self.kind != "label_flip"

    def poison_data(self, client: int, data: ClientData, round: int) -> ClientData:
        """The data `client` trains on in `round` (label_flip flips a malicious client's labels)."""
        if self.kind != "label_flip" or not self.active(round) or not self.malicious([client])[0]:
            return data
        return flip_labels(data, int(self.num_classes))

    def apply(self, ids: Sequence[int], deltas: torch.Tensor, round: int) -> torch.Tensor:
        """The (n, d) deltas the cohort `ids` sends in `round`: the attackers' rows
        replaced by the attack, the honest rows untouched.  `deltas` is not modified."""
        ids = np.asarray(ids, dtype=np.int64)
        if deltas.ndim != 2 or deltas.shape[0] != ids.shape[0]:
            raise ValueError(f"apply: deltas must be ({ids.shape[0]}, d), got {tuple(deltas.shape)}")
        mask = self.attackers(ids, round)
        if not mask.any() or self.kind == "label_flip":
            return deltas
        rows = torch.from_numpy(np.flatnonzero(mask)).to(deltas.device)
        ctx = AttackContext(
            cohort_size=int(ids.shape[0]), clients=ids[mask], round=int(round), seed=self.seed,
            collude=self.collude, scale=self.scale, noise_std=self.noise_std, alie_z=self.alie_z, value=self.value,
        )
        out = deltas.clone()
        out[rows] = UPDATE_ATTACKS[self.kind](deltas[rows], ctx).to(deltas.dtype)
        return out

    def apply_results(self, ids: Sequence[int], results: list[FitResult], round: int) -> tuple[list[FitResult], list[int]]:
        """`apply` on a cohort's FitResults (the simulation's hook): the results with the
        attackers' deltas replaced, and the ids of the clients that attacked."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = self.attackers(ids, round)
        attacked = [int(c) for c in ids[mask]]
        if not results or not mask.any() or self.kind == "label_flip":
            return results, attacked
        poisoned = self.apply(ids, torch.stack([r.delta for r in results]), round)
        out = [dataclasses.replace(r, delta=poisoned[i]) if mask[i] else r for i, r in enumerate(results)]
        return out, attacked

    def __repr__(self) -> str:
        return f"Attack({self.kind!r}, {len(self.malicious_ids)} malicious, start_round={self.start_round}, collude={self.collude})"


def build_attack(settings: dict[str, Any], *, population: int, num_classes: int | None, seed: int) -> Attack | None:
    """The attack part from the ``[attack]`` settings (`AttackConfig.model_dump()`);
    None when ``kind = "none"``."""
    s = dict(settings)
    kind = s.pop("kind", "none")
    if kind == "none":
        return None
    fraction = float(s.pop("fraction", 0.2))
    return Attack(kind, malicious_clients(population, fraction, seed), num_classes=num_classes, seed=seed, **s)
