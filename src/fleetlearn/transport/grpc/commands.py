"""The functions behind `fleetlearn certs`, `fleetlearn token ...` and `fleetlearn client`,
and the server-side transport for `fleetlearn server`.

Each takes plain values (what argparse gives) and returns plain results, so
the CLI stays a thin layer: it prints, and it maps `UsageError`-like failures
(ValueError, FileExistsError, TokenError, ClientRefused) to one line and exit
status 2.  The server command itself lives with the engine (it assembles the
Coordinator); it gets its transport from `server_transport`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import ConfigError, RunConfig, candidate_config, probe_refusal
from .auth import TokenStore, token_add, token_list, token_revoke  # noqa: F401 - the token commands, as the CLI calls them
from .certs import ClientTls, ServerTls, certs  # noqa: F401 - certs: `fleetlearn certs`, as the CLI calls it
from .client import Backoff, ClientReport, run_client
from .local_data import client_from_config, probe_client_from_config, run_config
from .server import Limits, RunRequirements
from .transport import GrpcTransport


def server_transport(
    config: RunConfig,
    spec: Any,
    address: str = "0.0.0.0:7777",
    state_dir: str | Path = "fleetlearn-state",
    cert_dir: str | Path | None = None,
    mutual_tls: bool = False,
    heartbeat_interval_s: float = 5.0,
    max_round_s: float = 600.0,
    limits: Limits = Limits(),
    insecure: bool = False,
    learner: Any = None,
    membership: Any = None,
) -> GrpcTransport:
    """The transport `fleetlearn server CONFIG` hands to the Coordinator.

    `spec` is the learner's ParamSpec (clients must build the same model); the
    codec chains come from `config.compression` (with `adaptive = true`, each client's
    rung of `ladder` per round, from its link as the server measures it); tokens from
    `<state_dir>/tokens.db` (the file `fleetlearn token add` writes); TLS from `cert_dir` (server.pem,
    server.key, and ca.pem when `mutual_tls`).  Without `cert_dir` the server is
    plaintext: fine on loopback, refused on any other address unless `insecure`.
    `learner`: the run's learner; a HeteroFL one (`model.widths`, or `model.lora_ranks` of a
    pretrained model) makes the server assign each client a width (a LoRA rank) by the run's
    `model.width_rule` from the memory it declares and send it only that sub-model.
    With `engine.region_aggregators` the transport is a root's: its clients are the regional
    aggregators (`fleetlearn aggregator`); `membership` (`engine.regions.RegionMembership`)
    makes it a regional aggregator's instead, serving its region's clients.
    """
    if config.canary.set:
        check_canary(config)
    secagg = bool(config.privacy.secure_aggregation)
    if secagg:
        check_secagg_over_grpc(config)
    if config.probes.clients:
        raise ConfigError(f"probes.clients = {config.probes.clients}: simulated probe devices run in the simulation; over gRPC "
                          "start probe clients as processes (fleetlearn client --probe) and leave probes.clients at 0")
    wire = _wire_args(config, spec)
    return GrpcTransport(
        address,
        tokens=TokenStore.open(state_dir),
        spec=spec,
        uplink=wire["uplink"],
        downlink=wire["downlink"],
        ladder=wire["ladder"],
        features=wire["features"],
        probe_refusal=probe_refusal(config),
        secagg=secagg,
        clusters=wire["clusters"],
        tls=ServerTls.from_dir(cert_dir, mutual=mutual_tls) if cert_dir else None,
        heartbeat_interval_s=heartbeat_interval_s,
        max_round_s=max_round_s,
        limits=limits,
        insecure=insecure,
        submodels=learner if getattr(learner, "name", None) == "heterofl" else None,
        regions=config.engine.regions if config.engine.region_aggregators and membership is None else 0,
        membership=membership,
    )


# What a client agrees to at registration (`RunRequirements`), by the config keys that set it.
_WIRE_KEYS = {
    "ladder": "compression.adaptive / compression.ladder",
    "uplink": "compression.uplink",
    "target_ratio": "compression.target_ratio",
    "downlink": "compression.downlink",
    "features": "client.objective",
    "clustering": "server.clustering",
    "clusters": "server.clusters",
    "secure_aggregation": "privacy.secure_aggregation",
}


def _wire_args(config: RunConfig, spec=None) -> dict[str, Any]:
    """The run's protocol settings, fixed for a client when it registers (`RunRequirements`);
    with the model's `spec`, the uplink chain `compression.target_ratio` chose."""
    comp = config.compression
    try:
        uplink = config.uplink_chain(spec) if spec is not None else comp.uplink
    except ValueError as exc:
        raise ConfigError(f"compression.target_ratio: {exc}") from None
    return {
        "uplink": uplink,
        "target_ratio": comp.target_ratio,
        "downlink": comp.downlink,
        "ladder": tuple(comp.ladder) if comp.adaptive else None,
        "features": ("scaffold",) if config.client.objective == "scaffold" else (),
        "clustering": config.server.clustering,  # the client wraps its model by it (local_data.client_from_config)
        "clusters": config.server.clusters if config.server.clustering != "none" else 1,
        "secure_aggregation": config.privacy.secure_aggregation,
    }


def _wire_normalised(config: RunConfig) -> dict[str, Any]:
    args = _wire_args(config)
    req = RunRequirements.for_run(None, args["uplink"], args["downlink"], ladder=args["ladder"])  # chains as the server compares them
    return {**args, "uplink": None if req.ladder else req.uplink, "downlink": req.downlink, "ladder": req.ladder}


def check_canary(config: RunConfig) -> None:
    """A canary over gRPC: both arms send their tasks over the same connections, so the
    candidate (``canary.set``) may change what a task carries (the fit config: client.lr,
    local_epochs, batch_size...; local DP; label-skew helpers) and the server's own parts
    (server.*: aggregator, optimizer, ...), but not what a client agreed to when it
    registered.  ConfigError naming the key, both values and the override otherwise."""
    candidate = candidate_config(config)
    try:
        ours, theirs = _wire_normalised(config), _wire_normalised(candidate)
    except ValueError as exc:
        raise ConfigError(f"canary.set = {config.canary.set!r}: {exc}") from None
    for name, key in _WIRE_KEYS.items():
        if ours[name] != theirs[name]:
            raise ConfigError(
                f"canary.set = {config.canary.set!r}: over gRPC both arms train the same connected clients, which agreed to "
                f"{key} when they registered (production: {_show(ours[name])}, candidate: {_show(theirs[name])}); "
                "a candidate over gRPC may change what a task carries (client.lr, client.local_epochs, client.batch_size, "
                "privacy.mode = 'local', ...) and the server's parts (server.aggregator, server.optimizer, ...), not "
                f"{key}; run that candidate in the simulation (fleetlearn run) or as its own run"
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def check_secagg_over_grpc(config: RunConfig) -> None:
    """Secure aggregation over gRPC: the clients mask their own rows, so the server has no
    individual update to compute anything per client from.  Refuse what would need one."""
    why = None
    if config.privacy.mode == "central" and config.server.aggregator != "mean":
        why = (f"server.aggregator = {config.server.aggregator!r} under central DP needs each client's contribution on the "
               "server; over gRPC only the masked sum arrives: use server.aggregator = 'mean'")
    elif (config.server.max_update_norm is not None or config.server.max_norm_ratio is not None
          or "norm" in (config.server.validators or ())):
        why = ("update-norm checks (server.max_update_norm, server.max_norm_ratio, the 'norm' validator) need each update "
               "on the server, where only the masked sum arrives; bound contributions on the device with privacy.mode = 'central'")
    elif config.server.clustering != "none":
        why = "clustered FL sends one block of the stacked models per client, which the masked sum cannot carry"
    elif config.compression.adaptive:
        why = "adaptive compression measures each client's upload; under secure aggregation nothing is uploaded in clear"
    if why:
        raise ConfigError(f"privacy.secure_aggregation = true over gRPC: {why}")


def _process_threads(cfg: RunConfig, learner) -> None:
    """This process's torch threads by `engine.threads` and the model's size (`client`)."""
    import torch

    from ...config import run_threads

    threads = run_threads(cfg.engine.threads, learner.spec.dim)
    if threads:
        torch.set_num_threads(threads)


def client(
    server: str,
    token: str,
    config: RunConfig | str | Path,
    *,
    client_index: int | None = None,
    data_fn: str | None = None,
    num_classes: int | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_server_name: str | None = None,
    name: str = "",
    max_rounds: int | None = None,
    give_up_after_s: float | None = None,
    device: dict[str, float] | None = None,
    uplink_limit_mbps: float | None = None,
    probe: bool = False,
    memory_mb: int | None = None,
    attack: str = "none",
    attack_options: dict[str, Any] | None = None,
    before_train: Any = None,
    own_process: bool = False,
) -> ClientReport:
    """`fleetlearn client --server HOST:PORT --token TOKEN --config RUN.toml (--client-index I | --data pkg.mod:fn)
    [--tls-ca ca.pem [--tls-cert c.pem --tls-key c.key]] [--name N] [--max-rounds N] [--uplink-limit-mbps R]
    [--memory-mb N] [--attack KIND [--attack-scale S ...]]`.  `memory_mb`: the memory this device declares for training (default: the
    machine's available memory); a HeteroFL run assigns the client's model width from it.
    `before_train`: called with each task before its local training (`FleetClient`).

    Builds the run's model and this client's local data, then runs until the
    server says the run finished.  Raises `ClientRefused` (bad or revoked token,
    incompatible client).

    `probe`: a probe client (`--probe`, no local data): each round it trains on the known
    synthetic data `fleetlearn.client.probe.probe_data` the server can draw too, and announces
    the "probe" feature; the server checks its updates and never aggregates them.  The test
    hook FLEETLEARN_PROBE_TAMPER (labels | codec) makes it lie on purpose.

    `attack`: a red-team client (`--attack KIND`, `attack_options` the `[attack]` keys of
    `--attack-scale S ...`): this device poisons its data and its own update as a simulated
    attacker with ``collude = false`` (fleetlearn.attacks.client_attack; model_replacement boosts
    by the run's ``server.cohort``).  Colluding attacks are refused (ValueError saying why).

    `own_process` (`fleetlearn client`: the process is this client's): torch's intra-op
    threads as the run's `engine.threads` sets them for the server and the simulation (one
    thread for models up to 100,000 parameters under "auto").  The thread count changes how
    some kernels round, so a client on torch's default threads would train a different
    model, to the last bit, from the simulation's device and the in-process clients.
    """
    from ...attacks import client_attack
    from ...client.personalization import personalization_for_run

    cfg = run_config(config)
    # Refused before any data is loaded or the server dialled (label_flip's classes come later).
    client_attack(attack, attack_options, cohort_size=cfg.server.cohort, num_classes=2, seed=cfg.seed)
    if probe and attack != "none":
        raise ValueError("--probe with --attack: a probe trains on data the server draws too and checks its update; "
                         "start the red-team client without --probe")
    if probe:
        learner, data, wrap = probe_client_from_config(cfg)
        if own_process:
            _process_threads(cfg, learner)
        return run_client(server, token, learner, data, tls=_client_tls(tls_ca, tls_cert, tls_key, tls_server_name), name=name,
                          max_rounds=max_rounds, backoff=Backoff(), give_up_after_s=give_up_after_s, device=device,
                          uplink_limit_mbps=uplink_limit_mbps, probe=True, uplink_wrap=wrap)
    learner, data, classes = client_from_config(cfg, client_index=client_index, data_fn=data_fn, num_classes=num_classes,
                                                with_classes=True)
    red_team = client_attack(attack, attack_options, cohort_size=cfg.server.cohort, num_classes=classes, seed=cfg.seed)
    if own_process:
        _process_threads(cfg, learner)
    # The personal step runs here, its state stays on this device (built as the server builds it).
    personalization = personalization_for_run(cfg, learner)
    tls = _client_tls(tls_ca, tls_cert, tls_key, tls_server_name)
    return run_client(server, token, learner, data, tls=tls, name=name, max_rounds=max_rounds,
                      backoff=Backoff(), give_up_after_s=give_up_after_s, device=device,
                      uplink_limit_mbps=uplink_limit_mbps, personalization=personalization, memory_mb=memory_mb,
                      attack=red_team, before_train=before_train)


def _client_tls(tls_ca, tls_cert, tls_key, tls_server_name) -> ClientTls | None:
    if tls_ca is None and tls_cert is None and tls_server_name is None:
        return None
    return ClientTls(Path(tls_ca) if tls_ca else None, Path(tls_cert) if tls_cert else None,
                     Path(tls_key) if tls_key else None, tls_server_name)
