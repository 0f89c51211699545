"""SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, Algorithm 1 with option II).

Each client ``i`` keeps a control variate ``c_i`` (its estimate of its own gradient), the
server keeps ``c`` (the estimate of the global gradient).  Local training adds the
correction ``c - c_i`` to every gradient (``TorchLearner.fit_cohort(corrections=...)``), which
removes the client drift that label skew causes.  After ``K_i`` local steps from ``x`` to
``y_i`` with learning rate ``lr``, option II sets (Alg. 1, line 12)

    c_i+ = c_i - c + (x - y_i) / (K_i lr),   so   delta_c_i = c_i+ - c_i = -c - delta_i / (K_i lr)

with ``delta_i = y_i - x`` the update the client sends anyway.  The server therefore
recovers every ``delta_c_i`` from what it already receives (the delta and the step count
in the update metrics) and needs no second uplink vector; it sets (Alg. 1, line 17)

    c <- c + (|S| / N) mean_{i in S} delta_c_i

with ``|S|`` the accepted updates and ``N`` the population.  With ``c`` and every ``c_i``
starting at 0 this keeps ``c = (1/N) sum_i c_i`` exactly, as long as the server and the
clients see the same deltas.

Approximations, stated:

- **Local momentum.**  With heavy-ball momentum ``beta`` (torch.optim.SGD semantics, the
  correction also passes through the buffer), ``K`` steps along a constant gradient ``g``
  move the model by ``lr g K_eff`` with ``K_eff = sum_{k=1..K} (1 - beta^k) / (1 - beta)``, not
  ``lr g K``.  `effective_steps` uses ``K_eff`` in place of ``K_i`` so that ``c_i`` stays an
  estimate of the gradient (with ``beta = 0``, ``K_eff = K``: the paper's formula exactly).
- **Lossy uplink codecs.**  The client updates ``c_i`` from its true delta, the server
  updates ``c`` from the decoded one.  With a lossy chain (quantization, top-k, error
  feedback) the invariant ``c = mean c_i`` then holds only up to the compression error.
- **Refused or late updates.**  A client whose update the server refuses or receives after
  the deadline has already moved its ``c_i``; the server does not count it.  Again the
  invariant drifts by that client's ``delta_c_i / N``.
- **Rollback.**  A guardrail that restores an earlier model version restores ``c`` with it
  (it is part of the server state); clients keep their ``c_i``, as real devices would.
"""

from __future__ import annotations

import numpy as np
import torch

SERVER_KEY = "scaffold.c"  # the server control variate, in the coordinator's server state
CLIENT_KEY = "scaffold.c_i"  # a client's control variate, in its ClientStateStore entry


def effective_steps(steps, momentum: float = 0.0) -> torch.Tensor:
    """``K_eff`` per client: ``sum_{k=1..K} (1 - beta^k) / (1 - beta)``; ``K`` when ``beta = 0``.

    Closed form: ``(K - beta (1 - beta^K) / (1 - beta)) / (1 - beta)``."""
    k = torch.as_tensor(np.asarray(steps, dtype=np.float64))
    b = float(momentum)
    if not 0.0 <= b < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if b == 0.0:
        return k
    return (k - b * (1.0 - b**k) / (1.0 - b)) / (1.0 - b)


def control_deltas(deltas: torch.Tensor, steps, lr: float, momentum: float, c: torch.Tensor) -> torch.Tensor:
    """Option II: ``delta_c_i = -c - delta_i / (K_eff,i lr)`` for an ``(n, d)`` matrix of deltas.

    A client that took no step (``K_i = 0``) learnt nothing about its gradient: its row is 0."""
    if deltas.dim() != 2 or deltas.shape[1] != c.shape[0]:
        raise ValueError(f"deltas must be (n, {c.shape[0]}), got {tuple(deltas.shape)}")
    keff = effective_steps(steps, momentum).to(torch.float64)
    if keff.shape != (deltas.shape[0],):
        raise ValueError(f"steps must give one count per row of deltas ({deltas.shape[0]}), got {tuple(keff.shape)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    took = keff > 0
    scale = torch.where(took, 1.0 / (keff.clamp(min=1e-12) * lr), torch.zeros_like(keff)).to(torch.float32)
    out = -c.unsqueeze(0) - deltas * scale.unsqueeze(1)
    return out * took.to(torch.float32).unsqueeze(1)


def server_control_step(c: torch.Tensor, deltas_c: torch.Tensor, population: int) -> torch.Tensor:
    """``c + (|S| / N) mean_i delta_c_i`` = ``c + sum_i delta_c_i / N`` (Alg. 1, line 17)."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if deltas_c.shape[0] == 0:
        return c
    return c + deltas_c.sum(0) / float(population)
