"""Server optimizers: ``step(params, pseudo_gradient, state) -> (params, state)``.

The pseudo-gradient is the aggregated client delta (local minus global), so a
step *adds* it.  FedAvg is `sgd` with ``server_lr = 1`` (Reddi et al., ICLR 2021,
Alg. 1 with SERVEROPT = SGD).  State is a dict of tensors so it can be
checkpointed; adaptive optimizers arrive with the non-IID work.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


class ServerSGD:
    name = "sgd"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def init(self, params: torch.Tensor) -> State:
        return {}

    def step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return params + self.server_lr * pseudo_gradient, state
