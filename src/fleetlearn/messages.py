"""The messages that cross a transport: `Task` (server -> client) and `Update`
(client -> server), plus `Dropout` for a client that went away.

They are plain data.  A transport moves them and never looks inside the payload;
the payload's length is what the byte accounting and the virtual clock use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .task_spec import TaskSpec


@dataclass(frozen=True)
class Task:
    """One round's work order.  The same Task is broadcast to the whole cohort."""

    round: int
    version: int  # model version the payload encodes; updates must name it back
    payload: bytes  # the global model, encoded by the downlink codec chain
    codec: str  # the downlink chain, in the `[compression]` syntax
    # What the clients do this round: local-training hyper-parameters and one typed entry
    # per client-side feature (fleetlearn.task_spec).  A mapping is parsed as its wire form.
    spec: TaskSpec
    deadline_s: float | None = None  # seconds after dispatch; None waits for everyone
    # SCAFFOLD's server control variate c (float32 wire format), b"" without SCAFFOLD.
    # It travels to every client with the model, so it counts in the downlink bytes.
    control: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.spec, Mapping):
            object.__setattr__(self, "spec", TaskSpec.from_dict(self.spec))
        elif not isinstance(self.spec, TaskSpec):
            raise TypeError(f"Task.spec must be a TaskSpec (or its wire form, a mapping), got {type(self.spec).__name__}")

    @property
    def nbytes(self) -> int:
        return len(self.payload) + len(self.control)


@dataclass(frozen=True)
class ClientMetrics:
    """What a client measured while training (all on its own data)."""

    loss_before: float  # global model on the client's first mini-batch (its data when it fits one batch)
    loss_after: float  # running training loss of the last local epoch (size-weighted mean of its batch losses)
    accuracy: float  # local model on the client's local test split (nan if it has none)
    compute_seconds: float  # wall seconds the learner spent (simulation: real CPU time)
    steps: int  # optimizer steps taken
    samples: int  # examples processed (epochs x examples, or steps x batch)
    # Label-skew helpers: the client's training label histogram (when the server asks for it,
    # for `label_importance` weighting) and the examples it added by oversampling.
    label_counts: tuple[int, ...] | None = None
    oversampled: int = 0
    # Personalization: personal model and received global model on the local test split.
    personal_accuracy: float = float("nan")
    global_accuracy: float = float("nan")

    def to_dict(self) -> dict[str, float]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "accuracy": self.accuracy,
            "compute_seconds": self.compute_seconds,
            "steps": self.steps,
            "samples": self.samples,
            "personal_accuracy": self.personal_accuracy,
            "global_accuracy": self.global_accuracy,
        }


@dataclass(frozen=True)
class Update:
    """A client's reply: the encoded delta (local model minus the model it got)."""

    client_id: int
    round: int
    base_version: int  # the model version this delta was computed from (staleness)
    payload: bytes  # the delta, encoded by the uplink codec chain
    codec: str
    num_examples: int  # as claimed by the client; the server caps what it believes
    metrics: ClientMetrics
    downlink_bytes: int  # bytes of the Task payload this client received
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uplink_bytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class Dropout:
    """A selected client that will not reply this round, and why."""

    client_id: int
    round: int
    reason: str
    downlink_bytes: int = 0
