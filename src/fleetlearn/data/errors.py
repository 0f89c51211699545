"""The one error type of `fleetlearn.data` (a `ConfigError`, see fleetlearn.errors)."""

from fleetlearn.errors import DataError

__all__ = ["DataError"]
