"""The client side of a round, shared by the simulation, Ray and gRPC clients."""

from .runtime import ClientRuntime, ClientStateStore

__all__ = ["ClientRuntime", "ClientStateStore"]
