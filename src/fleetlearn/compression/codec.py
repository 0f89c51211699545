"""Codecs: how a vector becomes bytes on the wire, and back.

Contract (DESIGN.md section 4): ``encode(vec, state) -> (payload, state)`` and
``decode(payload) -> vec``.  A payload is self-describing, so ``decode`` needs no
side information, and ``len(payload)`` is exactly what travels.  Codecs compose
into chains written in one syntax everywhere: ``"topk:0.01 | q8"``.  State
(for example error-feedback residuals) is explicit so it can be checkpointed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..params import PayloadError

State = dict[str, torch.Tensor]


class Codec(Protocol):
    name: str
    lossy: bool

    def encode(self, vec: torch.Tensor, state: State | None = None) -> tuple[bytes, State | None]: ...

    def decode(self, payload: bytes) -> torch.Tensor: ...


class IdentityCodec:
    """Plain float32: a 4-byte length header, then little-endian values."""

    name = "none"
    lossy = False
    _HEADER = struct.Struct("<I")

    def encode(self, vec: torch.Tensor, state: State | None = None) -> tuple[bytes, State | None]:
        arr = vec.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        return self._HEADER.pack(arr.shape[0]) + arr.tobytes(), state

    def decode(self, payload: bytes) -> torch.Tensor:
        h = self._HEADER.size
        if len(payload) < h:
            raise PayloadError(f"payload of {len(payload)} bytes is shorter than its {h}-byte header")
        (n,) = self._HEADER.unpack_from(payload)
        if len(payload) != h + 4 * n:
            raise PayloadError(f"payload announces {n} float32 values ({h + 4 * n} bytes) but has {len(payload)} bytes")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4", offset=h).copy())


@dataclass
class CodecChain:
    """Codecs applied left to right on encode and right to left on decode."""

    codecs: list[Codec] = field(default_factory=list)
    spec: str = "none"

    @property
    def lossy(self) -> bool:
        return any(c.lossy for c in self.codecs)

    def encode(self, vec: torch.Tensor, state: State | None = None) -> tuple[bytes, State | None]:
        if not self.codecs:
            return IdentityCodec().encode(vec, state)
        # The codecs that land with the communication work define how payloads nest;
        # today the only codec is the identity.
        payload, state = self.codecs[-1].encode(vec, state)
        return payload, state

    def decode(self, payload: bytes) -> torch.Tensor:
        if not self.codecs:
            return IdentityCodec().decode(payload)
        return self.codecs[-1].decode(payload)


CODECS: dict[str, Callable[..., Codec]] = {"none": IdentityCodec}


def parse_chain(spec: str) -> CodecChain:
    """``"name[:arg] | name[:arg]"`` -> a CodecChain; unknown names are a ValueError."""
    parts = [p.strip() for p in spec.split("|") if p.strip()]
    codecs: list[Codec] = []
    for part in parts:
        name, _, arg = part.partition(":")
        if name not in CODECS:
            raise ValueError(f"unknown codec {name!r} in {spec!r}; allowed: {', '.join(sorted(CODECS))}")
        codecs.append(CODECS[name](arg) if arg else CODECS[name]())
    return CodecChain([c for c in codecs if c.name != "none"], spec.strip() or "none")
