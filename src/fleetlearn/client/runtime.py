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
        return self.downlink.decode(task.payload, dim=self.dim), FitConfig.from_dict(task.config)

    def chain_for(self, level: int | None) -> CodecChain:
        if level is None or self.adaptive is None:
            return self.uplink
        return self.adaptive.chains[int(level)]

    def reply(self, client: int, task: Task, result: FitResult, level: int | None = None) -> Update:
        """The client's Update; `level` picks a rung of the adaptive ladder."""
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
        if state is None and getattr(chain, "stochastic", False):
            # Each client its own reproducible stream, whatever order clients run in.
            from ..compression import seed_state

            state = seed_state(int(np.random.SeedSequence([self.seed, client, 0xC0DEC]).generate_state(1, dtype=np.uint64)[0] >> 1))
        payload, state = chain.encode(delta, state)
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
                personal_accuracy=result.personal_accuracy,
                global_accuracy=result.global_accuracy,
            ),
            downlink_bytes=task.nbytes,
        )
