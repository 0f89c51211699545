"""Learning-rate schedules over rounds, for the client (``client.lr``) and the server
(``server.server_lr``).

One interface: ``schedule.lr_at(round, base_lr, history_metric=None) -> lr``.  ``round`` is the
1-based round number the coordinator uses (round 1 gets ``base_lr`` from every schedule).

- ``constant``: ``base_lr``.
- ``step``: ``base_lr * gamma ** ((round - 1) // step_size)`` — multiply by ``gamma`` every
  ``step_size`` rounds (torch's ``StepLR``).
- ``cosine``: cosine annealing (Loshchilov & Hutter, "SGDR", ICLR 2017, Eq. 5, one cycle, no
  restarts) from ``base_lr`` in round 1 to ``min_lr`` in round ``total_rounds``:
  ``min_lr + (base_lr - min_lr) (1 + cos(pi (round - 1) / (total_rounds - 1))) / 2``;
  rounds past ``total_rounds`` stay at ``min_lr``.
- ``plateau``: reduce-on-plateau.  ``history_metric`` is the newest value of the monitored
  metric (e.g. the last evaluation loss; None = nothing new, keep the current rate).  When
  it has not improved on the best seen — by more than ``threshold`` relative, in direction
  ``mode`` ("min" or "max") — for ``patience`` consecutive observations, the rate is
  multiplied by ``factor`` (never below ``min_lr``) and the count starts again.  Note: torch's
  ``ReduceLROnPlateau`` waits for ``patience + 1`` bad epochs; here ``patience`` bad rounds
  are enough, as the name says.  It is stateful: ``state_dict()`` / ``load_state_dict()``
  give and take a dict of plain numbers for the checkpoint, and asking twice for the same
  round does not count the metric twice.

``schedule_from_config(cfg, prefix)`` builds one from config-like keys, e.g. for the client
``{"lr_schedule": "step", "lr_step_size": 10, "lr_gamma": 0.5}`` with ``prefix="lr_"`` and for
the server ``{"server_lr_schedule": "cosine", "server_lr_min": 0.01}`` with ``prefix="server_lr_"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol


class LRSchedule(Protocol):
    name: str

    def lr_at(self, round: int, base_lr: float, history_metric: float | None = None) -> float: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: Mapping[str, float]) -> None: ...


def _check_round(round: int) -> int:
    if isinstance(round, bool) or int(round) != round or round < 1:
        raise ValueError(f"round must be an integer >= 1 (rounds are 1-based), got {round!r}")
    return int(round)


def _check_lr(base_lr: float) -> float:
    if not (base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be a positive finite number, got {base_lr!r}")
    return float(base_lr)


class _Stateless:
    name = "stateless"

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        if state:
            raise ValueError(f"schedule {self.name!r} has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantSchedule(_Stateless):
    """The base rate every round."""

    name = "constant"

    def lr_at(self, round: int, base_lr: float, history_metric: float | None = None) -> float:
        _check_round(round)
        return _check_lr(base_lr)


class StepSchedule(_Stateless):
    """``base_lr * gamma ** ((round - 1) // step_size)`` (torch.optim.lr_scheduler.StepLR)."""

    name = "step"

    def __init__(self, step_size: int = 10, gamma: float = 0.5):
        if isinstance(step_size, bool) or int(step_size) != step_size or step_size < 1:
            raise ValueError(f"step schedule: step_size must be an integer >= 1, got {step_size!r}")
        if not (0 < gamma <= 1):
            raise ValueError(f"step schedule: gamma must be in (0, 1], got {gamma!r}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)

    def lr_at(self, round: int, base_lr: float, history_metric: float | None = None) -> float:
        r = _check_round(round)
        return _check_lr(base_lr) * self.gamma ** ((r - 1) // self.step_size)


class CosineSchedule(_Stateless):
    """Cosine annealing from ``base_lr`` (round 1) to ``min_lr`` (round ``total_rounds`` and after);
    Loshchilov & Hutter 2017, Eq. 5 with a single cycle."""

    name = "cosine"

    def __init__(self, total_rounds: int, min_lr: float = 0.0):
        if isinstance(total_rounds, bool) or int(total_rounds) != total_rounds or total_rounds < 1:
            raise ValueError(f"cosine schedule: total_rounds must be an integer >= 1, got {total_rounds!r}")
        if not (min_lr >= 0 and math.isfinite(min_lr)):
            raise ValueError(f"cosine schedule: min_lr must be a finite number >= 0, got {min_lr!r}")
        self.total_rounds = int(total_rounds)
        self.min_lr = float(min_lr)

    def lr_at(self, round: int, base_lr: float, history_metric: float | None = None) -> float:
        r = _check_round(round)
        base = _check_lr(base_lr)
        if self.min_lr > base:
            raise ValueError(f"cosine schedule: min_lr = {self.min_lr} is above base_lr = {base}")
        if r == 1:
            return base
        if r >= self.total_rounds:
            return self.min_lr
        progress = (r - 1) / (self.total_rounds - 1)
        return self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PlateauSchedule:
    """Reduce-on-plateau: ``factor`` times the rate after ``patience`` consecutive observations of
    ``history_metric`` without a relative improvement of more than ``threshold`` (see module doc)."""

    name = "plateau"

    def __init__(
        self,
        factor: float = 0.5,
        patience: int = 5,
        mode: str = "min",
        threshold: float = 1e-4,
        min_lr: float = 0.0,
    ):
        if not (0 < factor < 1):
            raise ValueError(f"plateau schedule: factor must be in (0, 1), got {factor!r}")
        if isinstance(patience, bool) or int(patience) != patience or patience < 1:
            raise ValueError(f"plateau schedule: patience must be an integer >= 1, got {patience!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"plateau schedule: mode must be 'min' or 'max', got {mode!r}")
        if not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"plateau schedule: threshold must be a finite number >= 0, got {threshold!r}")
        if not (min_lr >= 0 and math.isfinite(min_lr)):
            raise ValueError(f"plateau schedule: min_lr must be a finite number >= 0, got {min_lr!r}")
        self.factor = float(factor)
        self.patience = int(patience)
        self.mode = mode
        self.threshold = float(threshold)
        self.min_lr = float(min_lr)
        self.scale = 1.0  # product of the reductions so far
        self.best = math.nan  # best metric seen (NaN: none yet)
        self.bad_rounds = 0  # consecutive observations without improvement
        self.last_round = 0  # the round whose metric was counted last

    def _improved(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        if self.mode == "min":
            return value < self.best - self.threshold * abs(self.best)
        return value > self.best + self.threshold * abs(self.best)

    def observe(self, round: int, value: float) -> None:
        r = _check_round(round)
        if r <= self.last_round:  # the same round asked again (e.g. client and server): count once
            return
        if not math.isfinite(value):
            raise ValueError(f"plateau schedule: the monitored metric must be finite, got {value!r} in round {r}")
        self.last_round = r
        if self._improved(value):
            self.best = float(value)
            self.bad_rounds = 0
            return
        self.bad_rounds += 1
        if self.bad_rounds >= self.patience:
            self.scale *= self.factor
            self.bad_rounds = 0

    def lr_at(self, round: int, base_lr: float, history_metric: float | None = None) -> float:
        base = _check_lr(base_lr)
        if history_metric is not None:
            self.observe(round, float(history_metric))
        else:
            _check_round(round)
        return max(base * self.scale, min(self.min_lr, base))

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad_rounds": float(self.bad_rounds), "last_round": float(self.last_round)}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        expected = {"scale", "best", "bad_rounds", "last_round"}
        if set(state) != expected:
            raise ValueError(f"plateau schedule state must have keys {sorted(expected)}, got {sorted(state)}")
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.bad_rounds = int(state["bad_rounds"])
        self.last_round = int(state["last_round"])

    def __repr__(self) -> str:
        return (
            f"PlateauSchedule(factor={self.factor}, patience={self.patience}, mode={self.mode!r}, "
            f"threshold={self.threshold}, min_lr={self.min_lr})"
        )


SCHEDULES = {cls.name: cls for cls in (ConstantSchedule, StepSchedule, CosineSchedule, PlateauSchedule)}

# config key suffix -> constructor argument, per schedule
_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "constant": {},
    "step": {"step_size": "step_size", "gamma": "gamma"},
    "cosine": {"total_rounds": "total_rounds", "min": "min_lr"},
    "plateau": {"factor": "factor", "patience": "patience", "mode": "mode", "threshold": "threshold", "min": "min_lr"},
}


def schedule_from_config(cfg: Mapping[str, Any], prefix: str = "lr_", total_rounds: int | None = None) -> LRSchedule:
    """Build a schedule from config-like keys that start with ``prefix``:

    ``{prefix}schedule`` (name; absent -> "constant"), and per schedule
    step: ``{prefix}step_size``, ``{prefix}gamma``; cosine: ``{prefix}total_rounds`` (default:
    the ``total_rounds`` argument, i.e. the run's rounds), ``{prefix}min``; plateau:
    ``{prefix}factor``, ``{prefix}patience``, ``{prefix}mode``, ``{prefix}threshold``, ``{prefix}min``.

    A key with the prefix that the chosen schedule does not take is an error (a typo, or a
    parameter of another schedule), named in the message.
    """
    where = f"{prefix}schedule"
    name = cfg.get(where, "constant")
    if name is None:
        name = "constant"
    if name not in SCHEDULES:
        raise ValueError(f"{where} = {name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    allowed = _CONFIG_KEYS[name]
    ours = [k for k in cfg if isinstance(k, str) and k.startswith(prefix) and k != where]
    unknown = [k for k in ours if k[len(prefix):] not in allowed]
    if unknown:
        takes = ", ".join(prefix + s for s in allowed) or "no parameters"
        raise ValueError(f"{where} = {name!r} does not take {', '.join(sorted(unknown))} (it takes {takes})")
    kwargs = {allowed[k[len(prefix):]]: cfg[k] for k in ours}
    if name == "cosine" and "total_rounds" not in kwargs:
        if total_rounds is None:
            raise ValueError(f"{where} = 'cosine' needs {prefix}total_rounds (or the run's number of rounds)")
        kwargs["total_rounds"] = total_rounds
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by _CONFIG_KEYS
        raise ValueError(f"{where} = {name!r}: {exc}") from None
