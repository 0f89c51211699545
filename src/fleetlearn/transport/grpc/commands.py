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
from typing import Any, Sequence

from ...config import ConfigError, RunConfig
from .auth import TokenInfo, TokenStore
from .certs import CertPaths, ClientTls, ServerTls, make_certs
from .client import Backoff, ClientReport, run_client
from .local_data import client_from_config, run_config
from .server import Limits
from .transport import GrpcTransport


def certs(out_dir: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), clients: Sequence[str] = ("client",),
          days: int = 365, overwrite: bool = False) -> CertPaths:
    """`fleetlearn certs [--out DIR] [--host H ...] [--client NAME ...] [--days N] [--force]`.

    The server certificate is valid for `hosts` only (by default 127.0.0.1 and localhost):
    clients on other machines dial the server by a name or address that must be among them."""
    return make_certs(out_dir, hosts=tuple(hosts), client_names=tuple(clients), days=days, overwrite=overwrite)


def token_add(state_dir: str | Path, name: str, rotate: bool = False) -> str:
    """`fleetlearn token add NAME [--state DIR] [--rotate]`: print the returned token once."""
    with TokenStore.open(state_dir) as store:
        return store.add(name, rotate=rotate)


def token_revoke(state_dir: str | Path, name: str) -> bool:
    """`fleetlearn token revoke NAME`: False if NAME had no active token."""
    with TokenStore.open(state_dir) as store:
        return store.revoke(name)


def token_list(state_dir: str | Path) -> list[TokenInfo]:
    """`fleetlearn token list`: names, client ids, created / revoked (never tokens: they are not stored)."""
    with TokenStore.open(state_dir) as store:
        return store.list()


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
) -> GrpcTransport:
    """The transport `fleetlearn server CONFIG` hands to the Coordinator.

    `spec` is the learner's ParamSpec (clients must build the same model); the
    codec chains come from `config.compression` (with `adaptive = true`, each client's
    rung of `ladder` per round, from its link as the server measures it); tokens from
    `<state_dir>/tokens.db` (the file `fleetlearn token add` writes); TLS from `cert_dir` (server.pem,
    server.key, and ca.pem when `mutual_tls`).  Without `cert_dir` the server is
    plaintext: fine on loopback, refused on any other address unless `insecure`.
    """
    secagg = bool(config.privacy.secure_aggregation)
    if secagg:
        check_secagg_over_grpc(config)
    return GrpcTransport(
        address,
        tokens=TokenStore.open(state_dir),
        spec=spec,
        uplink=config.compression.uplink,
        downlink=config.compression.downlink,
        ladder=config.compression.ladder if config.compression.adaptive else None,
        features=("scaffold",) if config.client.objective == "scaffold" else (),
        secagg=secagg,
        clusters=config.server.clusters if config.server.clustering != "none" else 1,
        tls=ServerTls.from_dir(cert_dir, mutual=mutual_tls) if cert_dir else None,
        heartbeat_interval_s=heartbeat_interval_s,
        max_round_s=max_round_s,
        limits=limits,
        insecure=insecure,
    )


def check_secagg_over_grpc(config: RunConfig) -> None:
    """Secure aggregation over gRPC: the clients mask their own rows, so the server has no
    individual update to compute anything per client from.  Refuse what would need one."""
    from ...compression import CountSketch, parse_chain

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
    elif isinstance(getattr(parse_chain(config.compression.uplink), "support", None), CountSketch):
        why = "count-sketch uplinks are summed in sketch space by the server from individual sketches"
    elif config.compression.adaptive:
        why = "adaptive compression measures each client's upload; under secure aggregation nothing is uploaded in clear"
    if why:
        raise ConfigError(f"privacy.secure_aggregation = true over gRPC: {why}")


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
) -> ClientReport:
    """`fleetlearn client --server HOST:PORT --token TOKEN --config RUN.toml (--client-index I | --data pkg.mod:fn)
    [--tls-ca ca.pem [--tls-cert c.pem --tls-key c.key]] [--name N] [--max-rounds N] [--uplink-limit-mbps R]`.

    Builds the run's model and this client's local data, then runs until the
    server says the run finished.  Raises `ClientRefused` (bad or revoked token,
    incompatible client).
    """
    from ...client.personalization import personalization_for_run

    cfg = run_config(config)
    learner, data = client_from_config(cfg, client_index=client_index, data_fn=data_fn, num_classes=num_classes)
    # The personal step runs here, its state stays on this device (built as the server builds it).
    personalization = personalization_for_run(cfg, learner)
    tls = None
    if tls_ca is not None or tls_cert is not None or tls_server_name is not None:
        tls = ClientTls(Path(tls_ca) if tls_ca else None, Path(tls_cert) if tls_cert else None,
                        Path(tls_key) if tls_key else None, tls_server_name)
    return run_client(server, token, learner, data, tls=tls, name=name, max_rounds=max_rounds,
                      backoff=Backoff(), give_up_after_s=give_up_after_s, device=device,
                      uplink_limit_mbps=uplink_limit_mbps, personalization=personalization)
