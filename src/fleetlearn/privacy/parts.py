"""The `[privacy]` settings and the parts they build, in one place, so the
engine wires privacy with a few calls (see `PrivacyParts`).

`PrivacySettings` is the `[privacy]` config section itself (`fleetlearn.config.PrivacyConfig`):
one schema, validated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import PrivacyConfig
from .accountant import PrivacyAccountant, PrivacySpent
from .compatibility import check_compatible
from .dp import AdaptiveClipping, CentralDP, LocalDP
from .secagg import SecureAggregation
from .telemetry import PrivateTelemetry


# The `[privacy]` section: one schema, validated once, where the config is validated
# (fleetlearn.config.PrivacyConfig).  `PrivacySettings(**kw)` validates the same way and
# raises the same ConfigError (a ValueError) naming the key.
PrivacySettings = PrivacyConfig


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
        state: dict[str, Any] = {"settings": self.settings.model_dump(mode="json")}
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
            # an integer count of share holders (>= 2) or a fraction of them
            threshold=int(s.secagg_threshold) if s.secagg_threshold is not None and s.secagg_threshold >= 2 else s.secagg_threshold,
            neighbors=s.secagg_neighbors,
            rounding=s.secagg_rounding,
            seed=seed,
        )
    telemetry = None
    if s.telemetry_noise_multiplier is not None:
        bounds = {"loss_before": s.telemetry_loss_bound, "loss_after": s.telemetry_loss_bound, "accuracy": 1.0, "update_norm": s.clip_norm}
        telemetry = PrivateTelemetry(s.telemetry_noise_multiplier, bounds, seed=0 if seed is None else seed)
    return PrivacyParts(s, central, local, secure, accountant, telemetry)
