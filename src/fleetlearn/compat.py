"""Which parts can run together: every pair rule, computed in one place from the capabilities
the parts declare when they register (fleetlearn.parts).

A rule says: when a feature is on (a config key), the part chosen for some role must have a
capability.  Each refusal names the key that turned the feature on, the part, and the
capability it is missing.  The capabilities read here:

  aggregator  linear                 its result is a weighted sum (secure aggregation, count
                                     sketches, regional pre-aggregation and HeteroFL can compute it)
              bounded_sensitivity    each client's contribution has a known norm bound (central DP
                                     wraps it; aggregation.pipeline.check_dp_composable checks the
                                     rule's `contributions` at build time)
              needs_individual_updates, needs_client_ids
              sync_only              keeps per-round state of a fixed cohort (FedBuff cannot run it)
              flags_clients          reports flagged clients (server.reputation reads them)
  selector    uniform_sampling       every available client is equally likely (the central-DP
                                     accountant's assumption)
  dataset     natural_devices        brings its own devices (data.partition = "natural")
  transport   client_helpers, attack_simulation, personalization, heterofl, clustering:
                                     what the backend carries (the simulation carries all; the
                                     gRPC server, transport "grpc", all but attack_simulation:
                                     a red-team client, `fleetlearn client --attack`, instead)
  weighting   client_helpers         needs a message from the client device (label histograms)

Rules between settings that are not parts (privacy, FedBuff, canary, HeteroFL width checks)
stay next to their keys in config.py; the privacy x aggregator rules are here
(`check_privacy`), and privacy.compatibility.check_compatible keeps its older signature on top.

This module imports only `parts` and `errors`; callers pass the config (duck-typed).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .parts import capabilities, find_part, names

__all__ = ["missing", "has", "check_config", "check_transport", "check_linear", "check_selector", "check_privacy",
           "transport_features", "client_side_helper"]


def missing(kind: str, name: str, capability: str) -> str:
    """The end of every refusal: " [capability 'linear' missing from aggregator 'median']"."""
    return f" [capability {capability!r} missing from {kind} {name!r}]"


def has(kind: str, name: str, capability: str) -> bool:
    return capability in capabilities(kind, name)


# -- the aggregator --------------------------------------------------------------------------------
def check_linear(aggregator: str, feature: str, why: str) -> None:
    """`feature` (a "key = value" text) computes the aggregate as a sum; the rule must be `linear`."""
    if not has("aggregator", aggregator, "linear"):
        raise ConfigError(f"{feature}: {why}; server.aggregator = {aggregator!r} needs individual updates"
                          + missing("aggregator", aggregator, "linear"))


def check_privacy(aggregator_needs_individual_updates: bool, mode: str, secagg: bool, aggregator: str, asynchronous: bool) -> None:
    """Privacy x aggregation: secure aggregation reveals only a sum (the rule must be linear);
    standalone central DP replaces the rule with a clipped noised sum; both need synchronous
    rounds (they are `sync_only`).  ValueError with the reason and the missing capability."""
    if asynchronous and secagg:
        raise ValueError(
            "secure aggregation cannot run with asynchronous (buffered) aggregation: its key agreement, masking and "
            "unmasking are rounds over a fixed cohort, and a buffer of updates computed at different times has no such "
            "cohort. Use server.mode = 'sync' with secure aggregation"
        )
    if asynchronous and mode == "central":
        raise ValueError(
            "central DP accounting assumes synchronous rounds, each a Poisson-subsampled Gaussian mechanism over a sampled "
            "cohort (McMahan et al. 2018); buffered asynchronous aggregation samples clients differently and weights "
            "stale updates, which this accountant does not model. Use server.mode = 'sync', or privacy mode 'local'"
        )
    if secagg and aggregator_needs_individual_updates:
        raise ValueError(
            f"secure aggregation cannot be combined with {aggregator}: secure aggregation only ever reveals the SUM of the "
            f"cohort's updates to the server (Bonawitz et al. 2017), but {aggregator} needs every individual update "
            "(e.g. median, trimmed mean, Krum). Use the 'mean' aggregator with secure aggregation, or turn secure aggregation off"
            " [capability 'linear' missing]"
        )
    if mode == "central" and aggregator_needs_individual_updates:
        raise ValueError(
            f"central DP cannot be combined with {aggregator}: DP-FedAvg (McMahan et al. 2018) calibrates its Gaussian noise "
            f"to a SUM of clipped updates and replaces the aggregator with it, so {aggregator}, which needs individual "
            "updates, would not run and its robustness would be lost. Use the 'mean' aggregator, or privacy mode 'local' "
            "(noise added on each device; any aggregator is then post-processing) [capability 'linear' or 'bounded_sensitivity' missing]"
        )


# -- the selector ------------------------------------------------------------------------------------
def check_selector(selector: Any, population: int, cohort: int, what: str) -> None:
    """Under central DP the selector must sample uniformly: the built selector (wrappers
    included) must say each client's chance (`inclusion`), which only `uniform_sampling`
    selectors do."""
    if selector.inclusion(range(population), min(cohort, population)) is None:
        raise ConfigError(
            f"{what} with privacy.mode = 'central': the accountant composes one subsampled Gaussian per round and needs "
            "to know each client's chance of taking part; this selector's choice is not uniform (it depends on what "
            "clients reported or on their history), so no sound epsilon can be given. Use server.selector = 'poisson' "
            "(the default under central DP) or 'random' (fixed-size, accounted without replacement)"
            " [capability 'uniform_sampling' missing]"
        )


# -- the transport -----------------------------------------------------------------------------------
def transport_features(cfg: Any) -> list[tuple[str, str]]:
    """(capability, "key = value") for each feature on in `cfg` that a transport must carry."""
    out = []
    srv = cfg.server
    helper = next((key for key, on in (
        ("client.objective = 'scaffold'", cfg.client.objective == "scaffold"),
        ("client.oversample = true", cfg.client.oversample),
        (f"server.weighting = {str(srv.weighting)!r}", has("weighting", str(srv.weighting), "client_helpers")),
    ) if on), None)
    if helper:
        out.append(("client_helpers", helper))
    if cfg.personalization.method != "none":
        out.append(("personalization", f"personalization.method = {cfg.personalization.method!r}"))
    if srv.clustering != "none":
        out.append(("clustering", f"server.clustering = {srv.clustering!r}"))
    if cfg.model.heterofl:
        out.append(("heterofl", f"model.widths = {cfg.model.widths}" if cfg.model.heterofl_widths else f"model.lora_ranks = {cfg.model.lora_ranks}"))
    if cfg.attack.kind != "none":
        out.append(("attack_simulation", f"attack.kind = {cfg.attack.kind!r}"))
    if cfg.privacy.secure_aggregation:
        out.append(("secure_aggregation", "privacy.secure_aggregation = true"))
    if srv.mode == "async":
        out.append(("async_rounds", "server.mode = 'async'"))
    return out


def client_side_helper(cfg: Any) -> str | None:
    """The first enabled option that needs the client device's extra messages, as "key = value"."""
    return next((key for cap, key in transport_features(cfg) if cap == "client_helpers"), None)


# Why a server-side feature cannot exist on a real fleet, and what exists there instead.
_ON_A_FLEET = {
    "attack_simulation": "the simulation (fleetlearn run) makes some of its clients malicious; a real server controls no "
                         "client, so it cannot: for a red-team drill start attacking clients with "
                         "`fleetlearn client --attack KIND` and leave [attack] out of the server's config",
}


def check_transport(cfg: Any, backend: str | None = None) -> None:
    """Every feature on in `cfg` must be carried by the transport `engine.backend` names (or
    `backend`, e.g. "grpc" for `fleetlearn server`)."""
    chosen = backend is None or backend == cfg.engine.backend
    backend = backend or cfg.engine.backend
    for cap, key in transport_features(cfg):
        if not has("transport", backend, cap):
            where, fix = ((f"engine.backend = {backend!r}", "set engine.backend = 'simulation'") if chosen
                          else (f"the {backend!r} transport", _ON_A_FLEET.get(cap, "it runs in the simulation (fleetlearn run)")))
            raise ConfigError(f"{key}: {where} does not carry it; {fix}" + missing("transport", backend, cap))


# -- the whole config (RunConfig's cross-checks) --------------------------------------------------------
def check_config(cfg: Any) -> None:
    """The pair rules between parts a config chooses, from their capabilities.  Raises
    ValueError (the config layer words it as a ConfigError) naming the missing capability."""
    srv = cfg.server
    agg = srv.aggregator
    if srv.reputation and not has("aggregator", agg, "flags_clients"):
        raise ValueError(f"server.reputation = true needs the flags of server.aggregator = 'dnc'; got server.aggregator = {agg!r}"
                         + missing("aggregator", agg, "flags_clients"))
    if srv.mode == "async":
        for key, kind, name in (("server.aggregator", "aggregator", agg), ("server.selector", "selector", str(srv.selector)),
                                ("server.weighting", "weighting", str(srv.weighting))):
            if has(kind, name, "sync_only"):
                raise ValueError(f"{key} = {name!r} keeps state of a fixed cohort for synchronous rounds; it cannot run with "
                                 f"server.mode = 'async' [capability 'sync_only' of {kind} {name!r}]")
        helper = client_side_helper(cfg)
        if helper:
            raise ValueError(f"{helper} runs in synchronous rounds only; it cannot run with server.mode = 'async'")
    part = find_part("dataset", cfg.data.dataset)
    if cfg.data.partition == "natural" and part is not None and not has("dataset", cfg.data.dataset, "natural_devices"):
        natural = [n for n in _names("dataset") if has("dataset", n, "natural_devices")]
        raise ValueError(f"data.partition = 'natural' needs a dataset with its own devices ({', '.join(natural)} or a custom one), "
                         f"not {cfg.data.dataset!r}" + missing("dataset", cfg.data.dataset, "natural_devices"))
    backend = cfg.engine.backend
    for cap, key in transport_features(cfg):
        if cap in ("personalization", "clustering") and not has("transport", backend, cap):
            raise ValueError(f"{key} keeps its state in the in-process simulation; engine.backend = {backend!r} is not supported"
                             + missing("transport", backend, cap))


def _names(kind: str) -> list[str]:
    return names(kind)
