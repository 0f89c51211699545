"""The client side of a round, shared by every transport:
task -> params -> Learner.fit -> delta -> uplink codec chain -> Update.

Per-client state that must survive between rounds (error-feedback residuals,
control variates) lives in a `ClientStateStore`, loaded only for the cohort.
"""

from __future__ import annotations

import numpy as np
import torch

from ..compression import CodecChain
from ..learners.base import FitConfig, FitResult
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


class ClientRuntime:
    """Turns a Task into params and a FitResult into an Update."""

    def __init__(
        self, uplink: CodecChain, downlink: CodecChain, states: ClientStateStore | None = None, seed: int = 0,
        dim: int | None = None, adaptive=None,
    ):
        self.uplink = uplink
        self.downlink = downlink
        self.states = states if states is not None else ClientStateStore()
        self.seed = seed  # the device's own randomness (local DP noise, stochastic codecs)
        self.dim = dim  # the model dimension: a payload claiming another is refused before allocation
        self.adaptive = adaptive  # fleetlearn.compression.AdaptiveCompression or None

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

    def chain_for(self, level: int | None) -> CodecChain:
        if level is None or self.adaptive is None:
            return self.uplink
        return self.adaptive.chains[int(level)]

    def reply(self, client: int, task: Task, result: FitResult, level: int | None = None) -> Update:
        """The client's Update; `level` picks a rung of the adaptive ladder."""
        delta = result.delta
        ldp = task.config.get("local_dp")
        if ldp:
            # Local DP: the device clips and noises its own update before it leaves.
            from ..privacy import LocalDP

            part = LocalDP(ldp["clip_norm"], ldp["noise_multiplier"])
            delta = part.apply(delta, LocalDP.client_generator(self.seed, task.round, client))
        chain = self.chain_for(level)
        state = self.states.get(client)
        if state is None and getattr(chain, "stochastic", False):
            # Each client its own reproducible stream, whatever order clients run in.
            from ..compression import seed_state

            state = seed_state(int(np.random.SeedSequence([self.seed, client, 0xC0DEC]).generate_state(1, dtype=np.uint64)[0] >> 1))
        if result.cluster is None:
            payload, state = chain.encode(delta, state)
        else:  # clustered FL: only the trained model's block goes up, tagged with its index
            from ..compression.blocks import encode_block

            payload, state = encode_block(chain, delta, result.cluster, result.clusters, state)
        self.states.put(client, state)
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
            ),
            downlink_bytes=task.nbytes,
        )
