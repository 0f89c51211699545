"""Transports: how tasks reach clients (the in-process simulation, Ray workers, gRPC).

The names below are imported on first use (PEP 562): importing the package registers the
backends without loading torch, so ``fleetlearn token ...`` (the gRPC tokens) starts light.
"""

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..lazy import lazy_exports
from ..parts import register_part

_LAZY = {"Arrival": ".base", "Reply": ".base", "Transport": ".base", "SimulationTransport": ".simulation",
         "client_seed": ".simulation", "client_seeds": ".simulation"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .base import Arrival, Reply, Transport
    from .simulation import SimulationTransport, client_seed, client_seeds

# -- registration (fleetlearn.parts): the backends `engine.backend` chooses ------------------------
# A backend is ``build(config, data, device, fleet, clock, attack) -> Transport``.  Its
# capabilities say what it carries (fleetlearn.compat refuses the features it lacks, naming them):
#   client_helpers: SCAFFOLD control variates, oversampling, label histograms in the task/update;
#   attack_simulation: simulated malicious clients; personalization: personal state per client;
#   heterofl: sub-models of several widths; clustering: clustered FL's tagged models;
#   secure_aggregation: the SecAgg message flow (masked updates; the server learns the sum only);
#   async_rounds: overlapping dispatches for FedBuff (server.mode = "async").
# The gRPC server is an application-level transport (`fleetlearn server`): it is passed to
# build_coordinator as a `transport_factory`, not chosen by engine.backend.  It is registered
# (unlisted, `served_by` its command) to declare what it carries, which build_coordinator checks
# for it; engine.backend refuses it, naming the command that runs it.
SIMULATION_CAPABILITIES = frozenset({"client_helpers", "attack_simulation", "personalization", "heterofl", "clustering",
                                     "secure_aggregation", "async_rounds"})
# Real devices run the one client device (fleetlearn.client.Device) with every client-side
# feature; simulated attackers exist only in the simulation (a real server controls no client: a red-team
# drill runs attacking clients instead, `fleetlearn client --attack`, on the same device).
GRPC_CAPABILITIES = SIMULATION_CAPABILITIES - {"attack_simulation"}


def _simulation(config, data, device, fleet, clock, attack):
    from .simulation import SimulationTransport

    return SimulationTransport(data, device, fleet, config.seed, clock=clock,
                               heartbeat_timeout_s=config.server.heartbeat_timeout_s, attack=attack)


def _ray(config, data, device, fleet, clock, attack):
    eng = config.engine
    try:
        from .ray_backend import RayTransport

        return RayTransport(data, device, fleet, config.seed, clock=clock, heartbeat_timeout_s=config.server.heartbeat_timeout_s,
                            attack=attack, address=eng.address, num_workers=eng.ray_workers)
    except ImportError as exc:
        raise ConfigError(f"engine.backend = 'ray': {exc}") from None


def _grpc(config, data, device, fleet, clock, attack):
    raise ConfigError("engine.backend = 'grpc': the gRPC server is `fleetlearn server CONFIG` (its clients `fleetlearn client`); "
                      "`fleetlearn run` simulates: use engine.backend = 'simulation' or 'ray'")


register_part("transport", "simulation", _simulation, capabilities=SIMULATION_CAPABILITIES)
# Ray runs the same client device as the simulation on its workers: it carries everything.
register_part("transport", "ray", _ray, capabilities=SIMULATION_CAPABILITIES)
register_part("transport", "grpc", _grpc, capabilities=GRPC_CAPABILITIES, listed=False, served_by="fleetlearn server CONFIG")

__all__ = sorted(_LAZY)
