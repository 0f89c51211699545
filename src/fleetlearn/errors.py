"""The exception family of fleetlearn: every refusal of bad input is a `FleetlearnError`.

    FleetlearnError            anything fleetlearn refuses or cannot do with the input it was given
    ├── ConfigError            a configuration that cannot run (also a ValueError)
    │   └── DataError          data that cannot be loaded or partitioned as configured
    └── RunFailedError         a run whose every round failed (nothing was learned)

The message of a ConfigError names the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any


class FleetlearnError(Exception):
    """Base of every error fleetlearn raises for bad input or a run that cannot go on."""


class ConfigError(FleetlearnError, ValueError):
    """A configuration that cannot run.  The message names the key and what is allowed."""


class DataError(ConfigError):
    """Data that cannot be loaded or partitioned as configured.

    The message names the dataset or `data.*` key, the numbers involved and what to change.
    """


class RunFailedError(FleetlearnError):
    """A run in which every round failed: the model never changed.  `summary` is the
    `RunSummary` (with every round's record and reason)."""

    def __init__(self, message: str, summary: Any = None):
        super().__init__(message)
        self.summary = summary


def all_rounds_failed(summary: Any) -> str | None:
    """Why `summary` (a RunSummary) is a failed run, or None: at least one round ran and
    every round that ran failed."""
    records = list(getattr(summary, "records", []) or [])
    if not records or any(r.status != "failed" for r in records):
        return None
    reasons = list(dict.fromkeys(r.reason for r in records if r.reason))
    why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else "")
    return f"every round failed ({len(records)} of {len(records)}), the model never changed: {why or 'no reason recorded'}"
