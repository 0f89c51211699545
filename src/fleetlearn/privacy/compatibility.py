"""Which privacy settings can run together with which aggregators (the rules themselves are
in fleetlearn.compat, `check_privacy`; this module parses the mode string and keeps the
older `check_compatible` signature).

Secure aggregation (Bonawitz et al., CCS 2017) gives the server only the sum
of the cohort's updates, so an aggregator that must see each update (median,
trimmed mean, Krum, Bulyan, geometric median, ...) cannot run behind it.
Central DP-FedAvg (McMahan et al., ICLR 2018) calibrates its noise to the
sensitivity C of a SUM of clipped updates.  `check_compatible` refuses a rule
that needs individual updates under central DP as a standalone rule; the
engine instead wraps the rule in `aggregation.pipeline.CentralDPStage`, which
composes with rules whose per-client contributions are bounded
(norm_bounded_mean, centered_clipping) and refuses the others by that
capability.  Local DP noises each update on the device, so any aggregator is
post-processing and allowed.

SecAgg with central DP works: clients clip, the server securely sums the
clipped updates (and, for adaptive clipping, the clip indicators as one extra
coordinate) and adds the Gaussian noise to the unmasked sum.  The server is
trusted to add the noise (it never sees individual updates); distributed
noise (each client adding a share of it, Kairouz et al. ICML 2021) is not
implemented.
"""

from __future__ import annotations

from ..compat import check_privacy

PRIVACY_MODES = ("none", "central", "local")


def parse_privacy_mode(privacy_mode: str, secure_aggregation: bool | None = None) -> tuple[str, bool]:
    """``"central"``, ``"local+secagg"``, ``"secagg"``, ... -> (mode, secure_aggregation)."""
    if not isinstance(privacy_mode, str):
        raise ValueError(f"privacy mode must be a string, got {privacy_mode!r}")
    tokens = [t.strip() for t in privacy_mode.split("+") if t.strip()]
    allowed = PRIVACY_MODES + ("secagg",)
    bad = [t for t in tokens if t not in allowed]
    if bad or not tokens:
        raise ValueError(f"unknown privacy mode {privacy_mode!r}; allowed: {', '.join(PRIVACY_MODES)}, optionally joined with '+secagg'")
    dp = [t for t in tokens if t in ("central", "local")]
    if len(dp) > 1:
        raise ValueError(f"privacy mode {privacy_mode!r} combines central and local DP: choose one")
    secagg = "secagg" in tokens or bool(secure_aggregation)
    return (dp[0] if dp else "none"), secagg


def check_compatible(
    aggregator_needs_individual_updates: bool,
    privacy_mode: str,
    *,
    secure_aggregation: bool | None = None,
    aggregator: str = "the aggregator",
    asynchronous: bool = False,
) -> tuple[str, bool]:
    """Refuse combinations that cannot work, with a ValueError that says why.

    `privacy_mode` is ``none | central | local`` optionally joined with
    ``+secagg`` (or pass ``secure_aggregation=True``).  `asynchronous`: the
    engine runs buffered asynchronous aggregation (FedBuff) instead of rounds.
    Returns the parsed ``(mode, secure_aggregation)``.
    """
    mode, secagg = parse_privacy_mode(privacy_mode, secure_aggregation)
    # The rules live with every other pair rule, in fleetlearn.compat.
    check_privacy(aggregator_needs_individual_updates, mode, secagg, aggregator, asynchronous)
    return mode, secagg
