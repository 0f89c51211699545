"""Detectors: ``check(history) -> Alert | None`` on the list of RoundRecords so
far (the last one is the round being finished), and `MonitorHook`, which runs
them after every round and records their alerts in ``record.extra["alerts"]``.

Everything a detector needs is in the history, so they work the same live (as a
hook) and offline on a run store's records; `OutlierUpdateDetector` keeps a
bounded per-client cache of it, rebuilt from the records whenever the history does
not continue it.  Rounds that were not evaluated (``accuracy``/``loss`` NaN because
of ``eval_every``) are skipped by the trend detectors.

Severity is for people (issue 21): ``critical`` where a person must act now (the
model is non-finite or blew up, participation collapsed, a probe failed),
``warning`` for a persistent or extreme signal, ``info`` for what one round shows
but does not prove.  The defaults are calibrated on healthy runs: at most 1 warning
per 100 clean rounds over IID, Dirichlet 0.5 and 0.1 partitions and the `uniform`,
`mixed_fleet` and `flaky` fleets (BENCHMARKS.md, "Operations").
"""

from __future__ import annotations

import math
from collections import deque
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
    the central loss exceeds ``max_ratio`` x the best loss so far (all critical:
    a person must act), or (a warning) the loss rose in each of the last ``patience``
    evaluated rounds (by more than ``min_rise`` relative each time) and ended above
    ``warn_ratio`` x the best loss.

    Calibrated on healthy runs (`benchmarks/operations.py`, false-alarm table): a
    Dirichlet-0.1 run's loss rises for three evaluated rounds in a row and reaches
    1.85x its best loss and recovers, so neither a short rise nor a 1.5x excursion
    proves divergence; a blow-up (a learning rate pushed x50) is far above 3x."""

    name = "divergence"
    config_keys = {
        "divergence_patience": "patience",
        "divergence_min_rise": "min_rise",
        "divergence_max_ratio": "max_ratio",
        "divergence_param_growth": "param_growth",
        "divergence_warn_ratio": "warn_ratio",
    }

    def __init__(self, patience: int = 3, min_rise: float = 0.0, max_ratio: float | None = 3.0, param_growth: float | None = 10.0,
                 warn_ratio: float = 2.0):
        if patience < 1:
            raise ValueError(f"divergence: patience must be >= 1, got {patience}")
        if not warn_ratio >= 1:
            raise ValueError(f"divergence: divergence_warn_ratio must be >= 1, got {warn_ratio}")
        self.patience, self.min_rise, self.max_ratio, self.param_growth = int(patience), float(min_rise), max_ratio, param_growth
        self.warn_ratio = float(warn_ratio)

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
            best = min(v for _, v in losses)
            if np.all(tail[1:] > tail[:-1] * (1.0 + self.min_rise)) and tail[-1] > self.warn_ratio * best:
                return Alert(self.name, "warning", f"loss rose for {self.patience} evaluated rounds in a row ({tail[0]:.4g} -> {tail[-1]:.4g}), "
                             f"{tail[-1] / best:.3g}x the best loss {best:.4g} (warn above {self.warn_ratio:g}x)", r, value=float(tail[-1]))
        return None


def _was_evaluated(r: RoundRecord) -> bool:
    # An evaluated round has a central accuracy; a NaN loss beside a real accuracy is a blow-up.
    return math.isfinite(num(r.accuracy))


class OscillationDetector:
    """Accuracy oscillates: among the last ``window`` accuracy changes larger than
    ``amplitude`` in absolute value, the sign flipped at least ``min_flips`` times.

    Healthy non-IID training oscillates while it improves (a Dirichlet-0.1 run flips
    direction 4-7 times in 8 rounds for 20 rounds on its way to 0.9), so that is
    ``info``; it is a ``warning`` only when the oscillation brought no progress: the
    best accuracy of the window is less than ``min_gain`` above the best before it."""

    name = "oscillation"
    config_keys = {"oscillation_window": "window", "oscillation_amplitude": "amplitude", "oscillation_min_flips": "min_flips",
                   "oscillation_min_gain": "min_gain"}

    def __init__(self, window: int = 8, amplitude: float = 0.02, min_flips: int = 4, min_gain: float = 0.005):
        if window < 2 or min_flips < 1:
            raise ValueError("oscillation: need window >= 2 and min_flips >= 1")
        self.window, self.amplitude, self.min_flips, self.min_gain = int(window), float(amplitude), int(min_flips), float(min_gain)

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        accs = _series(history, "accuracy")
        if not accs or accs[-1][0] != history[-1].round:
            return None
        v = np.array([a for _, a in accs[-(self.window + 1):]])
        deltas = np.diff(v)
        big = deltas[np.abs(deltas) >= self.amplitude]
        flips = int(np.sum(np.sign(big[1:]) != np.sign(big[:-1]))) if big.size > 1 else 0
        if flips >= self.min_flips:
            before = [a for _, a in accs[: -(self.window + 1)]]
            gain = float(v.max() - max(before)) if before else math.inf
            stalled = gain < self.min_gain
            note = f"; best accuracy {'improved by only' if stalled else 'still improving, by'} {gain:+.4f}" if before else "; still improving"
            return Alert(self.name, "warning" if stalled else "info",
                         f"accuracy changed direction {flips} times in the last {len(deltas)} evaluated rounds (swings >= {self.amplitude:g}, largest {np.abs(deltas).max():.3g}){note}",
                         history[-1].round, value=float(flips))
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


class _ClientHistory:
    """Per-client history of the outlier detector, as parallel arrays sorted by client
    id (looked up with `np.searchsorted`, no Python loop over clients): an EWMA
    baseline of each metric's round residual, the number of observations, a bitmask
    of which of its recent participations were odd, and the last round seen.  At most
    ``cap`` clients are kept; the least recently seen are dropped first."""

    def __init__(self, metrics: int, cap: int):
        self.cap = int(cap)
        self.ids = np.empty(0, dtype=np.int64)
        self.base = np.empty((0, metrics))
        self.count = np.empty(0, dtype=np.int64)
        self.odd = np.empty(0, dtype=np.int64)  # bit j: odd in the (j+1)-th latest participation
        self.last = np.empty(0, dtype=np.int64)

    def slots(self, ids: np.ndarray, round: int) -> np.ndarray:
        """The rows of `ids` (added with no history where new)."""
        new = np.setdiff1d(ids, self.ids)
        if new.size:
            ids_all = np.concatenate([self.ids, new])
            order = np.argsort(ids_all, kind="stable")
            k = new.size
            self.ids = ids_all[order]
            self.base = np.concatenate([self.base, np.full((k, self.base.shape[1]), np.nan)])[order]
            self.count = np.concatenate([self.count, np.zeros(k, dtype=np.int64)])[order]
            self.odd = np.concatenate([self.odd, np.zeros(k, dtype=np.int64)])[order]
            self.last = np.concatenate([self.last, np.full(k, round, dtype=np.int64)])[order]
        return np.searchsorted(self.ids, ids)

    def evict(self, keep: np.ndarray) -> None:
        """Drop the least recently seen clients beyond the cap (never those in `keep`)."""
        extra = self.ids.size - self.cap
        if extra <= 0:
            return
        last = self.last.copy()
        last[np.searchsorted(self.ids, keep)] = np.iinfo(np.int64).max
        drop = np.argsort(last, kind="stable")[:extra]
        mask = np.ones(self.ids.size, dtype=bool)
        mask[drop] = False
        self.ids, self.base, self.count, self.odd, self.last = self.ids[mask], self.base[mask], self.count[mask], self.odd[mask], self.last[mask]


def _scale(pool: np.ndarray) -> float:
    """Robust standard deviation of residuals around 0: 1.4826 x the median absolute
    value (the normal-consistent MAD), else 1.2533 x the mean absolute value, else inf."""
    a = np.abs(pool[np.isfinite(pool)])
    if a.size == 0:
        return math.inf
    s = 1.4826 * float(np.median(a))
    if s > 0:
        return s
    m = 1.2533 * float(np.mean(a))
    return m if m > 0 else math.inf


class OutlierUpdateDetector:
    """Outlier client updates, calibrated against the run itself.

    Each round, for every accepted update, two residuals against the round's cohort:
    the log norm minus the cohort's median log norm (too large: scaling attacks,
    exploding local training) and the cosine to the aggregate minus the cohort's
    median cosine (too small: sign or label flipping).  Each residual is scored twice,
    in the direction that matters:

    - against the **cohort's spread under the run's partition**: the robust standard
      deviation (1.4826 MAD) of the residuals pooled over the last ``spread_rounds``
      rounds, so a Dirichlet-0.1 run's wide spread is its normal;
    - against the **client's own history**: the residual minus the client's baseline
      (a Huber-clipped EWMA, weight ``ewma``, of its past residuals), over the pooled
      robust spread of those surprises.

    A client with at least ``min_history`` past observations is scored against itself
    (an honest client whose data simply differs is far from the cohort but close to
    its own baseline); a new client against the cohort.  A score above ``threshold``
    makes the update *odd*.  Severity:

    - ``warning`` names the clients odd in at least ``persistence`` of their last
      ``window`` participations, scoring above ``alarm_threshold`` in one round, or
      odd together with at least ``min_count - 1`` others in the same round
      (independent honest clients are rarely odd at once; attackers are);
    - ``info`` records the round's other odd updates: one round proves nothing, and
      the guardrail does not act on it by default.

    Calibrated on 27 healthy 50-round runs (IID, Dirichlet 0.5 and 0.1 x `uniform`,
    `mixed_fleet`, `flaky`): honest scores exceed 7 about once in 4,500 updates (largest
    8.3) and two honest clients are odd in the same round about once in 225 rounds
    (three never), while 30%
    label flippers or x10 scalers put 4-10 odd updates in their first round
    (`benchmarks/operations.py`, BENCHMARKS.md "Operations").

    Needs at least ``min_clients`` updates.  State: a few floats per client seen, at
    most ``max_clients`` of them (the least recently seen are forgotten), and
    ``spread_rounds`` rounds of residuals.  The state is a cache of the history: it is
    rebuilt from the records when the history does not continue it (a resumed run,
    an offline `replay`)."""

    name = "outlier_updates"
    config_keys = {
        "outlier_threshold": "threshold",
        "outlier_alarm_threshold": "alarm_threshold",
        "outlier_persistence": "persistence",
        "outlier_window": "window",
        "outlier_min_count": "min_count",
        "outlier_min_clients": "min_clients",
        "outlier_min_history": "min_history",
        "outlier_spread_rounds": "spread_rounds",
        "outlier_ewma": "ewma",
        "outlier_max_clients": "max_clients",
    }
    METRICS = (("norm", 1.0), ("cosine", -1.0))  # (what, the direction in which it is odd)

    def __init__(self, threshold: float = 4.5, alarm_threshold: float = 10.0, persistence: int = 2, window: int = 3, min_count: int = 3,
                 min_clients: int = 10, min_history: int = 2, spread_rounds: int = 10, ewma: float = 0.3,
                 max_clients: int = 100_000):
        if not (0 < threshold <= alarm_threshold):
            raise ValueError(f"outlier_updates: need 0 < outlier_threshold <= outlier_alarm_threshold, got {threshold} and {alarm_threshold}")
        if not (1 <= persistence <= window <= 62):
            raise ValueError(f"outlier_updates: need 1 <= outlier_persistence <= outlier_window <= 62, got {persistence} and {window}")
        for key, v, lo in (("outlier_min_clients", min_clients, 3), ("outlier_min_count", min_count, 1), ("outlier_min_history", min_history, 1),
                           ("outlier_spread_rounds", spread_rounds, 1), ("outlier_max_clients", max_clients, 1)):
            if v < lo:
                raise ValueError(f"outlier_updates: {key} must be >= {lo}, got {v}")
        if not (0 < ewma <= 1):
            raise ValueError(f"outlier_updates: outlier_ewma must be in (0, 1], got {ewma}")
        self.threshold, self.alarm_threshold = float(threshold), float(alarm_threshold)
        self.persistence, self.window, self.min_clients, self.min_count = int(persistence), int(window), int(min_clients), int(min_count)
        self.min_history, self.spread_rounds, self.ewma, self.max_clients = int(min_history), int(spread_rounds), float(ewma), int(max_clients)
        self.reset()

    def reset(self) -> None:
        self._clients = _ClientHistory(len(self.METRICS), self.max_clients)
        self._resid: deque[np.ndarray] = deque(maxlen=self.spread_rounds)  # (n, metrics) per round
        self._surprise: deque[np.ndarray] = deque(maxlen=self.spread_rounds)
        self._round: int | None = None

    @staticmethod
    def _updates(rec: RoundRecord) -> tuple[np.ndarray, np.ndarray]:
        """Client ids and an (n, 2) matrix of [norm, cosine] of the round's accepted updates."""
        per = debug_of(rec).get("clients") or {}
        if per.get("id"):
            ids = np.asarray(per["id"], dtype=np.int64)
            norms = np.array([num(v) for v in per.get("norm", [])], dtype=np.float64)
            cos = np.array([num(v) for v in per["cosine"]], dtype=np.float64) if per.get("cosine") else np.full(ids.shape, np.nan)
        else:  # no debug measurements: the norms the coordinator put on the client records
            acc = [c for c in rec.clients if c.status == "accepted"]
            ids = np.array([c.client_id for c in acc], dtype=np.int64)
            norms = np.array([num(c.update_norm) for c in acc], dtype=np.float64)
            cos = np.full(ids.shape, np.nan)
        if norms.shape != ids.shape or cos.shape != ids.shape:
            return np.empty(0, dtype=np.int64), np.empty((0, 2))
        ids, first = np.unique(ids, return_index=True)  # one row per client
        return ids, np.stack([norms[first], cos[first]], axis=1)

    def _observe(self, rec: RoundRecord) -> dict[str, Any] | None:
        """Score the round's updates and update the history; the scored round, or None."""
        ids, vals = self._updates(rec)
        if ids.size < self.min_clients:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            logn = np.where(vals[:, 0] > 0, np.log(vals[:, 0]), np.nan)
        x = np.stack([logn, vals[:, 1]], axis=1)
        ok = np.isfinite(x)
        enough = ok.sum(axis=0) >= self.min_clients
        med = np.array([np.median(x[ok[:, j], j]) if enough[j] else np.nan for j in range(x.shape[1])])
        x = np.where(ok & enough, x - med, np.nan)  # residuals against this round's cohort
        h = self._clients
        slot = h.slots(ids, rec.round)
        base = h.base[slot]
        known = (h.count[slot] >= self.min_history)[:, None] & np.isfinite(base)
        surprise = np.where(known, x - base, np.nan)
        self._resid.append(x)
        self._surprise.append(surprise)
        s_cohort = np.array([_scale(np.concatenate([r[:, j] for r in self._resid])) for j in range(x.shape[1])])
        pooled = [np.concatenate([r[:, j] for r in self._surprise]) for j in range(x.shape[1])]
        s_own = np.array([_scale(p) if np.isfinite(p).sum() >= self.min_clients else s for p, s in zip(pooled, s_cohort)])
        sign = np.array([d for _, d in self.METRICS])
        z_cohort = sign * x / s_cohort
        z_own = sign * surprise / s_own
        z = np.where(known, z_own, z_cohort)  # a client with a history is compared with itself
        z = np.where(np.isfinite(z), z, -np.inf)
        score = z.max(axis=1)
        odd = score > self.threshold
        mask = (1 << self.window) - 1
        bits = ((h.odd[slot] << 1) | odd.astype(np.int64)) & mask
        h.odd[slot] = bits
        flags = sum((bits >> j) & 1 for j in range(self.window))
        persistent = odd & (flags >= self.persistence)
        alarm = score > self.alarm_threshold
        crowd = odd & (int(odd.sum()) >= self.min_count)  # independent clients odd together: coordinated
        # Baselines follow each client (a Huber-clipped EWMA: one odd round moves it little).
        step = np.clip(x - base, -2.0 * s_own, 2.0 * s_own)
        new_base = np.where(np.isfinite(base), base + self.ewma * np.where(np.isfinite(step), step, 0.0), x)
        h.base[slot] = np.where(np.isfinite(x), new_base, base)
        h.count[slot] += 1
        h.last[slot] = rec.round
        h.evict(ids)
        return {"ids": ids, "x": x, "z": z, "z_cohort": z_cohort, "z_own": z_own, "scales": (s_cohort, s_own), "score": score, "odd": odd, "warn": persistent | alarm | crowd, "persistent": persistent, "alarm": alarm, "flags": flags}

    def _catch_up(self, history: Sequence[RoundRecord]) -> None:
        """Bring the state to the round before history[-1] (all of history on a fresh or
        rewound detector, else the records it has not seen)."""
        cur = history[-1].round
        if self._round is not None and cur <= self._round:
            self.reset()
        i = len(history) - 1
        while i > 0 and (self._round is None or history[i - 1].round > self._round):
            i -= 1
        for rec in history[i:-1]:
            self._observe(rec)
            self._round = rec.round

    def check(self, history: Sequence[RoundRecord]) -> Alert | None:
        self._catch_up(history)
        cur = history[-1]
        seen = self._observe(cur)
        self._round = cur.round
        if seen is None or not seen["odd"].any():
            return None
        warn = seen["warn"]
        pick = warn if warn.any() else seen["odd"]
        idx = np.flatnonzero(pick)
        idx = idx[np.argsort(-seen["score"][idx], kind="stable")]
        names = [m for m, _ in self.METRICS]

        def what(i: int) -> str:
            j = int(np.argmax(seen["z"][i]))
            why = "persistent: odd in %d of its last %d rounds" % (seen["flags"][i], self.window) if seen["persistent"][i] else (
                "single round above %g" % self.alarm_threshold if seen["alarm"][i] else
                "one of %d odd this round" % int(seen["odd"].sum()) if seen["warn"][i] else "single round")
            return f"client {int(seen['ids'][i])}: {names[j]} score {seen['z'][i, j]:.1f} ({why})"

        detail = "; ".join(what(int(i)) for i in idx[:10])
        more = f" and {idx.size - 10} more" if idx.size > 10 else ""
        who = sorted(int(c) for c in seen["ids"][idx])
        n = int(seen["ids"].size)
        if warn.any():
            return Alert(self.name, "warning", f"{idx.size} of {n} updates are persistent or extreme outliers (score > {self.threshold:g} in "
                         f">= {self.persistence} of {self.window} rounds, > {self.alarm_threshold:g} once, or >= {self.min_count} odd together): {detail}{more}",
                         cur.round, clients=who, value=float(seen["score"][idx].max()))
        return Alert(self.name, "info", f"{idx.size} of {n} updates are odd this round (score > {self.threshold:g}; one round proves nothing): {detail}{more}",
                     cur.round, clients=who, value=float(seen["score"][idx].max()))


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
    ``patience`` evaluated rounds in a row.  Healthy Dirichlet-0.1 runs dip up to
    0.24 below their best for one round and 0.11 for two (the false-alarm table),
    hence the defaults: 0.15 for 2 rounds."""

    name = "drift"
    config_keys = {"drift_threshold": "threshold", "drift_patience": "patience", "drift_metric": "metric"}

    def __init__(self, threshold: float = 0.15, patience: int = 2, metric: str = "accuracy"):
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
