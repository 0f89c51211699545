"""One block of a stacked parameter vector, tagged with its index: the uplink of clustered FL.

A clustered run keeps ``count`` models of ``d`` parameters stacked in one ``count * d``
vector; a client trains one of them and sends only that block, encoded by the usual
uplink chain, behind a 9-byte header that names the block::

    b"FLBK" | version u8 | count u16 | index u16 | the chain's payload of the d-vector

The header is what the server reads the client's cluster from, so the cluster travels
with the bytes on every transport and is counted in the uplink bytes.
"""

from __future__ import annotations

import struct

import torch

from ..params import PayloadError
from .codec import RESIDUAL

BLOCK_MAGIC = b"FLBK"
BLOCK_VERSION = 1
_HEADER = struct.Struct("<4sBHH")
HEADER_BYTES = _HEADER.size
BLOCK_INDEX = "block_index"  # codec state key: the block the residual belongs to


def encode_block(chain, full: torch.Tensor, index: int, count: int, state: dict | None = None) -> tuple[bytes, dict | None]:
    """Encode block `index` of the (count * d,) vector `full` with `chain`, behind a tag.

    Codec state (an error-feedback residual) belongs to one block's model: when the
    client's block changes, the residual of the other model is dropped, not added in."""
    if not 0 <= index < count or count > 0xFFFF:
        raise ValueError(f"block index {index} out of range for {count} blocks")
    if full.numel() % count:
        raise ValueError(f"a vector of {full.numel()} entries does not split into {count} blocks")
    block = full.reshape(count, -1)[index]
    if state is not None:
        prev = state.get(BLOCK_INDEX)
        if prev is not None and int(prev) != index:
            state = {k: v for k, v in state.items() if k != RESIDUAL}
    payload, state = chain.encode(block, state)
    if state is not None:
        state = {**state, BLOCK_INDEX: torch.tensor(index, dtype=torch.int64)}
    return _HEADER.pack(BLOCK_MAGIC, BLOCK_VERSION, count, index) + payload, state


def read_block_header(payload: bytes) -> tuple[int, int]:
    """(index, count) of a block payload; PayloadError if it is not one."""
    if len(payload) < HEADER_BYTES:
        raise PayloadError(f"block payload of {len(payload)} bytes is shorter than its {HEADER_BYTES}-byte header")
    magic, version, count, index = _HEADER.unpack_from(payload)
    if magic != BLOCK_MAGIC:
        raise PayloadError(f"not a block payload (magic {magic!r}, expected {BLOCK_MAGIC!r}): clustered runs send one tagged block")
    if version != BLOCK_VERSION:
        raise PayloadError(f"block payload version {version}, this server reads {BLOCK_VERSION}")
    if count == 0 or index >= count:
        raise PayloadError(f"block index {index} out of range for {count} blocks")
    return index, count


def decode_block(chain, payload: bytes, count: int, dim: int) -> tuple[torch.Tensor, int]:
    """The (count * dim,) vector with the payload's block filled in (zeros elsewhere), and its index."""
    index, got = read_block_header(payload)
    if got != count:
        raise PayloadError(f"block payload names {got} blocks, the run has {count}")
    block = chain.decode(payload[HEADER_BYTES:], dim=dim)
    full = torch.zeros(count, dim, dtype=torch.float32)
    full[index] = block
    return full.reshape(-1), index
