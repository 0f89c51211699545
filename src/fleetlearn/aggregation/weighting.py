"""Aggregation weights as a part: per-client information of one round -> weights ``(n,) >= 0``.

The aggregator receives these weights (it normalises them); the coordinator records each
client's share (``ClientRecord.weight``) so their effect is visible round by round.

Functions (vectorised numpy; each raises ``ValueError`` naming the argument on NaN, negative
counts or wrong shapes):

- ``examples(counts, max_examples=None, max_examples_ratio=None)``: the claimed example counts,
  capped at ``max_examples`` and at a ratio x the cohort's (lower) median, so no client can
  buy itself more weight by claiming more (``Coordinator.example_weights``; McMahan et al.,
  AISTATS 2017, weight ``n_k / n``).  The default ratio is ``min(10, max(1, n - 1))`` for a
  cohort of n: against n - 1 equal honest claims one false claim then carries at most half of
  the round's weight, never more than the rest of the cohort together (10 / (n + 9) beyond 11
  clients).  The default weighting.
- ``uniform(n)``: every client 1 (the "equal weighting" of FedAvg variants on unbalanced data).
- ``loss_improvement(loss_before, loss_after, floor=0.1)``: by how much local training lowered
  the client's own loss, ``max(before - after, 0)``, lifted to at least ``floor x`` the largest
  improvement so that no client gets zero unless no client improved.
- ``distance(updates, previous_aggregate, mode="exp" | "cosine", temperature=1.0)``:
  down-weights clients whose update points away from the previous round's aggregate.
- ``label_importance(label_counts, target="uniform" | "global" | array, method="nnls" | "multiplicative")``:
  importance weights from each client's label histogram so that the weighted mixture of the
  clients' label distributions matches a target distribution.

Each has a part class (``name``, ``__call__(info: CohortInfo) -> weights``) in ``WEIGHTINGS``,
built by ``make_weighting(name, **params)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..parts import PartConfig, register_part, table

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

DEFAULT_MAX_EXAMPLES_RATIO = 10.0  # the ratio cap of large cohorts (see `claim_ratio`)


def claim_ratio(n: int, max_examples_ratio: float | None = None) -> float:
    """The cap on a claim as a multiple of the cohort's lower median: `max_examples_ratio`
    when set, else ``min(10, max(1, n - 1))``.  A fixed 10x let one false claim take
    10 / 14 = 71% of a 5-client round; with n - 1 it never outweighs the rest of the cohort
    (at most half against equal honest claims), whatever the cohort's size, while clients
    that really hold up to 10x the median keep their weight in cohorts above 10."""
    if max_examples_ratio is not None:
        return float(max_examples_ratio)
    return min(DEFAULT_MAX_EXAMPLES_RATIO, max(1.0, float(n - 1)))


# -- input checks ----------------------------------------------------------------------------


def _as_array(values: Any, what: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers: {exc}") from None
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)) if arr.ndim else []
        raise ValueError(f"{what} has NaN or infinite values (clients {list(bad)[:10]})")
    return arr


def _nonempty(arr: np.ndarray, what: str) -> None:
    if arr.shape[0] == 0:
        raise ValueError(f"{what}: no clients (empty array)")


def _nonnegative(arr: np.ndarray, what: str) -> None:
    if (arr < 0).any():
        bad = np.flatnonzero((arr < 0).reshape(arr.shape[0], -1).any(axis=1))
        raise ValueError(f"{what} must be >= 0; negative for clients {list(bad)[:10]}")


# -- weights ---------------------------------------------------------------------------------


def examples(counts: ArrayLike, max_examples: float | None = None, max_examples_ratio: float | None = None) -> np.ndarray:
    """``min(n_i, cap)`` with ``cap = min(ratio * lower_median(n), max_examples)`` and ``ratio =
    claim_ratio(len(n), max_examples_ratio)``.

    The example counts are the clients' own claims; the cap bounds what a false claim can buy
    (the lower median moves only if half the cohort lies, also in a cohort of two, where the
    plain median is the liar's own half).  Same numbers as ``Coordinator.example_weights``.
    """
    c = _as_array(counts, "example counts", 1)
    _nonempty(c, "example counts")
    _nonnegative(c, "example counts")
    if max_examples_ratio is not None and not max_examples_ratio >= 1:
        raise ValueError(f"max_examples_ratio must be >= 1, got {max_examples_ratio}")
    cap = claim_ratio(c.size, max_examples_ratio) * float(np.quantile(c, 0.5, method="lower"))
    if max_examples is not None:
        if not max_examples >= 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        cap = min(cap, float(max_examples))
    return np.minimum(c, cap)


def uniform(n: int) -> np.ndarray:
    """Weight 1 for each of ``n`` clients."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"uniform weights need a number of clients >= 1, got {n!r}")
    return np.ones(int(n))


def loss_improvement(loss_before: ArrayLike, loss_after: ArrayLike, floor: float = 0.1) -> np.ndarray:
    """``w_i = max(before_i - after_i, floor * max_j (before_j - after_j)^+)`` with
    ``(.)^+ = max(., 0)``: clients whose local training lowered their own loss more count more.
    A heuristic, not one paper's rule (q-FFL, Li et al., ICLR 2020, weights by the loss
    itself, favouring high-loss clients; this rewards progress instead).  Losses are
    self-reported, like example counts.

    The floor (a fraction in [0, 1]) keeps every client above zero while anyone improved;
    ``floor = 0`` lets non-improving clients drop out.  If no client improved (every
    ``before <= after``), there is nothing to prefer: all weights are 1, not all 0, because
    an all-zero vector cannot be normalised into a mean.
    """
    before = _as_array(loss_before, "loss_before", 1)
    after = _as_array(loss_after, "loss_after", 1)
    _nonempty(before, "loss_before")
    if before.shape != after.shape:
        raise ValueError(f"loss_before has shape {before.shape}, loss_after {after.shape}")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    gain = np.maximum(before - after, 0.0)
    top = gain.max()
    if top <= 0:
        return np.ones_like(gain)
    return np.maximum(gain, floor * top)


def distance(
    updates: ArrayLike,
    previous_aggregate: ArrayLike | None,
    mode: str = "exp",
    temperature: float = 1.0,
) -> np.ndarray:
    """Down-weight clients far from the previous round's aggregate ``g`` (the last pseudo-gradient).

    - ``mode="exp"``: ``w_i = exp(-d_i / (temperature * median_j d_j))`` with
      ``d_i = ||u_i - g||_2``.  Scale-free: the median client gets ``exp(-1/temperature)``,
      and weights shrink exponentially with distance in units of the median distance.  If
      every ``d_i`` is 0 all weights are 1; if only the median is 0 the mean distance is
      the unit instead.
    - ``mode="cosine"``: ``w_i = (1 + cos(u_i, g)) / 2`` in [0, 1] — 1 along ``g``, 1/2
      orthogonal, 0 only exactly opposite.  A smooth form of FLTrust's trust score
      ``ReLU(cos(u_i, g_0))`` (Cao et al., NDSS 2021), with the previous aggregate in place
      of a server-side reference update; ``temperature`` raises it to the power
      ``1 / temperature``.  A zero vector (update or ``g``) has cosine 0.

    ``previous_aggregate = None`` (the first round) gives all ones.
    """
    u = _as_array(updates, "updates", 2)
    _nonempty(u, "updates")
    if not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if previous_aggregate is None:
        return np.ones(u.shape[0])
    g = _as_array(previous_aggregate, "previous_aggregate", 1)
    if g.shape[0] != u.shape[1]:
        raise ValueError(f"previous_aggregate has {g.shape[0]} entries, the updates {u.shape[1]} columns")
    if mode == "exp":
        d = np.linalg.norm(u - g[None, :], axis=1)
        unit = float(np.median(d))
        if unit <= 0:
            unit = float(d.mean())
        if unit <= 0:
            return np.ones(u.shape[0])
        return np.exp(-d / (temperature * unit))
    if mode == "cosine":
        norms = np.linalg.norm(u, axis=1) * np.linalg.norm(g)
        dots = u @ g
        cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
        w = (1.0 + np.clip(cos, -1.0, 1.0)) / 2.0
        return w ** (1.0 / temperature)
    raise ValueError(f"distance weighting mode must be 'exp' or 'cosine', got {mode!r}")


def label_distributions(label_counts: ArrayLike) -> np.ndarray:
    """Rows of ``(n, C)`` label counts (or estimates) normalised to sum 1; an all-zero row stays 0."""
    h = _as_array(label_counts, "label_counts", 2)
    _nonempty(h, "label_counts")
    _nonnegative(h, "label_counts")
    if h.shape[1] == 0:
        raise ValueError("label_counts has no classes (shape (n, 0))")
    totals = h.sum(axis=1, keepdims=True)
    return np.divide(h, totals, out=np.zeros_like(h), where=totals > 0)


def _target_distribution(target: str | ArrayLike, h: np.ndarray) -> np.ndarray:
    num_classes = h.shape[1]
    if isinstance(target, str):
        if target == "uniform":
            return np.full(num_classes, 1.0 / num_classes)
        if target == "global":
            return h.sum(axis=0) / h.sum()
        raise ValueError(f"label_importance target must be 'uniform', 'global' or a distribution, got {target!r}")
    t = _as_array(target, "target distribution", 1)
    if t.shape[0] != num_classes:
        raise ValueError(f"target distribution has {t.shape[0]} classes, label_counts {num_classes}")
    _nonnegative(t[None, :], "target distribution")
    if t.sum() <= 0:
        raise ValueError("target distribution sums to 0")
    return t / t.sum()


def label_importance(
    label_counts: ArrayLike,
    target: str | ArrayLike = "uniform",
    method: str = "nnls",
    iterations: int = 500,
) -> np.ndarray:
    """Importance weights from the clients' label histograms.

    With ``P`` the ``(n, C)`` matrix of client label distributions (rows of ``label_counts``
    normalised) and ``t`` the target distribution — ``"uniform"`` (1/C each), ``"global"``
    (the cohort's pooled histogram, ``sum_i counts_i / sum counts``) or a given vector —
    find mixture weights ``w >= 0`` with ``P^T w ~= t``: the label distribution of the
    weighted mixture of clients equals the target (importance weighting for label shift,
    cf. Lipton et al., ICML 2018, here with one weight per client rather than per class).
    The histograms are the clients' own estimates (self-reported, as example counts are).

    - ``method="nnls"``: ``min_w ||P^T w - t||_2^2 + lambda^2 (sum w - 1)^2``, ``w >= 0``, solved
      by Lawson-Hanson non-negative least squares (``scipy.optimize.nnls``) on the system
      ``[P^T; lambda 1^T] w = [t; lambda]`` with ``lambda = 1``.  The sum row pins the scale for
      clients whose rows are zero.  Exact when ``t`` is a mixture of the rows and ``P`` has
      full row rank; when several mixtures fit (more clients than classes) NNLS returns a
      sparse one, so some clients may get 0.
    - ``method="multiplicative"``: the EM fixed-point update for mixture proportions,
      ``w_i <- w_i * sum_c P_ic t_c / (P^T w)_c`` from uniform ``w`` for ``iterations`` steps
      (it minimises ``KL(t || P^T w)`` over the simplex; Dempster, Laird & Rubin 1977).
      Weights stay positive after finitely many steps, and among many fitting mixtures it
      stays near the uniform start: the gentler choice for large cohorts.

    A client with no labels (an all-zero row) gets weight 0; all rows zero is an error.
    The result sums to 1 (up to the fit's residual) and is >= 0.
    """
    p = label_distributions(label_counts)
    live = p.sum(axis=1) > 0
    if not live.any():
        raise ValueError("label_counts: every client's histogram is empty (all zeros)")
    t = _target_distribution(target, _as_array(label_counts, "label_counts", 2))
    n = p.shape[0]
    w = np.zeros(n)
    pl = p[live]
    if method == "nnls":
        from scipy.optimize import nnls

        a = np.vstack([pl.T, np.ones((1, pl.shape[0]))])
        b = np.concatenate([t, [1.0]])
        w[live], _ = nnls(a, b)
        return w
    if method == "multiplicative":
        if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        wl = np.full(pl.shape[0], 1.0 / pl.shape[0])
        tiny = np.finfo(np.float64).tiny
        for _ in range(int(iterations)):
            mix = pl.T @ wl  # (C,)
            ratio = np.divide(t, mix, out=np.zeros_like(t), where=mix > tiny)
            wl = wl * (pl @ ratio)
            wl = wl / wl.sum()
        w[live] = wl
        return w
    raise ValueError(f"label_importance method must be 'nnls' or 'multiplicative', got {method!r}")


# -- parts -----------------------------------------------------------------------------------


@dataclass
class CohortInfo:
    """What the server knows about the accepted clients of one round (row i = client i).

    Only the fields a weighting reads need to be set: ``examples`` reads ``num_examples``;
    ``loss_improvement`` the two losses; ``distance`` ``updates`` (n, d) and
    ``previous_aggregate`` (d,) (None in the first round); ``label_importance`` ``label_counts`` (n, C).
    """

    num_examples: ArrayLike
    loss_before: ArrayLike | None = None
    loss_after: ArrayLike | None = None
    updates: ArrayLike | None = None
    previous_aggregate: ArrayLike | None = None
    label_counts: ArrayLike | None = None

    @property
    def n(self) -> int:
        return int(np.shape(self.num_examples)[0])


def _need(info: CohortInfo, field: str, part: str) -> Any:
    value = getattr(info, field)
    if value is None:
        raise ValueError(f"weighting {part!r} needs CohortInfo.{field}, which is None")
    return value


def _match(weights: np.ndarray, info: CohortInfo, part: str) -> np.ndarray:
    if weights.shape != (info.n,):
        raise ValueError(f"weighting {part!r}: {weights.shape[0]} weights for {info.n} clients (num_examples)")
    return weights


class ExampleWeighting:
    name = "examples"

    def __init__(self, max_examples: float | None = None, max_examples_ratio: float | None = None):
        self.max_examples = max_examples
        self.max_examples_ratio = max_examples_ratio

    def __call__(self, info: CohortInfo) -> np.ndarray:
        return examples(info.num_examples, self.max_examples, self.max_examples_ratio)


class UniformWeighting:
    name = "uniform"

    def __call__(self, info: CohortInfo) -> np.ndarray:
        return uniform(info.n)


class LossImprovementWeighting:
    name = "loss_improvement"

    def __init__(self, floor: float = 0.1):
        self.floor = floor

    def __call__(self, info: CohortInfo) -> np.ndarray:
        w = loss_improvement(_need(info, "loss_before", self.name), _need(info, "loss_after", self.name), self.floor)
        return _match(w, info, self.name)


class DistanceWeighting:
    name = "distance"

    def __init__(self, mode: str = "exp", temperature: float = 1.0):
        if mode not in ("exp", "cosine"):
            raise ValueError(f"distance weighting mode must be 'exp' or 'cosine', got {mode!r}")
        self.mode = mode
        self.temperature = temperature

    def __call__(self, info: CohortInfo) -> np.ndarray:
        w = distance(_need(info, "updates", self.name), info.previous_aggregate, self.mode, self.temperature)
        return _match(w, info, self.name)


class LabelImportanceWeighting:
    name = "label_importance"

    def __init__(self, target: str | ArrayLike = "uniform", method: str = "nnls", iterations: int = 500):
        if method not in ("nnls", "multiplicative"):
            raise ValueError(f"label_importance method must be 'nnls' or 'multiplicative', got {method!r}")
        self.target = target
        self.method = method
        self.iterations = iterations

    def __call__(self, info: CohortInfo) -> np.ndarray:
        w = label_importance(_need(info, "label_counts", self.name), self.target, self.method, self.iterations)
        return _match(w, info, self.name)


# -- registration (fleetlearn.parts): each weighting with its own keys ----------------------
# ``server.weighting = {name = "distance", mode = "cosine"}``; the old flat keys
# ``server.weighting_<key>`` are still read (see `legacy`).  "examples" reads the claim caps
# ``server.max_examples`` / ``server.max_examples_ratio`` (shared with the coordinator's weights).


class LossImprovementConfig(PartConfig):
    floor: float = Field(default=0.1, ge=0, le=1)


class DistanceConfig(PartConfig):
    mode: Literal["exp", "cosine"] = "exp"
    temperature: float = Field(default=1.0, gt=0)


class LabelImportanceConfig(PartConfig):
    # the label distribution the weighted mixture of clients should match, and the fit
    # (multiplicative: EM mixture proportions, dense weights; nnls: least squares, sparse weights).
    target: Literal["uniform", "global"] = "uniform"
    method: Literal["multiplicative", "nnls"] = "multiplicative"


def _build_examples(ctx: Any, options: Any) -> ExampleWeighting:
    srv = ctx.config.server
    return ExampleWeighting(max_examples=srv.max_examples, max_examples_ratio=srv.max_examples_ratio)


register_part("weighting", "examples", ExampleWeighting, build=_build_examples)
register_part("weighting", "uniform", UniformWeighting)
register_part("weighting", "loss_improvement", LossImprovementWeighting, config=LossImprovementConfig,
              legacy={"weighting_floor": "floor"}, capabilities={"needs_losses"})
register_part("weighting", "distance", DistanceWeighting, config=DistanceConfig,
              legacy={"weighting_mode": "mode", "weighting_temperature": "temperature"}, capabilities={"needs_individual_updates"})
register_part("weighting", "label_importance", LabelImportanceWeighting, config=LabelImportanceConfig,
              legacy={"weighting_target": "target", "weighting_method": "method"}, capabilities={"client_helpers"})

WEIGHTINGS = table("weighting")  # name -> class: a live view of the registry


def make_weighting(name: str, **params: Any):
    """``WEIGHTINGS[name](**params)`` with a message that lists the choices or the parameters."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting {name!r} is unknown; choose one of {', '.join(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](**params)
    except TypeError as exc:
        raise ValueError(f"weighting {name!r}: {exc}") from None


def weighting_from_config(cfg: Mapping[str, Any], prefix: str = "weighting") -> Any:
    """``{"weighting": "distance", "weighting_mode": "cosine"}`` -> ``DistanceWeighting(mode="cosine")``:
    the name under ``prefix`` and each parameter under ``{prefix}_{param}``."""
    name = cfg.get(prefix, "examples") or "examples"
    params = {k[len(prefix) + 1:]: v for k, v in cfg.items() if isinstance(k, str) and k.startswith(prefix + "_")}
    return make_weighting(name, **params)
