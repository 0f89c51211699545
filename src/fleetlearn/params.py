"""The model as the system sees it: a `ParamSpec` and one flat float32 vector.

Everything outside the learner (codecs, aggregators, privacy, the store) works on
flat vectors ``(d,)`` or on ``(n_clients, d)`` matrices; converting to and from a
torch module is the learner's job.  The wire format of an uncompressed vector is
its little-endian float32 bytes, so a payload's size is exactly ``4 * d``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from math import prod

import numpy as np
import torch


class PayloadError(ValueError):
    """A payload that cannot be decoded (truncated, corrupted, wrong size)."""


# glibc's largest heap block on 64-bit (the ceiling of its mmap threshold): a run has blocks
# up to this size served from its heap (engine/running.py, RetainedHeap), and the learner
# keeps each per-step temporary of a training group under it (learners/torch_learner.py).
HEAP_BLOCK_MAX = 32 << 20


def empty_rows(n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised (n, d) matrix of updates; a float32 one of 1 MiB or more comes from
    numpy, which asks the kernel for transparent huge pages (madvise): a cohort's matrix
    above `HEAP_BLOCK_MAX` (38 MB at 1,000 clients of a 10k-parameter model) is a fresh
    mapping every round, then faulted in 2 MiB at a time instead of 4 KiB."""
    if dtype == torch.float32 and 4 * n * d >= 1 << 20:
        return torch.from_numpy(np.empty((n, d), dtype=np.float32))
    return torch.empty(n, d, dtype=dtype)


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a model's tensors, in flat-vector order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError("ParamSpec: names and shapes differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("ParamSpec: duplicate tensor names")

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "ParamSpec":
        items = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        return cls(tuple(n for n, _ in items), tuple(s for _, s in items))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(prod(s)) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def last_layer(self) -> tuple[str, ...]:
        """Names of the model's last layer: the tensors sharing the last tensor's module path
        (FedPer's "last" head, target_ratio's kept output layer); () for an empty spec."""
        if not self.names:
            return ()
        last = self.names[-1]
        prefix = last.rsplit(".", 1)[0] + "." if "." in last else last
        return tuple(n for n in self.names if n.startswith(prefix) or n == last)

    @property
    def nbytes(self) -> int:
        return 4 * self.dim

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``vec`` (or of a batch ``(..., d)``) shaped per tensor."""
        if vec.shape[-1] != self.dim:
            raise ValueError(f"vector has {vec.shape[-1]} entries, the spec needs {self.dim}")
        lead = tuple(vec.shape[:-1])
        parts = torch.split(vec, self.sizes, dim=-1)
        return {n: p.reshape(lead + s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"missing tensors: {missing}")
        return torch.cat([tensors[n].detach().reshape(-1).to(torch.float32) for n in self.names])

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes]})

    @classmethod
    def from_json(cls, text: str) -> "ParamSpec":
        obj = json.loads(text)
        return cls(tuple(obj["names"]), tuple(tuple(s) for s in obj["shapes"]))

    def digest(self) -> str:
        """A short hash that two parties compare to know they share an architecture."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def vector_to_bytes(vec: torch.Tensor) -> bytes:
    """Little-endian float32 bytes of a flat vector (the identity wire format)."""
    arr = vec.detach().to("cpu", torch.float32).contiguous().numpy()
    return arr.astype("<f4", copy=False).tobytes()


def bytes_to_vector(payload: bytes, dim: int) -> torch.Tensor:
    if len(payload) != 4 * dim:
        raise PayloadError(f"payload has {len(payload)} bytes, expected {4 * dim} for {dim} float32 values")
    arr = np.frombuffer(payload, dtype="<f4")
    return torch.from_numpy(arr.copy())
