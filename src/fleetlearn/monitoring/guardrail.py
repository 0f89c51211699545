"""Guardrail: automatic rollback when a chosen detector fires.

After `MonitorHook` has recorded this round's alerts, the guardrail looks for
alerts of its ``trigger`` detectors of severity ``min_severity`` or above (default
``warning``: an ``info`` alert records a single-round oddity that proves nothing, so
it is not acted on).  If one fired it

1. rejects the round: ``coordinator.restore(version, reason)`` puts back the last
   version the guardrail saw committed without a trigger alert (and its
   server-optimizer state); the coordinator marks the record ``rolled_back``;
2. applies the configured responses, which persist after the rollback:
   - ``lr_factor``: multiplies the server learning rate and the base rate its schedule
     scales (not below ``min_lr``), through the server optimizer's state
     (``coordinator.server_state = optimizer.lr.scaled(state, factor, min_lr)``), so the
     checkpoint, a resume and a later rollback carry the lower rate;
   - ``clip_factor``: multiplies ``clip_norm`` (or ``max_norm``) of the aggregator and
     of the privacy parts that have a settable one;
   - ``exclude_rounds``: the clients named by the alerts (outlier updates) are
     excluded from selection for that many rounds; ``excluded(round)`` answers
     and ``coordinator.excluded_clients`` is kept up to date for the selector.

Everything is recorded in ``record.extra["guardrail"]`` and in ``events``.  A
round that did not commit (``status != "ok"``) changed no model, so it is not
rolled back, but the responses still apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..records import RoundRecord
from .detectors import SEVERITIES, alerts_of

GUARDRAIL_KEY = "guardrail"


@dataclass
class GuardrailEvent:
    round: int
    detectors: list[str]
    rolled_back: bool
    restored_version: int | None
    actions: dict[str, Any] = field(default_factory=dict)


class Guardrail:
    name = "guardrail"

    def __init__(
        self,
        trigger: Sequence[str] = ("divergence",),
        lr_factor: float | None = None,
        min_lr: float = 0.0,
        clip_factor: float | None = None,
        exclude_rounds: int = 0,
        rollback: bool = True,
        min_severity: str = "warning",
    ):
        if min_severity not in SEVERITIES:
            raise ValueError(f"guardrail: min_severity must be one of {', '.join(SEVERITIES)}, got {min_severity!r}")
        if lr_factor is not None and not 0 < lr_factor:
            raise ValueError(f"guardrail: lr_factor must be > 0, got {lr_factor}")
        if clip_factor is not None and not 0 < clip_factor:
            raise ValueError(f"guardrail: clip_factor must be > 0, got {clip_factor}")
        if exclude_rounds < 0:
            raise ValueError(f"guardrail: exclude_rounds must be >= 0, got {exclude_rounds}")
        self.trigger = set(trigger)
        self.lr_factor, self.min_lr, self.clip_factor = lr_factor, float(min_lr), clip_factor
        self.exclude_rounds, self.rollback = int(exclude_rounds), bool(rollback)
        self.acts_on = set(SEVERITIES[SEVERITIES.index(min_severity):])
        self._exclusions: dict[int, int] = {}  # client id -> last round it is excluded from
        self._good: list[int] = [0]  # versions committed without a trigger alert
        self.events: list[GuardrailEvent] = []

    # -- exclusions ----------------------------------------------------------------
    def excluded(self, round: int) -> set[int]:
        """Clients excluded from selection in `round`."""
        return {c for c, until in self._exclusions.items() if until >= round}

    def exclude(self, clients: Sequence[int], from_round: int) -> None:
        until = from_round + self.exclude_rounds - 1
        for c in clients:
            self._exclusions[int(c)] = max(until, self._exclusions.get(int(c), 0))

    def _expire(self, round: int) -> None:
        self._exclusions = {c: u for c, u in self._exclusions.items() if u >= round}

    # -- resume ------------------------------------------------------------------------
    def restore(self, records: Sequence[RoundRecord], coordinator: Any) -> None:
        """Relearn from a resumed run's committed rounds what the responses changed: the
        good versions, the exclusions still running, and the last server learning rate
        and clip norms a response set (all recorded in ``record.extra["guardrail"]``)."""
        self._good, self._exclusions = [0], {}
        for rec in records:
            info = rec.extra.get(GUARDRAIL_KEY) or {}
            if rec.status == "ok" and not info.get("fired"):
                self._good.append(int(rec.version))
            if info.get("excluded_now"):
                self.exclude([int(c) for c in info["excluded_now"]], rec.round + 1)
            lr, base = info.get("server_lr"), info.get("base_server_lr")
            if isinstance(lr, list) or isinstance(base, list):  # the checkpoint has them; older ones do not
                opt = coordinator.server_optimizer
                coordinator.server_state = opt.lr.set(coordinator.server_state, float(lr[1]) if isinstance(lr, list) else None,
                                                      float(base[1]) if isinstance(base, list) else None)
            for where, (_, new) in (info.get("clip_norm") or {}).items() if isinstance(info.get("clip_norm"), dict) else ():
                self._set_clip(coordinator, where, float(new))
        self._good = self._good[-64:]
        if records:
            self._expire(records[-1].round + 1)
            coordinator.excluded_clients = self.excluded(records[-1].round + 1)

    @staticmethod
    def _set_clip(coordinator: Any, where: str, value: float) -> None:
        """Set the clip recorded as ``"privacy.central.clip_norm"`` (a dotted path from the coordinator)."""
        *path, attr = where.split(".")
        obj = coordinator
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                return
        try:
            setattr(obj, attr, value)
        except AttributeError:
            pass

    # -- the hook --------------------------------------------------------------------
    def after_round(self, record: RoundRecord, coordinator: Any) -> None:
        r = record.round
        fired = [a for a in alerts_of(record) if a.get("detector") in self.trigger and a.get("round") == r and a.get("severity") in self.acts_on]
        if not fired:
            if record.status == "ok":
                self._good.append(int(coordinator.version))
                self._good = self._good[-64:]
            self._expire(r + 1)
            self._publish(record, coordinator, None)
            return
        names = sorted({a["detector"] for a in fired})
        reason = "guardrail: " + "; ".join(f"{a['detector']}: {a.get('message', '')}" for a in fired)
        rolled_back, restored = False, None
        actions: dict[str, Any] = {}
        if self.rollback and record.status == "ok":
            restored = self._restore(coordinator, reason, actions)
            rolled_back = restored is not None
        if self.lr_factor is not None:
            self._scale_lr(coordinator, actions)
        if self.clip_factor is not None:
            actions["clip_norm"] = self._scale_clip(coordinator)
        if self.exclude_rounds > 0:
            flagged = sorted({int(c) for a in fired for c in (a.get("clients") or [])})
            if flagged:
                self.exclude(flagged, r + 1)
                actions["excluded_now"] = flagged
        self._expire(r + 1)
        event = GuardrailEvent(r, names, rolled_back, restored, actions)
        self.events.append(event)
        self._publish(record, coordinator, event)

    def _restore(self, coordinator: Any, reason: str, actions: dict[str, Any]) -> int | None:
        current = int(coordinator.version)
        candidates = [v for v in self._good if v < current]
        target = max(candidates) if candidates else None
        try:
            return int(coordinator.restore(target, reason))
        except Exception as exc:  # that version is gone (memory and store): the last kept one
            actions["restore_error"] = f"version {target}: {exc}"
            try:
                return int(coordinator.restore(None, reason))
            except Exception as exc2:
                actions["restore_error"] += f"; last good version: {exc2}"
                return None

    def _scale_lr(self, coordinator: Any, actions: dict[str, Any]) -> None:
        """Multiply the server learning rate now, and the base rate its schedule recomputes
        it from each round, so the lower rate persists under a schedule: both are entries
        of the optimizer's state."""
        opt, state = coordinator.server_optimizer, coordinator.server_state
        old, old_base = opt.lr.value(state), opt.lr.base(state)
        state = coordinator.server_state = opt.lr.scaled(state, float(self.lr_factor), self.min_lr)
        actions["server_lr"] = [old, opt.lr.value(state)]
        actions["base_server_lr"] = [old_base, opt.lr.base(state)]

    def _scale_clip(self, coordinator: Any) -> dict[str, list[float]] | str:
        out: dict[str, list[float]] = {}
        privacy = getattr(coordinator, "privacy", None)
        parts = {
            "aggregator": getattr(coordinator, "aggregator", None),
            "privacy": privacy,
            "privacy.central": getattr(privacy, "central", None),
            "privacy.central.adaptive": getattr(getattr(privacy, "central", None), "adaptive", None),
            "privacy.local": getattr(privacy, "local", None),
        }
        for where, obj in parts.items():
            if obj is None:
                continue
            for attr in ("clip_norm", "max_norm"):
                old = getattr(obj, attr, None)
                if not isinstance(old, (int, float)) or isinstance(old, bool):
                    continue
                try:
                    setattr(obj, attr, float(old) * float(self.clip_factor))
                except AttributeError:  # a read-only property (e.g. derived from an adaptive clip)
                    continue
                out[f"{where}.{attr}"] = [float(old), float(getattr(obj, attr))]
        return out or "no part with a settable clip_norm"

    def _publish(self, record: RoundRecord, coordinator: Any, event: GuardrailEvent | None) -> None:
        nxt = self.excluded(record.round + 1)
        try:
            coordinator.excluded_clients = nxt
        except AttributeError:
            pass
        if event is None and not nxt:
            return
        info: dict[str, Any] = {"excluded": sorted(nxt)}
        if event is not None:
            info.update(fired=event.detectors, rolled_back=event.rolled_back, restored_version=event.restored_version, **event.actions)
        record.extra[GUARDRAIL_KEY] = info
