"""The client device: the one client side of a round, for every backend.

    Task -> params (downlink codec) -> the task spec's client-side features -> Learner
    -> delta -> uplink codec chain -> Update

`Device.train` runs a cohort of clients through local training (one batched computation
when the learner can; a gRPC client is a cohort of one), `Device.encode` turns the
results into Updates.  The simulation, the Ray workers and `fleetlearn client` all call
these two methods: no transport keeps its own copy of the client round.  Between the two
a simulation may act on the results (a simulated attacker replaces its delta: it sees the
whole cohort, so attackers may collude) and choose each client's adaptive-compression rung
(it depends on the client's processed samples).  A red-team device (`fleetlearn client
--attack`) carries its own attack part (`attack`, a fleetlearn.attacks.DeviceAttack) and
applies it at the same two points: poisoned data before training, its own update after
training, before encoding.

What the device does for each feature is read from the task's typed spec
(`fleetlearn.task_spec`): clustered FL's candidates, oversampling, SCAFFOLD's control
variate, personalization, local DP, label histograms, adaptive rungs.

Per-client state that must survive between rounds (error-feedback residuals, SCAFFOLD's
c_i, stochastic-codec streams) lives in a `ClientStateStore` (`client.state_store`: a
bounded memory over a SQLite file, so it grows with the cohort, not the population), read
only for the cohort; personal heads/models in a second one (`personal_states`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..compression import CodecChain
from ..compression.codec import RNG_SEED
from ..learners.base import ClientData, FitConfig, FitResult
from ..learners.scaffold import CLIENT_KEY, control_deltas
from ..messages import ClientMetrics, Dropout, Task, Update
from ..task_spec import ClusteringEntry, LabelHistogramEntry, LocalDPEntry, OversampleEntry
from .state_store import ClientStateStore


@dataclass
class Trained:
    """A cohort's local training, before its updates are encoded."""

    clients: list[int]
    results: list[FitResult]
    own: Sequence[ClientData]  # each client's own data (its claim and its label histogram)
    added: list[int]  # examples oversampling added per client (0: none)


class Device:
    """One client device (or a batched cohort of them): runs a Task into Updates.

    `learner` trains; `uplink`/`downlink` are the run's codec chains; `states` holds
    per-client codec and SCAFFOLD state, `personal_states` personalization's; `seed` is
    the device's own randomness (local DP noise, stochastic codecs); `adaptive` the
    adaptive-compression ladder; `personalization` the personalization part;
    `num_classes` bounds labels for oversampling (default: the largest label + 1);
    `attack` makes the device malicious (a red-team client, fleetlearn.attacks.DeviceAttack)."""

    def __init__(
        self, learner, uplink: CodecChain, downlink: CodecChain, states: ClientStateStore | None = None, seed: int = 0,
        adaptive=None, personalization=None, num_classes: int | None = None, attack=None,
    ):
        self.learner = learner
        self.uplink = uplink
        self.downlink = downlink
        self.states = states if states is not None else ClientStateStore()
        self.seed = seed
        # The model dimension: a payload claiming another is refused before allocation.
        self.dim = int(learner.spec.dim)
        self.adaptive = adaptive  # fleetlearn.compression.AdaptiveCompression or None
        # fleetlearn.client.personalization part or None; its per-client state (FedPer heads,
        # Ditto models) in a store of its own, apart from the codec state.
        self.personalization = personalization
        self.personal_states = ClientStateStore()
        self.num_classes = num_classes
        # fleetlearn.attacks.DeviceAttack or None: poison_data before training, apply_results after.
        self.attack = attack
        # Secure aggregation over a network: each client's outgoing update stays here (its
        # Update carries no payload) until the SecAgg stages mask it (`take_held`).
        self.held: dict[int, torch.Tensor] = {}
        # The Learner protocol's optional flag: HeteroFL trains each client at its own width.
        self._by_id = bool(getattr(learner, "needs_client_ids", False))

    # -- the round -------------------------------------------------------------------------
    def train(
        self, task: Task, clients: Sequence[int], data: Sequence[ClientData], seeds: Sequence[int],
        step_limits: Sequence[int | None] | None = None,
    ) -> Trained:
        """Local training of `clients` (their `data`, one seed each) on `task`.  Raises
        ValueError for a task this device cannot use (a payload or control variate of
        another model, a clustered task for an unclustered model)."""
        clients = [int(c) for c in clients]
        params, hp = self.receive(task)
        spec = task.spec
        kwargs: dict = {}
        clustering = spec.get(ClusteringEntry)
        if clustering is not None:
            kwargs["candidates"] = [clustering.candidates_of(c) for c in clients]
        if self._by_id:
            kwargs["clients"] = clients
        if self.attack is not None:  # a red-team device trains on poisoned data (label_flip), as a simulated attacker
            data = [self.attack.poison_data(cid, d, task.round) for cid, d in zip(clients, data)]
        if task.spec.get(OversampleEntry) is None:
            trained_on = data  # as given (a simulated cohort's CohortData stays whole)
        else:
            trained_on = [self.oversampled(d, task, c) for c, d in zip(clients, data)]
        # SCAFFOLD: each client corrects its gradients by c - c_i (its own c_i, from `states`).
        c = self.receive_control(task)
        if c is not None and c.numel() != params.numel():
            raise ValueError(f"the task's control variate has {c.numel()} values; the model has {params.numel()}")
        c_i = self.control_variates(clients, c.numel()) if c is not None else None
        limits = list(step_limits) if step_limits is not None and any(s is not None for s in step_limits) else None
        if self.personalization is None:
            corrections = (c.unsqueeze(0) - c_i) if c is not None and clients else None
            results = self.learner.fit_cohort(params, trained_on, hp, list(seeds), corrections=corrections, step_limits=limits, **kwargs)
        else:  # global training plus each client's personal step (its state: personal_states)
            results = self.personalization.fit_cohort(self.learner, params, clients, trained_on, hp, list(seeds), self.personal_states, limits)
        results, added = self.claimed_counts(results, trained_on, data)
        if c is not None:
            self.update_controls(clients, c, c_i, results, hp)
        if self.attack is not None:  # ... and sends its attacked update (its own row only, never colluding)
            results, _ = self.attack.apply_results(clients, list(results), task.round)
        return Trained(clients, list(results), data, added)

    def encode(self, task: Task, trained: Trained, levels: Sequence[int | None] | None = None, secure: bool = False) -> list[Update | Dropout]:
        """Each trained client's Update (`levels`: its adaptive rung, None for the run's
        uplink).  A client whose update cannot be sent (local training diverged to NaN)
        becomes a Dropout with the reason.  `secure`: see `reply`."""
        n = len(trained.clients)
        lv = [None] * n if levels is None else list(levels)
        prepared: list[tuple | ValueError] = []
        for cid, result, level in zip(trained.clients, trained.results, lv):
            try:
                prepared.append(self.outgoing(cid, task, result, level))
            except ValueError as exc:
                prepared.append(exc)
        # The payloads, chain by chain (the run's uplink; adaptive rungs each their own): one
        # `encode_many` per chain, what one `encode` per client gives.
        encoded: list = [None] * n
        if not secure:
            by_chain: dict[int, list[int]] = {}
            for i, (prep, result) in enumerate(zip(prepared, trained.results)):
                if not isinstance(prep, ValueError) and result.cluster is None:
                    by_chain.setdefault(id(prep[1]), []).append(i)
            for rows in by_chain.values():
                chain = prepared[rows[0]][1]
                done = chain.encode_many([prepared[i][0] for i in rows], [prepared[i][2] for i in rows])
                for i, e in zip(rows, done):
                    encoded[i] = e
        out: list[Update | Dropout] = []
        own = trained.own if task.spec.get(LabelHistogramEntry) is not None else None  # the labels only count there
        for i, (cid, result, added) in enumerate(zip(trained.clients, trained.results, trained.added)):
            try:
                out.append(self.reply(cid, task, result, lv[i], labels=None if own is None else own[i].y, oversampled=added,
                                      secure=secure, prepared=prepared[i], encoded=encoded[i]))
            except ValueError as exc:
                out.append(Dropout(cid, task.round, f"client error: {exc}", task.nbytes))
        return out

    def run(self, task: Task, clients: Sequence[int], data: Sequence[ClientData], seeds: Sequence[int],
            step_limits: Sequence[int | None] | None = None, secure: bool = False) -> list[Update | Dropout]:
        """`train` then `encode` with the run's uplink (`secure`: see `reply`)."""
        return self.encode(task, self.train(task, clients, data, seeds, step_limits), secure=secure)

    def take_held(self, client: int) -> torch.Tensor | None:
        """The update `reply(secure=True)` kept for secure aggregation (removed from the
        device), None if it kept none."""
        return self.held.pop(int(client), None)

    # -- downlink ----------------------------------------------------------------------------
    def receive(self, task: Task) -> tuple[torch.Tensor, FitConfig]:
        """The model the task carries, and the round's training hyper-parameters."""
        entry = task.spec.get(ClusteringEntry)
        if entry is not None and entry.blocks < entry.clusters:
            # Clustered FL: the task carries the first `blocks` of the stacked models; the
            # rest are not in use (no client may pick them) and stay zero here.
            if self.dim % entry.clusters:
                raise ValueError(f"a clustered task of {entry.clusters} models for a model of {self.dim} parameters")
            block_dim = self.dim // entry.clusters
            sent = self.downlink.decode(task.payload, dim=entry.blocks * block_dim)
            full = torch.zeros(self.dim)
            full[: sent.numel()] = sent
            return full, task.spec.fit
        return self.downlink.decode(task.payload, dim=self.dim), task.spec.fit

    def receive_control(self, task: Task) -> torch.Tensor | None:
        """SCAFFOLD: the server control variate c the Task carries (None without SCAFFOLD)."""
        if not task.control:
            return None
        return CodecChain().decode(task.control, dim=self.dim)

    # -- SCAFFOLD (fleetlearn.learners.scaffold) ---------------------------------------------
    def control_variates(self, clients, dim: int) -> torch.Tensor:
        """The cohort's c_i as an (n, d) matrix (0 for a client that has none yet)."""
        out = torch.zeros(len(clients), dim)
        for row, c in enumerate(clients):
            s = self.states.get(int(c))
            if s is not None and CLIENT_KEY in s:
                out[row] = s[CLIENT_KEY]
        return out

    def update_controls(self, clients, c: torch.Tensor, c_i: torch.Tensor, results: list[FitResult], hp: FitConfig) -> None:
        """Option II: each client moves its own c_i by ``-c - delta_i / (K_eff,i lr)``, from its
        true delta (see fleetlearn.learners.scaffold for what this approximates)."""
        if not results:
            return
        deltas = torch.stack([r.delta for r in results])
        new = c_i + control_deltas(deltas, [r.steps for r in results], hp.lr, hp.momentum, c)
        for row, cid in enumerate(clients):
            if not bool(torch.isfinite(new[row]).all()):
                continue  # a diverged client sends nothing (see reply) and keeps its old c_i
            s = dict(self.states.get(int(cid)) or {})
            s[CLIENT_KEY] = new[row].clone()
            self.states.put(int(cid), s)

    # -- label-skew helpers --------------------------------------------------------------------
    def oversampled(self, data: ClientData, task: Task, client: int) -> ClientData:
        """Label-skew helper (the task's `oversample` entry): the client duplicates examples of
        its under-represented classes (fleetlearn.data.balance), with a fresh draw seeded by
        (run seed, round, client) each round; `data` itself when the task does not ask.
        Classes the client lacks add nothing, so the draw does not depend on `num_classes`."""
        opts = task.spec.get(OversampleEntry)
        if opts is None or data.y.numel() == 0:
            return data
        from ..data.balance import oversample

        rng = np.random.default_rng([task.spec.seed, task.round, client, 0x0E5A])
        classes = self.num_classes if self.num_classes is not None else int(data.y.max()) + 1
        x, y = oversample(data.x.numpy(), data.y.numpy(), classes, rng, float(opts.noise_std))
        return ClientData(torch.from_numpy(x), torch.from_numpy(y), data.x_test, data.y_test)

    @staticmethod
    def claimed_counts(results: list[FitResult], trained: Sequence, own: Sequence) -> tuple[list[FitResult], list[int]]:
        """Oversampled copies change what a client trains on, not the count it claims: each
        result's ``num_examples`` goes back to the client's own data.  Returns the results
        and the examples each client added."""
        if trained is own:  # nothing oversampled
            return results, [0] * len(results)
        added = [t.num_examples - o.num_examples for t, o in zip(trained, own)]
        if any(added):
            results = [dataclasses.replace(r, num_examples=o.num_examples) if a else r for r, o, a in zip(results, own, added)]
        return results, added

    # -- uplink ----------------------------------------------------------------------------------
    def chain_for(self, level: int | None) -> CodecChain:
        if level is None or self.adaptive is None:
            return self.uplink
        return self.adaptive.chains[int(level)]

    def outgoing(self, client: int, task: Task, result: FitResult, level: int | None = None) -> tuple[torch.Tensor, CodecChain, dict | None]:
        """What the client sends before encoding: (its outgoing delta, the chain of its rung, its
        codec state).  The delta is `result.delta` less what stays on the device (FedPer's head),
        clipped and noised under local DP."""
        delta = result.delta
        if self.personalization is not None:
            delta = self.personalization.outgoing(delta)  # FedPer: the head never leaves the device
        ldp = task.spec.get(LocalDPEntry)
        if ldp is not None:
            # Local DP: the device clips and noises its own update before it leaves.
            from ..privacy import LocalDP

            part = LocalDP(ldp.clip_norm, ldp.noise_multiplier)
            delta = part.apply(delta, LocalDP.client_generator(self.seed, task.round, client))
            if self.personalization is not None:  # clipped on the body only; no noise on the head either
                delta = self.personalization.outgoing(delta)
        chain = self.chain_for(level)
        state = self.states.get(client)
        if chain.stochastic and (state is None or RNG_SEED not in state):
            # Each client its own reproducible stream, whatever order clients run in.
            from ..compression import seed_state

            seeded = seed_state(int(np.random.SeedSequence([self.seed, client, 0xC0DEC]).generate_state(1, dtype=np.uint64)[0] >> 1))
            state = {**(state or {}), **seeded}
        return delta, chain, state

    def reply(
        self, client: int, task: Task, result: FitResult, level: int | None = None,
        labels: torch.Tensor | None = None, oversampled: int = 0, secure: bool = False,
        prepared: tuple | ValueError | None = None, encoded: tuple | ValueError | None = None,
    ) -> Update:
        """The client's Update; `level` picks a rung of the adaptive ladder.  `labels`: the
        client's own training labels, counted into a histogram when the task has a
        `label_histogram` entry (for `label_importance` weighting).  `secure` (secure
        aggregation over a network): the update goes through the uplink chain and back
        (what the server would have decoded: lossy codecs and error feedback compose), is
        held on the device for the SecAgg stages (`take_held`), and the Update carries an
        empty payload.  `prepared` (`outgoing`'s answer) and `encoded` (the chain's
        `encode_many` answer for this client) come from `encode`, which prepares and encodes
        a cohort at once; a ValueError in either is raised here."""
        if prepared is None:
            prepared = self.outgoing(client, task, result, level)
        if isinstance(prepared, ValueError):
            raise prepared
        delta, chain, state = prepared
        if isinstance(encoded, ValueError):
            raise encoded
        if encoded is not None:
            payload, state = encoded
        elif secure:
            if result.cluster is not None:
                raise ValueError("secure aggregation cannot send one block of clustered FL's models")
            payload, state = chain.encode(delta, state)
            # The row it masks lives where the run's linear aggregation sums: a sketch
            # uplink's table, else the decoded update (a ladder rung's too).
            self.held[client] = self.uplink.summand(payload, dim=self.dim)
            payload = b""
        elif result.cluster is None:
            payload, state = chain.encode(delta, state)
        else:  # clustered FL: only the trained model's block goes up, tagged with its index
            from ..compression.blocks import encode_block

            payload, state = encode_block(chain, delta, result.cluster, result.clusters, state)
        self.states.put(client, state)
        counts = None
        hist = task.spec.get(LabelHistogramEntry)
        if hist is not None and labels is not None:
            counts = tuple(int(v) for v in torch.bincount(labels.to(torch.int64), minlength=hist.classes)[: hist.classes])
        return Update(
            client_id=client,
            round=task.round,
            base_version=task.version,
            payload=payload,
            codec=chain.spec,
            num_examples=result.num_examples,
            metrics=ClientMetrics(
                loss_before=result.loss_before,
                loss_after=result.loss_after,
                accuracy=result.accuracy,
                compute_seconds=result.compute_seconds,
                steps=result.steps,
                samples=result.samples,
                label_counts=counts,
                oversampled=int(oversampled),
                personal_accuracy=result.personal_accuracy,
                global_accuracy=result.global_accuracy,
            ),
            downlink_bytes=task.nbytes,
        )
