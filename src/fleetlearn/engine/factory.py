"""Assemble a Coordinator from a RunConfig: the registry of parts, in one place."""

from __future__ import annotations

from ..aggregation import AGGREGATORS, SERVER_OPTIMIZERS
from ..client import ClientRuntime
from ..compression import parse_chain
from ..config import ConfigError, RunConfig
from ..data import FederatedData, load_federated
from ..devices import make_fleet
from ..learners import TorchLearner, model_factory
from ..ops import RunStore
from ..privacy import PrivacyParts, build_privacy
from ..selection import SELECTORS
from ..transport import SimulationTransport
from ..validation import default_validators
from .clock import VirtualClock
from .coordinator import Coordinator, RoundHook
from .evaluation import Evaluator


def build_learner(config: RunConfig, data: FederatedData) -> TorchLearner:
    m = config.model
    try:
        make = model_factory(m.name, data.num_features, data.num_classes, m.hidden, m.kwargs)
        return TorchLearner(make, vectorize=config.engine.vectorize)
    except (ImportError, TypeError) as exc:
        raise ConfigError(f"model.name = {m.name!r}: {exc}") from None


def build_privacy_parts(config: RunConfig, population: int, aggregator) -> PrivacyParts | None:
    p = config.privacy
    if p.mode == "none" and not p.secure_aggregation:
        return None
    settings = p.model_dump()
    if settings["secagg_threshold"] is not None and float(settings["secagg_threshold"]).is_integer() and settings["secagg_threshold"] >= 2:
        settings["secagg_threshold"] = int(settings["secagg_threshold"])
    try:
        return build_privacy(
            settings,
            cohort=config.server.cohort,
            population=population,
            seed=config.seed,
            aggregator_needs_individual_updates=getattr(aggregator, "needs_individual_updates", False),
            aggregator=f"server.aggregator = {config.server.aggregator!r}",
            asynchronous=config.server.mode == "async",
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_selector(config: RunConfig, population: int):
    srv = config.server
    if srv.selector == "oort":
        return SELECTORS["oort"](population, epsilon=srv.oort_epsilon, alpha=srv.oort_alpha, quantile=srv.deadline_quantile)
    return SELECTORS[srv.selector]()


def build_coordinator(config: RunConfig, store: bool = True, hooks: list[RoundHook] | None = None, data: FederatedData | None = None) -> Coordinator:
    """Everything a run needs, chosen by configuration.  `store=False` keeps it in memory."""
    if data is None:
        data = load_federated(config.data, config.seed)
    if config.server.cohort > data.num_clients:
        raise ConfigError(f"server.cohort = {config.server.cohort} exceeds the {data.num_clients} clients the data has")
    learner = build_learner(config, data)
    try:
        uplink = parse_chain(config.compression.uplink)
    except ValueError as exc:
        raise ConfigError(f"compression.uplink = {config.compression.uplink!r}: {exc}") from None
    try:
        downlink = parse_chain(config.compression.downlink)
    except ValueError as exc:
        raise ConfigError(f"compression.downlink = {config.compression.downlink!r}: {exc}") from None
    fleet = make_fleet(config.devices, data.num_clients, config.seed)
    clock = VirtualClock()
    transport = SimulationTransport(
        data, learner, fleet, ClientRuntime(uplink, downlink, seed=config.seed), config.seed,
        clock=clock, heartbeat_timeout_s=config.server.heartbeat_timeout_s,
    )
    aggregator = AGGREGATORS[config.server.aggregator]()
    privacy = build_privacy_parts(config, data.num_clients, aggregator)
    run_store = None
    if store:
        run_store = RunStore.create(config.store.root, config.to_toml(), config.digest(), name=config.name, url=config.store.url)
        run_store.write_json("data_stats.json", data.stats)
    return Coordinator(
        config=config,
        learner=learner,
        transport=transport,
        selector=build_selector(config, data.num_clients),
        aggregator=aggregator,
        privacy=privacy,
        server_optimizer=SERVER_OPTIMIZERS[config.server.optimizer](config.server.server_lr),
        validators=default_validators(),
        downlink=downlink,
        uplink=uplink,
        evaluator=Evaluator(learner, data, config.server.eval_clients, config.seed),
        store=run_store,
        hooks=hooks or [],
        clock=clock,
    )
