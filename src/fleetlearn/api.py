"""The Python API: `fleetlearn.run(config) -> RunSummary`.  The CLI is a thin layer over it.

Every refusal is a `fleetlearn.FleetlearnError` (fleetlearn.errors): a `ConfigError` (a
`ValueError` too) for a configuration that cannot run, with `DataError` under it for data
that cannot be loaded as configured, and `RunFailedError` for a run whose every round failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, add_config_dir_to_path, load_config
from .errors import ConfigError, FleetlearnError, RunFailedError, all_rounds_failed
from .records import RoundRecord, RunSummary


def run(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    on_round: Callable[[RoundRecord], Any] | None = None,
    store: bool = True,
    hooks: list | None = None,
) -> RunSummary:
    """Run a federated training job and return its summary (with every RoundRecord).

    `config` is a TOML path, a dict of sections, a `RunConfig` (validated again: one made
    with ``model_copy(update=...)`` is checked like any other), or None for the embedded
    default (digits, 100 clients, Dirichlet 0.5, 20 rounds, an MLP).  `overrides` are
    ``"section.key=value"`` strings, as on the command line.

    Raises `ConfigError` (or its subclass `DataError`) before training when the config
    cannot run, and `RunFailedError` (its `summary` attached) when every round failed.
    """
    cfg = load_config(config, overrides)
    if isinstance(config, (str, Path)):
        add_config_dir_to_path(config, cfg)  # only when the config names an import path
    runner = build(cfg, store=store, hooks=hooks)  # a Coordinator, or a CanaryRollout with [canary]
    summary = runner.run(on_round=on_round)
    why = all_rounds_failed(summary)
    if why is not None:
        where = f"; the records are in {summary.run_dir}" if summary.run_dir else ""
        raise RunFailedError(why + where, summary)
    return summary


def build(config: RunConfig, *, store: Any = True, hooks: list | None = None, data: Any = None):
    """`engine.build_run` with every failure to build reported as a `ConfigError`.

    Refusals already name the key (the parts raise ConfigError / DataError); anything else
    a part raises while being built from this config (a ValueError, an OSError of the
    store or the metrics endpoint, a failed allocation) becomes a ConfigError that says
    so, the original chained as its cause."""
    from .engine import build_run
    from .ops import StoreError

    try:
        return build_run(config, store=store, hooks=hooks, data=data)
    except FleetlearnError:
        raise
    except StoreError as exc:
        raise ConfigError(f"store (store.root = {config.store.root!r}, store.url = {config.store.url!r}): {exc}") from exc
    except MemoryError as exc:
        raise ConfigError(f"the run does not fit in memory as configured (MemoryError: {exc}); reduce the sizes in the config "
                          "(data.clients, model.hidden, server.cohort, client.batch_size)") from exc
    except RuntimeError as exc:
        if "alloc" not in str(exc):
            raise
        raise ConfigError(f"the run does not fit in memory as configured ({exc}); reduce the sizes in the config") from exc
    except (ValueError, TypeError, OverflowError, OSError, RecursionError) as exc:
        raise ConfigError(f"the run cannot be built from this config: {type(exc).__name__}: {exc}") from exc
