"""Model-poisoning attacks on the malicious rows of a cohort's (n, d) delta matrix.

Each attack is a pure function ``fn(honest, ctx) -> poisoned``: ``honest`` is the
(k, d) matrix of the k attackers' *honest* deltas (what they computed by training
on their real data), the result is the (k, d) matrix they send instead.  ``ctx``
carries the cohort size, the attackers' ids and the attack's settings.

Colluding versus independent attackers (``ctx.collude``): colluding attackers
share their honest updates, so every statistic below (the mean, the coordinate-wise
std) is taken over the k attackers' honest rows of this cohort and all of them send
the same vector; an independent attacker sees only its own update.  A cohort with a
single attacker is therefore the same in both modes except for ALIE's std proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class AttackContext:
    """What an attack function may use besides the attackers' honest rows."""

    cohort_size: int  # n: updates computed in this dispatch, honest and malicious
    clients: np.ndarray  # (k,) the attackers' client ids, row for row
    round: int
    seed: int  # the run seed (per-client noise streams)
    collude: bool = True
    scale: float = 10.0
    noise_std: float = 1.0
    alie_z: float | None = None
    value: float = 100.0
    extra: dict = field(default_factory=dict)


def _shared_mean(honest: torch.Tensor) -> torch.Tensor:
    """The attackers' honest mean, broadcast to every attacker's row (colluding)."""
    return honest.to(torch.float64).mean(0, keepdim=True).expand_as(honest)


def _direction(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """The honest update an attacker works from: the colluders' mean, or its own."""
    return _shared_mean(honest) if ctx.collude else honest.to(torch.float64)


def sign_flip(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Send the negated honest update.

    Independent (``collude = false``): each attacker sends ``-g_i``, minus its own
    update: the sign-flipping attack of Li et al. (RSA, AAAI 2019; they also scale it)
    and the "bit flipping" of Karimireddy et al. (ICML 2021).  Colluding (the
    ``[attack]`` default): all attackers send ``-mean(g_att)``, minus the mean of their
    pooled honest updates, the form of Allen-Zhu et al. (ICLR 2021) and Allouah et al.
    (AISTATS 2023), who negate the honest mean.  The copies are identical, which pulls
    distance- and median-based rules towards them under label skew (see
    docs/architecture.md, "Robust aggregation under label skew")."""
    return (-_direction(honest, ctx)).to(honest.dtype)


def scaling(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Boost the honest update by ``scale`` (the boosting of Bhagoji et al., ICML 2019):
    ``scale * g_i``, or ``scale * mean(g_att)`` when colluding."""
    return (ctx.scale * _direction(honest, ctx)).to(honest.dtype)


def _client_generator(seed: int, round: int, client: int) -> torch.Generator:
    s = int(np.random.SeedSequence([seed, round, client, 0xA77AC]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


def gaussian(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Replace the update by ``N(0, noise_std^2 I)`` noise: the "Gaussian Byzantine
    worker" of Blanchard et al. (NeurIPS 2017, section 5).  Each attacker draws from its
    own stream seeded by (run seed, round, client), so collusion changes nothing."""
    k, d = honest.shape
    out = torch.empty((k, d), dtype=honest.dtype)
    for row, client in enumerate(ctx.clients.tolist()):  # k attackers, each its own stream
        out[row] = torch.randn(d, generator=_client_generator(ctx.seed, ctx.round, int(client)), dtype=honest.dtype)
    return (out * ctx.noise_std).to(honest.device)


def alie_z_max(n: int, f: int) -> float:
    """Baruch et al. (NeurIPS 2019), Algorithm 1 / eq. (4): with n workers of which f
    are corrupted, ``s = floor(n / 2 + 1) - f`` honest workers must be "won over", and
    ``z_max = max_z { Phi(z) < (n - s) / n }`` = ``Phi^-1((n - s) / n)``.

    A corrupted majority (s <= 0) makes the probability reach 1; it is capped at
    ``1 - 1e-6`` so z stays finite.  Never negative (f >= 1 gives s <= n / 2)."""
    if n < 1 or f < 0:
        raise ValueError(f"alie_z_max: need n >= 1 and f >= 0, got n = {n}, f = {f}")
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 0.5), 1.0 - 1e-6)
    return float(NormalDist().inv_cdf(p))


def alie(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """"A little is enough" (Baruch et al., NeurIPS 2019): send ``mu - z * sigma``,
    coordinate-wise, where (mu, sigma) estimate the benign updates' distribution.

    Colluding (the paper's setting): mu and sigma are the mean and the unbiased std
    (ddof = 1) over the k attackers' honest updates in the cohort; all send the same
    vector.  Independent: an attacker knows only its own update g_i, and uses mu = g_i
    and its coordinate magnitudes |g_i| as the std proxy: ``g_i - z * |g_i|``.  A
    colluding cohort with a single attacker has no sample std and falls back to the
    independent rule.  z is ``alie_z`` if set, else `alie_z_max(n, k)` for this cohort."""
    k = honest.shape[0]
    z = ctx.alie_z if ctx.alie_z is not None else alie_z_max(ctx.cohort_size, k)
    h = honest.to(torch.float64)
    if ctx.collude and k > 1:
        mu = h.mean(0, keepdim=True)
        sigma = h.std(0, correction=1, keepdim=True)
        return (mu - z * sigma).expand_as(h).to(honest.dtype)
    return (h - z * h.abs()).to(honest.dtype)


def same_value(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Every coordinate equals ``value`` (the same-value attack of Li et al., RSA,
    AAAI 2019, with c = 100 there)."""
    return torch.full_like(honest, float(ctx.value))


def model_replacement(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Model replacement (Bagdasaryan et al., AISTATS 2020, eq. 3) without a backdoor.

    The paper's attacker submits ``gamma * (X - G)`` with ``gamma = n / eta`` so that
    FedAvg's ``G + eta / n * sum(deltas)`` lands on its target X, assuming the honest
    deltas nearly cancel.  Here the target direction ``X - G`` is the negative of the
    honest update (``-mean(g_att)`` colluding, ``-g_i`` independent), n is the cohort
    size and the server learning rate eta is taken as 1 (plain FedAvg).  Each attacker
    boosts by n as if it were the only one, as in the paper's single-attacker round."""
    return (-float(ctx.cohort_size) * _direction(honest, ctx)).to(honest.dtype)


def unchanged(honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Data-poisoning attacks (label_flip) send their honest update of poisoned data."""
    return honest


UpdateAttack = Callable[[torch.Tensor, AttackContext], torch.Tensor]

# The registry of parts: `[attack] kind` -> the function applied to the attackers' rows.
UPDATE_ATTACKS: dict[str, UpdateAttack] = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "gaussian": gaussian,
    "label_flip": unchanged,
    "alie": alie,
    "same_value": same_value,
    "model_replacement": model_replacement,
}
