"""fleetlearn: federated learning that survives production.

    import fleetlearn
    summary = fleetlearn.run({"server": {"rounds": 5}})
"""

from .api import run
from .config import RunConfig, load_config
from .errors import ConfigError, DataError, FleetlearnError, RunFailedError
from .messages import ClientMetrics, Dropout, Task, Update
from .params import ParamSpec
from .records import ClientRecord, RoundRecord, RunSummary

__version__ = "0.1.0"

__all__ = [
    "ClientMetrics",
    "ClientRecord",
    "ConfigError",
    "DataError",
    "Dropout",
    "FleetlearnError",
    "ParamSpec",
    "RoundRecord",
    "RunConfig",
    "RunFailedError",
    "RunSummary",
    "Task",
    "Update",
    "__version__",
    "load_config",
    "run",
]
