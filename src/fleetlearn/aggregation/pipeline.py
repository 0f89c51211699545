"""The server's aggregation as one composed pipeline: the engine makes one call.

A round's accepted updates travel as a `Batch` (the (n, d) matrix in client-id order,
the weighting part's weights, the client ids, the raw payloads, the round) into the
run's stage; ``stage.next(batch)`` returns a `StageResult`: the (d,) aggregate the
server optimizer applies, the rows that reached it (a regional aggregator that
failed loses its rows), and the stage's measurements, which the round record keeps
under the stage's own keys.  Stages wrap stages, as TFF's aggregation factories and
optax's ``chain`` do:

- `RuleStage(aggregator)`: a weighted mean or a robust rule on the rows (every part
  in `AGGREGATORS`, MIFA, HeteroFL's coverage mean, per-cluster aggregation).
- `SketchSpaceStage(inner, chain, dim)`: count-sketch uplinks: the inner linear stage (the
  mean, the secure sum, central DP) runs on the clients' sketch tables, unsketched once.
- `CoverageStage(dim)`: ``subset`` uplinks (each client sends a random part of its update):
  each coordinate is the weighted mean over the clients whose payload carries it
  (`coverage_mean`), in place of the plain mean.
- `SecureSumStage(secure)`: the weighted mean through secure aggregation.
- `HierarchyStage(hierarchy)`: regional pre-aggregation of the weighted mean.
- `CentralDPStage(central, secure, inner)`: DP-FedAvg's clip, (secure) sum and noise,
  around an inner rule's per-client contributions.  The inner rule must bound each
  client's contribution (`contributions`): the plain mean, `norm_bounded_mean` with a
  fixed bound, `centered_clipping` with a fixed radius and one step from a public
  centre (the previous round's released aggregate).  Any other rule is refused by
  `check_dp_composable`, naming the missing capability.

Which stage a run gets is decided once, by `build_pipeline` from the run's parts, so
the engine never asks what its parts can do.  Stateful stages (MIFA's memory, DnC's
reputation, `CentralDPStage`'s public centre) checkpoint through `state_dict` /
`load_state_dict` (the ``aggregator/<key>`` side state); the DP noise generator and the
adaptive clip live in the privacy state, committed with every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch


@dataclass
class Batch:
    """A round's accepted updates, rows in client-id order."""

    updates: torch.Tensor  # (n, d)
    weights: np.ndarray  # (n,) float64 >= 0: the weighting part's, times FedBuff's staleness scale
    client_ids: list[int]
    payloads: list[bytes] = field(default_factory=list)
    round: int = 0
    dropped: int = 0  # clients that dropped after secure aggregation's key exchange


@dataclass
class StageResult:
    aggregate: torch.Tensor  # (d,) float32: the pseudo-gradient the server optimizer applies
    measurements: dict[str, Any] = field(default_factory=dict)  # record.extra, under the stage's keys
    kept: np.ndarray | None = None  # (n,) bool: rows that reached the aggregate (None: all)
    lost_reason: Callable[[int], str] | None = None  # row -> why its update was lost
    # Bytes the stage's own messages moved per client, (uplink, downlink): secure aggregation
    # run by the clients over the network; counted into the round's byte accounting.
    link_bytes: dict[int, tuple[int, int]] | None = None


class Stage:
    """A pipeline stage: ``next(batch) -> StageResult``; stateless unless it says otherwise.
    A stage refuses a batch it cannot aggregate with ValueError (the round fails, model
    unchanged, the reason prefixed with `label`)."""

    name = "stage"
    capacity: int | None = None  # the most rows it can aggregate (secure aggregation's headroom); None: any

    @property
    def label(self) -> str:
        return self.name

    def next(self, batch: Batch) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"aggregation stage {self.name!r} keeps no state, but the checkpoint has {sorted(state)}")


class RuleStage(Stage):
    """An aggregation rule on the rows: ``aggregate(updates, weights)``, or
    ``aggregate_round(ids, updates, weights)`` for rules that keep per-client state or
    need the ids (MIFA, HeteroFL, clustered FL, DnC with reputation).  A rule that
    leaves rows out reports them as client ids (``aggregator_removed`` /
    ``aggregator_distrusted``)."""

    def __init__(self, rule):
        self.rule = rule
        self.name = str(getattr(rule, "name", type(rule).__name__))
        self._by_ids = bool(getattr(rule, "needs_client_ids", False))
        self._removed = hasattr(rule, "last_removed")
        self._state = getattr(rule, "state_dict", None), getattr(rule, "load_state_dict", None)

    @property
    def label(self) -> str:
        return f"aggregator {self.name}"

    def next(self, batch: Batch) -> StageResult:
        w = torch.from_numpy(batch.weights).to(torch.float32)  # rules normalise their weights
        if self._by_ids:
            out = self.rule.aggregate_round(batch.client_ids, batch.updates, w)
        else:
            out = self.rule.aggregate(batch.updates, w)
        m: dict[str, Any] = {}
        if self._removed:
            for key in ("removed", "distrusted"):
                rows = getattr(self.rule, f"last_{key}", None)
                if rows is not None:
                    m[f"aggregator_{key}"] = [batch.client_ids[i] for i in rows]
        return StageResult(out, m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state[0]() if self._state[0] is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self._state[1] is not None:
            if state:
                self._state[1](state)
        else:
            super().load_state_dict(state)


class SketchSpaceStage(Stage):
    """Count-sketch uplinks (FetchSGD): a linear inner stage -- the weighted mean, secure
    aggregation's sum, central DP's clip, sum and noise -- runs on the clients' sketch
    tables (`CodecChain.summand`, one (rows x cols) row per client), and its result is
    unsketched once (`CodecChain.from_sum`).  Sketches are linear, so the mean of the tables
    is the sketch of the mean; under secure aggregation each client masks its own table (the
    payloads are then empty and the rows here are placeholders); under central DP the
    clipping bounds each client's table, so the noise is calibrated in the space the server
    sums (unsketching is post-processing)."""

    def __init__(self, inner: Stage, chain, dim: int):
        self.inner, self.chain, self.dim = inner, chain, int(dim)
        self.width = chain.summand_width(self.dim)
        self.name = f"sketch_space({inner.name})"
        self.capacity = inner.capacity

    @property
    def label(self) -> str:
        return f"sketch aggregation ({self.inner.label})"

    def next(self, batch: Batch) -> StageResult:
        from ..params import PayloadError

        n = len(batch.client_ids)
        if any(batch.payloads):
            try:
                tables = torch.stack([self.chain.summand(p, self.dim) for p in batch.payloads])
            except PayloadError as exc:
                raise ValueError(str(exc)) from None
        else:  # secure aggregation over a network: each table stays on its device until masked
            tables = torch.zeros(n, self.width)
        res = self.inner.next(Batch(tables, batch.weights, batch.client_ids, batch.payloads, batch.round, batch.dropped))
        res.aggregate = self.chain.from_sum(res.aggregate, self.dim)
        return res

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


class CoverageStage(Stage):
    """``subset`` uplinks: each client sends a random part of its update (drawn independently
    of the values), and each coordinate of the aggregate is the weighted mean over the clients
    whose payload carries it (`coverage_mean`, 0 where none does), read from the payloads'
    supports (`coverage_mean_of_rows`: the rows are the payloads' decodes, zero off their
    supports, as the intake writes them).  A plain mean of such rows would shrink every
    coordinate by the fraction sent.  Measurements: ``coverage_clients`` (the mean number of
    clients per coordinate) and ``coverage_missed`` (the fraction of coordinates no client
    sent this round)."""

    name = "coverage_mean"

    def __init__(self, dim: int):
        self.dim = int(dim)

    @property
    def label(self) -> str:
        return "coverage mean"

    def next(self, batch: Batch) -> StageResult:
        from ..aggregation.mean import check_weights, coverage_mean_of_rows
        from ..compression.codec import payload_blocks
        from ..params import PayloadError

        n, d = len(batch.client_ids), self.dim
        if len(batch.payloads) != n:
            raise ValueError(f"averaging by coverage reads each client's payload; {len(batch.payloads)} payloads for {n} updates")
        if n == 0:
            raise ValueError("coverage_mean: cannot aggregate an empty cohort (n = 0)")
        if tuple(batch.updates.shape) != (n, d):
            raise ValueError(f"averaging by coverage needs ({n}, {d}) updates, got {tuple(batch.updates.shape)}")

        def supports():  # read when each row's weight is added: memory holds one at a time
            for payload in batch.payloads:
                try:
                    yield payload_blocks(payload, d)
                except PayloadError as exc:
                    raise ValueError(str(exc)) from None

        fold = coverage_mean_of_rows(batch.updates, supports(), check_weights(batch.weights, n))
        m = {"coverage_clients": fold.entries / d if d else 0.0, "coverage_missed": fold.missed / d if d else 0.0}
        return StageResult(fold.mean, m)


class SecureSumStage(Stage):
    """The weighted mean computed through secure aggregation (the server learns only the sum)."""

    name = "secure_sum"

    def __init__(self, secure):
        self.secure = secure
        self.capacity = secure.quantizer.max_clients

    def next(self, batch: Batch) -> StageResult:
        out = self.secure.aggregate(batch.updates, batch.weights, dropped=batch.dropped, round=batch.round,
                                    client_ids=batch.client_ids)
        return remote_outcome(self.secure, batch, StageResult(out.to(torch.float32)))


def remote_outcome(secure, batch: Batch, result: StageResult) -> StageResult:
    """Secure aggregation run by the clients over a network (`SecureAggregation.remote`):
    its measurements (bytes, seconds, survivors) join the stage's, and the clients that
    dropped during the protocol lose their rows (recorded as dropped, with the reason)."""
    res = getattr(secure, "last_remote", None) if secure is not None else None
    if res is None or getattr(secure, "remote", None) is None:
        return result
    result.measurements.update(res.measurements)
    result.link_bytes = dict(res.client_bytes)
    kept = np.isin(np.asarray(batch.client_ids, dtype=np.int64), np.asarray(res.survivors, dtype=np.int64))
    if not kept.all():
        result.kept = kept
        result.lost_reason = lambda i: "dropped during secure aggregation: its masked input never arrived; its masks were removed"
    return result


class HierarchyStage(Stage):
    """Regional aggregators: each region forwards one pre-aggregated weighted sum; the rows
    of a region whose aggregator failed never reach the root."""

    name = "hierarchy"

    def __init__(self, hierarchy):
        self.hierarchy = hierarchy

    def next(self, batch: Batch) -> StageResult:
        res = self.hierarchy.aggregate(batch.updates, batch.weights, batch.client_ids, batch.round)
        regions = self.hierarchy.regions(batch.client_ids)
        kept = None if res.kept.all() else res.kept
        return StageResult(res.mean, res.to_metrics(), kept,
                           lambda i: f"region {int(regions[i])}: its aggregator failed; update lost")


# -- central DP around an inner rule ----------------------------------------------------------------
class DPComposeError(ValueError):
    """An aggregation rule that central DP cannot wrap: the message names the missing capability."""


def contributions_of(rule) -> Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]] | None:
    """The rule's per-client contributions, if it has them: ``f(updates, center) ->
    (rows, center)`` such that the rule's result is ``center + sum(rows) / m`` with every
    row's norm bounded by the rule without looking at the other rows.  None when the rule
    has no such form (order statistics, distance-based selection, data-dependent bounds)."""
    fn = getattr(rule, "contributions", None)
    return fn


def check_dp_composable(rule, what: str) -> None:
    """Raise `DPComposeError` unless central DP can wrap `rule` (see `contributions_of`)."""
    why = getattr(rule, "dp_refusal", None)
    reason = why() if callable(why) else None
    if contributions_of(rule) is None or reason:
        detail = reason or (
            "its result is not a sum of per-client contributions of bounded norm (it selects or reorders updates "
            "by looking at all of them), so one client's influence on it has no bound the Gaussian noise could cover"
        )
        raise DPComposeError(
            f"central DP cannot wrap {what}: capability 'bounded per-client contributions' missing: {detail}. Rules that "
            "compose with central DP: mean, norm_bounded_mean (with server.norm_bound), centered_clipping "
            "(with server.cc_tau and server.cc_iters = 1); or use privacy.mode = 'local', under which any rule is "
            "post-processing"
        )


class CentralDPStage(Stage):
    """DP-FedAvg around an inner rule: the inner rule's per-client contributions are clipped
    to C, summed (securely with SecAgg), noised and divided by the expected cohort; the
    inner rule's public centre is added back.  The centre is public: the previous round's
    released aggregate, never this round's data."""

    name = "central_dp"

    def __init__(self, central, secure=None, inner=None, inner_name: str = "mean"):
        self.central, self.secure, self.inner, self.inner_name = central, secure, inner, inner_name
        self._contrib = contributions_of(inner) if inner is not None else None
        self.center: torch.Tensor | None = None  # the last released aggregate (public)
        self.capacity = secure.quantizer.max_clients if secure is not None else None

    def next(self, batch: Batch) -> StageResult:
        rows, center = batch.updates, None
        if self._contrib is not None:
            rows, center = self._contrib(batch.updates, self.center)
        res = self.central.aggregate(rows, secure=self.secure, dropped=batch.dropped, round=batch.round, client_ids=batch.client_ids)
        out = res.mean.to(torch.float32)
        if center is not None:
            out = out + center.to(torch.float32)
        self.center = out.detach().clone()
        m = res.to_metrics()
        if self.inner is not None:
            m["dp_inner_rule"] = self.inner_name
        return remote_outcome(self.secure, batch, StageResult(out, m))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.center is None else {"dp_center": self.center}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "dp_center" in state:
            self.center = state["dp_center"].to(torch.float32)


def build_pipeline(aggregator, *, privacy=None, sketch=None, dim: int | None = None, hierarchy=None,
                   what: str = "the aggregator", coverage: bool = False) -> Stage:
    """The run's stage from its parts: central DP around the rule (which must compose),
    else secure aggregation's sum, else regional pre-aggregation, else the rule itself;
    with a count-sketch uplink (`sketch`: the uplink chain, `dim` the model's) that stage
    runs in sketch space (`SketchSpaceStage`); with a ``subset`` uplink (`coverage`) the
    plain mean is the coverage mean (`CoverageStage`; the config refused every other
    aggregation first, `config.coverage_refusal`)."""
    central = privacy.central if privacy is not None else None
    secure = privacy.secure if privacy is not None else None
    if coverage:
        if central is not None or secure is not None or hierarchy is not None or getattr(aggregator, "name", "mean") != "mean":
            raise ValueError(f"a subset uplink is averaged by coverage, which only the plain mean does; {what} is not it")
        if dim is None:
            raise ValueError("a coverage-mean pipeline needs the model's dimension")
        return CoverageStage(dim)
    if central is not None:
        inner = None
        if getattr(aggregator, "name", "mean") != "mean":
            check_dp_composable(aggregator, what)
            inner = aggregator
        stage: Stage = CentralDPStage(central, secure, inner, getattr(aggregator, "name", "mean"))
    elif secure is not None:
        stage = SecureSumStage(secure)
    elif hierarchy is not None:
        stage = HierarchyStage(hierarchy)
    else:
        stage = RuleStage(aggregator)
    if sketch is not None:
        if dim is None:
            raise ValueError("a sketch-space pipeline needs the model's dimension")
        stage = SketchSpaceStage(stage, sketch, dim)
    return stage


__all__ = [
    "Batch",
    "CentralDPStage",
    "CoverageStage",
    "DPComposeError",
    "HierarchyStage",
    "RuleStage",
    "SecureSumStage",
    "SketchSpaceStage",
    "Stage",
    "StageResult",
    "build_pipeline",
    "check_dp_composable",
]
