"""The attack part: which clients are malicious, and what they do to their data and updates.

A seeded fixed subset of the population (``round(fraction * population)`` clients,
chosen with the run seed) is malicious, so the same clients attack every round they
are selected, from ``start_round`` on.  The transport calls two hooks:

- `Attack.poison_data(client, data, round)` before training (data poisoning:
  label_flip trains on labels ``y -> C - 1 - y``);
- `Attack.apply(ids, deltas, round)` after training, before encoding (model
  poisoning on the (n, d) delta matrix of the cohort; honest rows pass untouched).

On a real fleet the server controls no client, so ``[attack]`` cannot exist there; a
red-team client (`fleetlearn client --attack KIND`) can: `client_attack` builds a
`DeviceAttack`, the same part for one device that attacks with its own update only
(never colluding), which the client device (fleetlearn.client.Device) calls at the
same two points.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np
import torch

from ..config import CLIENT_ATTACK_OPTIONS
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
        cohort_size: int | None = None,
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
        if cohort_size is not None and int(cohort_size) < 1:
            raise ValueError(f"cohort_size must be >= 1 (or None: the updates in the dispatch), got {cohort_size!r}")
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
        # The cohort size n the attack assumes (model_replacement's boost, ALIE's z_max); None: the
        # number of updates `apply` is given (the simulation sees its whole dispatch).
        self.cohort_size = None if cohort_size is None else int(cohort_size)

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
            cohort_size=self.cohort_size if self.cohort_size is not None else int(ids.shape[0]), clients=ids[mask], round=int(round), seed=self.seed,
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


# -- a red-team client: one real device that attacks (fleetlearn client --attack) ----------------
# (its `[attack]` keys, CLIENT_ATTACK_OPTIONS, live with the section in fleetlearn.config)


class DeviceAttack(Attack):
    """`Attack` for a device that is malicious itself: every client it trains attacks (from
    `start_round`), with its own honest update only (``collude = False``), on the cohort size n
    it assumes (`cohort_size`: the run's ``server.cohort``).  Its update is what the
    simulation's `Attack.apply` gives that client's row with ``collude = false`` (when the
    simulation's dispatch holds n updates)."""

    def __init__(self, kind: str, *, cohort_size: int, **options: Any):
        options.pop("collude", None)
        super().__init__(kind, [], collude=False, cohort_size=cohort_size, **options)

    def malicious(self, ids: Sequence[int]) -> np.ndarray:
        return np.ones(len(np.asarray(ids).reshape(-1)), dtype=bool)

    def __repr__(self) -> str:
        return f"DeviceAttack({self.kind!r}, start_round={self.start_round}, cohort_size={self.cohort_size})"


def _flag(key: str) -> str:
    return "--attack-" + key.replace("_", "-")


def client_attack(kind: str, options: dict[str, Any] | None = None, *, cohort_size: int, num_classes: int | None,
                  seed: int) -> DeviceAttack | None:
    """The attack a red-team client runs (`fleetlearn client --attack KIND [--attack-scale S ...]`),
    or None for ``kind = "none"``.  `options`: the ``[attack]`` keys of `CLIENT_ATTACK_OPTIONS`
    (None values are unset).  ValueError naming the flag for a kind or value that cannot run on
    one device: colluding attacks need the other attackers' honest updates, which a real client
    does not see."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if opts.pop("collude", False):
        raise ValueError("collude = true: colluding attackers pool their honest updates, which one real client cannot see "
                         "without a side channel to the others; a red-team client attacks with its own update only")
    if "fraction" in opts:
        raise ValueError("fraction: the simulation's share of malicious clients; on a real fleet the clients started with "
                         "--attack are the malicious ones")
    for key in opts:
        if key not in CLIENT_ATTACK_OPTIONS:
            raise ValueError(f"{_flag(key)}: not an option of a red-team client; allowed: "
                             + ", ".join(_flag(k) for k in CLIENT_ATTACK_OPTIONS))
    if kind == "none":
        if opts:
            raise ValueError(f"{_flag(next(iter(opts)))} needs --attack KIND")
        return None
    solo = [k + (" (with --attack-alie-z)" if k == "alie" else "") for k in UPDATE_ATTACKS]
    if kind not in UPDATE_ATTACKS:
        raise ValueError(f"--attack {kind!r}: unknown attack; a red-team client runs: {', '.join(solo)}")
    for key in opts:
        kinds = CLIENT_ATTACK_OPTIONS[key]
        if kinds is not None and kind not in kinds:
            raise ValueError(f"{_flag(key)} applies to --attack {' / '.join(kinds)}, not --attack {kind}")
    if kind == "alie" and "alie_z" not in opts:
        raise ValueError(
            "--attack alie without --attack-alie-z is the colluding attack: its z_max(n, f) needs the number f of attackers "
            "in the cohort and its mean and std their pooled honest updates, which one real client cannot see without a "
            "side channel to the others; give --attack-alie-z Z for the independent form (g - Z |g|), or run colluding "
            f"attacks in the simulation ([attack] in fleetlearn run). A red-team client runs: {', '.join(solo)}")
    from ..config import AttackConfig, ConfigError  # the [attack] section's own bounds, worded with the flag

    try:
        AttackConfig(kind=kind, collude=False, **opts)
    except ConfigError as exc:
        raise ValueError(re.sub(r"^invalid config: attack\.(\w+)", lambda m: _flag(m.group(1)), str(exc))) from None
    return DeviceAttack(kind, cohort_size=cohort_size, num_classes=num_classes, seed=seed, **opts)
