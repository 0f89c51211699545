"""The Coordinator: the one round engine, its loop and its state.

select -> dispatch(task, deadline) -> collect -> validate -> aggregate ->
server optimizer -> evaluate -> hooks (monitors, guardrails) -> store.

It never knows whether a client is a Python object, a Ray actor or a phone on
gRPC: it sees a `Transport` that yields replies as they arrive.  What a round does
between its ends lives next to it: the intake of replies (intake.py), the server's
step (step.py: weights, the aggregation pipeline, the server optimizer), rollback
(versions.py), checkpoints and resume (resume.py), the drivers' frame (running.py).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..aggregation.pipeline import RuleStage
from ..aggregation.weighting import ExampleWeighting
from ..compression import CodecChain
from ..config import RunConfig
from ..learners.base import FitConfig
from ..learners.scaffold import SERVER_KEY as SCAFFOLD_C
from ..messages import Task, Update
from ..task_spec import TaskSpec
from ..ops import RunStore
from ..records import ClientRecord, RoundRecord, RunSummary
from ..validation import RelativeNormFilter, ValidationContext
from .clock import VirtualClock
from .evaluation import Evaluator
from .intake import Collected, Intake, UpdateDecoder, client_record, collect, round_deadline, tally
from .phases import PHASES_KEY, PhaseTimer, phase_of
from .resume import commit, load_side_state, resume, side_state
from .running import SyncRounds, running, sampling
from .step import aggregate
from .summary import summarize
from .versions import Versions, restore


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
        client_schedule=None,
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
        # An optax-style transform: its learning rate and schedule are entries of server_state.
        self.server_optimizer = server_optimizer
        self.validators = list(validators)
        self.downlink = downlink
        self.uplink = uplink
        self.evaluator = evaluator
        self.store = store
        self.hooks = list(hooks)
        self.clock = clock if clock is not None else VirtualClock()
        self.privacy = privacy  # fleetlearn.privacy.PrivacyParts or None
        self.weighting = weighting if weighting is not None else ExampleWeighting(config.server.max_examples, config.server.max_examples_ratio)
        self.client_schedule = client_schedule  # the client lr's schedule (aggregation.schedules) or None
        self.task_writers = list(task_writers)  # the client-side features' server halves (engine.tasks)
        self.client_lr = config.client.lr
        self._previous_aggregate: torch.Tensor | None = None
        norm_filter = RelativeNormFilter(config.server.max_norm_ratio) if config.server.max_norm_ratio is not None else None
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
        self.versions = Versions(0, self.params, self.server_state)
        self.current_record: RoundRecord | None = None  # the round the hooks are finishing (restore marks it)
        self.phases = PhaseTimer()  # wall seconds per phase of the round (engine/phases.py)

    # -- state -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.learner.spec.dim

    def fit_config(self) -> FitConfig:
        c = self.config.client
        mu = c.prox_mu if c.objective == "prox" else 0.0
        return FitConfig(c.local_epochs, c.local_steps, c.batch_size, self.client_lr, c.momentum, c.weight_decay, mu)

    def _apply_schedules(self, r: int) -> None:
        """This round's learning rates: the client's, and the server optimizer's schedule
        step on its own state (reduce-on-plateau watches the last central loss)."""
        last_loss = next((x.loss for x in reversed(self.records) if not math.isnan(x.loss)), None)
        if self.client_schedule is not None:
            self.client_lr = float(self.client_schedule.lr_at(r, self.config.client.lr, last_loss))
        self.server_state = self.server_optimizer.lr.at_round(self.server_state, r, last_loss)

    def task_spec(self, cohort: Sequence[int] = (), deadline: float | None = None) -> TaskSpec:
        """What every client is told to do this round (travels inside the Task): the fit
        hyper-parameters and each client-side feature's entry (its `task_writers`)."""
        entries = (w.task_entry(self, cohort, deadline) for w in self.task_writers)
        return TaskSpec.of(self.fit_config(), *entries, seed=self.config.seed, partial_work=self.config.server.partial_work)

    def note_completions(self, arrivals: np.ndarray) -> None:
        """Keep one round's (or FedBuff step's) arrival times for the adaptive deadline: the
        last `server.deadline_window` of them, all that `round_deadline` reads."""
        self._completions.append(arrivals)
        del self._completions[:-self.config.server.deadline_window]

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

    def run_round(self) -> RoundRecord:
        t_wall = time.perf_counter()
        timer = self.phases
        timer.begin()
        self.last_updates = self.last_weights = self.last_aggregate = self.prev_params = None
        self.round += 1
        r = self.round
        with timer("select"):
            self._apply_schedules(r)
            srv = self.config.server
            available = self.round_pool(r)
            want = min(math.ceil(srv.cohort * srv.over_selection), len(available))
            self.round_sampling = sampling(self.selector, available, want)
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
            deadline = round_deadline(srv, self._completions)
            task = Task(round=r, version=self.version, payload=self.encoded_params(), codec=self.downlink.spec,
                        spec=self.task_spec(cohort, deadline), deadline_s=deadline, control=self._encoded_control())
            # How many accepted updates end the wait: the cohort (fixed-size), or what the Poisson draw
            # gave (its size varies around the expected cohort), within what the pipeline can sum.
            target = self.selector.target(len(cohort), srv.cohort, srv.over_selection)
            if self.pipeline.capacity is not None:
                target = min(target, self.pipeline.capacity)
        t_collect = time.perf_counter()
        got = collect(self.transport, self.intake, task, cohort, target, self.dim) if cohort else Collected()
        record.selected = len(cohort)
        record.deadline_s = deadline if deadline is not None else math.nan
        self.intake.filter_relative_norms(got)  # may turn accepted updates into rejected ones: count after it
        self.note_completions(tally(record, got, self.transport))
        # Collecting ran the transport's dispatch: its training and encoding are phases of their own.
        trained = float(self.transport.train_wall_seconds) if cohort else 0.0
        encoded = float(self.transport.encode_wall_seconds) if cohort else 0.0
        timer.add("train", trained)
        timer.add("encode", encoded)
        timer.add("intake", max(0.0, time.perf_counter() - t_collect - trained - encoded))
        if record.status == "failed":
            pass
        elif len(got.vecs) < srv.min_replies:
            record.status = "failed"
            record.reason = f"{len(got.vecs)} accepted updates, fewer than min_replies = {srv.min_replies}; model unchanged"
        else:
            with timer("aggregate"):
                self.aggregate(record, got)
        self.clock.advance(record.sim_seconds)
        return self.finish_record(record, t_wall)

    def finish_record(self, record: RoundRecord, t_wall: float) -> RoundRecord:
        """Evaluate, run the hooks, commit to the store: the end of every round (sync or async)."""
        timer = self.phases
        r = record.round
        last = r == self.config.server.rounds
        if r % self.config.server.eval_every == 0 or last:
            with timer("evaluate"):
                record.loss, record.accuracy, scores = self.evaluator.central_scores(self.params)
                record.extra.update(scores)
                record.fed_accuracy, record.fed_accuracy_p10 = self.evaluator.federated(self.params)
        if last and self.evaluator.personalization is not None:
            with timer("evaluate"):
                personal = self.evaluator.personal(self.params, self.fit_config())
            if personal is not None:
                record.extra["personalization"] = personal
        self.current_record = record
        record.wall_seconds = time.perf_counter() - t_wall
        for hook in self.hooks:
            with timer(phase_of(hook)):
                hook.after_round(record, self)
        self.current_record = None
        self.selector.observe(record)
        if record.status == "ok":
            self.versions.add(self.version, self.params, self.server_state)
        record.wall_seconds = time.perf_counter() - t_wall
        record.extra[PHASES_KEY] = timer.snapshot()
        if self.store is not None:
            with timer("commit"):
                commit(self, record, last)
        timer.end()
        self.records.append(record)
        return record

    @property
    def phase_log(self) -> list[dict[str, float]]:
        """Wall seconds per phase of the recent rounds, the commit included (engine/phases.py)."""
        return list(self.phases.log)

    def restore(self, version: int | None = None, reason: str = "") -> int:
        """Put back a good model version (default: the last good one before the current) and
        its server-optimizer state, from memory or else the store; the round being finished
        is recorded as ``rolled_back`` (`versions.restore`)."""
        return restore(self, version, reason)

    def accept(self, msg: Update, rec: ClientRecord, ctx: ValidationContext) -> torch.Tensor | None:
        """Decode and validate one update (FedBuff's intake, one reply at a time)."""
        return self.intake.accept(msg, rec, ctx)

    client_record = staticmethod(client_record)

    def example_weights(self, claims: Sequence[int]) -> np.ndarray:
        """Claimed example counts, capped so no client can buy itself more weight:
        at ``server.max_examples`` and at ``max_examples_ratio`` x the cohort median."""
        from ..aggregation.weighting import examples

        return examples(np.asarray(claims, dtype=np.float64), self.config.server.max_examples, self.config.server.max_examples_ratio)

    def aggregate(self, record: RoundRecord, got: Collected, scale: np.ndarray | None = None) -> None:
        """Aggregate the accepted updates and step the server optimizer (`step.aggregate`).
        `scale` multiplies each update's weight without renormalising (FedBuff's staleness)."""
        aggregate(self, record, got, scale)

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
    def running(self):
        """While a run executes: its torch threads, monitoring and frozen heap (`running.running`)."""
        return running(self)

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> RunSummary:
        with self.running() as heap:
            t0 = time.perf_counter()
            try:
                self.driver(self).run(heap.after_rounds(on_round))
            except BaseException:
                if self.store is not None:
                    self.store.writer.wait()  # the last round's commit finishes; the run's own error is raised
                raise
            if self.store is not None:
                self.store.flush()  # every round is committed before the run returns
            return self.summary(time.perf_counter() - t0)

    def summary(self, wall_seconds: float) -> RunSummary:
        """The run's summary (also written to the store when there is one)."""
        return summarize(self, wall_seconds)
