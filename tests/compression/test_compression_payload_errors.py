"""Corrupted, truncated, random and inconsistent payloads: PayloadError, never anything else."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from compression_helpers import heavy_tailed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlearn.compression import decode_payload, parse_chain, read_sketch, sum_sketches, wire
from fleetlearn.params import PayloadError

CHAINS = ["none", "fp16", "bf16", "q8", "q4", "q2:block=5", "sign", "sign:block=7", "topk:0.1", "topk:0.3 | q4", "randk:0.2 | fp16", "topk:0.05 | sign", "sketch:5,cols=40,rows=3", "q8 | zstd", "topk:0.3 | q4 | zstd", "topk:0.3,block=4 | q2 | zstd", "q2:block=5,dither", "topk:0.3 | q4:dither | zstd", "subset:0.3,block=4 | q2:dither", "subset:0.3,block=4,keep=7 | q2:dither", "subset:0.2 | q8:stochastic | zstd"]
_payloads: dict[tuple[str, int], bytes] = {}


def valid_payload(spec: str, d: int) -> bytes:
    key = (spec, d)
    if key not in _payloads:
        _payloads[key] = parse_chain(spec).encode(heavy_tailed(d, seed=d), None)[0]
    return _payloads[key]


payloads = st.builds(valid_payload, st.sampled_from(CHAINS), st.sampled_from([0, 1, 13, 200, 2500]))


def decodes_or_refuses(payload: bytes, dim: int | None = None) -> None:
    try:
        out = decode_payload(payload, dim=dim)
    except PayloadError as exc:
        assert str(exc)  # a reason, not an empty message
        return
    assert out.dtype == torch.float32 and out.dim() == 1 and torch.isfinite(out).all()


def with_crc(body: bytes) -> bytes:
    """`body` + the checksum of its format version (the one in its header when it names one this build reads)."""
    version = body[2] if len(body) > 2 and body[2] in wire.READS else wire.VERSION
    return body + struct.pack("<I", wire.checksum(body, version))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_are_refused(data):
    with pytest.raises(PayloadError):
        decode_payload(data)


@given(st.binary(min_size=0, max_size=120))
@settings(max_examples=300, deadline=None)
def test_random_bodies_behind_a_valid_header_and_crc_never_crash(data):
    # Random content that passes the magic, version and CRC checks exercises every structural check.
    for support in (0, 1, 2, 3, 0x80, 0x81):  # 0x80: the body is zstd-coded
        for value in range(5):
            for version in wire.READS:
                decodes_or_refuses(with_crc(b"FL" + bytes([version, support, value]) + data))


@given(p=payloads, cut=st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_truncated_payloads_are_refused(p, cut):
    with pytest.raises(PayloadError):
        decode_payload(p[: cut % len(p)])


@given(p=payloads, pos=st.integers(0, 10**6), bit=st.integers(0, 7))
@settings(max_examples=300, deadline=None)
def test_any_single_bit_flip_is_detected(p, pos, bit):
    b = bytearray(p)
    b[pos % len(b)] ^= 1 << bit
    with pytest.raises(PayloadError):
        decode_payload(bytes(b))


@given(p=payloads, edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4), extra=st.binary(max_size=6), cut=st.integers(0, 8))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_consistent_looking_forgeries_never_crash(p, edits, extra, cut):
    # Edits with a recomputed CRC: only the structural checks stand between them and a crash.
    b = bytearray(p[:-4])
    for pos, val in edits:
        b[pos % len(b)] = val
    body = bytes(b[: len(b) - cut]) + extra
    h_dim = struct.unpack_from("<I", p, 5)[0]
    decodes_or_refuses(with_crc(body), dim=h_dim)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "shorter than the 13-byte minimum"),
        (b"XX" + bytes(20), "not a fleetlearn codec payload"),
        (b"FL\x09" + bytes(20), "format version 9; this build reads versions 1, 2"),
    ],
)
def test_reasons_are_clear(payload, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_payload(payload)


def test_crc_mismatch_reason():
    p = bytearray(valid_payload("q8", 200))
    p[40] ^= 0xFF
    with pytest.raises(PayloadError, match=r"checksum \(XXH3\) mismatch .* the payload is corrupted"):
        decode_payload(bytes(p))


@pytest.mark.parametrize("spec", ["none", "q8 | zstd", "topk:0.3,block=4 | q2 | zstd", "sketch:5,cols=40,rows=3"])
def test_version_1_payloads_with_a_crc32_trailer_are_still_read(spec):
    """Version 2 changed only the trailer (XXH3 instead of CRC32): a version-1 payload (an
    older client) decodes to the same vector, and its CRC is still checked."""
    p = valid_payload(spec, 2500)
    assert p[2] == wire.VERSION == 2
    v1 = bytearray(p[:-4])
    v1[2] = 1
    v1 = bytes(v1) + struct.pack("<I", zlib.crc32(bytes(v1)))
    if spec.startswith("sketch"):
        assert torch.equal(read_sketch(v1).table, read_sketch(p).table)
    else:
        assert torch.equal(decode_payload(v1), decode_payload(p))
    bad = bytearray(v1)
    bad[20] ^= 0x01
    with pytest.raises(PayloadError, match="CRC32 mismatch"):
        decode_payload(bytes(bad))
    future = bytearray(p)
    future[2] = 3
    with pytest.raises(PayloadError, match="payload format version 3; this build reads versions 1, 2"):
        decode_payload(bytes(future))


def _reframe(p: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(p[:-4])
    struct.pack_into(fmt, b, offset, value)
    return with_crc(bytes(b))


def test_structural_reasons_are_clear():
    q = valid_payload("q8", 200)
    with pytest.raises(PayloadError, match="announces 3 bits"):
        decode_payload(_reframe(q, 9, "<B", 3))
    with pytest.raises(PayloadError, match="scales must be finite"):
        decode_payload(_reframe(q, 15, "<f", 3e38))  # a step whose top level overflows float32
    with pytest.raises(PayloadError, match="unknown flags 0x4"):
        decode_payload(_reframe(q, 10, "<B", 4))
    with pytest.raises(PayloadError, match="both stochastic and dithered"):
        decode_payload(_reframe(q, 10, "<B", 3))
    with pytest.raises(PayloadError, match="truncated or inconsistent"):  # a dither seed the encoder never wrote
        decode_payload(_reframe(q, 10, "<B", 2))
    qd = valid_payload("q2:block=5,dither", 200)
    decode_payload(qd)
    with pytest.raises(PayloadError, match="scales must be finite"):  # dithered values reach (c + 1/2) steps
        decode_payload(_reframe(qd, 23, "<f", 2.0e38))  # 1.5 * 2e38 would pass undithered: 2 * 2e38 does not
    with pytest.raises(PayloadError, match="trailing bytes|scales must be finite"):  # the seed read as scales and codes
        decode_payload(_reframe(qd, 10, "<B", 0))
    with pytest.raises(PayloadError, match="truncated or inconsistent"):
        decode_payload(_reframe(q, 5, "<I", 100_000))  # a larger dim than the bytes present
    with pytest.raises(PayloadError, match="trailing bytes"):
        decode_payload(_reframe(q, 5, "<I", 100))
    t = valid_payload("topk:0.1", 2500)
    with pytest.raises(PayloadError, match="k=3000 entries of a vector of dim 2500"):
        decode_payload(_reframe(t, 9, "<I", 3000))
    with pytest.raises(PayloadError, match="out of range"):
        decode_payload(_reframe(t, 13, "<I", 2400))  # first index shifted: the last falls off the end
    b = valid_payload("topk:0.2,block=4", 2502)  # 626 blocks, the last holds 2 entries
    with pytest.raises(PayloadError, match="block size 0; allowed 1 to 65536"):
        decode_payload(_reframe(b, 9, "<I", 0))
    with pytest.raises(PayloadError, match="block size 70000"):
        decode_payload(_reframe(b, 9, "<I", 70_000))
    with pytest.raises(PayloadError, match="k=700 entries of a vector of dim 626"):  # more blocks than there are
        decode_payload(_reframe(b, 13, "<I", 700))
    with pytest.raises(PayloadError, match="out of range for dim 626"):
        decode_payload(_reframe(b, 17, "<I", 600))  # first block shifted: the last falls off the end
    with pytest.raises(PayloadError, match="truncated or inconsistent|trailing bytes"):
        decode_payload(_reframe(b, 9, "<I", 2))  # other block size: other entry count than the values sent
    f = bytearray(valid_payload("none", 13)[:-4])
    f[9:13] = struct.pack("<f", float("nan"))
    with pytest.raises(PayloadError, match="non-finite"):
        decode_payload(with_crc(bytes(f)))
    s = valid_payload("sketch:5,cols=40,rows=3", 200)
    with pytest.raises(PayloadError, match="rows"):
        decode_payload(_reframe(s, 9, "<H", 99))
    with pytest.raises(PayloadError, match="dim 200, expected 201"):
        read_sketch(s, dim=201)
    with pytest.raises(PayloadError, match="not a sketch"):
        sum_sketches([q])


def test_payload_must_be_bytes():
    with pytest.raises(PayloadError, match="bytes"):
        decode_payload("FL")  # type: ignore[arg-type]
    assert torch.equal(decode_payload(bytearray(valid_payload("q8", 13))), decode_payload(valid_payload("q8", 13)))
    assert torch.equal(decode_payload(memoryview(valid_payload("q8", 13))), decode_payload(valid_payload("q8", 13)))
