"""fleetlearn: federated learning that survives production.

    import fleetlearn
    summary = fleetlearn.run({"server": {"rounds": 5}})

The names below are imported on first use (PEP 562), so ``import fleetlearn`` and the
CLI's light commands (``--help``, ``runs``, ``show``) do not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

# name -> the module (relative to this package) that defines it
_LAZY = {
    "run": ".api",
    "RunConfig": ".config",
    "load_config": ".config",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "FleetlearnError": ".errors",
    "RunFailedError": ".errors",
    "ClientMetrics": ".messages",
    "Dropout": ".messages",
    "Task": ".messages",
    "Update": ".messages",
    "ParamSpec": ".params",
    "ClientRecord": ".records",
    "RoundRecord": ".records",
    "RunSummary": ".records",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .api import run
    from .config import RunConfig, load_config
    from .errors import ConfigError, DataError, FleetlearnError, RunFailedError
    from .messages import ClientMetrics, Dropout, Task, Update
    from .params import ParamSpec
    from .records import ClientRecord, RoundRecord, RunSummary


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
