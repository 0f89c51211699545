"""The client side of a round, shared by every transport:
task -> params -> Learner.fit -> delta -> uplink codec chain -> Update.

Per-client state that must survive between rounds (error-feedback residuals,
control variates) lives in a `ClientStateStore`, loaded only for the cohort.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..compression import CodecChain
from ..compression.codec import RNG_SEED
from ..learners.base import ClientData, FitConfig, FitResult
from ..learners.scaffold import CLIENT_KEY, control_deltas
from ..messages import ClientMetrics, Task, Update


class ClientStateStore:
    """Per-client tensors keyed by client id; only clients that have state cost memory."""

    def __init__(self) -> None:
        self._state: dict[int, dict[str, torch.Tensor]] = {}

    def get(self, client: int) -> dict[str, torch.Tensor] | None:
        return self._state.get(client)

    def put(self, client: int, state: dict[str, torch.Tensor] | None) -> None:
        if state:
            self._state[client] = state
        else:
            self._state.pop(client, None)

    def __len__(self) -> int:
        return len(self._state)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._state.values() for t in s.values())

    def clients(self) -> list[int]:
        return sorted(self._state)

    # -- checkpoints: flat "client/<id>/<key>" tensors, what safetensors stores ------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every client's state as flat tensors named ``client/<id>/<key>`` (for a checkpoint)."""
        return {f"client/{c}/{k}": t for c, s in self._state.items() for k, t in s.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the whole store with what `state_dict` wrote."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            head, cid, key = (name.split("/", 2) + ["", ""])[:3]
            if head != "client" or not cid.isdigit() or not key:
                raise ValueError(f"client state tensor {name!r} is not named client/<id>/<key>")
            state.setdefault(int(cid), {})[key] = t
        self._state = state


class ClientRuntime:
    """Turns a Task into params and a FitResult into an Update."""

    def __init__(
        self, uplink: CodecChain, downlink: CodecChain, states: ClientStateStore | None = None, seed: int = 0,
        dim: int | None = None, adaptive=None, personalization=None,
    ):
        self.uplink = uplink
        self.downlink = downlink
        self.states = states if states is not None else ClientStateStore()
        self.seed = seed  # the device's own randomness (local DP noise, stochastic codecs)
        self.dim = dim  # the model dimension: a payload claiming another is refused before allocation
        self.adaptive = adaptive  # fleetlearn.compression.AdaptiveCompression or None
        # fleetlearn.client.personalization part or None; its per-client state (FedPer heads,
        # Ditto models) in a store of its own, apart from the codec state.
        self.personalization = personalization
        self.personal_states = ClientStateStore()

    def receive(self, task: Task) -> tuple[torch.Tensor, FitConfig]:
        entry = task.config.get("clustering")
        if entry and int(entry["blocks"]) < int(entry["clusters"]):
            # Clustered FL: the task carries the first `blocks` of the stacked models; the
            # rest are not in use (no client may pick them) and stay zero here.
            k, blocks = int(entry["clusters"]), int(entry["blocks"])
            block_dim = self.dim // k if self.dim is not None else None
            sent = self.downlink.decode(task.payload, dim=None if block_dim is None else blocks * block_dim)
            full = torch.zeros(k * (block_dim if block_dim is not None else sent.numel() // blocks))
            full[: sent.numel()] = sent
            return full, FitConfig.from_dict(task.config)
        return self.downlink.decode(task.payload, dim=self.dim), FitConfig.from_dict(task.config)

    # -- SCAFFOLD (fleetlearn.learners.scaffold) -------------------------------------------
    def receive_control(self, task: Task) -> torch.Tensor | None:
        """The server control variate c the Task carries (None without SCAFFOLD)."""
        if not task.control:
            return None
        return CodecChain().decode(task.control, dim=self.dim)

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

    @staticmethod
    def cluster_candidates(task: Task, clients) -> list[list[int]] | None:
        """Clustered FL: each client's candidate clusters from the task (None: not a clustered
        task).  A client the task does not list may pick any of its `active` clusters."""
        entry = task.config.get("clustering")
        if not entry:
            return None
        listed = entry.get("candidates") or {}
        every = list(range(int(entry["active"])))
        return [listed.get(str(int(c)), every) for c in clients]

    @staticmethod
    def oversampled(data: ClientData, task: Task, seed: int, client: int, num_classes: int | None = None) -> ClientData:
        """Label-skew helper (task config ``oversample``): the client duplicates examples of its
        under-represented classes (fleetlearn.data.balance), with a fresh draw seeded by
        (run seed, round, client) each round; `data` itself when the task does not ask.
        `num_classes` only bounds the labels (default: the largest label + 1; classes the
        client lacks add nothing, so the draw is the same)."""
        opts = task.config.get("oversample")
        if not opts or data.y.numel() == 0:
            return data
        from ..data.balance import oversample

        rng = np.random.default_rng([seed, task.round, client, 0x0E5A])
        classes = num_classes if num_classes is not None else int(data.y.max()) + 1
        x, y = oversample(data.x.numpy(), data.y.numpy(), classes, rng, float(opts.get("noise_std", 0.0)))
        return ClientData(torch.from_numpy(x), torch.from_numpy(y), data.x_test, data.y_test)

    @staticmethod
    def claimed_counts(results: list[FitResult], trained: list, own: list) -> tuple[list[FitResult], list[int]]:
        """Oversampled copies change what a client trains on, not the count it claims: each
        result's ``num_examples`` goes back to the client's own data (`own`, what `oversampled`
        was given; `trained`, what it returned).  Returns the results and the examples each
        client added.  Members that are not ClientData (the Ray backend's ClientRefs, whose
        workers hold the data) added nothing here."""
        added = [t.num_examples - o.num_examples if isinstance(o, ClientData) else 0 for t, o in zip(trained, own)]
        if any(added):
            results = [dataclasses.replace(r, num_examples=o.num_examples) if a else r for r, o, a in zip(results, own, added)]
        return results, added

    def chain_for(self, level: int | None) -> CodecChain:
        if level is None or self.adaptive is None:
            return self.uplink
        return self.adaptive.chains[int(level)]

    def reply(
        self, client: int, task: Task, result: FitResult, level: int | None = None,
        labels: torch.Tensor | None = None, oversampled: int = 0,
    ) -> Update:
        """The client's Update; `level` picks a rung of the adaptive ladder.  `labels`: the
        client's own training labels, counted into a histogram when the task asks for one
        (``label_histogram`` = the number of classes, for `label_importance` weighting)."""
        delta = result.delta
        if self.personalization is not None:
            delta = self.personalization.outgoing(delta)  # FedPer: the head never leaves the device
        ldp = task.config.get("local_dp")
        if ldp:
            # Local DP: the device clips and noises its own update before it leaves.
            from ..privacy import LocalDP

            part = LocalDP(ldp["clip_norm"], ldp["noise_multiplier"])
            delta = part.apply(delta, LocalDP.client_generator(self.seed, task.round, client))
            if self.personalization is not None:  # clipped on the body only; no noise on the head either
                delta = self.personalization.outgoing(delta)
        chain = self.chain_for(level)
        state = self.states.get(client)
        if getattr(chain, "stochastic", False) and (state is None or RNG_SEED not in state):
            # Each client its own reproducible stream, whatever order clients run in.
            from ..compression import seed_state

            seeded = seed_state(int(np.random.SeedSequence([self.seed, client, 0xC0DEC]).generate_state(1, dtype=np.uint64)[0] >> 1))
            state = {**(state or {}), **seeded}
        if result.cluster is None:
            payload, state = chain.encode(delta, state)
        else:  # clustered FL: only the trained model's block goes up, tagged with its index
            from ..compression.blocks import encode_block

            payload, state = encode_block(chain, delta, result.cluster, result.clusters, state)
        self.states.put(client, state)
        counts = None
        classes = task.config.get("label_histogram")
        if classes and labels is not None:
            counts = tuple(int(v) for v in torch.bincount(labels.to(torch.int64), minlength=int(classes))[: int(classes)])
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
