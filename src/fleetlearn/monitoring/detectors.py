"""Detectors: ``check(history) -> Alert | None`` on the list of RoundRecords so
far (the last one is the round being finished), and `MonitorHook`, which runs
them after every round and records their alerts in ``record.extra["alerts"]``.

Detectors are stateless: everything they need is in the history, so they work
the same live (as a hook) and offline on a run store's records.  Rounds that
were not evaluated (``accuracy``/``loss`` NaN because of ``eval_every``) are
skipped by the trend detectors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..records import RoundRecord
from .measurements import debug_of, num

ALERTS_KEY = "alerts"  # record.extra[ALERTS_KEY]: list of Alert dicts

SEVERITIES = ("info", "warning", "critical")


@dataclass
class Alert:
    detector: str
    severity: str  # "info" | "warning" | "critical"
    message: str
    round: int
    clients: list[int] = field(default_factory=list)  # clients the alert names (outlier updates)
    value: float = math.nan  # the measured quantity that crossed the threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not math.isfinite(d["value"]):
            d["value"] = None if math.isnan(d["value"]) else str(d["value"])
        return d


class Detector(Protocol):
    name: str

    def check(self, history: Sequence[RoundRecord]) -> Alert | None: ...


def _series(history: Sequence[RoundRecord], attr: str) -> list[tuple[int, float]]:
    """(round, value) of the rounds where `attr` was measured (finite)."""
    out = []
    for r in history:
        v = num(getattr(r, attr))
        if math.isfinite(v):
            out.append((r.round, v))
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class DivergenceDetector:
    """Training is diverging: the round's loss or model is non-finite (NaN/inf),
    the model norm jumped by more than ``param_growth`` x the last committed one,
    the central loss exceeds ``max_ratio`` x the best loss so far, or the loss
    rose in each of the last ``patience`` evaluated rounds (by more than
    ``min_rise`` relative each time)."""

    name = "divergence"
    config_keys = {
        "divergence_patience": "patience",
        "divergence_min_rise": "min_rise",
        "divergence_max_ratio": "max_ratio",
        "divergence_param_growth": "param_growth",
    }

    def __init__(self, patience: int = 3, min_rise: float = 0.0, max_ratio: float | None = 1.5, param_growth: float | None = 10.0):
        if patience < 1:
            raise ValueError(f"divergence: patience must be >= 1, got {patience}")
        self.patience, self.min_rise, self.max_ratio, self.param_growth = int(patience), float(min_rise), max_ratio, param_growth

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        cur = history[-1]
        r = cur.round
        dbg = debug_of(cur)
        loss = num(cur.loss)
        if math.isinf(loss) or (math.isnan(loss) and cur.status == "ok" and _was_evaluated(cur)):
            return Alert(self.name, "critical", f"central loss is {loss}", r, value=loss)
        if dbg.get("model_finite") is False:
            return Alert(self.name, "critical", "the global model has non-finite parameters", r)
        if cur.status == "failed" and "non-finite" in cur.reason:
            return Alert(self.name, "critical", f"the server step was refused: {cur.reason}", r)
        norm = num(dbg.get("model_norm"))
        if self.param_growth is not None and math.isfinite(norm):
            prev = next((num(debug_of(h).get("model_norm")) for h in reversed(history[:-1]) if h.status == "ok" and math.isfinite(num(debug_of(h).get("model_norm")))), math.nan)
            if math.isfinite(prev) and prev > 0 and norm > self.param_growth * prev:
                return Alert(self.name, "critical", f"model norm grew {norm / prev:.3g}x in one round ({prev:.4g} -> {norm:.4g}; limit {self.param_growth:g}x)", r, value=norm / prev)
        losses = _series(history, "loss")
        if not losses or losses[-1][0] != r:
            return None
        if self.max_ratio is not None and len(losses) > 1:
            best = min(v for _, v in losses[:-1])
            if best > 0 and loss > self.max_ratio * best:
                return Alert(self.name, "critical", f"loss {loss:.4g} is {loss / best:.3g}x the best loss {best:.4g} (limit {self.max_ratio:g}x)", r, value=loss / best)
        if len(losses) > self.patience:
            tail = np.array([v for _, v in losses[-(self.patience + 1):]])
            if np.all(tail[1:] > tail[:-1] * (1.0 + self.min_rise)):
                return Alert(self.name, "warning", f"loss rose for {self.patience} evaluated rounds in a row ({tail[0]:.4g} -> {tail[-1]:.4g})", r, value=float(tail[-1]))
        return None


def _was_evaluated(r: RoundRecord) -> bool:
    # An evaluated round has a central accuracy; a NaN loss beside a real accuracy is a blow-up.
    return math.isfinite(num(r.accuracy))


class OscillationDetector:
    """Accuracy oscillates: among the last ``window`` accuracy changes larger than
    ``amplitude`` in absolute value, the sign flipped at least ``min_flips`` times."""

    name = "oscillation"
    config_keys = {"oscillation_window": "window", "oscillation_amplitude": "amplitude", "oscillation_min_flips": "min_flips"}

    def __init__(self, window: int = 8, amplitude: float = 0.02, min_flips: int = 4):
        if window < 2 or min_flips < 1:
            raise ValueError("oscillation: need window >= 2 and min_flips >= 1")
        self.window, self.amplitude, self.min_flips = int(window), float(amplitude), int(min_flips)

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        accs = _series(history, "accuracy")
        if not accs or accs[-1][0] != history[-1].round:
            return None
        v = np.array([a for _, a in accs[-(self.window + 1):]])
        deltas = np.diff(v)
        big = deltas[np.abs(deltas) >= self.amplitude]
        flips = int(np.sum(np.sign(big[1:]) != np.sign(big[:-1]))) if big.size > 1 else 0
        if flips >= self.min_flips:
            return Alert(self.name, "warning", f"accuracy changed direction {flips} times in the last {len(deltas)} evaluated rounds (swings >= {self.amplitude:g}, largest {np.abs(deltas).max():.3g})", history[-1].round, value=float(flips))
        return None


class StagnationDetector:
    """Training stalled: the best accuracy of the last ``window`` evaluated rounds
    improves on the best accuracy before them by less than ``eps``."""

    name = "stagnation"
    config_keys = {"stagnation_window": "window", "stagnation_eps": "eps"}

    def __init__(self, window: int = 10, eps: float = 0.005):
        if window < 1:
            raise ValueError("stagnation: window must be >= 1")
        self.window, self.eps = int(window), float(eps)

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        accs = _series(history, "accuracy")
        if len(accs) <= self.window or accs[-1][0] != history[-1].round:
            return None
        before = max(a for _, a in accs[: -self.window])
        recent = max(a for _, a in accs[-self.window:])
        gain = recent - before
        if gain < self.eps:
            return Alert(self.name, "info", f"best accuracy improved by {gain:+.4f} over the last {self.window} evaluated rounds (eps {self.eps:g})", history[-1].round, value=gain)
        return None


def robust_z(x: np.ndarray) -> np.ndarray:
    """Modified z-score M_i = 0.6745 (x_i - median) / MAD (Iglewicz & Hoaglin, "How to
    Detect and Handle Outliers", ASQC 1993, eq. 3.2; |M| > 3.5 flags an outlier).
    0.6745 is the 0.75 quantile of N(0, 1), so MAD / 0.6745 estimates sigma for normal
    data.  When MAD = 0 (over half the values equal) the mean absolute deviation is
    used instead, scaled by sqrt(pi/2) = 1.2533 (its normal-consistency factor);
    if that is 0 too, every z is 0."""
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x)
    dev = x - med
    mad = np.median(np.abs(dev))
    if mad > 0:
        return 0.6745 * dev / mad
    mean_ad = np.mean(np.abs(dev))
    if mean_ad > 0:
        return dev / (1.2533 * mean_ad)
    return np.zeros_like(x)


class OutlierUpdateDetector:
    """Outlier client updates by robust z-score (`robust_z`) on the accepted
    updates of this round: a norm with z > ``threshold`` (too large: scaling
    attacks, exploding local training) or a cosine to the aggregate with
    z < -``threshold`` (pointing away: sign flipping, label flipping).  Needs at
    least ``min_clients`` updates.  Names the client ids."""

    name = "outlier_updates"
    config_keys = {"outlier_threshold": "threshold", "outlier_min_clients": "min_clients"}

    def __init__(self, threshold: float = 3.5, min_clients: int = 10):
        self.threshold, self.min_clients = float(threshold), int(min_clients)

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        cur = history[-1]
        per = debug_of(cur).get("clients") or {}
        if per.get("id"):
            ids = np.asarray(per["id"], dtype=np.int64)
            norms = np.array([num(v) for v in per.get("norm", [])])
            cos = np.array([num(v) for v in per.get("cosine", [])]) if per.get("cosine") else np.full(ids.shape, np.nan)
        else:  # no debug measurements: the norms the coordinator put on the client records
            acc = [c for c in cur.clients if c.status == "accepted"]
            ids = np.array([c.client_id for c in acc], dtype=np.int64)
            norms = np.array([num(c.update_norm) for c in acc])
            cos = np.full(ids.shape, np.nan)
        if ids.size < self.min_clients:
            return None
        flagged: dict[int, list[str]] = {}
        for label, vals, sign in (("norm", norms, 1.0), ("cosine", cos, -1.0)):
            ok = np.isfinite(vals)
            if ok.sum() < self.min_clients:
                continue
            z = np.full(vals.shape, 0.0)
            z[ok] = robust_z(vals[ok])
            for i in np.flatnonzero(sign * z > self.threshold):
                flagged.setdefault(int(ids[i]), []).append(f"{label} {vals[i]:.3g} (z={z[i]:+.1f})")
        if not flagged:
            return None
        who = sorted(flagged)
        detail = "; ".join(f"client {c}: {', '.join(flagged[c])}" for c in who[:10])
        more = f" and {len(who) - 10} more" if len(who) > 10 else ""
        return Alert(self.name, "warning", f"{len(who)} of {ids.size} updates are outliers (|robust z| > {self.threshold:g}): {detail}{more}", cur.round, clients=who, value=float(len(who)))


class ParticipationCollapseDetector:
    """Participation collapsed: accepted / selected fell below ``min_fraction``, or
    the accepted count fell below ``drop_fraction`` x its median over the previous
    ``window`` rounds."""

    name = "participation_collapse"
    config_keys = {"participation_min_fraction": "min_fraction", "participation_drop_fraction": "drop_fraction", "participation_window": "window"}

    def __init__(self, min_fraction: float = 0.5, drop_fraction: float = 0.5, window: int = 5):
        self.min_fraction, self.drop_fraction, self.window = float(min_fraction), float(drop_fraction), int(window)

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        cur = history[-1]
        if cur.selected > 0:
            frac = cur.accepted / cur.selected
            if frac < self.min_fraction:
                return Alert(self.name, "critical", f"only {cur.accepted} of {cur.selected} selected clients were accepted ({frac:.0%} < {self.min_fraction:.0%}; dropped {cur.dropped}, rejected {cur.rejected}, late {cur.late})", cur.round, value=frac)
        prev = [h.accepted for h in history[-(self.window + 1):-1]]
        if prev:
            med = float(np.median(prev))
            if med > 0 and cur.accepted < self.drop_fraction * med:
                return Alert(self.name, "critical", f"{cur.accepted} clients accepted, below {self.drop_fraction:g} x the recent median of {med:g}", cur.round, value=cur.accepted / med)
        if cur.selected == 0 and cur.status == "failed":
            return Alert(self.name, "critical", f"no clients could be selected: {cur.reason}", cur.round, value=0.0)
        return None


class DriftDetector:
    """Held-out accuracy drifted: ``metric`` (central ``accuracy`` or
    ``fed_accuracy``) is more than ``threshold`` below its best so far, for
    ``patience`` evaluated rounds in a row."""

    name = "drift"
    config_keys = {"drift_threshold": "threshold", "drift_patience": "patience", "drift_metric": "metric"}

    def __init__(self, threshold: float = 0.1, patience: int = 1, metric: str = "accuracy"):
        if metric not in ("accuracy", "fed_accuracy"):
            raise ValueError(f"drift: metric must be 'accuracy' or 'fed_accuracy', got {metric!r}")
        self.threshold, self.patience, self.metric = float(threshold), int(patience), metric

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        s = _series(history, self.metric)
        if len(s) <= self.patience or s[-1][0] != history[-1].round:
            return None
        vals = np.array([v for _, v in s])
        best_before = np.maximum.accumulate(vals)
        gaps = best_before[-self.patience:] - vals[-self.patience:]
        if np.all(gaps > self.threshold):
            return Alert(self.name, "warning", f"{self.metric} {vals[-1]:.4f} is {gaps[-1]:.4f} below its best {best_before[-1]:.4f} (threshold {self.threshold:g})", history[-1].round, value=float(gaps[-1]))
        return None


DETECTORS: dict[str, type] = {
    cls.name: cls
    for cls in (DivergenceDetector, OscillationDetector, StagnationDetector, OutlierUpdateDetector, ParticipationCollapseDetector, DriftDetector)
}


def make_detector(name: str, settings: dict[str, Any] | None = None) -> Detector:
    """A detector by name; `settings` are flat config keys (``divergence_patience``...),
    of which those in the detector's ``config_keys`` are passed to it."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; allowed: {', '.join(DETECTORS)}")
    cls = DETECTORS[name]
    kw = {arg: settings[key] for key, arg in cls.config_keys.items() if settings and key in settings and settings[key] is not None}
    return cls(**kw)


class MonitorHook:
    """RoundHook: runs `detectors` on the history (the coordinator's records plus
    this round) and appends each alert, as a dict, to ``record.extra["alerts"]``.
    Every alert of the run is also kept in ``alerts`` and passed to ``on_alert``
    (for the lead's store, the exporter, a log).  Place it after
    `DebugMeasurements` and before `Guardrail`."""

    name = "monitor"

    def __init__(self, detectors: Sequence[Detector], on_alert: Callable[[Alert], Any] | None = None):
        self.detectors = list(detectors)
        self.on_alert = on_alert
        self.alerts: list[Alert] = []
        self._history: list[RoundRecord] = []  # used when the coordinator keeps no records

    def check(self, history: Sequence[RoundRecord]) -> list[Alert]:
        out = []
        for det in self.detectors:
            alert = det.check(history)
            if alert is not None:
                out.append(alert)
        return out

    def after_round(self, record: RoundRecord, coordinator: Any) -> None:
        past = getattr(coordinator, "records", None)
        if past is None:
            past = self._history
            self._history.append(record)
            history = list(past)
        else:
            history = list(past) + [record]
        new = self.check(history)
        record.extra.setdefault(ALERTS_KEY, []).extend(a.to_dict() for a in new)
        for a in new:
            self.alerts.append(a)
            if self.on_alert is not None:
                self.on_alert(a)


def alerts_of(record: RoundRecord) -> list[dict[str, Any]]:
    """The alert dicts recorded on a round ([] if none)."""
    a = record.extra.get(ALERTS_KEY) or []
    return [x for x in a if isinstance(x, dict)]


def replay(records: Sequence[RoundRecord], detectors: Sequence[Detector]) -> list[Alert]:
    """Run detectors offline over a finished run's records, as they would have run live."""
    out = []
    for i in range(len(records)):
        for det in detectors:
            a = det.check(records[: i + 1])
            if a is not None:
                out.append(a)
    return out
