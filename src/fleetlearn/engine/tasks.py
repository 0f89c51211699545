"""The server halves of the client-side features: what each writes into a round's task spec.

Every round the Coordinator builds one `TaskSpec` (fleetlearn.task_spec): the fit
hyper-parameters plus one entry per *task writer* the factory gave it.  A writer is any
object with ``task_entry(coordinator, cohort, deadline) -> TaskEntry | None``; the client
half of the same feature reads the entry in `fleetlearn.client.Device`.  Adding a
client-side feature is: a `TaskEntry` (registered), a writer here or in the feature's
module, and the device's reading of it -- no branch in the Coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..config import RunConfig
from ..task_spec import AdaptiveEntry, LabelHistogramEntry, LocalDPEntry, OversampleEntry, TaskEntry


class TaskWriter(Protocol):
    def task_entry(self, coordinator: Any, cohort: Sequence[int], deadline: float | None) -> TaskEntry | None: ...


@dataclass(frozen=True)
class Fixed:
    """An entry that is the same every round (local DP, oversampling, label histograms)."""

    entry: TaskEntry

    def task_entry(self, coordinator: Any, cohort: Sequence[int], deadline: float | None) -> TaskEntry:
        return self.entry


@dataclass(frozen=True)
class Adaptive:
    """Adaptive compression's entry: `pace` (finish near the earliest end of a round that
    waits for `wait_for` replies, capped by the round's deadline) or `upload_budget`
    (a fixed budget, else the round's deadline less download and compute)."""

    policy: str
    wait_for: int
    slack: float
    upload_budget_s: float | None

    def task_entry(self, coordinator: Any, cohort: Sequence[int], deadline: float | None) -> AdaptiveEntry | None:
        if self.policy == "pace":
            return AdaptiveEntry(policy="pace", wait_for=self.wait_for, slack=self.slack, deadline_s=deadline)
        if self.upload_budget_s is not None:
            return AdaptiveEntry(policy="upload_budget", upload_budget_s=self.upload_budget_s)
        if deadline is not None:
            return AdaptiveEntry(policy="upload_budget", upload_budget_s=deadline, budget_is_deadline=True)
        return AdaptiveEntry(policy="upload_budget")  # no budget this round: every client sends the run's chain


@dataclass(frozen=True)
class Clustering:
    """Clustered FL's entry: the active clusters and (CFL) the cohort's candidates."""

    part: Any  # fleetlearn.clustering.Clustering

    def task_entry(self, coordinator: Any, cohort: Sequence[int], deadline: float | None) -> TaskEntry:
        return self.part.task_entry(coordinator.server_state, cohort)


def task_writers(config: RunConfig, privacy=None, clustering=None, num_classes: int | None = None) -> list[TaskWriter]:
    """The run's task writers, from its configuration and parts."""
    out: list[TaskWriter] = []
    comp = config.compression
    if comp.adaptive:
        out.append(Adaptive(comp.policy, config.server.cohort, comp.pace_slack, comp.upload_budget_s))
    if config.client.oversample:
        out.append(Fixed(OversampleEntry(noise_std=config.client.oversample_noise_std)))
    if config.server.weighting == "label_importance" and num_classes:
        out.append(Fixed(LabelHistogramEntry(classes=num_classes)))
    if privacy is not None and privacy.local is not None:
        out.append(Fixed(LocalDPEntry(clip_norm=privacy.local.clip_norm, noise_multiplier=privacy.local.noise_multiplier)))
    if clustering is not None:
        out.append(Clustering(clustering))
    return out
