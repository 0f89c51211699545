"""Assemble a Coordinator from a RunConfig.  Parts are looked up by name in the one registry
(fleetlearn.parts) and built from their own config (`build_part`); the pair rules between
them are fleetlearn.compat's."""

from __future__ import annotations

from .. import compat
from ..attacks import build_attack
from ..client import Device
from ..client.state_store import CLIENT_STATE_FILE, PERSONAL_STATE_FILE
from ..compression import AdaptiveCompression, CountSketch, parse_chain
from ..config import ConfigError, RunConfig, coverage_refusal
from ..parts import BuildContext, build_part, get_part
from ..data import FederatedData, load_federated
from ..devices import make_fleet
from ..learners import TorchLearner, model_factory, resolve_device
from ..monitoring import build_monitoring
from ..ops import RunStore
from ..ops.registry import PARAM_SPEC_FILE
from ..privacy import PrivacyParts, build_privacy
from ..aggregation.pipeline import build_pipeline
from ..aggregation.schedules import schedule_from_config
from ..validation import build_validators
from .clock import VirtualClock
from .coordinator import Coordinator, RoundHook
from .fedbuff import FedBuffLoop
from .tasks import task_writers
from .evaluation import Evaluator


def build_learner(config: RunConfig, data: FederatedData, fleet=None):
    """The model's learner; with several `model.widths`, the HeteroFL wrapper that trains
    each device at the width its memory allows (`model.width_rule`).  Its batched steps
    run as `engine.training_kernels` says."""
    from ..learners.torch_learner import set_training_kernels

    learner = _build_learner(config, data, fleet)
    set_training_kernels(learner, config.engine.training_kernels)
    return learner


def _build_learner(config: RunConfig, data: FederatedData, fleet=None):
    m = config.model
    if m.name.startswith("hf:"):
        return _pretrained_learner(config, data, fleet)
    if m.heterofl:
        from ..learners.heterofl import heterofl_parts

        return _part("model.widths", "widths", m.widths, lambda: heterofl_parts(
            m, data.num_features, data.num_classes, None if fleet is None else fleet.memory_mb, data.num_clients, config.engine.vectorize))
    _check_model_size(config, data)
    try:
        make = model_factory(m.name, data.num_features, data.num_classes, m.hidden, m.kwargs)
        learner = TorchLearner(make, vectorize=config.engine.vectorize, device=resolve_device(config.engine.device))
    except (ImportError, TypeError) as exc:
        raise ConfigError(f"model.name = {m.name!r}: {exc}") from None
    except Exception as exc:  # the user's factory (or a built-in given bad kwargs) raised
        raise ConfigError(f"model.name = {m.name!r}: building the model raised {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:
        raise ConfigError(f"model.name = {m.name!r}: building the model called exit ({exc.code!r}); a model factory must return a torch.nn.Module") from None
    _check_model_output(m.name, learner, data)
    return learner


def _pretrained_learner(config: RunConfig, data: FederatedData, fleet=None):
    """A pretrained Hugging Face encoder with LoRA adapters and a head (fleetlearn.learners.hf):
    the learner's vector is the adapters and the head; with several `model.lora_ranks`, the
    HeteroFL wrapper that trains each device at the rank its memory allows."""
    from ..learners.hf import lora_learner, lora_rank_parts

    m = config.model
    if m.heterofl:
        learner = _part("model.lora_ranks", "lora_ranks", m.lora_ranks, lambda: lora_rank_parts(
            m, data.num_features, data.num_classes, None if fleet is None else fleet.memory_mb, data.num_clients, config.engine.vectorize,
            config.engine.device))
    else:
        learner = lora_learner(m, data.num_features, data.num_classes, config.engine.vectorize, config.engine.device)
    _check_model_output(m.name, learner, data)
    return learner


# The largest model a run builds (float32 parameters): 2^28 is 1 GiB, and every client of a
# vectorized cohort holds a copy of it and of its gradient.
MAX_MODEL_PARAMS = 2**28


def _check_model_size(config: RunConfig, data: FederatedData) -> None:
    """Refuse a built-in model too large to hold, before allocating it (built on the meta device)."""
    import torch

    m = config.model
    student = config.distill.student_hidden
    if student:
        widths = [data.num_features, *student, data.num_classes]
        n = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        if n > MAX_MODEL_PARAMS:
            raise ConfigError(f"distill.student_hidden = {student}: the student MLP on {data.num_features} features and {data.num_classes} classes "
                              f"has {n:,} parameters; allowed: at most {MAX_MODEL_PARAMS:,} ({4 * MAX_MODEL_PARAMS / 2**30:.0f} GiB)")
    if m.name not in ("mlp", "logistic", "char_gru", "char_lstm"):
        return
    widths = [data.num_features, *(m.hidden if m.name == "mlp" else []), data.num_classes]
    if m.name in ("mlp", "logistic"):
        n = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    else:
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in model_factory(m.name, data.num_features, data.num_classes, m.hidden, m.kwargs)().parameters())
        except Exception as exc:
            raise ConfigError(f"model.name = {m.name!r} with model.kwargs = {m.kwargs}: building the model raised {type(exc).__name__}: {exc}") from None
    if n > MAX_MODEL_PARAMS:
        raise ConfigError(
            f"model.hidden = {m.hidden}: model.name = {m.name!r} on {data.num_features} features and {data.num_classes} classes "
            f"has {n:,} parameters ({4 * n / 2**30:.1f} GiB); allowed: at most {MAX_MODEL_PARAMS:,} ({4 * MAX_MODEL_PARAMS / 2**30:.0f} GiB)"
        )


def _check_model_output(name: str, learner, data: FederatedData) -> None:
    """The model must map a batch of the data's examples to (batch, num_classes) float32 logits."""
    import torch

    where = f"model.name = {name!r}"
    params = list(learner.module.parameters())
    if not params:
        raise ConfigError(f"{where}: the model has no parameters; expected a torch.nn.Module with float32 parameters to train")
    bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if bad:
        raise ConfigError(f"{where}: the model's parameters are {', '.join(bad)}; expected float32 (call .float() on the module)")
    x = getattr(data, "x", None)
    if x is None:  # a stand-in for the data that only gives its shape
        return
    x = x[:2]
    try:
        with torch.no_grad():
            out = learner.module(x)
    except Exception as exc:
        raise ConfigError(f"{where}: the model failed on a batch of the data, shape {tuple(x.shape)} float32 "
                          f"({data.num_features} features): {type(exc).__name__}: {exc}") from None
    want = (x.shape[0], data.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != torch.float32:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: the model maps a batch of shape {tuple(x.shape)} to {got}; expected float32 logits "
                          f"of shape {want} (batch, the data's {data.num_classes} classes)")


def build_model_hooks(config: RunConfig, data: FederatedData, learner, x_unlabeled) -> list:
    """Round hooks of the model parts: HeteroFL's per-client widths and per-width accuracy
    (first, so monitors see them), and the on-device student of `distill.student_hidden`."""
    out: list = []
    if config.model.heterofl:
        from ..learners.heterofl import HeteroFLRecorder

        out.append(HeteroFLRecorder(learner, data.central_x, data.central_y))
    d = config.distill
    if d.student_hidden:
        from ..learners import mlp
        from ..learners.distill import StudentDistiller

        f, c, hidden = data.num_features, data.num_classes, config.model.hidden
        out.append(StudentDistiller(
            lambda: mlp(f, c, hidden), lambda: mlp(f, c, d.student_hidden), x_unlabeled, data.central_x, data.central_y,
            steps=d.student_steps, every=d.student_every, temperature=d.student_temperature, seed=config.seed, rounds=config.server.rounds))
    return out

def build_clustering(config: RunConfig, learner, population: int):
    """Clustered FL: the server part and the learner wrapped to k stacked models."""
    from ..clustering import Clustering
    from ..learners.clustered import ClusteredLearner

    srv = config.server
    wrapped = ClusteredLearner.for_run(learner, srv.clustering, srv.clusters)
    part = _part("server.clustering", "clustering", srv.clustering, lambda: Clustering(srv.clustering, srv.clusters, learner.spec.dim, population, srv.cfl_eps1, srv.cfl_eps2, srv.cfl_min_gap))
    return part, wrapped


def _is_sketch(chain) -> bool:
    return isinstance(getattr(chain, "support", None), CountSketch)


def _part(kind: str, key: str, value, build):
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{kind} = {value!r}: {exc}") from None


def build_aggregator(config: RunConfig, dim: int | None = None, population: int | None = None, learner=None):
    srv = config.server
    if getattr(learner, "name", None) == "heterofl":
        from ..learners.heterofl import HeteroFLAggregator

        return HeteroFLAggregator(learner)  # server.aggregator = "mean", per coordinate over its covering clients
    part = get_part("aggregator", srv.aggregator)
    if part.build is not None:  # built from the run's size (mifa)
        ctx = BuildContext(config, population=population, dim=dim)
        return _part("server.aggregator", "aggregator", srv.aggregator, lambda: build_part("aggregator", srv.aggregator, None, ctx))
    cls = part.obj
    keys = getattr(cls, "config_keys", {})
    kwargs = {arg: getattr(srv, key) for key, arg in keys.items() if getattr(srv, key) is not None}
    return _part("server.aggregator", "aggregator", srv.aggregator, lambda: cls(**kwargs))


def build_server_optimizer(config: RunConfig, schedule=None):
    """`server.optimizer` with its own keys (beta1, tau, ...) and `server.server_lr`; its
    learning rate and `schedule` (`server_lr_*`) live in its state."""
    srv = config.server
    return _part("server.optimizer", "optimizer", str(srv.optimizer),
                 lambda: build_part("server_optimizer", srv.optimizer, srv.options("optimizer"), BuildContext(config, schedule=schedule)))


def build_run_validators(config: RunConfig) -> list:
    srv = config.server
    return _part(
        "server.validators", "validators", srv.validators,
        lambda: build_validators(srv.validators, max_norm=srv.max_update_norm, max_staleness=None if srv.mode == "async" else srv.max_staleness, max_examples=srv.max_claimed_examples),
    )


def build_weighting(config: RunConfig):
    """`server.weighting` with its own keys (floor, mode, ...)."""
    srv = config.server
    return _part("server.weighting", "weighting", str(srv.weighting),
                 lambda: build_part("weighting", srv.weighting, srv.options("weighting"), BuildContext(config)))


_SCHEDULE_KEYS = {"step": ("step_size", "gamma"), "cosine": ("min",), "plateau": ("factor", "patience", "min")}


def build_schedules(config: RunConfig) -> dict:
    """The client and server learning-rate schedules, from `lr_*` / `server_lr_*` keys
    (the coordinator applies the client's; the server optimizer owns the server's)."""
    out = {}
    for name, section, prefix in (("client", config.client, "lr_"), ("server", config.server, "server_lr_")):
        kind = getattr(section, prefix + "schedule")
        cfg = {prefix + "schedule": kind, **{prefix + k: getattr(section, prefix + k) for k in _SCHEDULE_KEYS.get(kind, ())}}
        out[name] = _part(f"{'client' if name == 'client' else 'server'}.{prefix}schedule", prefix, kind, lambda cfg=cfg, prefix=prefix: schedule_from_config(cfg, prefix, total_rounds=config.server.rounds))
    return out


def build_privacy_parts(config: RunConfig, population: int, aggregator) -> PrivacyParts | None:
    p = config.privacy
    if p.mode == "none" and not p.secure_aggregation:
        return None
    try:
        return build_privacy(
            p,  # the [privacy] section is the privacy settings (one schema, validated once)
            cohort=config.server.cohort,
            population=population,
            seed=config.seed,
            # Central DP wraps the rule in the pipeline, which refuses a rule without bounded per-client
            # contributions (aggregation.pipeline.check_dp_composable); secure aggregation still needs a sum.
            aggregator_needs_individual_updates=getattr(aggregator, "needs_individual_updates", False)
            and (p.secure_aggregation or p.mode != "central"),
            aggregator=f"server.aggregator = {config.server.aggregator!r}",
            asynchronous=config.server.mode == "async",
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def selector_name(config: RunConfig) -> str:
    """The selector a run uses: `server.selector`, with "auto" resolved (Poisson sampling
    under central DP, the sampling its accountant composes; uniform fixed-size otherwise)."""
    name = config.server.selector
    if name == "auto":
        return "poisson" if config.privacy.mode == "central" else "random"
    return str(name)


def build_decoder(uplink, learner, clustering=None, masked: bool = False):
    """How the server reads an uplink payload (engine.intake): nothing (secure aggregation
    run by the clients: `masked`), a summed-in-sketch-space count sketch, a HeteroFL
    sub-model, one tagged block of clustered FL's models, or the model's full vector."""
    from .intake import ClusterDecoder, MaskedDecoder, SketchDecoder, SubModelDecoder, UpdateDecoder

    dim = learner.spec.dim
    if masked:
        return MaskedDecoder(uplink, dim)
    if _is_sketch(uplink):
        return SketchDecoder(uplink, dim)
    if getattr(learner, "name", None) == "heterofl":
        return SubModelDecoder(uplink, dim, learner)
    if clustering is not None:
        return ClusterDecoder(uplink, dim, clustering)
    return UpdateDecoder(uplink, dim)


def build_selector(config: RunConfig, population: int):
    srv = config.server
    """`server.selector` ("auto" resolved) with its own keys, capped by `server.max_newcomers`;
    under central DP it must sample uniformly (compat.check_selector)."""
    srv = config.server
    name = selector_name(config)
    options = srv.options("selector") if name == srv.selector else get_part("selector", name).options()
    selector = _part("server.selector", "selector", name,
                     lambda: build_part("selector", name, options, BuildContext(config, population=population)))
    if srv.max_newcomers is not None:
        from ..selection import NewcomerCap

        selector = NewcomerCap(selector, srv.max_newcomers, population)
    if config.privacy.mode == "central":
        what = f"server.selector = {str(srv.selector)!r}" if srv.max_newcomers is None else f"server.max_newcomers = {srv.max_newcomers}"
        compat.check_selector(selector, population, srv.cohort, what)
    return selector


def build_personalization_part(config: RunConfig, learner):
    """The `[personalization]` part (fleetlearn.client.personalization), or None."""
    from ..client.personalization import personalization_for_run

    return personalization_for_run(config, learner)


def build_attack_part(config: RunConfig, data: FederatedData):
    """The `[attack]` part (simulated malicious clients), or None."""
    a = config.attack
    return _part("attack.kind", "kind", a.kind, lambda: build_attack(a.model_dump(), population=data.num_clients, num_classes=data.num_classes, seed=config.seed))


def _check_scaffold(config: RunConfig, uplink) -> None:
    if config.client.objective != "scaffold":
        return
    if _is_sketch(uplink):
        raise ConfigError(f"client.objective = 'scaffold' needs each client's decoded delta; compression.uplink = {config.compression.uplink!r} only gives the server a summed sketch")
    p = config.privacy
    if p.mode == "central" or p.secure_aggregation:
        raise ConfigError("client.objective = 'scaffold' updates the server control variate from individual deltas, which central DP / secure aggregation hide; use privacy.mode = 'none' or 'local'")


def build_transport(config: RunConfig, data: FederatedData, device: Device, fleet, clock):
    """The transport of `[engine] backend`: in-process simulation, or the same on Ray workers
    (the same client device, so every client-side feature runs on both); with
    `[probes] clients`, wrapped to add that many probe devices."""
    part = get_part("transport", config.engine.backend)  # registered in fleetlearn.transport
    attack = build_attack_part(config, data)
    compat.check_transport(config)  # the features on must be ones the backend carries
    transport = part.obj(config, data, device, fleet, clock, attack)
    p = config.probes
    if p.clients:
        from ..client.probe import tamper_from_env
        from ..monitoring.probe_clients import ProbeTransport

        tamper = _part("probes.clients", "clients", p.clients, tamper_from_env)
        transport = ProbeTransport(transport, p.clients, data.num_features, data.num_classes, p.examples, tamper)
    return transport


def build_probe_clients(config: RunConfig, transport, learner, uplink, downlink, decoder, data: FederatedData, device_seed: int):
    """The server side of probe clients (monitoring.probe_clients) when the transport has
    probes (`probe_clients()`: the simulation's `[probes] clients`, gRPC's `--probe` clients)
    and the run lets the server predict their updates; else None."""
    from ..config import probe_refusal

    roster = getattr(transport, "probe_clients", None)
    if roster is None or probe_refusal(config) is not None:
        return None
    from ..monitoring.probe_clients import ProbeClients

    p = config.probes
    return ProbeClients(learner, uplink, downlink, decoder, roster, num_features=data.num_features, num_classes=data.num_classes,
                        examples=p.examples, tolerance=p.tolerance, device_seed=device_seed)


def build_coordinator(
    config: RunConfig,
    store: bool | RunStore = True,
    hooks: list[RoundHook] | None = None,
    data: FederatedData | None = None,
    transport_factory=None,
) -> Coordinator:
    """Everything a run needs, chosen by configuration.

    `store`: True creates a run directory, False keeps everything in memory, a
    `RunStore` continues that run (resume).  `transport_factory(learner, device)`
    replaces the simulation (e.g. the gRPC server); the simulation's data then only
    serves the server's central evaluation."""
    if data is None:
        data = load_federated(config.data, config.seed)
    if config.server.cohort > data.num_clients:
        raise ConfigError(f"server.cohort = {config.server.cohort} exceeds the {data.num_clients} clients the data has")
    fleet = make_fleet(config.devices, data.num_clients, config.seed)
    learner = build_learner(config, data, fleet)
    if transport_factory is not None:  # the gRPC server (registered as transport "grpc" for its capabilities)
        compat.check_transport(config, "grpc")
    x_unlabeled = None
    if config.distill.enabled:
        from dataclasses import replace

        from ..learners.distill import split_unlabeled

        x_unlabeled, cx, cy = _part("distill.server_fraction", "server_fraction", config.distill.server_fraction,
                                    lambda: split_unlabeled(data.central_x, data.central_y, config.distill.server_fraction, config.seed))
        data = replace(data, central_x=cx, central_y=cy)
    clustering = None
    if config.server.clustering != "none":
        clustering, learner = build_clustering(config, learner, data.num_clients)  # over gRPC: commands.client wraps likewise
    if config.compression.target_ratio is not None:
        try:
            chosen = config.uplink_chain(learner.spec)
        except ValueError as exc:
            raise ConfigError(f"compression.target_ratio: {exc}") from None
    else:
        chosen = config.compression.uplink
    try:
        uplink = parse_chain(chosen)
    except ValueError as exc:
        raise ConfigError(f"compression.uplink = {chosen!r}: {exc}") from None
    try:
        downlink = parse_chain(config.compression.downlink)
    except ValueError as exc:
        raise ConfigError(f"compression.downlink = {config.compression.downlink!r}: {exc}") from None
    _check_chains(config, uplink, downlink, learner.spec.dim)
    clock = VirtualClock()
    adaptive = None
    if config.compression.adaptive:
        adaptive = _part("compression.ladder", "ladder", config.compression.ladder, lambda: AdaptiveCompression(config.compression.ladder, learner.spec.dim, seed=config.seed))
    if _is_sketch(uplink):
        compat.check_linear(config.server.aggregator, f"compression.uplink = {config.compression.uplink!r}",
                            "it aggregates in sketch space, which only a linear rule (the mean) can do")
    _check_scaffold(config, uplink)
    personalization = build_personalization_part(config, learner)  # over gRPC the clients run it (commands.client)
    device = Device(learner, uplink, downlink, seed=config.seed, adaptive=adaptive, personalization=personalization, num_classes=data.num_classes)
    if transport_factory is not None:
        transport = transport_factory(learner, device)
    else:
        transport = build_transport(config, data, device, fleet, clock)
    aggregator = build_aggregator(config, learner.spec.dim, data.num_clients, learner)
    schedules = build_schedules(config)
    server_optimizer = build_server_optimizer(config, schedules["server"])
    evaluator = Evaluator(
        learner, data, config.server.eval_clients, config.seed, federated=transport_factory is None,
        personalization=personalization, personal_states=device.personal_states, chunk=config.server.cohort,
    )
    if clustering is not None:
        from ..clustering import ClusteredAggregator, ClusteredServerOptimizer, ClusteringHook
        from .evaluation import ClusteredEvaluator

        aggregator = ClusteredAggregator(aggregator, clustering)
        server_optimizer = ClusteredServerOptimizer(server_optimizer, clustering)
        evaluator = ClusteredEvaluator(learner, data, config.server.eval_clients, config.seed, clustering,
                                       state_fn=lambda: coordinator.server_state, federated=transport_factory is None)
        hooks = [ClusteringHook(clustering, evaluator), *(hooks or [])]
    privacy = build_privacy_parts(config, data.num_clients, aggregator)
    # Secure aggregation run by the clients (gRPC): the SecAgg part sums through the transport.
    remote = transport.secure_aggregation() if hasattr(transport, "secure_aggregation") else None
    if privacy is not None and privacy.secure is not None and remote is not None:
        privacy.secure.remote = remote
    run_store = store if isinstance(store, RunStore) else None
    if store is True:
        try:
            run_store = RunStore.create(config.store.root, config.to_toml(), config.digest(), name=config.name, url=config.store.url,
                                        run_id=config.store.run_id)
        except OSError as exc:
            raise ConfigError(f"store.root = {config.store.root!r}: cannot create a run directory there ({exc.strerror or exc}); "
                              "allowed: a writable folder (created if missing)") from None
        run_store.write_json("data_stats.json", data.stats)
    if run_store is not None and not (run_store.run_dir / PARAM_SPEC_FILE).is_file():
        run_store.write_text(PARAM_SPEC_FILE, learner.spec.to_json())  # atomically; `models export` names the tensors
    monitoring = _build_monitoring(config)
    if privacy is not None and privacy.telemetry is not None:
        from ..privacy.telemetry import PrivateTelemetryHook

        monitoring.telemetry = PrivateTelemetryHook(privacy.telemetry)  # after the guardrail, before the exporter
    hierarchy = _hierarchy(config, data.num_clients, uplink, privacy)
    regional = _check_region_aggregators(config, uplink, privacy, transport_factory) if config.engine.region_aggregators else None
    try:
        pipeline = regional.stage(learner.spec.dim) if regional is not None else build_pipeline(aggregator, privacy=privacy, sketch=uplink if _is_sketch(uplink) else None, dim=learner.spec.dim, coverage=uplink.coverage,
                                  hierarchy=hierarchy, what=f"server.aggregator = {config.server.aggregator!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    decoder = regional.decoder(learner.spec.dim) if regional is not None else build_decoder(uplink, learner, clustering, masked=remote is not None)
    selector = build_selector(config, data.num_clients)
    # Probe clients: the simulation's device uses the run seed, a `fleetlearn client` device 0.
    probes = build_probe_clients(config, transport, learner, uplink, downlink, decoder, data,
                                 device.seed if transport_factory is None else 0)
    if probes is not None:
        from ..monitoring.probe_clients import ProbeSelector

        selector = ProbeSelector(selector, probes)
    coordinator = Coordinator(
        config=config,
        learner=learner,
        transport=transport,
        selector=selector,
        aggregator=aggregator,
        pipeline=pipeline,
        driver=FedBuffLoop if config.server.mode == "async" else None,
        decoder=decoder,
        privacy=privacy,
        server_optimizer=server_optimizer,
        validators=build_run_validators(config),
        weighting=build_weighting(config),
        client_schedule=schedules["client"],
        downlink=downlink,
        uplink=uplink,
        # On a real network the server cannot see clients' data: central evaluation only.
        evaluator=evaluator,
        store=run_store,
        hooks=build_model_hooks(config, data, learner, x_unlabeled) + list(hooks or []) + ([probes] if probes else [])
        + ([regional.records(transport)] if regional is not None else []) + monitoring.hooks,
        clock=clock,
        task_writers=task_writers(config, privacy, clustering, data.num_classes),
    )
    coordinator.monitoring = monitoring
    if probes is not None:  # probe clients' updates go to their check, never to aggregation
        coordinator.intake.diverters.append(probes)
    if config.distill.method == "feddf":
        from ..learners.distill import FedDFStep

        d = config.distill
        coordinator.server_steps.append(FedDFStep(
            learner.module, learner.spec, x_unlabeled, steps=d.steps, lr=d.lr, temperature=d.temperature, batch_size=d.batch_size,
            val_fraction=d.val_fraction, seed=config.seed, heterofl=learner if config.model.heterofl else None))
    if transport_factory is None:  # simulated clients keep their state here; real devices keep their own
        # Bounded memory, the rest on disk: the run directory's files with a run store.
        device.states.max_bytes = device.personal_states.max_bytes = int(config.engine.client_state_memory_mb * 2**20)
        if run_store is not None:
            device.states.attach(run_store.run_dir / CLIENT_STATE_FILE)
            device.personal_states.attach(run_store.run_dir / PERSONAL_STATE_FILE)
        coordinator.client_states = device.states
        coordinator.personal_states = device.personal_states
    coordinator.clustering = clustering
    return coordinator


def _check_endpoint(host: str, port: int) -> None:
    """Bind (host, port) the way the metrics server will (address reuse on), then let go:
    an unknown host, a port in use or one this user may not bind is refused before the run."""
    import socket

    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)


def _build_monitoring(config: RunConfig):
    mon = config.monitoring
    try:
        if mon.prometheus_port is not None:
            _check_endpoint(mon.prometheus_host, mon.prometheus_port)
        return build_monitoring(mon)
    except (ValueError, TypeError) as exc:  # "probe_updates: need at least 2 ..." -> "monitoring.probe_updates: ..."
        msg = str(exc)
        head = msg.split(":", 1)[0]
        raise ConfigError(f"monitoring.{msg}" if head in type(mon).model_fields else f"monitoring: {msg}") from None
    except (OSError, OverflowError, UnicodeError) as exc:  # the Prometheus endpoint: unknown host, port in use, no permission
        raise ConfigError(
            f"monitoring.prometheus_host = {mon.prometheus_host!r}, monitoring.prometheus_port = {mon.prometheus_port}: "
            f"cannot serve metrics there ({getattr(exc, 'strerror', None) or exc}); allowed: an address of this machine "
            "and a free port (0: any free port), or no prometheus_port"
        ) from None


SKETCH_HEADER_SLACK = 64  # bytes: the payload and sketch headers


def _check_chains(config: RunConfig, uplink, downlink, dim: int) -> None:
    """Codec chains that cannot serve this run: a sparsifier or sketch on the downlink (it
    sends the model itself, not an update: dropping coordinates zeroes weights, and no
    error feedback restores them: topk:0.1 | q8 takes digits from 0.415 to 0.18), a
    sketch larger than the float32 vector it stands for (headers aside), and a ``subset``
    uplink in a run that cannot average by coverage (`config.coverage_refusal`)."""
    comp = config.compression
    if downlink.support is not None:
        raise ConfigError(
            f"compression.downlink = {comp.downlink!r}: the downlink sends the global model itself, and a sparsifier or "
            "sketch drops most of its weights every round; allowed on the downlink: the dense codecs none, fp16, bf16, q8, q4, q2, sign "
            "(optionally with an entropy coder such as zstd)"
        )
    dense = 4 * dim
    for key, spec, chain in (("uplink", comp.uplink, uplink),):
        if _is_sketch(chain) and chain.estimate_bytes(dim) > dense + SKETCH_HEADER_SLACK:
            raise ConfigError(
                f"compression.{key} = {spec!r}: the sketch payload ({chain.estimate_bytes(dim):,} bytes) is larger than the "
                f"model it compresses ({dense:,} bytes of float32 for {dim:,} parameters); allowed: a sketch smaller than that"
            )
    if uplink.coverage and (why := coverage_refusal(config)):
        raise ConfigError(f"compression.uplink = {uplink.spec!r} sends a random subset of each update, which the server averages "
                          f"over the clients that sent each coordinate; {why}")


def _hierarchy(config: RunConfig, population: int, uplink, privacy):
    """`[engine] regions > 1`: regional pre-aggregation of the weighted mean."""
    from .hierarchy import build_hierarchy

    if config.engine.regions <= 1 or config.engine.region_aggregators:
        return None
    why = None
    if not compat.has("aggregator", config.server.aggregator, "linear"):
        why = (f"server.aggregator = {config.server.aggregator!r} does not decompose into regional sums (only the mean does)"
               + compat.missing("aggregator", config.server.aggregator, "linear"))
    elif config.model.heterofl:
        why = "HeteroFL averages each coordinate over the clients whose width covers it, not through regional sums"
    elif privacy is not None and (privacy.central is not None or privacy.secure is not None):
        why = "central DP and secure aggregation are applied at the root over individual updates in this simulation"
    if why:
        raise ConfigError(f"engine.regions = {config.engine.regions}: {why}")
    return build_hierarchy(config.engine, population, config.seed)


class _RegionalRoot:
    """A root of regional aggregators: its decoder, aggregation stage and round hook (engine/regions.py)."""

    def __init__(self, regions: int, min_regions: int):
        self.regions, self.min_regions = regions, min_regions

    def decoder(self, dim: int):
        from .regions import RegionSumDecoder

        return RegionSumDecoder(dim)

    def stage(self, dim: int):
        from .regions import RegionSumStage

        return RegionSumStage(self.regions, self.min_regions, dim)

    def records(self, transport):
        from .regions import RegionRecords

        return RegionRecords(transport, self.regions)


def _check_region_aggregators(config: RunConfig, uplink, privacy, transport_factory) -> _RegionalRoot:
    """`engine.region_aggregators = true`: what a root of `fleetlearn aggregator`s can run.
    Its clients are the aggregators, and what each forwards is one region's weighted sum, so
    only the weighted mean decomposes; features that need each client's update (or a
    per-client protocol) at the root are refused, naming the key."""
    eng = config.engine
    head = f"engine.region_aggregators = true (engine.regions = {eng.regions})"
    why = None
    if transport_factory is None:
        why = ("the regions are `fleetlearn aggregator` processes that a `fleetlearn server` root drives over gRPC; in the simulation "
               "(fleetlearn run) use engine.regions alone (simulated regions, region_failure)")
    elif not compat.has("aggregator", config.server.aggregator, "linear"):
        why = (f"server.aggregator = {config.server.aggregator!r} does not decompose into regional sums (only the mean does: the root "
               "sees one sum per region, never the clients' updates)" + compat.missing("aggregator", config.server.aggregator, "linear"))
    elif privacy is not None or config.privacy.mode != "none" or config.privacy.secure_aggregation:
        why = (f"privacy.mode = {config.privacy.mode!r} / privacy.secure_aggregation = {config.privacy.secure_aggregation}: differential "
               "privacy and secure aggregation inside a region are not built for regional aggregators yet (docs/multi-region.md, "
               "section 4); run them on a flat server")
    elif config.server.mode == "async":
        why = "server.mode = 'async' (FedBuff) folds each client's update as it arrives; a region forwards one sum per round"
    elif config.model.heterofl:
        why = "HeteroFL averages each coordinate over the clients whose width covers it, not through regional sums"
    elif config.server.clustering != "none":
        why = f"server.clustering = {config.server.clustering!r} aggregates per cluster, which a region's single sum cannot carry"
    elif config.client.objective == "scaffold":
        why = "client.objective = 'scaffold' updates the server control variate from each client's steps, which the root never sees"
    elif config.compression.adaptive:
        why = "compression.adaptive picks each client's rung from the link the root measures; the root sees only the aggregators"
    elif _is_sketch(uplink):
        why = f"compression.uplink = {config.compression.uplink!r} is summed in sketch space; a region forwards a dense float64 sum"
    elif config.canary.set:
        why = "a canary splits one cohort into two arms; with regional aggregators the root's cohort is the regions"
    elif config.server.cohort < eng.regions:
        why = (f"server.cohort = {config.server.cohort} is below engine.regions: the root selects server.cohort of the connected "
               "aggregators and every region must be asked; each aggregator takes up to server.cohort of its own clients")
    elif config.server.min_replies > eng.regions:
        why = f"server.min_replies = {config.server.min_replies} exceeds engine.regions: the root's replies are the regions' forwards"
    if why:
        raise ConfigError(f"{head}: {why}")
    return _RegionalRoot(eng.regions, eng.min_regions)
