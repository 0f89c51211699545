"""Server optimizers: ``step(params, pseudo_gradient, state) -> (params, state)``.

The pseudo-gradient ``Delta`` is the aggregated client delta (local minus global), so a
step *adds* it (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 1/2 write
``Delta_t = mean_i (x_i - x_t)`` and ``x_{t+1} = x_t + eta * ...``).

- ``sgd``: ``w <- w + lr Delta``.  FedAvg is ``sgd`` with ``server_lr = 1``.
- ``momentum`` (FedAvgM, Hsu, Qi & Brown 2019, arXiv:1909.06335):
  ``v <- beta v + Delta; w <- w + lr v``.
- ``adam``, ``yogi``, ``adagrad`` (FedAdam / FedYogi / FedAdagrad, Reddi et al. 2021,
  Algorithm 2): ``m <- b1 m + (1 - b1) Delta`` and ``w <- w + lr m / (sqrt(v) + tau)`` with

  - adam:    ``v <- b2 v + (1 - b2) Delta^2``
  - yogi:    ``v <- v - (1 - b2) Delta^2 sign(v - Delta^2)``
  - adagrad: ``v <- v + Delta^2``

  As in the paper there is **no bias correction** (no ``1 - b^t`` divisors, unlike
  Kingma & Ba's Adam), ``m`` starts at 0 and ``v`` at ``tau^2`` (Alg. 2: "v_{-1} >= tau^2").
  Algorithm 2 keeps the first moment ``m`` for all three; ``beta1 = 0`` gives the classic
  (momentum-free) Adagrad update.  Defaults: ``tau = 1e-3, b1 = 0.9, b2 = 0.99``.

All arithmetic is element-wise on the flat ``(d,)`` vector.  A step never writes into its
inputs: the coordinator keeps earlier ``(params, state)`` pairs for rollback.  State is a
``dict[str, Tensor]`` so it goes into checkpoints as is; restoring it and stepping on gives
the same numbers as never having stopped.

**The learning rate lives in the state** (an optax-style transform with its hyper-parameter
injected, as optax's ``inject_hyperparams`` does): ``state["lr"]`` is the rate the next
step uses, ``state["lr/base"]`` the rate the schedule scales, and ``state["lr/schedule/*"]``
a stateful schedule's memory (reduce-on-plateau).  ``ServerLR`` (``optimizer.lr``) owns them:
``at_round(state, round, metric)`` is the schedule's step at the start of a round,
``scaled(state, factor, floor)`` the guardrail's response; both return a new state, so
checkpoints, resume and rollback carry the rate.  Nothing sets an attribute: ``server_lr``
is only the configured rate that ``init`` starts from.  A state without the entries (a
checkpoint written before they existed) steps at the configured rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .schedules import LRSchedule

State = dict[str, torch.Tensor]

LR, LR_BASE, LR_MEMORY = "lr", "lr/base", "lr/schedule/"


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64)


class ServerLR:
    """The server learning rate and its schedule, as entries of the optimizer's state.

    ``lr`` is the rate of the next step; ``lr/base`` the rate the schedule scales (the
    configured ``server_lr`` until a guardrail scales it); ``lr/schedule/<key>`` the
    schedule's memory (``LRSchedule.state_dict``), loaded into the schedule before and read
    back after each ``at_round``, so the state alone decides the rate.  Every method returns
    a new dict and leaves its input alone (kept versions share their states).
    """

    def __init__(self, lr: float, schedule: LRSchedule | None = None):
        self.initial = float(lr)
        self.schedule = schedule  # None: the rate changes only through `scaled` / `set`

    @staticmethod
    def entries(state: Mapping[str, torch.Tensor]) -> State:
        """The state's learning-rate entries."""
        return {k: v for k, v in state.items() if k == LR or k == LR_BASE or k.startswith(LR_MEMORY)}

    def init(self) -> State:
        memory = self.schedule.state_dict() if self.schedule is not None else {}
        return {LR: _scalar(self.initial), LR_BASE: _scalar(self.initial), **{LR_MEMORY + k: _scalar(v) for k, v in memory.items()}}

    def value(self, state: Mapping[str, torch.Tensor]) -> float:
        """The rate the next step uses."""
        return float(state[LR]) if LR in state else self.initial

    def base(self, state: Mapping[str, torch.Tensor]) -> float:
        return float(state[LR_BASE]) if LR_BASE in state else self.initial

    def filled(self, state: Mapping[str, torch.Tensor], memory: Mapping[str, float] | None = None) -> State:
        """`state` with the entries it lacks (an older checkpoint): the configured rate, and the
        schedule's memory from `memory` (older side files kept it as ``schedule/server/*``)."""
        out = {**self.init(), **state}
        if memory and not any(k.startswith(LR_MEMORY) for k in state):
            out.update({LR_MEMORY + k: _scalar(v) for k, v in memory.items()})
        return out

    def at_round(self, state: Mapping[str, torch.Tensor], round: int, metric: float | None = None) -> State:
        """The schedule's step: the rate of round `round` (1-based) from the base rate and,
        for reduce-on-plateau, the newest monitored metric."""
        if self.schedule is None:
            return dict(state)
        state = self.filled(state)
        self.schedule.load_state_dict({k[len(LR_MEMORY):]: float(v) for k, v in state.items() if k.startswith(LR_MEMORY)})
        lr = float(self.schedule.lr_at(round, self.base(state), metric))
        memory = {LR_MEMORY + k: _scalar(v) for k, v in self.schedule.state_dict().items()}
        return {**state, **memory, LR: _scalar(lr)}

    def scaled(self, state: Mapping[str, torch.Tensor], factor: float, floor: float = 0.0) -> State:
        """The rate and the base rate times `factor`, not below `floor` (a guardrail's response:
        it persists, since the schedule scales the base)."""
        return self.set(state, max(self.value(state) * factor, floor), max(self.base(state) * factor, floor))

    def set(self, state: Mapping[str, torch.Tensor], lr: float | None = None, base: float | None = None) -> State:
        """The state with this rate and / or base rate (resume relearning a recorded response)."""
        out = self.filled(state)
        if lr is not None:
            out[LR] = _scalar(lr)
        if base is not None:
            out[LR_BASE] = _scalar(base)
        return out

    def carry(self, restored: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> State:
        """A rolled-back-to state with the current rate and schedule memory: a rollback puts
        back the model and the optimizer's moments, not the responses that lowered the rate."""
        return {**restored, **self.entries(current)}


class ServerOptimizer:
    """The transform's frame: ``init`` adds the learning-rate entries to the rule's state,
    ``step`` reads the rate from the state and keeps the entries; subclasses give
    ``_init(params)`` and ``_step(params, pseudo_gradient, state, lr) -> (params, moments)``."""

    name = "server"

    def __init__(self, server_lr: float, schedule: LRSchedule | None = None):
        self.server_lr = server_lr  # the configured rate; the running one is state["lr"]
        self.lr = ServerLR(server_lr, schedule)

    def init(self, params: torch.Tensor) -> State:
        return {**self._init(params), **self.lr.init()}

    def step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new_params, moments = self._step(params, pseudo_gradient, state, self.lr.value(state))
        return new_params, {**moments, **{k: v.clone() for k, v in self.lr.entries(state).items()}}  # fresh tensors, as the moments

    def _init(self, params: torch.Tensor) -> State:
        return {}

    def _step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State, lr: float) -> tuple[torch.Tensor, State]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check(pseudo_gradient: torch.Tensor, params: torch.Tensor) -> None:
    if pseudo_gradient.shape != params.shape:
        raise ValueError(f"pseudo_gradient has shape {tuple(pseudo_gradient.shape)}, params {tuple(params.shape)}")


def _require_state(state: State, keys: tuple[str, ...], name: str, params: torch.Tensor) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"server optimizer {name!r}: state lacks {missing} (got keys {sorted(state)}); build it with init(params)")
    for k in keys:
        if state[k].shape != params.shape:
            raise ValueError(f"server optimizer {name!r}: state[{k!r}] has shape {tuple(state[k].shape)}, params {tuple(params.shape)}")


def _beta(value: float, what: str) -> float:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{what} must be in [0, 1), got {value}")
    return float(value)


def _positive(value: float, what: str) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{what} must be a positive finite number, got {value}")
    return float(value)


class ServerSGD(ServerOptimizer):
    """``w <- w + server_lr * Delta``; FedAvg when ``server_lr = 1`` (Reddi et al. 2021, Alg. 1)."""

    name = "sgd"

    def __init__(self, server_lr: float = 1.0, schedule: LRSchedule | None = None):
        super().__init__(server_lr, schedule)

    def _step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State, lr: float) -> tuple[torch.Tensor, State]:
        return params + lr * pseudo_gradient, dict(state)


class ServerMomentum(ServerOptimizer):
    """FedAvgM (Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data
    distribution", Sec. 3): heavy-ball momentum on the pseudo-gradient,
    ``v <- momentum * v + Delta;  w <- w + server_lr * v``, with ``v`` starting at 0.

    With ``momentum = 0`` it is ``ServerSGD(server_lr)``.  Hsu et al. pair ``momentum = 0.9``
    with ``server_lr = 1 - momentum`` so that the steady-state step size matches FedAvg.
    """

    name = "momentum"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, schedule: LRSchedule | None = None):
        super().__init__(server_lr, schedule)
        self.momentum = _beta(momentum, "server momentum")

    def _init(self, params: torch.Tensor) -> State:
        return {"v": torch.zeros_like(params)}

    def _step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State, lr: float) -> tuple[torch.Tensor, State]:
        _check(pseudo_gradient, params)
        _require_state(state, ("v",), self.name, params)
        v = self.momentum * state["v"] + pseudo_gradient
        return params + lr * v, {"v": v}


class _ServerAdaptive(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2 (FedAdagrad / FedYogi / FedAdam); subclasses give the
    second-moment update ``_second_moment(v, Delta^2)``.

    ``initial_accumulator`` is ``v_{-1}``; None means ``tau^2`` as in the paper.
    """

    name = "adaptive"

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_accumulator: float | None = None,
        schedule: LRSchedule | None = None,
    ):
        super().__init__(server_lr, schedule)
        self.beta1 = _beta(beta1, "server beta1")
        self.beta2 = _beta(beta2, "server beta2")
        self.tau = _positive(tau, "server tau")
        init_v = self.tau**2 if initial_accumulator is None else float(initial_accumulator)
        if not init_v >= 0 or math.isinf(init_v):
            raise ValueError(f"initial_accumulator (v at round 0) must be a finite number >= 0, got {initial_accumulator}")
        self.initial_accumulator = init_v

    def _init(self, params: torch.Tensor) -> State:
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.initial_accumulator)}

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State, lr: float) -> tuple[torch.Tensor, State]:
        _check(pseudo_gradient, params)
        _require_state(state, ("m", "v"), self.name, params)
        m = self.beta1 * state["m"] + (1.0 - self.beta1) * pseudo_gradient
        v = self._second_moment(state["v"], pseudo_gradient * pseudo_gradient)
        new_params = params + lr * m / (v.sqrt() + self.tau)
        return new_params, {"m": m, "v": v}


class ServerAdam(_ServerAdaptive):
    """FedAdam (Reddi et al. 2021, Alg. 2, no bias correction):
    ``m <- b1 m + (1-b1) Delta;  v <- b2 v + (1-b2) Delta^2;  w <- w + lr m / (sqrt(v) + tau)``.

    **What it reduces to with ``beta1 = 0`` and a large ``tau``.**  With ``b1 = 0``, ``m_t = Delta_t``.
    Unrolled, ``v_t = b2^t v_0 + (1-b2) sum_{s=1..t} b2^(t-s) Delta_s^2`` (round ``t = 1, 2, ...``),
    so ``w_t = w_{t-1} + lr Delta_t / (sqrt(v_t) + tau)``: SGD on the pseudo-gradient with an
    element-wise learning rate ``lr / (sqrt(v_t) + tau)``.  When ``tau >> |Delta|``:

    - with ``initial_accumulator = 0`` (or ``beta2 = 0``, which forgets ``v_0`` at once),
      ``sqrt(v_t) <= max_s |Delta_s| << tau`` and the step is ``lr Delta_t / tau`` up to a relative
      error ``max|Delta| / tau``: exactly FedAvg with ``server_lr_eff = lr / tau``
      (``ServerSGD(server_lr=lr / tau)``);
    - with the paper's default ``v_0 = tau^2``, ``sqrt(v_t) ~= b2^(t/2) tau``, so the step is
      ``lr Delta_t / (tau (1 + b2^(t/2)))``: FedAvg whose server learning rate warms up from
      ``lr / (tau (1 + sqrt(b2)))`` (about ``lr / (2 tau)`` in round 1) to ``lr / tau`` as
      ``b2^t -> 0``; again up to a relative error of order ``max|Delta| / tau``.

    So to recover FedAvg (server learning rate 1) set ``server_lr = tau``.  Both statements are
    tested numerically (tests/noniid/test_noniid_server_opt.py), and through the engine
    (tests/noniid/test_noniid_objectives.py: ``beta1 = beta2 = 0``, ``tau = server_lr = 1e4``
    gives FedAvg's parameters to a relative 1e-3).
    """

    name = "adam"

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * sq


class ServerYogi(_ServerAdaptive):
    """FedYogi (Reddi et al. 2021, Alg. 2; Zaheer et al., NeurIPS 2018):
    ``v <- v - (1-b2) Delta^2 sign(v - Delta^2)`` — ``v`` moves towards ``Delta^2`` by an additive
    step, so it grows or shrinks more slowly than Adam's, with no bias correction."""

    name = "yogi"

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * sq * torch.sign(v - sq)


class ServerAdagrad(_ServerAdaptive):
    """FedAdagrad (Reddi et al. 2021, Alg. 2): ``v <- v + Delta^2`` (``beta2`` is unused);
    ``beta1 = 0`` gives classic Adagrad on the pseudo-gradient."""

    name = "adagrad"

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v + sq


