"""Canary rollouts: a candidate configuration trains beside production, on disjoint
clients, until a stated rule promotes it or rolls it back.

One round engine: `CanaryRollout` drives two `Coordinator`s built by
`build_coordinator` from the production configuration and from the candidate's
(production plus ``canary.set`` overrides: another client lr, codec, aggregator...).

- **Split.**  At the canary's start a seeded ``canary.fraction`` of the population
  (`split_clients` over the transport's ``client_ids()``) trains only the candidate,
  the rest only production (`RestrictedSelector`); the cohort is split the same way
  (candidate: ``max(1, round(cohort x fraction))`` clients a round).
- **Transport.**  The simulation builds the candidate its own simulated transport
  over the same population; a run on a real fleet (``transport_factory``: the gRPC
  server) gives the candidate production's transport, so both arms dispatch the
  round, one after the other, to their own clients with their own task.
- **Start.**  At ``canary.start_round`` the candidate starts from production's
  current model (server-optimizer state copied when both use the same optimizer).
  Both arms share one monotonic version counter, so the registry's versions stay
  unique and each candidate version's parent is the version it trained from.
- **Rule.**  Each canary round both models are evaluated on the same held-out set.
  After ``canary.rounds`` rounds, with ``m`` the mean of ``canary.metric`` over the
  last ``canary.window`` of them: promote iff ``m_candidate >= m_production + margin``
  (accuracy) or ``m_candidate <= m_production - margin`` (loss).  A candidate round
  that fails or is rolled back by the candidate's own guardrail, or a non-finite
  candidate metric, rolls the candidate back at once.
- **Promote** (mode canary): the candidate coordinator becomes production (its
  configuration, model and parts) and takes the whole population and cohort again;
  the run store records its later versions with the candidate's config hash.
  **Roll back**: production takes the whole population and cohort again; the
  candidate's versions are tagged ``rolled_back``.  **Shadow** (mode shadow): the
  rule is evaluated and recorded but the candidate never ships.
- **Records.**  Every canary round's production record carries
  ``extra["canary"]`` (both arms' metrics); the decision round also the decision.
  Candidate versions are registered (``arm`` canary or shadow, tags ``canary`` or
  ``candidate``, their checkpoints); a promoted candidate's last version is tagged
  ``production``.  Decisions are also kept in ``canary.json`` in the run directory,
  and the candidate's configuration in ``canary/<config hash>.toml``.

Caveat: with a small ``fraction`` the candidate trains on fewer clients a round
than production, which the rule does not correct for; use a margin, or a fraction
near 0.5 for a like-for-like comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import ConfigError, RunConfig, candidate_config
from ..data import load_federated
from ..records import RoundRecord, RunSummary
from ..selection import RestrictedSelector
from .coordinator import Coordinator
from .running import budget_exhausted, clients_ready

CANARY_KEY = "canary"


@dataclass
class CanaryDecision:
    round: int
    mode: str
    decision: str  # promote | rollback | shadow_pass | shadow_fail
    metric: str
    production: float
    candidate: float
    margin: float
    rounds: int  # candidate rounds trained
    overrides: list[str]
    candidate_config_hash: str
    candidate_versions: list[int]
    reason: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("production", "candidate"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


def split_population(population: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(production ids, candidate ids): a seeded ``round(fraction x population)`` (at least 1) for the candidate."""
    return split_clients(np.arange(population, dtype=np.int64), fraction, seed)


def split_clients(ids, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_population` over the transport's client ids (`Transport.client_ids`: the
    simulation's 0..N-1, the gRPC server's token ids): the candidate gets the ids at the
    positions the rule draws for ``len(ids)`` clients, in ascending id order."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    population = len(ids)
    n = min(population - 1, max(1, int(round(fraction * population))))
    if n < 1:  # a single client: nobody left for production
        return ids, ids[:0]
    rng = np.random.default_rng([seed, 0xCA7A])
    cand = ids[np.sort(rng.choice(population, size=n, replace=False))]
    return np.setdiff1d(ids, cand), cand


class CanaryRollout:
    """Run a configuration with a ``[canary]`` section: production, a canary beside it
    for ``canary.rounds`` rounds, the decision, then the chosen configuration to the end.
    The same surface as a `Coordinator` for its callers: ``run``, ``store``, ``summary``."""

    def __init__(self, config: RunConfig, store=True, hooks: list | None = None, data=None, transport_factory=None):
        from .factory import build_coordinator

        c = config.canary
        if not c.set:
            raise ConfigError("canary.set is empty: nothing to roll out")
        self.config = config
        self.data = data if data is not None else load_federated(config.data, config.seed)
        self.candidate_cfg = candidate_config(config)
        self.candidate_hash = self.candidate_cfg.digest()
        srv = config.server
        self.full_cohort, self.full_min_replies = srv.cohort, srv.min_replies
        self.cand_cohort = max(1, int(round(srv.cohort * c.fraction)))
        self.prod_cohort = srv.cohort - self.cand_cohort
        if self.prod_cohort < max(1, srv.min_replies):
            raise ConfigError(f"canary.fraction = {c.fraction}: leaves production {self.prod_cohort} clients a round, "
                              f"fewer than server.min_replies = {srv.min_replies} (or 1)")
        if c.start_round + c.rounds - 1 > srv.rounds:
            raise ConfigError(f"canary.start_round = {c.start_round} + canary.rounds = {c.rounds} run past server.rounds = {srv.rounds}")
        self.production: Coordinator = build_coordinator(config, store=store, hooks=hooks, data=self.data, transport_factory=transport_factory)
        self._build = build_coordinator
        # A real fleet (`transport_factory`, e.g. the gRPC server): both arms dispatch over the one
        # transport, to disjoint clients, each its own task (model, version, fit config).  The
        # simulation builds the candidate its own simulated transport over the same population.
        self._shared_transport = transport_factory is not None
        self.prod_ids = self.cand_ids = np.zeros(0, dtype=np.int64)  # the arms, split at the canary's start
        if self.production.store is not None:  # the registry names versions by config hash: keep the config it stands for
            folder = self.production.store.run_dir / "canary"
            folder.mkdir(exist_ok=True)
            (folder / f"{self.candidate_hash}.toml").write_text(self.candidate_cfg.to_toml())
        self.candidate: Coordinator | None = None
        self.decisions: list[CanaryDecision] = []
        self._history: list[dict[str, Any]] = []
        self._pending: str | None = None  # the decision taken in the round being finished
        self._cand_versions: list[int] = []
        self._cand_record: RoundRecord | None = None
        self.production.hooks.append(self)  # last: sees the round as finally recorded

    # -- the Coordinator surface ---------------------------------------------------------
    @property
    def store(self):
        return self.production.store

    @property
    def records(self) -> list[RoundRecord]:
        return self.production.records

    def summary(self, wall_seconds: float) -> RunSummary:
        return self.production.summary(wall_seconds)

    @property
    def transport(self):
        return self.production.transport

    @property
    def wait_for_clients(self) -> tuple[int, float] | None:
        """(min clients, timeout s) before each round (`fleetlearn server --min-clients`)."""
        return self.production.wait_for_clients

    @wait_for_clients.setter
    def wait_for_clients(self, value: tuple[int, float] | None) -> None:
        self.production.wait_for_clients = value

    @property
    def stopped_reason(self):
        return self.production.stopped_reason

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> RunSummary:
        # Production's threads and monitoring for the whole rollout.  A promotion makes the
        # candidate production, so `self.production` is read afresh every round.
        with self.production.running() as heap:
            t0 = time.perf_counter()
            after_round = heap.after_rounds(on_round)
            while self.production.round < self.config.server.rounds:
                if not clients_ready(self.production) or budget_exhausted(self.production):
                    break
                after_round(self.step())
            return self.production.summary(time.perf_counter() - t0)

    # -- one round ------------------------------------------------------------------------
    def step(self) -> RoundRecord:
        c = self.config.canary
        r = self.production.round + 1
        if self.candidate is None and not self.decisions and r == c.start_round:
            self._start()
        if self.candidate is not None:
            cand = self.candidate
            cand.max_version = max(cand.max_version, self.production.max_version)
            cand_record = cand.run_round()
            self.production.max_version = max(self.production.max_version, cand.max_version)
            self._register(cand_record)
            self._cand_record = cand_record
        record = self.production.run_round()  # the hook below decides, inside the round
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None
        return record

    def _start(self) -> None:
        prod = self.production
        cfg = self.candidate_cfg
        cfg.server.cohort = self.cand_cohort
        cfg.server.min_replies = min(self.full_min_replies, self.cand_cohort)
        shared = (lambda learner, device: prod.transport) if self._shared_transport else None
        cand = self._build(cfg, store=False, data=self.data, transport_factory=shared)
        cand.params, cand.version, cand.round = prod.params, prod.version, prod.round
        cand.max_version = prod.max_version
        if type(cand.server_optimizer) is type(prod.server_optimizer):
            # Production's moments, the candidate's own learning rate and schedule (its config's).
            cand.server_state = cand.server_optimizer.lr.carry(dict(prod.server_state), cand.server_state)
        else:
            cand.server_state = cand.server_optimizer.init(prod.params)
        cand.versions.reset(cand.version, cand.params, cand.server_state)
        cand.clock.now = prod.clock.now
        self.prod_ids, self.cand_ids = split_clients(prod.transport.client_ids(), self.config.canary.fraction, self.config.seed)
        cand.selector = RestrictedSelector(cand.selector, self.cand_ids)
        prod.config.server.cohort = self.prod_cohort
        prod.selector = RestrictedSelector(prod.selector, self.prod_ids)
        self.candidate = cand
        self._history, self._cand_versions = [], []

    def _register(self, rec: RoundRecord) -> None:
        store = self.production.store
        if rec.status == "ok":
            self._cand_versions.append(rec.version)
        if store is None:
            return
        from ..ops import ModelRegistry

        mode = self.config.canary.mode
        reg = ModelRegistry(store)
        reg.register(rec, self.candidate_hash, mode, params=self.candidate.params, state=self.candidate.server_state)
        if rec.status == "ok":
            reg.tag(rec.version, "canary" if mode == "canary" else "candidate", f"{mode} of {self.config.canary.set}")

    # -- the hook: compare and decide inside the production round -----------------------------
    def after_round(self, record: RoundRecord, coordinator: Coordinator) -> None:
        if self.candidate is None or coordinator is not self.production:
            return
        c = self.config.canary
        cand_rec = self._cand_record
        assert cand_rec is not None
        prod_val = self._metric(record, self.production)
        cand_val = self._metric(cand_rec, self.candidate)
        entry = {"round": record.round, "production": _none(prod_val), "candidate": _none(cand_val),
                 "candidate_version": cand_rec.version, "candidate_status": cand_rec.status,
                 "production_clients": record.selected, "candidate_clients": cand_rec.selected,
                 "candidate_cohort": sorted(int(x.client_id) for x in cand_rec.clients)}
        self._history.append(entry)
        info: dict[str, Any] = {"mode": c.mode, "metric": c.metric, **entry}
        broken = cand_rec.status != "ok" or not math.isfinite(cand_val)
        if broken or len(self._history) >= c.rounds:
            window = self._history[-c.window:]
            p = _mean([h["production"] for h in window])
            q = _mean([h["candidate"] for h in window])
            if broken:
                better, why = False, f"candidate round {record.round} {cand_rec.status}" + (f": {cand_rec.reason}" if cand_rec.reason else "") + (f", {c.metric} {cand_val}" if not math.isfinite(cand_val) else "")
            else:
                better = (q >= p + c.margin) if c.metric == "accuracy" else (q <= p - c.margin)
                op = ">=" if better else "<"
                if c.metric == "loss":
                    op = "<=" if better else ">"
                    why = f"candidate {c.metric} {q:.4f} {op} production {p:.4f} - margin {c.margin:g} over the last {len(window)} rounds"
                else:
                    why = f"candidate {c.metric} {q:.4f} {op} production {p:.4f} + margin {c.margin:g} over the last {len(window)} rounds"
            if c.mode == "canary":
                decision = "promote" if better else "rollback"
            else:
                decision = "shadow_pass" if better else "shadow_fail"
            d = CanaryDecision(record.round, c.mode, decision, c.metric, p, q, c.margin, len(self._history), list(c.set),
                               self.candidate_hash, list(self._cand_versions), why, list(self._history))
            self.decisions.append(d)
            info["decision"] = d.to_dict()
            self._pending = decision
        record.extra[CANARY_KEY] = info

    def _metric(self, record: RoundRecord, coord: Coordinator) -> float:
        v = record.loss if self.config.canary.metric == "loss" else record.accuracy
        if math.isnan(v):  # not evaluated this round (eval_every): evaluate now
            loss, acc = coord.evaluator.central(coord.params)
            v = loss if self.config.canary.metric == "loss" else acc
        return float(v)

    # -- after the decision ---------------------------------------------------------------
    def _apply(self, decision: str) -> None:
        prod, cand = self.production, self.candidate
        assert cand is not None
        d = self.decisions[-1]
        store = prod.store
        reg = None
        if store is not None:
            from ..ops import ModelRegistry

            reg = ModelRegistry(store)
        if decision == "promote":
            cand.store = prod.store
            cand.records = prod.records
            cand.monitoring = prod.monitoring
            exporter = getattr(prod.monitoring, "exporter", None) if prod.monitoring is not None else None
            cand.hooks = [h for h in cand.hooks if not _is_exporter(h)] + ([exporter] if exporter is not None else [])
            cand.selector = cand.selector.inner
            cand.config.server.cohort = self.full_cohort
            cand.config.server.min_replies = self.full_min_replies
            cand.wait_for_clients = prod.wait_for_clients
            cand.clock.now = max(cand.clock.now, prod.clock.now)
            cand.max_version = max(cand.max_version, prod.max_version)
            if store is not None:
                store.config_hash = self.candidate_hash
                if reg is not None and cand.version in self._cand_versions:
                    reg.tag(cand.version, "production", f"canary promoted: {d.reason}")
            self.production = cand
            if not self._shared_transport:
                prod.transport.close()  # the old production arm's own transport (e.g. its Ray workers)
        else:
            prod.selector = prod.selector.inner
            prod.config.server.cohort = self.full_cohort
            if reg is not None and decision in ("rollback", "shadow_fail"):
                for v in self._cand_versions:
                    reg.tag(v, "rolled_back", f"{d.mode} {decision}: {d.reason}")
        if decision != "promote" and not self._shared_transport:
            cand.transport.close()  # the candidate arm's own transport, discarded with it
        self.candidate = None
        if store is not None:
            store.write_json("canary.json", [x.to_dict() for x in self.decisions])


def _is_exporter(hook: Any) -> bool:
    from ..monitoring.prometheus import PrometheusExporter

    return isinstance(hook, PrometheusExporter)


def _none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean(xs: list) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(vals)) if vals else math.nan


def build_run(config: RunConfig, store=True, hooks: list | None = None, data=None, transport_factory=None):
    """What `fleetlearn run` and `fleetlearn server` drive: a `Coordinator`, or a
    `CanaryRollout` (two of them) when ``[canary] set`` names a candidate configuration.
    Both offer ``run(on_round)``, ``store``, ``transport``, ``wait_for_clients`` and
    ``summary(wall_seconds)``.  `transport_factory`: as `build_coordinator`'s (the gRPC
    server); a canary's two arms then share the one transport."""
    if config.canary.set:
        return CanaryRollout(config, store=store, hooks=hooks, data=data, transport_factory=transport_factory)
    from .factory import build_coordinator

    return build_coordinator(config, store=store, hooks=hooks, data=data, transport_factory=transport_factory)
