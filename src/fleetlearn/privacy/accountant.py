"""Privacy accounting with the `dp-accounting` package (RDP and PLD).

Each round of central DP-FedAvg is a Poisson-subsampled Gaussian mechanism:
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with q the sampling rate (the
cohort size divided by the number of clients it was drawn from) and z the
noise multiplier (for adaptive clipping, the combined z of Andrew et al. 2021,
not the larger z_Delta put on the updates).  Rounds compose.  Epsilon for the
target delta comes from Renyi DP (Mironov, CSF 2017; Mironov, Talwar, Zhang
2019 for the subsampled Gaussian) or from privacy loss distributions (Koskela
et al. AISTATS 2020; Doroshenko et al., PETS 2022), both as implemented in
`dp_accounting.rdp.RdpAccountant` and `dp_accounting.pld.PLDAccountant`.

Sampling: the event must be the sampling the engine actually used.  Each round
records the per-client inclusion probability q of that round (the cohort's
expected size over the clients it was drawn from: the available pool less any
excluded clients, never the whole population) and how the cohort was drawn:

- ``"poisson"``: every available client took part independently with
  probability q (`PoissonSelector`, the default under central DP):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add-or-remove-one
  adjacency, accounted by RDP or PLD.
- ``"fixed"``: a fixed-size cohort drawn uniformly without replacement
  (`RandomSelector`).  That sampling supports replace-one adjacency only, under
  which the sum of clipped updates has sensitivity 2C:
  ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))``
  (Wang, Balle, Kasiviswanathan, AISTATS 2019).  dp-accounting has this event
  for RDP only, so a ledger with such rounds is accounted by RDP whatever
  `accounting` says (`method` tells which was used).  A ledger never mixes the
  two kinds: their epsilons are under different adjacencies.

The ledger is run-length encoded, ``[(q, z, count, sampling), ...]``, and
epsilon is recomputed from it with one self-composition per run: composing a
PLD round by round is far slower (the PMF is re-discretised every time) and
gives a slightly different number from composing ``count`` rounds at once.

Hot path (why not just call the accountants): building the one-round object
-- the RDP curve of a subsampled Gaussian, or its discretised PLD -- is most
of the cost (up to ~1 s for a PLD at small z), and it depends only on (q, z).
We cache it per (q, z, sampling) and then do exactly what
`RdpAccountant.compose` / `PLDAccountant.compose` do with it (``count * curve``
summed in ledger order; ``PLD.identity().compose(pld.self_compose(count))``
folded left in ledger order), so the numbers are bit-identical to the
libraries' own accountants (the tests check this).  The PLD fold of the ledger
less its last run is cached too, so a round whose q differs from the last one
(availability changes every round on a real fleet) costs one new one-round PLD
and one composition, not the whole ledger again.  Results are also cached per
ledger, so the "would the next round exceed the budget?" check costs nothing
extra when the round then happens.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..lazy import lazy_module

# dp-accounting pulls in scipy (about 3 s of imports): loaded on the first accounting call, so a
# client, a `fleetlearn token` or a run without DP never pays for it.
dp_accounting = lazy_module("dp_accounting")
pld_lib = lazy_module("dp_accounting.pld.privacy_loss_distribution")
_rdp = lazy_module("dp_accounting.rdp")
_rdp_accountant = lazy_module("dp_accounting.rdp.rdp_privacy_accountant")

ACCOUNTING_METHODS = ("pld", "rdp")
ACCOUNTING_MODES = ("central", "local")
SAMPLINGS = ("poisson", "fixed")  # Poisson sampling; a fixed-size cohort without replacement
WOR_DENOMINATOR = 1 << 30  # q = m / n for the without-replacement event: m / 2^30 rounded up (>= q)

Run = tuple[float, float, int, str]  # (sampling rate q, noise multiplier z, rounds, sampling)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # RdpAccountant logs a warning for every fractional order it drops at small z;
    # the result is still a valid bound, so keep the run's log readable.
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


@dataclass(frozen=True)
class PrivacySpent:
    """(epsilon, delta) after `rounds` rounds: what each RoundRecord reports."""

    epsilon: float
    delta: float
    rounds: int

    def to_metrics(self) -> dict[str, float]:
        """For ``RoundRecord.extra``."""
        return {"dp_epsilon": self.epsilon, "dp_delta": self.delta, "dp_rounds": float(self.rounds)}


def dp_event(sampling_rate: float, noise_multiplier: float, mode: str = "central", sampling: str = "poisson") -> dp_accounting.DpEvent:
    """The dp-accounting event of one round.

    central, poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
    (``GaussianDpEvent(z)`` when q = 1), the DP-FedAvg round of McMahan et al.
    (ICLR 2018), add-or-remove-one adjacency.
    central, fixed: ``SampledWithoutReplacementDpEvent(2^30, ceil(q 2^30),
    GaussianDpEvent(z / 2))`` (``GaussianDpEvent(z / 2)`` when q = 1):
    replace-one adjacency, sensitivity 2C.
    local: ``GaussianDpEvent(z / 2)``: a client's own clipped-and-noised
    release, sensitivity 2 C, no amplification by sampling (a client is
    assumed to take part in every round, an upper bound).
    """
    q, z = float(sampling_rate), float(noise_multiplier)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if mode == "local":
        return dp_accounting.GaussianDpEvent(z / 2.0)
    if mode != "central":
        raise ValueError(f"mode must be one of {ACCOUNTING_MODES}, got {mode!r}")
    if sampling == "fixed":
        if q == 1.0:
            return dp_accounting.GaussianDpEvent(z / 2.0)
        m = min(WOR_DENOMINATOR, math.ceil(q * WOR_DENOMINATOR))
        return dp_accounting.SampledWithoutReplacementDpEvent(WOR_DENOMINATOR, m, dp_accounting.GaussianDpEvent(z / 2.0))
    if q == 1.0:
        return dp_accounting.GaussianDpEvent(z)
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


def rdp_accountant_for(event: dp_accounting.DpEvent) -> _rdp.RdpAccountant:
    """dp-accounting's RDP accountant with the adjacency the event supports."""
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        return _rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return _rdp.RdpAccountant()


class PrivacyAccountant:
    """Tracks the privacy spent by a run: ``record_round(q, z, sampling=...)`` after
    every round, `spent()` for the (epsilon, delta) to report, `would_exceed(budget)`
    before a round so the run stops cleanly before the budget is crossed, and
    `epsilon_after` / `max_rounds` for planning.

    accounting: ``"pld"`` (tighter, ~0.1-1 s per new (q, z)) or ``"rdp"``
    (fast, looser); a ledger of fixed-size rounds is accounted by RDP (see the
    module docstring; `method` says which).  mode: ``"central"`` (DP-FedAvg) or
    ``"local"`` (local DP).  The state (`state_dict`) is the run-length-encoded
    ledger; it belongs in every round's commit and must NOT be rolled back with
    the model: privacy spent on a discarded round is still spent.
    """

    PLD_PREFIXES = 4  # composed PLD prefixes kept (each a few MB at the default discretisation)

    def __init__(self, delta: float = 1e-5, accounting: str = "pld", mode: str = "central", pld_discretization: float = 1e-4):
        if not (0.0 < float(delta) < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if accounting not in ACCOUNTING_METHODS:
            raise ValueError(f"accounting must be one of {ACCOUNTING_METHODS}, got {accounting!r}")
        if mode not in ACCOUNTING_MODES:
            raise ValueError(f"mode must be one of {ACCOUNTING_MODES}, got {mode!r}")
        if not (float(pld_discretization) > 0):
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization!r}")
        self.delta = float(delta)
        self.accounting = accounting
        self.mode = mode
        self.pld_discretization = float(pld_discretization)
        self.runs: list[Run] = []
        self._cache: dict[tuple[Run, ...], float] = {}
        self._one_round: dict[tuple[float, float, str], Any] = {}  # (q, z, sampling) -> RDP curve
        self._pld_round: dict[tuple[float, float], Any] = {}  # (q, z) -> one Poisson round's PLD
        self._pld_folds: dict[tuple[Run, ...], Any] = {}  # ledger -> its composed PLD (a few, LRU)

    # -- the ledger ---------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return sum(r[2] for r in self.runs)

    @property
    def sampling(self) -> str | None:
        """How the ledger's rounds were sampled ("poisson" / "fixed"), None before the first."""
        return self.runs[0][3] if self.runs else None

    def method_for(self, runs: tuple[Run, ...]) -> str:
        """The method that accounts `runs`: `accounting`, except that without-replacement
        rounds (central mode) exist in dp-accounting for RDP only."""
        if self.mode == "central" and any(r[3] == "fixed" and r[0] < 1.0 for r in runs):
            return "rdp"
        return self.accounting

    @property
    def method(self) -> str:
        """The method that accounts the ledger so far (see `method_for`)."""
        return self.method_for(tuple(self.runs))

    def _rdp_curve(self, q: float, z: float, sampling: str) -> np.ndarray:
        key = (q, z, sampling)
        if key not in self._one_round:
            event = dp_event(q, z, self.mode, sampling)
            self._one_round[key] = rdp_accountant_for(event).compose(event, 1).rdp
        return self._one_round[key]

    def _rdp_epsilon(self, runs: tuple[Run, ...]) -> float:
        orders = _rdp.RdpAccountant().orders
        total = np.zeros_like(orders, dtype=np.float64)
        for q, z, count, sampling in runs:  # RdpAccountant.compose: rdp += count * curve
            total += count * self._rdp_curve(q, z, sampling)
        return float(_rdp_accountant.compute_epsilon(orders, total, self.delta)[0])

    def _pld_part(self, q: float, z: float, count: int, sampling: str):
        # Mirrors PLDAccountant._maybe_compose for the events `dp_event` makes.
        vdi = self.pld_discretization
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        event = dp_event(q, z, self.mode, sampling)
        if isinstance(event, dp_accounting.GaussianDpEvent):
            return pld_lib.from_gaussian_mechanism(
                standard_deviation=event.noise_multiplier / math.sqrt(count), value_discretization_interval=vdi, neighboring_relation=relation
            )
        key = (q, z)
        if key not in self._pld_round:
            self._pld_round[key] = pld_lib.from_gaussian_mechanism(
                standard_deviation=z, value_discretization_interval=vdi, sampling_prob=q, neighboring_relation=relation
            )
        return self._pld_round[key].self_compose(count)

    def _pld_fold(self, runs: tuple[Run, ...]):
        """identity, then each run's part composed in ledger order (a left fold, as
        PLDAccountant does); folds of ledgers are kept so a new run costs one compose."""
        if not runs:
            return pld_lib.identity(value_discretization_interval=self.pld_discretization)
        hit = self._pld_folds.get(runs)
        if hit is None:
            hit = self._pld_fold(runs[:-1]).compose(self._pld_part(*runs[-1]))
            self._pld_folds[runs] = hit
            while len(self._pld_folds) > self.PLD_PREFIXES:
                self._pld_folds.pop(next(iter(self._pld_folds)))
        else:  # most recently used last
            self._pld_folds[runs] = self._pld_folds.pop(runs)
        return hit

    def _pld_epsilon(self, runs: tuple[Run, ...]) -> float:
        if any(r[1] == 0 for r in runs):
            return math.inf  # a NonPrivate round: PLDAccountant reports inf
        # The prefix (all runs but the last) is cached; the last run's count changes every round.
        pld = self._pld_fold(runs[:-1]).compose(self._pld_part(*runs[-1]))
        return float(pld.get_epsilon_for_delta(self.delta))

    def _epsilon(self, runs: tuple[Run, ...]) -> float:
        if not runs:
            return 0.0
        hit = self._cache.get(runs)
        if hit is not None:
            return hit
        with _quiet_absl():
            eps = self._rdp_epsilon(runs) if self.method_for(runs) == "rdp" else self._pld_epsilon(runs)
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[runs] = eps
        return eps

    def _extend(self, runs: tuple[Run, ...], q: float, z: float, count: int, sampling: str = "poisson") -> tuple[Run, ...]:
        if count == 0:
            return runs
        if runs and self.mode == "central" and runs[-1][3] != sampling:
            raise ValueError(
                f"this privacy ledger holds {runs[-1][3]!r}-sampled rounds and cannot compose {sampling!r}-sampled ones: "
                "their epsilons are under different adjacencies (add-or-remove vs replace-one); keep the run's selector"
            )
        if runs and runs[-1][0] == q and runs[-1][1] == z and runs[-1][3] == sampling:
            return runs[:-1] + ((q, z, runs[-1][2] + count, sampling),)
        return runs + ((q, z, count, sampling),)

    def _planned(self, sampling_rate: float | None, noise_multiplier: float | None, sampling: str | None = None) -> tuple[float, float, str]:
        if (sampling_rate is None or noise_multiplier is None) and not self.runs:
            raise ValueError("no round recorded yet: give sampling_rate and noise_multiplier")
        q = self.runs[-1][0] if sampling_rate is None else float(sampling_rate)
        z = self.runs[-1][1] if noise_multiplier is None else float(noise_multiplier)
        kind = sampling if sampling is not None else (self.runs[-1][3] if self.runs else "poisson")
        dp_event(q, z, self.mode, kind)  # validates
        return q, z, kind

    # -- the API the engine calls ---------------------------------------------------
    def record_round(self, sampling_rate: float, noise_multiplier: float, rounds: int = 1, sampling: str = "poisson") -> None:
        """Compose one round (or `rounds` identical ones) at sampling rate q (the
        cohort's expected size / the clients it was drawn from), noise multiplier z,
        with the sampling the selector used ("poisson" or "fixed").
        Cheap: epsilon is computed when `spent()` / `epsilon()` asks for it."""
        if int(rounds) != rounds or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        q, z, kind = self._planned(sampling_rate, noise_multiplier, sampling)
        self.runs = list(self._extend(tuple(self.runs), q, z, int(rounds), kind))

    def epsilon(self) -> float:
        """Epsilon spent so far at `delta` (0 before the first round; inf if z = 0)."""
        return self._epsilon(tuple(self.runs))

    def spent(self) -> PrivacySpent:
        """(epsilon, delta, rounds) so far: what a RoundRecord reports."""
        return PrivacySpent(self.epsilon(), self.delta, self.rounds)

    def epsilon_after(self, rounds: int, sampling_rate: float | None = None, noise_multiplier: float | None = None, sampling: str | None = None) -> float:
        """Epsilon after `rounds` MORE rounds at (q, z, sampling) (default: those of the
        last recorded round) on top of the ledger.  On a fresh accountant this
        is the plan for a run of `rounds` rounds."""
        if int(rounds) != rounds or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        if rounds == 0:
            return self.epsilon()
        q, z, kind = self._planned(sampling_rate, noise_multiplier, sampling)
        return self._epsilon(self._extend(tuple(self.runs), q, z, int(rounds), kind))

    def would_exceed(self, budget_epsilon: float, sampling_rate: float | None = None, noise_multiplier: float | None = None, sampling: str | None = None) -> bool:
        """True when one more round at (q, z) would take epsilon above the
        budget: call it BEFORE dispatching a round and stop the run if True."""
        if not (float(budget_epsilon) > 0):
            raise ValueError(f"budget_epsilon must be > 0, got {budget_epsilon!r}")
        return self.epsilon_after(1, sampling_rate, noise_multiplier, sampling) > float(budget_epsilon)

    def max_rounds(self, budget_epsilon: float, sampling_rate: float | None = None, noise_multiplier: float | None = None, limit: int = 100_000, sampling: str | None = None) -> int:
        """The largest number of further rounds at (q, z) that stays within the
        budget (0 if even one round exceeds it; `limit` if it never does within
        `limit`).  Epsilon grows with rounds, so this is a binary search."""
        q, z, kind = self._planned(sampling_rate, noise_multiplier, sampling)
        if self.epsilon_after(1, q, z, kind) > budget_epsilon:
            return 0
        lo = 1  # doubling, then bisection: eps(lo) <= budget < eps(hi)
        while True:
            hi = min(2 * lo, limit)
            if self.epsilon_after(hi, q, z, kind) > budget_epsilon:
                break
            if hi == limit:
                return limit
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid, q, z, kind) <= budget_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: the settings and the run-length-encoded ledger."""
        return {
            "accounting": self.accounting,
            "mode": self.mode,
            "delta": self.delta,
            "pld_discretization": self.pld_discretization,
            "events": [[q, z, c, kind] for q, z, c, kind in self.runs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ledger.  Its mode must match (central and local rounds are
        different mechanisms); delta and the method may change on resume, since
        epsilon is recomputed from the ledger.  A ledger entry without its sampling
        (written before selectors said how they sample) is a fixed-size round: the
        only cohort the engine drew then."""
        if not isinstance(state, dict) or not isinstance(state.get("events"), list):
            raise ValueError("accountant state has no list of events")
        if state.get("mode", "central") != self.mode:
            raise ValueError(f"accountant state is for mode {state.get('mode')!r}, this accountant is {self.mode!r}")
        runs: tuple[Run, ...] = ()
        for item in state["events"]:
            if not isinstance(item, (list, tuple)) or len(item) not in (3, 4):
                raise ValueError(f"accountant state has a malformed event {item!r}")
            q, z, c = float(item[0]), float(item[1]), int(item[2])
            kind = str(item[3]) if len(item) == 4 else "fixed"
            dp_event(q, z, self.mode, kind)
            if c < 1:
                raise ValueError(f"accountant state has a run with count {c}")
            runs = self._extend(runs, q, z, c, kind)
        self.runs = list(runs)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyAccountant":
        acc = cls(
            delta=state["delta"],
            accounting=state.get("accounting", "pld"),
            mode=state.get("mode", "central"),
            pld_discretization=state.get("pld_discretization", 1e-4),
        )
        acc.load_state_dict(state)
        return acc
