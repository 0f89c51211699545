"""The Coordinator: the one round engine.

select -> dispatch(task, deadline) -> collect -> validate -> aggregate ->
server optimizer -> evaluate -> hooks (monitors, guardrails) -> store.

It never knows whether a client is a Python object, a Ray actor or a phone on
gRPC: it sees a `Transport` that yields replies as they arrive.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..aggregation.pipeline import Batch, RuleStage
from ..compression import CodecChain
from ..config import RunConfig
from ..learners.base import FitConfig
from ..messages import Dropout, Task, Update
from ..task_spec import TaskSpec
from ..ops import RunStore
from ..params import PayloadError
from ..records import ClientRecord, RoundRecord, RunSummary
from ..validation import ValidationContext
from ..learners.scaffold import SERVER_KEY as SCAFFOLD_C
from .clock import VirtualClock
from .evaluation import Evaluator
from .intake import Collected, Intake, UpdateDecoder, client_record, collect
from .resume import load_side_state, resume, side_state
from .summary import summarize


class RoundHook(Protocol):
    """Called after each round with its record, before the store commits it.

    Monitors add measurements to ``record.extra`` and may read the round's raw
    material on the coordinator: ``last_updates`` (the accepted (n, d) matrix),
    ``last_weights`` (n,), ``last_aggregate`` (d,) and ``prev_params`` (d,), all
    None after a failed round.  Rows follow client ids, as do the accepted clients in
    ``record.clients`` (aggregation is independent of arrival order).  Guardrails may reject the round: call
    ``coordinator.restore(version, reason)``, which puts back that model version
    and marks the record ``rolled_back``.
    """

    def after_round(self, record: RoundRecord, coordinator: "Coordinator") -> None: ...


class Coordinator:
    def __init__(
        self,
        *,
        config: RunConfig,
        learner,
        transport,
        selector,
        aggregator,
        server_optimizer,
        validators: Sequence,
        downlink: CodecChain,
        uplink: CodecChain,
        evaluator: Evaluator,
        store: RunStore | None = None,
        hooks: Sequence[RoundHook] = (),
        clock: VirtualClock | None = None,
        privacy=None,
        weighting=None,
        schedules: dict | None = None,
        pipeline=None,
        driver=None,
        decoder=None,
        task_writers: Sequence = (),
    ):
        self.config = config
        self.learner = learner
        self.transport = transport
        self.selector = selector
        self.aggregator = aggregator
        # The server's aggregation: one composed stage (aggregation.pipeline.build_pipeline).
        self.pipeline = pipeline if pipeline is not None else RuleStage(aggregator)
        # What drives the rounds: synchronous rounds, or FedBuff's buffered asynchronous loop
        # (engine.fedbuff.FedBuffLoop), chosen by the factory; it uses this class's public API.
        self.driver = driver if driver is not None else SyncRounds
        self.server_optimizer = server_optimizer
        self.validators = list(validators)
        self.downlink = downlink
        self.uplink = uplink
        self.evaluator = evaluator
        self.store = store
        self.hooks = list(hooks)
        self.clock = clock if clock is not None else VirtualClock()
        self.privacy = privacy  # fleetlearn.privacy.PrivacyParts or None
        if weighting is None:
            from ..aggregation.weighting import ExampleWeighting

            weighting = ExampleWeighting(config.server.max_examples, config.server.max_examples_ratio)
        self.weighting = weighting
        self.schedules = schedules or {}
        self.task_writers = list(task_writers)  # the client-side features' server halves (engine.tasks)
        self.base_server_lr = server_optimizer.server_lr  # the schedule scales this
        self.client_lr = config.client.lr
        self._previous_aggregate: torch.Tensor | None = None
        norm_filter = None
        if config.server.max_norm_ratio is not None:
            from ..validation import RelativeNormFilter

            norm_filter = RelativeNormFilter(config.server.max_norm_ratio)
        # Decode and validate replies: the decoder is the run's payload shape (intake.py).
        self.intake = Intake(decoder if decoder is not None else UpdateDecoder(uplink, learner.spec.dim), validators, norm_filter)
        self.stopped_reason: str | None = None  # set when the run stops early (privacy budget)
        self.round_sampling: tuple[str, float] = ("poisson", 1.0)  # this round's (sampling kind, inclusion probability)
        self._pool: tuple[int, Any] | None = None  # (round, available clients) fixed when the budget was checked
        self.wait_for_clients: tuple[int, float] | None = None  # (min clients, timeout s) before each round
        self.server_steps: list = []  # parts that move the model after the server optimizer (FedDF)
        self.params = learner.init_params(config.seed)
        self.server_state = server_optimizer.init(self.params)
        self.scaffold = config.client.objective == "scaffold"
        if self.scaffold:  # SCAFFOLD's server control variate c rides in the server state (checkpoints, rollback)
            self.server_state = {**self.server_state, SCAFFOLD_C: torch.zeros_like(self.params)}
        self.client_states = None  # the simulation's ClientStateStore (set by the factory): checkpointed per round
        self.personal_states = None  # personal heads / models (personalization), checkpointed likewise
        self.version = 0
        self.max_version = 0  # versions only go up, also after a rollback (the registry's lineage)
        self.round = 0
        self.excluded_clients: set[int] = set()  # a guardrail may exclude flagged clients for a while
        self.monitoring = None  # fleetlearn.monitoring.MonitoringParts (set by the factory)
        self.clustering = None  # fleetlearn.clustering.Clustering (set by the factory) or None
        self.records: list[RoundRecord] = []
        self._task_cache: tuple[tuple[int, int], bytes] | None = None
        self._completions: list[np.ndarray] = []  # arrival times of recent rounds (adaptive deadline)
        # The last round's raw material, for monitors (see RoundHook).
        self.last_updates: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_aggregate: torch.Tensor | None = None
        self.prev_params: torch.Tensor | None = None
        # Recent good versions kept in memory so a guardrail can roll back without the store.
        self._versions: dict[int, tuple[torch.Tensor, dict]] = {0: (self.params, self.server_state)}
        self._current_record: RoundRecord | None = None

    KEEP_VERSIONS = 5  # good versions kept in memory for rollback

    # -- state -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.learner.spec.dim

    def fit_config(self) -> FitConfig:
        c = self.config.client
        mu = c.prox_mu if c.objective == "prox" else 0.0
        return FitConfig(c.local_epochs, c.local_steps, c.batch_size, self.client_lr, c.momentum, c.weight_decay, mu)

    def _apply_schedules(self, r: int) -> None:
        """This round's client and server learning rates (plateau watches the central loss)."""
        last_loss = next((x.loss for x in reversed(self.records) if not math.isnan(x.loss)), None)
        if "client" in self.schedules:
            self.client_lr = float(self.schedules["client"].lr_at(r, self.config.client.lr, last_loss))
        if "server" in self.schedules and self.base_server_lr is not None:
            self.server_optimizer.server_lr = float(self.schedules["server"].lr_at(r, self.base_server_lr, last_loss))

    def task_spec(self, cohort: Sequence[int] = (), deadline: float | None = None) -> TaskSpec:
        """What every client is told to do this round (travels inside the Task): the fit
        hyper-parameters and each client-side feature's entry (its `task_writers`)."""
        entries = (w.task_entry(self, cohort, deadline) for w in self.task_writers)
        return TaskSpec.of(self.fit_config(), *entries, seed=self.config.seed, partial_work=self.config.server.partial_work)

    def sampling(self, available, want: int) -> tuple[str, float]:
        """How this round's cohort is drawn from `available`: the selector's (kind,
        per-client inclusion probability).  The accountant composes exactly this; a
        selector that is not uniform says None and counts as every client in every
        round (no amplification; central DP refuses such selectors at build time)."""
        inc = self.selector.inclusion(available, want) if len(available) and want > 0 else None
        return inc if inc is not None else ("poisson", 1.0)

    def privacy_stop_reason(self, sampling: tuple[str, float]) -> str | None:
        if self.privacy is None:
            return None
        kind, q = sampling
        return self.privacy.budget_stop_reason(q, kind)

    def encoded_params(self) -> bytes:
        # The broadcast payload is encoded once per model version.
        vec = self.params
        if self.clustering is not None:  # clustered FL: only the models in use (CFL's first blocks)
            vec = self.clustering.broadcast(self.params, self.server_state)
        if self._task_cache is None or self._task_cache[0] != (self.version, vec.numel()):
            payload, _ = self.downlink.encode(vec)
            self._task_cache = ((self.version, vec.numel()), payload)
        return self._task_cache[1]

    def _encoded_control(self) -> bytes:
        """SCAFFOLD: the server control variate c as float32 (exact: the client's c_i update
        and the server's c update must use the same c); b"" without SCAFFOLD."""
        if not self.scaffold:
            return b""
        payload, _ = CodecChain().encode(self.server_state[SCAFFOLD_C])
        return payload

    # -- one round -----------------------------------------------------------------
    def selection_rng(self, r: int) -> np.random.Generator:
        """Selection randomness derived from (seed, round): a resumed run selects as an
        uninterrupted one would."""
        return np.random.default_rng([self.config.seed, 0x5E1EC7, r])

    def available(self, r: int):
        """The transport's available clients, less any a guardrail excluded."""
        available = self.transport.available(r)
        if self.excluded_clients:
            available = np.setdiff1d(np.asarray(available, dtype=np.int64), np.fromiter(self.excluded_clients, dtype=np.int64))
        return available

    def round_pool(self, r: int):
        """The pool round `r` draws its cohort from (`available`): the denominator of the
        round's privacy sampling rate.  Fixed once per round, so the budget check and the
        round see the same pool."""
        if self._pool is None or self._pool[0] != r:
            self._pool = (r, self.available(r))
        return self._pool[1]

    def clients_ready(self) -> bool:
        """Before a round: wait for `wait_for_clients` = (min clients, timeout s) when set.
        If they do not come, the run stops (`stopped_reason` says why) instead of recording
        rounds that end with nobody: waiting for clients never uses up rounds, and the run
        can be resumed."""
        if self.wait_for_clients is None:
            return True
        need, timeout = self.wait_for_clients
        got = len(self.transport.wait_available(need, timeout))
        if got >= need:
            self._pool = None  # the pool is read after the wait
            return True
        self.stopped_reason = (
            f"waited {timeout:g} s for {need} connected clients before round {self.round + 1}, {got} connected; "
            "no round was run (resume the run when clients are back)"
        )
        return False

    def deadline(self) -> float | None:
        """This round's deadline: fixed, or a quantile of recent completion times."""
        srv = self.config.server
        if srv.deadline_policy == "adaptive" and self._completions:
            recent = np.concatenate(self._completions[-srv.deadline_window:])
            if recent.size:
                return float(np.quantile(recent, srv.deadline_quantile) * srv.deadline_margin)
        return srv.deadline_s

    def run_round(self) -> RoundRecord:
        t_wall = time.perf_counter()
        self.last_updates = self.last_weights = self.last_aggregate = self.prev_params = None
        self.round += 1
        r = self.round
        self._apply_schedules(r)
        srv = self.config.server
        available = self.round_pool(r)
        want = min(math.ceil(srv.cohort * srv.over_selection), len(available))
        self.round_sampling = self.sampling(available, want)
        self._pool = None
        record = RoundRecord(round=r, version=self.version, sim_start_s=self.clock.now)
        if self.privacy is not None and self.privacy.accountant is not None:
            record.extra["dp_sampling"], record.extra["dp_sampling_rate"] = self.round_sampling
            record.extra["dp_pool"] = len(available)
        if want < srv.min_replies:
            record.status, record.reason = "failed", f"only {len(available)} clients available, min_replies is {srv.min_replies}"
            cohort: list[int] = []
        else:
            cohort = self.selector.select(available, want, r, self.selection_rng(r))
        deadline = self.deadline()
        task = Task(
            round=r,
            version=self.version,
            payload=self.encoded_params(),
            codec=self.downlink.spec,
            spec=self.task_spec(cohort, deadline),
            deadline_s=deadline,
            control=self._encoded_control(),
        )
        # How many accepted updates end the wait: the cohort (fixed-size), or what the Poisson draw
        # gave (its size varies around the expected cohort), within what the pipeline can sum.
        target = self.selector.target(len(cohort), srv.cohort, srv.over_selection)
        if self.pipeline.capacity is not None:
            target = min(target, self.pipeline.capacity)
        got = collect(self.transport, self.intake, task, cohort, target, self.dim) if cohort else Collected()
        record.selected = len(cohort)
        record.deadline_s = deadline if deadline is not None else math.nan
        record.clients = got.clients
        self.intake.filter_relative_norms(got)  # may turn accepted updates into rejected ones: count after it
        record.accepted = len(got.accepted)
        record.dropped = sum(c.status == "dropped" for c in got.clients)
        record.rejected = sum(c.status == "rejected" for c in got.clients)
        record.late = sum(c.status == "late" for c in got.clients)
        record.uplink_bytes = sum(c.uplink_bytes for c in got.clients)
        record.downlink_bytes = sum(c.downlink_bytes for c in got.clients)
        record.sim_seconds = got.end_s
        record.train_wall_seconds = float(self.transport.train_wall_seconds)
        if self.transport.last_malicious:
            record.extra["malicious"] = [int(c) for c in self.transport.last_malicious]  # simulated attackers in this cohort
        refusals = self.transport.take_refusals()
        if refusals is not None:
            record.extra["refusals"] = refusals  # refused messages by reason (network transports)
        arrivals = np.array([c.arrival_s for c in got.clients if c.status in ("accepted", "rejected", "late") and not math.isnan(c.arrival_s)])
        self._completions.append(arrivals)
        if arrivals.size:
            p50, p90, p99 = np.percentile(arrivals, [50, 90, 99])
            record.completion_p50_s, record.completion_p90_s, record.completion_p99_s = float(p50), float(p90), float(p99)

        if record.status == "failed":
            pass
        elif len(got.vecs) < srv.min_replies:
            record.status = "failed"
            record.reason = f"{len(got.vecs)} accepted updates, fewer than min_replies = {srv.min_replies}; model unchanged"
        else:
            self.aggregate(record, got)
        self.clock.advance(record.sim_seconds)
        return self.finish_record(record, t_wall)

    def finish_record(self, record: RoundRecord, t_wall: float) -> RoundRecord:
        """Evaluate, run the hooks, commit to the store: the end of every round (sync or async)."""
        r = record.round
        last = r == self.config.server.rounds
        if r % self.config.server.eval_every == 0 or last:
            record.loss, record.accuracy = self.evaluator.central(self.params)
            record.fed_accuracy, record.fed_accuracy_p10 = self.evaluator.federated(self.params)
        if last and self.evaluator.personalization is not None:
            personal = self.evaluator.personal(self.params, self.fit_config())
            if personal is not None:
                record.extra["personalization"] = personal
        self._current_record = record
        record.wall_seconds = time.perf_counter() - t_wall
        for hook in self.hooks:
            hook.after_round(record, self)
        self._current_record = None
        self.selector.observe(record)
        if record.status == "ok":
            self._versions[self.version] = (self.params, self.server_state)
            for v in sorted(self._versions)[: -self.KEEP_VERSIONS]:
                del self._versions[v]
        record.wall_seconds = time.perf_counter() - t_wall
        if self.store is not None:
            every = self.config.store.checkpoint_every
            save = (every and r % every == 0) or last
            meta = None
            side = self.side_state() if save else {}
            if side:
                # Per-client state (EF residuals, SCAFFOLD c_i, personal heads/models) and the
                # stateful parts' state (aggregator memory, lr schedules) go with the checkpoint:
                # written (and fsynced) before the round's transaction, named in its metadata.
                meta = self.store.write_client_states(r, side)
            # Spent privacy is committed in the round's own transaction, checkpoint or not.
            ledger = self.privacy.state_dict() if self.privacy is not None else None
            self.store.commit_round(record, self.params if save else None, self.server_state if save else None, meta, privacy=ledger)
            if meta is not None:
                self.store.prune_client_states(keep=meta)
        self.records.append(record)
        return record

    def restore(self, version: int | None = None, reason: str = "") -> int:
        """Put back a good model version (default: the last good one before the
        current) and its server-optimizer state; the round being finished is
        recorded as ``rolled_back``.  Versions come from memory, else from the store."""
        if version is None:
            older = [v for v in self._versions if v < self.version]
            if not older:
                raise ValueError("no earlier good version to restore")
            version = max(older)
        if version in self._versions:
            params, state = self._versions[version]
        elif self.store is not None:
            _, params, state = self.store.load_checkpoint(version)
        else:
            raise ValueError(f"model version {version} is not available for restore")
        self.params, self.server_state, self.version = params, dict(state), version
        rec = self._current_record
        if rec is not None:
            if rec.status == "ok" and rec.version != version:
                # The rejected version keeps its number and its metrics in the registry.
                rec.extra.update(rejected_version=rec.version, rejected_accuracy=rec.accuracy, rejected_loss=rec.loss)
            rec.status = "rolled_back"
            rec.reason = reason or f"rolled back to version {version}"
            rec.version = version
            rec.extra["restored_version"] = version
            rec.loss, rec.accuracy = self.evaluator.central(self.params)
            rec.fed_accuracy, rec.fed_accuracy_p10 = self.evaluator.federated(self.params)
        return version

    def accept(self, msg: Update, rec: ClientRecord, ctx: ValidationContext) -> torch.Tensor | None:
        """Decode and validate one update (FedBuff's intake, one reply at a time)."""
        return self.intake.accept(msg, rec, ctx)

    client_record = staticmethod(client_record)

    def example_weights(self, claims: Sequence[int]) -> np.ndarray:
        """Claimed example counts, capped so no client can buy itself more weight:
        at ``server.max_examples`` and at ``max_examples_ratio`` x the cohort median."""
        from ..aggregation.weighting import examples

        return examples(np.asarray(claims, dtype=np.float64), self.config.server.max_examples, self.config.server.max_examples_ratio)

    def cohort_weights(self, got: Collected, matrix: torch.Tensor) -> np.ndarray:
        """The weighting part's weights for the accepted updates."""
        from ..aggregation.weighting import CohortInfo

        info = CohortInfo(
            num_examples=np.asarray(got.claims, dtype=np.float64),
            loss_before=np.array([c.loss_before for c in got.accepted]),
            loss_after=np.array([c.loss_after for c in got.accepted]),
            updates=matrix,
            previous_aggregate=self._previous_aggregate,
            label_counts=_label_counts(got.accepted),
        )
        return np.asarray(self.weighting(info), dtype=np.float64)

    def aggregate(self, record: RoundRecord, got: Collected, scale: np.ndarray | None = None) -> None:
        """Aggregate the accepted updates and step the server optimizer.

        `scale` multiplies each update's weight without renormalising (FedBuff's
        staleness weights: a stale update moves the model less)."""
        # Rows in client-id order, not arrival order: float sums then do not depend on which
        # reply came first, so a network run reproduces (and a resumed run matches) exactly.
        order = sorted(range(len(got.accepted)), key=lambda i: got.accepted[i].client_id)
        if order != list(range(len(order))):
            got.take(order)
            if scale is not None:
                scale = np.asarray(scale)[order]
        # The record lists its clients in the same order, so the accepted ones in
        # record.clients are the rows of `last_updates` (monitors rely on it).
        record.clients.sort(key=lambda c: c.client_id)
        matrix = torch.stack(got.vecs)
        try:
            weights = self.cohort_weights(got, matrix)
        except ValueError as exc:
            record.status, record.reason = "failed", f"weighting: {exc}; model unchanged"
            return
        scaled = weights if scale is None else weights * scale
        norm_w = scaled / scaled.sum()
        for rec, w in zip(got.accepted, norm_w):
            rec.weight = float(w)
        batch = Batch(matrix, scaled, [c.client_id for c in got.accepted], got.payloads, record.round,
                      dropped=sum(c.status != "accepted" for c in record.clients))  # after SecAgg's key exchange
        try:
            res = self.pipeline.next(batch)  # the one call: the run's composed aggregation stages
        except ValueError as exc:  # e.g. a cohort too small for the rule's precondition
            record.status, record.reason = "failed", f"{self.pipeline.label}: {exc}; model unchanged"
            return
        record.extra.update(res.measurements)
        pseudo_gradient = res.aggregate
        if res.kept is not None:
            matrix, scaled, weights = self._lose_rows(record, got, res, matrix, scaled, weights)
        priv = self.privacy
        if priv is not None and priv.accountant is not None:
            # Privacy spent on this aggregate stays spent, whatever happens to the round next.
            kind, q = self.round_sampling
            spent = priv.record_round(q, kind)
            record.extra.update(spent.to_metrics())
        if scale is not None:
            pseudo_gradient = pseudo_gradient * float(scaled.sum() / weights.sum())
        new_params, new_state = self.server_optimizer.step(self.params, pseudo_gradient, self.server_state)
        for part in self.server_steps:  # e.g. FedDF: distil the cohort's models into new_params
            new_params = part.apply(self, record, got, matrix, new_params)
        if not bool(torch.isfinite(new_params).all()):
            record.status, record.reason = "failed", "the aggregate produced non-finite parameters; model unchanged"
            return
        if self.scaffold:
            new_state = {**new_state, SCAFFOLD_C: self._scaffold_control(matrix, got)}
        self.prev_params = self.params
        self.last_updates, self.last_aggregate = matrix, pseudo_gradient
        self._previous_aggregate = pseudo_gradient
        self.last_weights = torch.from_numpy(scaled / scaled.sum()).to(torch.float32)
        self.params, self.server_state = new_params, new_state
        record.parent_version = self.version
        self.max_version += 1
        self.version = self.max_version
        record.version = self.version
        norms = np.array([c.update_norm for c in got.accepted])
        record.update_norm_mean = float(norms.mean())
        record.update_norm_max = float(norms.max())
        loss_b = np.array([c.loss_before for c in got.accepted])
        loss_a = np.array([c.loss_after for c in got.accepted])
        acc = np.array([c.accuracy for c in got.accepted])
        record.train_loss_before = _nanmean(loss_b)
        record.train_loss_after = _nanmean(loss_a)
        record.local_accuracy = _nanmean(acc)
        personal = np.array([c.personal_accuracy for c in got.accepted])
        if not np.isnan(personal).all():
            glob = np.array([c.global_accuracy for c in got.accepted])
            record.personal_accuracy, record.personal_global_accuracy = _nanmean(personal), _nanmean(glob)
            record.personal_gain = record.personal_accuracy - record.personal_global_accuracy

    def _lose_rows(self, record: RoundRecord, got: Collected, res, matrix: torch.Tensor, scaled: np.ndarray, weights: np.ndarray):
        """Rows a stage could not use (a regional aggregator that failed): their clients are
        recorded as dropped with the stage's reason, and the rest keep their share.
        Returns the matrix and weights of the rows that reached the aggregate."""
        for i, (rec, kept) in enumerate(zip(got.accepted, res.kept)):
            if not kept:
                rec.status, rec.reason, rec.weight = "dropped", res.lost_reason(i) if res.lost_reason else "update lost", 0.0
        keep = np.flatnonzero(res.kept)
        got.take(keep)
        lost = len(res.kept) - len(keep)
        record.accepted -= lost
        record.dropped += lost
        scaled, weights = scaled[keep], weights[keep]
        for rec, w in zip(got.accepted, scaled / scaled.sum()):
            rec.weight = float(w)
        return matrix[torch.from_numpy(keep)], scaled, weights

    def _scaffold_control(self, matrix: torch.Tensor, got: Collected) -> torch.Tensor:
        """SCAFFOLD option II on the server: c + (|S|/N) mean_i delta_c_i, with each delta_c_i
        recovered from the accepted (decoded) delta and its reported steps."""
        from ..learners.scaffold import control_deltas, server_control_step

        c = self.server_state[SCAFFOLD_C]
        steps = [c_.steps for c_ in got.accepted]
        dc = control_deltas(matrix, steps, self.client_lr, self.config.client.momentum, c)
        return server_control_step(c, dc, self.transport.population)

    # -- resume (engine/resume.py) ---------------------------------------------------
    def side_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs besides the model and server state (`resume.side_state`)."""
        return side_state(self)

    def load_side_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_side_state(self, tensors)

    def resume(self) -> int:
        """Continue a stored run from its last committed round (`resume.resume`); returns that round."""
        return resume(self)

    # -- the run -------------------------------------------------------------------
    @contextmanager
    def running(self) -> Iterator[None]:
        """While a run executes: its torch threads (`engine.threads`) and its monitoring
        (Prometheus endpoint); both are put back afterwards."""
        threads_before = torch.get_num_threads()
        threads = run_threads(self.config.engine.threads, self.dim)
        if threads:
            torch.set_num_threads(threads)
        if self.monitoring is not None:
            self.monitoring.start()
        try:
            yield
        finally:
            if self.monitoring is not None:
                self.monitoring.stop()
            torch.set_num_threads(threads_before)

    def budget_exhausted(self) -> bool:
        """True (and `stopped_reason` set) when the next round, at the sampling rate of the
        pool it will draw from, would take the privacy spent past its budget: the run
        stops cleanly before that round."""
        if self.privacy is None or self.privacy.settings.budget_epsilon is None:
            return False
        srv = self.config.server
        available = self.round_pool(self.round + 1)
        want = min(math.ceil(srv.cohort * srv.over_selection), len(available))
        reason = self.privacy_stop_reason(self.sampling(available, want))
        if reason is not None:
            self.stopped_reason = reason
        return reason is not None

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> RunSummary:
        with self.running():
            return self._run(on_round)

    def _run(self, on_round: Callable[[RoundRecord], Any] | None) -> RunSummary:
        t0 = time.perf_counter()
        self.driver(self).run(on_round)
        return self.summary(time.perf_counter() - t0)

    def summary(self, wall_seconds: float) -> RunSummary:
        """The run's summary (also written to the store when there is one)."""
        return summarize(self, wall_seconds)


class SyncRounds:
    """The synchronous driver: one round after another until `server.rounds`, each after
    the clients are ready (`clients_ready`) and while the privacy budget allows it."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> None:
        c = self.c
        while c.round < c.config.server.rounds:
            if not c.clients_ready() or c.budget_exhausted():
                break
            record = c.run_round()
            if on_round is not None:
                on_round(record)


AUTO_THREADS_MAX_DIM = 100_000  # engine.threads = "auto": one thread up to this many parameters


def run_threads(setting: int | str, dim: int) -> int:
    """The torch intra-op threads for a run (0: leave torch's setting alone)."""
    if setting == "auto":
        return 1 if dim <= AUTO_THREADS_MAX_DIM else 0
    return int(setting)

def _label_counts(accepted: Sequence[ClientRecord]) -> np.ndarray | None:
    """The accepted clients' label histograms as (n, C), or None unless every one sent one."""
    counts = [c.label_counts for c in accepted]
    if not counts or any(h is None for h in counts) or len({len(h) for h in counts}) != 1:
        return None
    return np.asarray(counts, dtype=np.float64)


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan
