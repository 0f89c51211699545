"""The `[privacy]` settings and the parts they build, in one place, so the
engine wires privacy with a few calls (see `PrivacyParts`).

`PrivacySettings` mirrors the recommended `[privacy]` config section key for
key; the config layer validates types and turns the section into this with
``PrivacySettings(**section.model_dump())``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .accountant import ACCOUNTING_METHODS, PrivacyAccountant, PrivacySpent
from .compatibility import PRIVACY_MODES, check_compatible
from .dp import AdaptiveClipping, CentralDP, LocalDP
from .quantize import ROUNDING
from .secagg import SecureAggregation
from .telemetry import PrivateTelemetry


@dataclass
class PrivacySettings:
    """The `[privacy]` section (defaults = privacy off)."""

    mode: str = "none"  # none | central (DP-FedAvg) | local (noise on each device)
    noise_multiplier: float = 1.0  # z >= 0; for adaptive clipping the combined z the accountant records
    clip_norm: float = 1.0  # C > 0 (the initial C when adaptive)
    adaptive_clipping: bool = False  # Andrew et al. 2021 (central only)
    target_quantile: float = 0.5  # gamma in (0, 1)
    clip_learning_rate: float = 0.2  # eta_C > 0
    clip_count_stddev: float | None = None  # sigma_b; None = expected cohort / 20
    accounting: str = "pld"  # pld | rdp
    delta: float = 1e-5  # target delta, must be < 1 / population
    budget_epsilon: float | None = None  # stop before a round would exceed it; None = no budget
    secure_aggregation: bool = False
    secagg_threshold: float | int | None = None  # int >= 2, or a fraction of share holders; None = honest majority
    secagg_modulus_bits: int = 32  # ring Z_{2^k}, k in [8, 62]
    secagg_clip_range: float = 1.0  # quantizer range [-c, c] (central DP always sends D/C in [-1, 1])
    secagg_neighbors: int | None = None  # SecAgg+ graph degree (even); None = all pairs
    secagg_rounding: str = "stochastic"  # stochastic | deterministic
    telemetry_noise_multiplier: float | None = None  # private telemetry (central mode); None = off
    telemetry_loss_bound: float = 10.0  # client-reported losses clipped to [0, bound]

    def validate(self) -> "PrivacySettings":
        """Raise ValueError naming the key, the bad value and what is allowed."""
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"privacy.{key} = {getattr(self, key)!r}: {msg}")

        if self.mode not in PRIVACY_MODES:
            raise bad("mode", f"allowed: {', '.join(PRIVACY_MODES)}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise bad("noise_multiplier", "must be a finite number >= 0")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise bad("clip_norm", "must be a finite number > 0")
        if self.adaptive_clipping and self.mode != "central":
            raise bad("adaptive_clipping", "adaptive clipping needs mode = 'central'")
        if not (0 < self.target_quantile < 1):
            raise bad("target_quantile", "must be in (0, 1)")
        if not (self.clip_learning_rate > 0):
            raise bad("clip_learning_rate", "must be > 0")
        if self.clip_count_stddev is not None and not (self.clip_count_stddev >= 0):
            raise bad("clip_count_stddev", "must be >= 0")
        if self.accounting not in ACCOUNTING_METHODS:
            raise bad("accounting", f"allowed: {', '.join(ACCOUNTING_METHODS)}")
        if not (0 < self.delta < 1):
            raise bad("delta", "must be in (0, 1)")
        if self.budget_epsilon is not None and not (self.budget_epsilon > 0):
            raise bad("budget_epsilon", "must be > 0")
        if self.budget_epsilon is not None and self.mode == "none":
            raise bad("budget_epsilon", "a privacy budget needs mode = 'central' or 'local'")
        t = self.secagg_threshold
        if t is not None and not (isinstance(t, int) and t >= 2 or isinstance(t, float) and 0 < t <= 1):
            raise bad("secagg_threshold", "must be an integer >= 2 or a fraction in (0, 1]")
        if not (isinstance(self.secagg_modulus_bits, int) and 8 <= self.secagg_modulus_bits <= 62):
            raise bad("secagg_modulus_bits", "must be an integer in [8, 62]")
        if not (self.secagg_clip_range > 0):
            raise bad("secagg_clip_range", "must be > 0")
        if self.mode == "central" and self.secure_aggregation and self.secagg_clip_range < 1:
            raise bad("secagg_clip_range", "must be >= 1 with central DP (clients send D/C, coordinates in [-1, 1])")
        n = self.secagg_neighbors
        if n is not None and not (isinstance(n, int) and n >= 2 and n % 2 == 0):
            raise bad("secagg_neighbors", "must be an even integer >= 2 (SecAgg+ graph degree) or unset for all pairs")
        if self.secagg_rounding not in ROUNDING:
            raise bad("secagg_rounding", f"allowed: {', '.join(ROUNDING)}")
        if self.telemetry_noise_multiplier is not None:
            if self.mode != "central":
                raise bad("telemetry_noise_multiplier", "private telemetry is released by the server: it needs mode = 'central'")
            if not (math.isfinite(self.telemetry_noise_multiplier) and self.telemetry_noise_multiplier > 0):
                raise bad("telemetry_noise_multiplier", "must be a finite number > 0")
        if not (math.isfinite(self.telemetry_loss_bound) and self.telemetry_loss_bound > 0):
            raise bad("telemetry_loss_bound", "must be a finite number > 0")
        return self


@dataclass
class PrivacyParts:
    """What `build_privacy` returns; the engine's privacy calls in one object.

    central: `CentralDP` or None -- clip, sum, noise around the aggregation rule's per-client
        contributions (aggregation.pipeline.CentralDPStage).
    local: `LocalDP` or None -- applied by each client before encoding.
    secure: `SecureAggregation` or None -- replaces the plain sum.
    accountant: `PrivacyAccountant` or None (None when mode = 'none').
    """

    settings: PrivacySettings
    central: CentralDP | None
    local: LocalDP | None
    secure: SecureAggregation | None
    accountant: PrivacyAccountant | None
    telemetry: PrivateTelemetry | None = None  # its releases are composed in `accountant` too

    @property
    def noise_multiplier(self) -> float:
        """The z the accountant records each round."""
        if self.central is not None:
            return self.central.noise_multiplier
        if self.local is not None:
            return self.local.noise_multiplier
        return math.nan

    def budget_stop_reason(self, sampling_rate: float, sampling: str = "poisson") -> str | None:
        """Call BEFORE dispatching a round: a reason to stop the run if one more
        round at this sampling rate would take epsilon above the budget."""
        budget = self.settings.budget_epsilon
        if budget is None or self.accountant is None:
            return None
        acc = self.accountant
        runs = acc._extend(tuple(acc.runs), float(sampling_rate), self.noise_multiplier, 1, sampling)
        if self.telemetry is not None:  # a round is two releases: the model update and the telemetry
            runs = acc._extend(runs, float(sampling_rate), self.telemetry.noise_multiplier, 1, sampling)
        nxt = acc._epsilon(runs)
        if nxt <= budget:
            return None
        return (
            f"privacy budget: one more round would spend epsilon = {nxt:.4g} > budget_epsilon = {budget:g} "
            f"(delta = {acc.delta:g}, {acc.rounds} rounds spent epsilon = {acc.epsilon():.4g})"
        )

    def record_round(self, sampling_rate: float, sampling: str = "poisson") -> PrivacySpent | None:
        """Call AFTER every round whose (noised) aggregate was computed, with the round's
        sampling rate (expected cohort / the clients it was drawn from) and sampling kind."""
        if self.accountant is None:
            return None
        self.accountant.record_round(sampling_rate, self.noise_multiplier, sampling=sampling)
        return self.accountant.spent()

    def summary(self) -> dict[str, Any]:
        """What the run summary says about privacy: epsilon at delta, and how it was accounted."""
        acc = self.accountant
        if acc is None:
            return {}
        return {
            "dp_mode": acc.mode, "dp_epsilon": acc.epsilon(), "dp_delta": acc.delta, "dp_rounds": acc.rounds,
            "dp_accounting": acc.method, "dp_sampling": acc.sampling or "",
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state for checkpoints: accountant ledger, adaptive C, noise RNG."""
        state: dict[str, Any] = {"settings": asdict(self.settings)}
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        if self.central is not None:
            state["central"] = self.central.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])
        if self.central is not None and "central" in state:
            self.central.load_state_dict(state["central"])


def build_privacy(
    settings: PrivacySettings | dict[str, Any] | None,
    *,
    cohort: int,
    population: int,
    seed: int | None = None,
    aggregator_needs_individual_updates: bool = False,
    aggregator: str = "the aggregator",
    asynchronous: bool = False,
) -> PrivacyParts:
    """Build the privacy parts for a run.  `cohort` is the expected number of
    accepted updates per round (DP-FedAvg's fixed denominator and the SecAgg
    quantizer's headroom), `population` the number of clients.  Raises
    ValueError for settings that cannot work (see `check_compatible`)."""
    s = PrivacySettings() if settings is None else (PrivacySettings(**settings) if isinstance(settings, dict) else settings)
    s.validate()
    if not (1 <= cohort <= population):
        raise ValueError(f"need 1 <= cohort ({cohort}) <= population ({population})")
    check_compatible(
        aggregator_needs_individual_updates, s.mode, secure_aggregation=s.secure_aggregation, aggregator=aggregator, asynchronous=asynchronous
    )
    if s.mode != "none" and s.delta >= 1.0 / population:
        raise ValueError(
            f"privacy.delta = {s.delta:g} is not below 1 / population = {1.0 / population:g}: a mechanism that publishes one "
            "random client's data outright satisfies that delta; choose a smaller delta"
        )
    central = local = secure = accountant = None
    if s.mode == "central":
        adaptive = None
        if s.adaptive_clipping:
            adaptive = AdaptiveClipping(s.clip_norm, cohort, s.target_quantile, s.clip_learning_rate, s.clip_count_stddev)
        central = CentralDP(s.noise_multiplier, s.clip_norm, cohort, adaptive, seed)
    elif s.mode == "local":
        local = LocalDP(s.clip_norm, s.noise_multiplier)
    if s.mode != "none":
        accountant = PrivacyAccountant(s.delta, s.accounting, s.mode)
    if s.secure_aggregation:
        secure = SecureAggregation(
            clip_range=max(s.secagg_clip_range, 1.0) if s.mode == "central" else s.secagg_clip_range,
            max_clients=cohort,
            modulus_bits=s.secagg_modulus_bits,
            threshold=s.secagg_threshold,
            neighbors=s.secagg_neighbors,
            rounding=s.secagg_rounding,
            seed=seed,
        )
    telemetry = None
    if s.telemetry_noise_multiplier is not None:
        bounds = {"loss_before": s.telemetry_loss_bound, "loss_after": s.telemetry_loss_bound, "accuracy": 1.0, "update_norm": s.clip_norm}
        telemetry = PrivateTelemetry(s.telemetry_noise_multiplier, bounds, seed=0 if seed is None else seed)
    return PrivacyParts(s, central, local, secure, accountant, telemetry)
