"""The device side of a probe client: a normal client device whose local data is a known
synthetic distribution, so the server can predict its update (monitoring/probe_clients.py).

A probe client trains through the one client device (`Device`) like every other client; only
its data differs.  Each round it trains on `probe_data(seed, round, client, ...)`, a seeded
sample of a fixed linear teacher (Gaussian inputs, labels ``argmax(x @ W)``), where ``seed``
is the run seed the task carries (``task.spec.seed``), and ``client`` its client id.  The
server draws the same sample and runs the same local training on its own copy of the device,
then compares what arrived after the wire, the decoder and the validators.

A probe announces itself with the protocol feature ``"probe"`` (`PROBE_FEATURE`) when it
registers (`fleetlearn client --probe`); the server never aggregates its updates.

Test hook: the environment variable ``FLEETLEARN_PROBE_TAMPER`` (`TAMPER_ENV`) makes a probe
lie on purpose, to test that the server notices: ``labels`` flips its labels, ``codec``
halves every update before encoding (a broken codec).  Never set it in production.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..learners.base import ClientData

PROBE_FEATURE = "probe"  # Capabilities.features entry of a probe client
TAMPER_ENV = "FLEETLEARN_PROBE_TAMPER"
TAMPERS = ("labels", "codec")
MAX_PROBE_EXAMPLES = 4096  # a probe's dataset (the server trains on it too)


def tamper_from_env() -> str | None:
    """The test hook's value (None: an honest probe); ValueError for an unknown one."""
    value = os.environ.get(TAMPER_ENV, "").strip()
    if not value:
        return None
    if value not in TAMPERS:
        raise ValueError(f"{TAMPER_ENV}={value!r}: unknown tampering; allowed: {', '.join(TAMPERS)} (or unset)")
    return value


def probe_data(seed: int, round: int, client: int, num_features: int, num_classes: int, examples: int,
               tamper: str | None = None) -> ClientData:
    """The probe's local data for `round`: `examples` Gaussian inputs labelled by the run's
    fixed linear teacher (seeded by `seed` alone), drawn from (seed, client, round).  The test
    split is the training split (a probe's accuracy is not what it measures)."""
    if not 1 <= examples <= MAX_PROBE_EXAMPLES:
        raise ValueError(f"probe examples must be 1..{MAX_PROBE_EXAMPLES}, got {examples}")
    if num_features < 1 or num_classes < 2:
        raise ValueError(f"a probe needs at least 1 feature and 2 classes, got {num_features} and {num_classes}")
    teacher = np.random.default_rng([int(seed), 0x9B0BE]).standard_normal((num_features, num_classes))
    rng = np.random.default_rng([int(seed), 0x9B0BE, int(client), int(round)])
    x = rng.standard_normal((examples, num_features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    if tamper == "labels":
        y = (y + 1) % num_classes
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return ClientData(xt, yt, xt, yt)


class TamperedChain:
    """The test hook's broken codec: the run's chain, fed half of every update."""

    def __init__(self, chain: Any):
        self._chain = chain

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chain, name)

    def encode(self, vec: torch.Tensor, state=None, checked: bool = False):
        return self._chain.encode(vec * 0.5, state)

    def encode_many(self, vecs, states):
        """`CodecChain.encode_many` with this chain's `encode`."""
        out = []
        for v, st in zip(vecs, states):
            try:
                out.append(self.encode(v, st))
            except ValueError as exc:
                out.append(exc)
        return out


def probe_chain(chain: Any, tamper: str | None) -> Any:
    """The uplink chain a probe encodes with: the run's, or the test hook's broken one."""
    return TamperedChain(chain) if tamper == "codec" else chain
