"""Transports: how tasks reach clients (simulation now; Ray and gRPC later)."""

from .base import Reply, Transport
from .simulation import SimulationTransport, client_seed

__all__ = ["Reply", "SimulationTransport", "Transport", "client_seed"]
