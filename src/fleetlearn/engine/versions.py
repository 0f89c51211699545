"""Model versions kept for rollback, and the rollback itself.

`Versions` keeps the last good `(params, server_state)` pairs in memory (a step never
writes into its inputs, so they stay intact).  `restore(c, version, reason)` is
`Coordinator.restore`: it puts back a good version (from memory, else from the store)
and marks the round being finished ``rolled_back``.  The server learning rate and its
schedule's memory are not rolled back (`ServerLR.carry`): a guardrail's lower rate is a
response to the rejected round and persists.
"""

from __future__ import annotations

import torch


class Versions:
    """The last `keep` good versions, in memory."""

    def __init__(self, version: int, params: torch.Tensor, state: dict, keep: int = 5):
        self.keep = keep
        self.kept: dict[int, tuple[torch.Tensor, dict]] = {version: (params, state)}

    def reset(self, version: int, params: torch.Tensor, state: dict) -> None:
        """Forget every version but this one (a resume, a canary's start)."""
        self.kept = {version: (params, state)}

    def add(self, version: int, params: torch.Tensor, state: dict) -> None:
        self.kept[version] = (params, state)
        for v in sorted(self.kept)[: -self.keep]:
            del self.kept[v]

    def before(self, version: int) -> int:
        """The newest kept version older than `version`."""
        older = [v for v in self.kept if v < version]
        if not older:
            raise ValueError("no earlier good version to restore")
        return max(older)

    def get(self, version: int, store=None) -> tuple[torch.Tensor, dict]:
        if version in self.kept:
            return self.kept[version]
        if store is not None:
            _, params, state = store.load_checkpoint(version)
            return params, state
        raise ValueError(f"model version {version} is not available for restore")


def restore(c, version: int | None = None, reason: str = "") -> int:
    """Put back a good model version (default: the last good one before the current) and
    its server-optimizer state; the round being finished is recorded as ``rolled_back``."""
    if version is None:
        version = c.versions.before(c.version)
    params, state = c.versions.get(version, c.store)
    c.params, c.server_state, c.version = params, c.server_optimizer.lr.carry(state, c.server_state), version
    rec = c.current_record
    if rec is not None:
        if rec.status == "ok" and rec.version != version:
            # The rejected version keeps its number and its metrics in the registry.
            rec.extra.update(rejected_version=rec.version, rejected_accuracy=rec.accuracy, rejected_loss=rec.loss)
        rec.status = "rolled_back"
        rec.reason = reason or f"rolled back to version {version}"
        rec.version = version
        rec.extra["restored_version"] = version
        rec.loss, rec.accuracy, scores = c.evaluator.central_scores(c.params)
        rec.extra.update(scores)
        rec.fed_accuracy, rec.fed_accuracy_p10 = c.evaluator.federated(c.params)
    return version
