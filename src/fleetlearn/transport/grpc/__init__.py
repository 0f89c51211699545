"""gRPC deployment: a real server and real clients, with TLS and per-client tokens.

Server side (the Coordinator's transport):

    tokens = TokenStore.open(state_dir)                 # tokens.db, hashed
    transport = GrpcTransport("0.0.0.0:7777", tokens=tokens, spec=learner.spec,
                              uplink=cfg.compression.uplink, downlink=cfg.compression.downlink,
                              tls=ServerTls.from_dir(cert_dir))

Client side (one device):

    run_client("server:7777", token, learner, data, tls_ca="certs/ca.pem")

Admin: `make_certs(dir)` (CA + server/client certificates), `TokenStore.add/revoke`.
The wire protocol is `fleetlearn.proto` (regenerate with `regen.sh`).
"""

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

# name -> the module that defines it, imported on first use (PEP 562): the token and
# certificate commands need neither torch nor the server.
_MODULES = {
    ".auth": ["TokenCheck", "TokenError", "TokenInfo", "TokenStore", "hash_token"],
    ".certs": ["CertPaths", "ClientTls", "ServerTls", "make_certs"],
    ".client": ["Backoff", "ClientRefused", "ClientReport", "FleetClient", "run_client"],
    ".local_data": ["client_data_from_config", "client_data_from_import", "client_from_config", "learner_from_config"],
    ".refusals": ["REASONS", "Refusal"],
    ".server": ["FleetServer", "Limits", "RunRequirements", "runtime_version"],
    ".transport": ["GrpcTransport"],
}
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, ns in _MODULES.items() for n in ns}, globals())

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .auth import TokenCheck, TokenError, TokenInfo, TokenStore, hash_token
    from .certs import CertPaths, ClientTls, ServerTls, make_certs
    from .client import Backoff, ClientRefused, ClientReport, FleetClient, run_client
    from .local_data import client_data_from_config, client_data_from_import, client_from_config, learner_from_config
    from .refusals import REASONS, Refusal
    from .server import FleetServer, Limits, RunRequirements, runtime_version
    from .transport import GrpcTransport

__all__ = sorted(n for ns in _MODULES.values() for n in ns)
