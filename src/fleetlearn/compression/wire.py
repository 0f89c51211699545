"""The payload format shared by every codec chain.

Every payload is self-describing and checksummed::

    offset  size  field
    0       2     magic b"FL"
    2       1     format version (2; version 1 payloads, with a CRC32 trailer, are still read)
    3       1     support: 0 dense, 1 topk, 2 randk, 3 sketch, 4 topk blocks; bit 7 set: the body
                  (support + value sections) is zstd-coded (see `entropy`)
    4       1     value codec: 0 float32, 1 fp16, 2 bf16, 3 uniform quantizer, 4 sign
    5       4     dim (uint32): length of the decoded vector
    9       ...   support section (sparse: k, first index, index coding; topk blocks: block
                  size, then a sparse section over block numbers; sketch: rows, cols, seed, k)
    ...     ...   value section (its own small header, then the coded values)
    -4      4     checksum of every byte before it: version 2, the low 32 bits of XXH3-64
                  (`xxhash`, ~10x faster than zlib's CRC32 on this CPU: at 1000 clients a round
                  checks 38 MB twice); version 1, CRC32 (zlib.crc32)

A zstd-coded body is: uncompressed length (uint32), then one zstd frame;
`read_header` decompresses it and hands back a reader over the plain body, so
the section readers never see the difference.  Given the dimension it expects,
`read_header` refuses a payload for another one before decompressing anything.

All integers are little-endian.  Decoding checks the magic, the version, the checksum,
and then that every length announced in the headers matches the bytes present,
so a truncated, corrupted or inconsistent payload raises `PayloadError` with a
reason instead of an obscure numpy/struct error or a silently wrong vector.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import xxhash

from ..params import PayloadError

MAGIC = b"FL"
VERSION = 2  # what this build writes
# What it reads: each version's checksum trailer (its name in errors, the function over the bytes before it).
CHECKSUMS = {
    1: ("CRC32", zlib.crc32),
    2: ("checksum (XXH3)", lambda data: xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF),  # low 32 bits of XXH3-64
}
READS = tuple(CHECKSUMS)

HEADER = struct.Struct("<2sBBBI")
CRC = struct.Struct("<I")
OVERHEAD = HEADER.size + CRC.size  # 13 bytes: header + trailer of every payload

# Wire ids.  Append, never renumber: old payloads must keep their meaning.
SUPPORT_DENSE, SUPPORT_TOPK, SUPPORT_RANDK, SUPPORT_SKETCH, SUPPORT_TOPK_BLOCKS, SUPPORT_SUBSET = 0, 1, 2, 3, 4, 5
SUPPORT_SUBSET_SEEDED = 6  # subset's blocks named by a seed (`sparsify.seeded_blocks`); 5 lists them (still read)
SUPPORT_SUBSET_KEEP = 7  # the same with the vector's last blocks always kept (``subset:F,keep=N``)
SUPPORT_NAMES = {SUPPORT_DENSE: "dense", SUPPORT_TOPK: "topk", SUPPORT_RANDK: "randk", SUPPORT_SKETCH: "sketch",
                 SUPPORT_TOPK_BLOCKS: "topk_blocks", SUPPORT_SUBSET: "subset", SUPPORT_SUBSET_SEEDED: "subset_seeded",
                 SUPPORT_SUBSET_KEEP: "subset_keep"}
# Supports whose section is a block size and block numbers (`sparsify.read_support_blocks`).
BLOCK_SUPPORTS = (SUPPORT_TOPK_BLOCKS, SUPPORT_SUBSET)
VALUE_F32, VALUE_F16, VALUE_BF16, VALUE_QUANT, VALUE_SIGN = 0, 1, 2, 3, 4
VALUE_NAMES = {VALUE_F32: "float32", VALUE_F16: "fp16", VALUE_BF16: "bf16", VALUE_QUANT: "quantized", VALUE_SIGN: "sign"}

MAX_DIM = 2**32 - 1  # dim travels as uint32
SUPPORT_ZSTD_FLAG = 0x80  # bit 7 of the support byte: the body is zstd-coded
ZSTD_HEAD = struct.Struct("<I")  # uncompressed body length


_SM_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SM_M1 = np.uint64(0xBF58476D1CE4E5B9)
_SM_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_HASH_CHUNK = 32768  # 256 KiB of keys per piece


def counter_hash(seed: int, start: int, count: int) -> np.ndarray:
    """uint64 keys i = start .. start + count - 1 of a stream named by a 64-bit `seed`:
    splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) (Steele, Lea and Flood 2014; the
    generator of Java's SplittableRandom).  Part of the wire format: what an encoder draws
    from a seed it sends (a quantizer's dither, subset's blocks), the decoder regenerates,
    so it is written out here instead of taken from a library generator whose stream may
    change between versions.  For one seed the keys are distinct (the mixer is a bijection
    and the counter does not repeat below 2^64)."""
    out = np.empty(count, dtype=np.uint64)
    tmp = np.empty(min(count, _HASH_CHUNK), dtype=np.uint64)
    seed64 = np.uint64(seed)
    for a in range(0, count, _HASH_CHUNK):  # in cache-sized pieces, in place: 3-4x faster on a long stream
        z = out[a : a + _HASH_CHUNK]
        t = tmp[: z.size]
        z[:] = np.arange(start + a + 1, start + a + 1 + z.size, dtype=np.uint64)
        z *= _SM_GAMMA
        z += seed64
        np.right_shift(z, _S30, out=t)
        z ^= t
        z *= _SM_M1
        np.right_shift(z, _S27, out=t)
        z ^= t
        z *= _SM_M2
        np.right_shift(z, _S31, out=t)
        z ^= t
    return out


def max_body_bytes(dim: int) -> int:
    """Most bytes a plain (non-sketch) body for `dim` values can hold: sparse float32
    (4-byte index + 4-byte value) or block-1 quantizer scales stay far below this.
    A zstd-coded body announcing more is refused before it is decompressed."""
    return 16 * dim + 4096


@dataclass(frozen=True)
class Header:
    support: int
    value: int
    dim: int

    @property
    def kind(self) -> str:
        return SUPPORT_NAMES[self.support]


def checksum(data: bytes | bytearray | memoryview, version: int = VERSION) -> int:
    """The trailer of a payload of format `version` over `data` (every byte before it)."""
    return CHECKSUMS[version][1](data)


def assemble(support: int, value: int, dim: int, parts: Iterable[bytes | bytearray | memoryview], zstd_level: int | None = None) -> bytes:
    """Header + parts + checksum as one bytes object; the checksum is computed part by part (no extra copy).

    With `zstd_level`, the parts are zstd-coded when that makes the payload smaller."""
    if zstd_level is not None:
        import zstandard

        parts = list(parts)
        body = b"".join(parts)
        z = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(body)
        if ZSTD_HEAD.size + len(z) < len(body):
            support |= SUPPORT_ZSTD_FLAG
            parts = [ZSTD_HEAD.pack(len(body)), z]
    head = HEADER.pack(MAGIC, VERSION, support, value, dim)
    chunks: list = [head]
    h = xxhash.xxh3_64(head)
    for p in parts:
        if len(p):
            h.update(p)
            chunks.append(p)
    chunks.append(CRC.pack(h.intdigest() & 0xFFFFFFFF))
    return b"".join(chunks)


def assemble_dense(head: bytes, values) -> bytes:
    """`assemble` of a dense float32 payload: `head` (this payload's packed header) and
    `values`, a contiguous little-endian float32 numpy vector; the same bytes."""
    h = xxhash.xxh3_64(head)
    h.update(values)
    return b"".join((head, values.data.cast("B"), CRC.pack(h.intdigest() & 0xFFFFFFFF)))


def as_view(payload: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload is bytes, got {type(payload).__name__}")
    mv = memoryview(payload)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def read_header(payload: bytes | bytearray | memoryview, *, check_crc: bool = True, dim: int | None = None) -> tuple[Header, "Reader"]:
    """Checks magic, version and checksum; returns the header and a reader positioned after it.

    `dim`: the dimension the receiver expects (the model's).  A payload announcing another
    is refused here, before a zstd-coded body is decompressed: the body's bound
    (`max_body_bytes`) is then the receiver's, not whatever the sender wrote in its header."""
    mv = as_view(payload)
    n = len(mv)
    if n < OVERHEAD:
        raise PayloadError(f"payload of {n} bytes is shorter than the {OVERHEAD}-byte minimum (header + checksum)")
    magic, version, support, value, payload_dim = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PayloadError(f"not a fleetlearn codec payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READS:
        raise PayloadError(f"payload format version {version}; this build reads versions {', '.join(map(str, READS))}")
    if check_crc:
        (want,) = CRC.unpack_from(mv, n - CRC.size)
        got = checksum(mv[: n - CRC.size], version)
        if got != want:
            raise PayloadError(f"{CHECKSUMS[version][0]} mismatch (stored {want:#010x}, computed {got:#010x}): the payload is corrupted")
    zstd = bool(support & SUPPORT_ZSTD_FLAG)
    support &= ~SUPPORT_ZSTD_FLAG
    if support not in SUPPORT_NAMES:
        raise PayloadError(f"unknown support id {support}; known: {SUPPORT_NAMES}")
    if value not in VALUE_NAMES:
        raise PayloadError(f"unknown value codec id {value}; known: {VALUE_NAMES}")
    if dim is not None and payload_dim != dim:
        raise PayloadError(f"payload is for a vector of dim {payload_dim}, expected {dim}")
    r = Reader(mv, HEADER.size, n - CRC.size)
    if zstd:
        if support == SUPPORT_SKETCH:
            raise PayloadError("a sketch payload cannot be zstd-coded (the server adds sketch tables as sent)")
        r = _zstd_body(r, payload_dim)
    return Header(support, value, payload_dim), r


def _zstd_body(r: "Reader", dim: int) -> "Reader":
    """A reader over the decompressed body of a zstd-coded payload."""
    (size,) = r.unpack(ZSTD_HEAD, "zstd body length")
    limit = max_body_bytes(dim)
    if size > limit:
        raise PayloadError(f"zstd-coded body announces {size} bytes; a payload of dim {dim} holds at most {limit}")
    frame = r.take(r.end - r.pos, "zstd frame")
    body = zstd_exact(frame, size, "zstd-coded body", lambda got: f"zstd frame holds {got} bytes, the payload announces {size}")
    return Reader(memoryview(body), 0, len(body))


def zstd_exact(frame, size: int, what: str, mismatch) -> bytes:
    """Decompress a zstd frame that must hold exactly `size` bytes, never allocating more:
    the frame's own content size is checked first (`mismatch(got)` words that refusal),
    then decompression is capped at `size`.  Every failure is a PayloadError naming `what`."""
    import zstandard

    try:
        got = zstandard.frame_content_size(frame)
        if got != size:
            raise PayloadError(mismatch(got))
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{what} does not decompress: {exc}") from None
    if len(out) != size:
        raise PayloadError(f"{what} decompressed to {len(out)} bytes, expected {size}")
    return out


class Reader:
    """Bounds-checked sequential reads; every overrun is a PayloadError naming the field."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, nbytes: int, what: str) -> memoryview:
        if nbytes < 0 or self.pos + nbytes > self.end:
            raise PayloadError(
                f"payload truncated or inconsistent: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"only {self.end - self.pos} remain before the CRC"
            )
        out = self.buf[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def finish(self) -> None:
        if self.pos != self.end:
            raise PayloadError(f"payload has {self.end - self.pos} unexpected trailing bytes before the CRC")
