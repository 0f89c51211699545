"""Device profiles, fleets and (later) availability traces and dropout models."""

from .profiles import DeviceProfile, Fleet, make_fleet

__all__ = ["DeviceProfile", "Fleet", "make_fleet"]
