"""The client side of a round: one `Device` for the simulation, Ray workers and gRPC clients."""

from .device import ClientStateStore, Device, Trained

__all__ = ["ClientStateStore", "Device", "Trained"]
