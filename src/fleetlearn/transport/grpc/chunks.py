"""Chunked payloads: a large byte string as a sequence of bounded messages.

gRPC refuses messages above a configured size (4 MB by default), and one huge
message would be held several times over (the bytes, the protobuf, its
serialisation).  A payload therefore travels as ``(offset, data)`` chunks of at
most `chunk_bytes`: the sender slices lazily, the receiver writes each chunk
into one buffer allocated at the announced size, after checking the size
against its limit, so peak memory is about one payload plus one chunk.
"""

from __future__ import annotations

from typing import Iterator

from .refusals import Refusal

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB


def iter_chunks(payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` pieces of `payload`, in order; one empty piece for an empty payload
    is not sent (the receiver knows the size from the metadata)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(payload)
    for off in range(0, len(view), chunk_bytes):
        # One chunk-sized copy at a time; protobuf bytes fields need `bytes`.
        yield off, bytes(view[off : off + chunk_bytes])


class PayloadAssembler:
    """Reassembles a chunked payload, refusing what does not add up.

    Raises `Refusal("oversized")` when the announced or received size passes
    `limit`, and `Refusal("malformed")` for a chunk out of order, too large a
    chunk, more bytes than announced, or (in `finish`) fewer.
    """

    def __init__(self, announced: int, limit: int, chunk_limit: int, what: str = "payload"):
        self.what = what
        if announced < 0:
            raise Refusal("malformed", f"{what} size {announced} is negative")
        if announced > limit:
            raise Refusal("oversized", f"{what} of {announced} bytes exceeds the limit of {limit} bytes")
        self.announced = announced
        self.chunk_limit = chunk_limit
        self.received = 0
        self._buf = bytearray(announced)

    def add(self, offset: int, data: bytes) -> None:
        n = len(data)
        if offset != self.received:
            raise Refusal("malformed", f"{self.what} chunk at offset {offset}, expected offset {self.received} (chunks must arrive in order)")
        if n == 0:
            raise Refusal("malformed", f"empty {self.what} chunk at offset {offset}")
        if n > self.chunk_limit:
            raise Refusal("oversized", f"{self.what} chunk of {n} bytes exceeds the chunk limit of {self.chunk_limit} bytes")
        if self.received + n > self.announced:
            raise Refusal("malformed", f"{self.what} has more than the {self.announced} bytes announced (chunk at {offset} of {n} bytes)")
        self._buf[offset : offset + n] = data
        self.received += n

    def finish(self) -> bytes:
        """The payload; refuses a truncated one."""
        if self.received != self.announced:
            raise Refusal("malformed", f"{self.what} truncated: received {self.received} of the {self.announced} bytes announced")
        # bytes() copies once; the buffer is dropped right after, so the peak is
        # two copies of one payload for an instant, never one per chunk.
        out = bytes(self._buf)
        self._buf = bytearray()
        return out
