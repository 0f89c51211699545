"""The typed task spec: what every client is told to do in a round.

A `Task` carries one `TaskSpec`: the local-training hyper-parameters (`FitConfig`), the
run seed, whether partial work is allowed, and one typed *entry* per client-side feature
the round uses (local DP, label histograms, oversampling, adaptive compression, clustered
FL...).  A feature that needs the client to do something declares its entry here or in its
own module with `register_task_entry`; the server half of the feature writes the entry, the
client half (`fleetlearn.client.Device`) reads it with `spec.get(EntryClass)`.

On the wire (gRPC's ``config_json``) the spec is one flat JSON object: the fit keys
(``lr``, ``local_epochs``, ...), ``seed``, ``partial_work`` and one key per entry.  Its
parser is strict, because a device reads it from the network: unknown keys, wrong types,
NaN or infinite numbers and out-of-range values are refused with a `TaskSpecError`
naming the key, and nothing larger than `MAX_SPEC_BYTES` is parsed at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_SPEC_BYTES = 1 << 20  # a task spec is a few hundred bytes; clustered FL's candidates stay far below this
MAX_CLASSES = 1_000_000
MAX_CLUSTERS = 4096


@dataclass(frozen=True)
class FitConfig:
    """Local-training hyper-parameters for one round (sent inside the Task).  Defined here,
    beside the spec that carries it, so that the message types load without torch
    (`fleetlearn.learners.base` re-exports it)."""

    local_epochs: int = 1
    local_steps: int | None = None  # if set, overrides local_epochs
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Local objective terms (docs/architecture.md, section 4.2: the local objective modifies the step).
    prox_mu: float = 0.0  # FedProx proximal term mu/2 ||w - w_global||^2 (Li et al., MLSys 2020)

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class TaskSpecError(ValueError):
    """A task spec a client cannot use (unknown entry, wrong type, out of range)."""


class TaskEntry(BaseModel):
    """One client-side feature's instructions in a Task.  Subclasses set `name` (the key on
    the wire) and declare their fields; `for_client` returns what one client may see."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)
    name: ClassVar[str] = ""

    def for_client(self, client: int) -> "TaskEntry":
        return self


TASK_ENTRIES: dict[str, type[TaskEntry]] = {}
E = TypeVar("E", bound=TaskEntry)


def register_task_entry(cls: type[E]) -> type[E]:
    """Register a task entry class under its `name` (a decorator).  The name must not be a
    fit key or another entry's."""
    name = cls.name
    if not name or name in _CORE_KEYS:
        raise ValueError(f"task entry {cls.__name__}: name {name!r} is empty or a core task key ({sorted(_CORE_KEYS)})")
    if TASK_ENTRIES.get(name, cls) is not cls:
        raise ValueError(f"task entry {name!r} is already registered by {TASK_ENTRIES[name].__name__}")
    TASK_ENTRIES[name] = cls
    return cls


class _Fit(BaseModel):
    """The wire form of FitConfig, validated (bounds generous, but finite and sane)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    local_epochs: int = Field(default=1, ge=0, le=100_000)
    local_steps: int | None = Field(default=None, ge=0, le=100_000_000)
    batch_size: int = Field(default=32, ge=1, le=1 << 24)
    lr: float = Field(default=0.05, ge=0, le=1e6)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1e6)
    prox_mu: float = Field(default=0.0, ge=0, le=1e6)


class _Core(_Fit):
    seed: int = Field(default=0, ge=0, lt=1 << 63)
    partial_work: bool = False


_CORE_KEYS = frozenset(_Core.model_fields)


# -- the built-in entries -------------------------------------------------------------
@register_task_entry
class LocalDPEntry(TaskEntry):
    """Local DP: the device clips its update to `clip_norm` and adds Gaussian noise."""

    name = "local_dp"
    clip_norm: float = Field(gt=0, le=1e12)
    noise_multiplier: float = Field(ge=0, le=1e6)


@register_task_entry
class LabelHistogramEntry(TaskEntry):
    """`label_importance` weighting: the device sends its training-label histogram of `classes` bins."""

    name = "label_histogram"
    classes: int = Field(ge=1, le=MAX_CLASSES)


@register_task_entry
class OversampleEntry(TaskEntry):
    """Label-skew helper: duplicate examples of under-represented local classes (with jitter)."""

    name = "oversample"
    noise_std: float = Field(default=0.0, ge=0, le=1e6)


@register_task_entry
class AdaptiveEntry(TaskEntry):
    """Adaptive compression: how each device's rung of the ladder is chosen this round.

    ``pace``: finish near the earliest end of a round that waits for `wait_for` replies
    (within `slack`, capped by `deadline_s`); ``upload_budget``: upload within
    `upload_budget_s` (less download and compute when `budget_is_deadline`)."""

    name = "adaptive"
    policy: Literal["pace", "upload_budget"]
    wait_for: int | None = Field(default=None, ge=1, le=1 << 31)
    slack: float = Field(default=0.05, ge=0, le=10)
    deadline_s: float | None = Field(default=None, gt=0, le=1e9)
    upload_budget_s: float | None = Field(default=None, gt=0, le=1e9)
    budget_is_deadline: bool = False

    @model_validator(mode="after")
    def _pace_waits_for(self) -> "AdaptiveEntry":
        if self.policy == "pace" and self.wait_for is None:
            raise ValueError("policy 'pace' needs wait_for (the replies the round waits for)")
        return self


@register_task_entry
class ClusteringEntry(TaskEntry):
    """Clustered FL: `clusters` stacked models, of which the first `blocks` travel in the
    payload and the first `active` may be picked; CFL lists each client's `candidates`."""

    name = "clustering"
    mode: Literal["ifca", "cfl"]
    clusters: int = Field(ge=1, le=MAX_CLUSTERS)
    active: int = Field(ge=1, le=MAX_CLUSTERS)
    blocks: int = Field(ge=1, le=MAX_CLUSTERS)
    candidates: dict[str, list[int]] | None = None  # client id (decimal string) -> cluster indices

    def for_client(self, client: int) -> "ClusteringEntry":
        """A client sees its own candidates only, not the others' cluster memberships."""
        if not self.candidates:
            return self
        mine = self.candidates.get(str(int(client)))
        return self.model_copy(update={"candidates": {str(int(client)): mine} if mine is not None else None})

    def candidates_of(self, client: int) -> list[int]:
        """The clusters `client` may pick (every active one when it is not listed)."""
        listed = (self.candidates or {}).get(str(int(client)))
        return list(listed) if listed is not None else list(range(self.active))


# -- the spec ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    fit: FitConfig = field(default_factory=FitConfig)
    seed: int = 0
    partial_work: bool = False
    entries: Mapping[str, TaskEntry] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, entry in self.entries.items():
            if not isinstance(entry, TaskEntry) or entry.name != name:
                raise TypeError(f"task spec entry {name!r} must be the registered TaskEntry of that name, got {type(entry).__name__}")
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    @classmethod
    def of(cls, fit: FitConfig, *entries: TaskEntry | None, seed: int = 0, partial_work: bool = False) -> "TaskSpec":
        """A spec from its parts; None entries are left out."""
        return cls(fit, int(seed), bool(partial_work), {e.name: e for e in entries if e is not None})

    def get(self, kind: type[E]) -> E | None:
        """This round's entry of `kind` (a TaskEntry subclass), or None when the round does not use it."""
        entry = self.entries.get(kind.name)
        return entry if isinstance(entry, kind) else None

    def with_entry(self, entry: TaskEntry) -> "TaskSpec":
        return TaskSpec(self.fit, self.seed, self.partial_work, {**self.entries, entry.name: entry})

    def for_client(self, client: int) -> "TaskSpec":
        """What `client` may see (e.g. only its own clustering candidates)."""
        return TaskSpec(self.fit, self.seed, self.partial_work, {k: e.for_client(client) for k, e in self.entries.items()})

    # -- the wire form -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.fit.to_dict(), "seed": self.seed, "partial_work": self.partial_work}
        for name, entry in self.entries.items():
            out[name] = entry.model_dump(mode="json", exclude_none=True)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskSpec":
        """Parse the wire form strictly (a `TaskSpecError` names the offending key)."""
        if not isinstance(data, Mapping):
            raise TaskSpecError(f"task spec: expected an object, got {type(data).__name__}")
        core = {k: v for k, v in data.items() if k in _CORE_KEYS}
        rest = {k: v for k, v in data.items() if k not in _CORE_KEYS}
        unknown = sorted(str(k) for k in rest if k not in TASK_ENTRIES)
        if unknown:
            raise TaskSpecError(f"task spec: unknown key(s) {unknown} (this client knows {sorted(_CORE_KEYS | set(TASK_ENTRIES))}): "
                                "the server asks for a feature this client does not have")
        try:
            c = _Core.model_validate(core)
        except ValidationError as exc:
            raise TaskSpecError(f"task spec: {_first_error(exc)}") from None
        entries: dict[str, TaskEntry] = {}
        for name, value in rest.items():
            try:
                entries[name] = TASK_ENTRIES[name].model_validate(value)
            except ValidationError as exc:
                raise TaskSpecError(f"task spec entry {name!r}: {_first_error(exc)}") from None
        fit = FitConfig(**{k: getattr(c, k) for k in _Fit.model_fields})
        return cls(fit, c.seed, c.partial_work, entries)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TaskSpec":
        if len(text) > MAX_SPEC_BYTES:
            raise TaskSpecError(f"task spec: {len(text)} bytes, allowed at most {MAX_SPEC_BYTES}")
        if not text:
            return cls()
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise TaskSpecError(f"task spec: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a task spec may carry")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')} (got {err.get('input')!r:.80})"
