"""fleetlearn: federated learning that survives production.

    import fleetlearn
    summary = fleetlearn.run({"server": {"rounds": 5}})
"""

from .api import run
from .config import ConfigError, RunConfig, load_config
from .messages import ClientMetrics, Dropout, Task, Update
from .params import ParamSpec
from .records import ClientRecord, RoundRecord, RunSummary

__version__ = "0.1.0"

__all__ = [
    "ClientMetrics",
    "ClientRecord",
    "ConfigError",
    "Dropout",
    "ParamSpec",
    "RoundRecord",
    "RunConfig",
    "RunSummary",
    "Task",
    "Update",
    "__version__",
    "load_config",
    "run",
]
