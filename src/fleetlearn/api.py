"""The Python API: `fleetlearn.run(config) -> RunSummary`.  The CLI is a thin layer over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, add_config_dir_to_path, load_config
from .engine import RoundHook, build_run
from .records import RoundRecord, RunSummary


def run(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    on_round: Callable[[RoundRecord], Any] | None = None,
    store: bool = True,
    hooks: list[RoundHook] | None = None,
) -> RunSummary:
    """Run a federated training job and return its summary (with every RoundRecord).

    `config` is a TOML path, a dict of sections, a `RunConfig`, or None for the
    embedded default (digits, 100 clients, Dirichlet 0.5, 20 rounds, an MLP).
    `overrides` are ``"section.key=value"`` strings, as on the command line.
    """
    if isinstance(config, (str, Path)):
        add_config_dir_to_path(config)
    cfg = load_config(config, overrides)
    runner = build_run(cfg, store=store, hooks=hooks)  # a Coordinator, or a CanaryRollout with [canary]
    return runner.run(on_round=on_round)
