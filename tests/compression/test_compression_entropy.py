"""The lossless `zstd` stage: exact round trips, applied only when it pays, refused forgeries."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard
from compression_helpers import heavy_tailed, vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import decode_payload, estimate_bytes, parse_chain, read_header
from fleetlearn.compression import wire
from fleetlearn.params import PayloadError

INNER = ["none", "q8", "q4", "q8:stochastic", "sign", "topk:0.1 | q8", "randk:0.2 | fp16", "fp16"]


@given(v=vectors(max_dim=800), inner=st.sampled_from(INNER))
@settings(max_examples=80, deadline=None)
def test_zstd_is_lossless_on_top_of_any_chain(v, inner):
    if "fp16" in inner:
        v = v.clamp(-6e4, 6e4)
    # Same seed, same stochastic draws: the zstd chain must decode to exactly what the chain alone decodes to.
    plain, _ = parse_chain(inner, seed=3).encode(v, None)
    coded, _ = parse_chain(f"{inner} | zstd", seed=3).encode(v, None)
    assert torch.equal(decode_payload(coded), decode_payload(plain))
    assert len(coded) <= len(plain)  # applied only when it pays
    assert len(coded) <= estimate_bytes(f"{inner} | zstd", v.numel())


def test_zstd_alone_round_trips_float32_exactly():
    v = heavy_tailed(5000)
    p, state = parse_chain("zstd").encode(v, None)
    assert state is None
    assert torch.equal(decode_payload(p, dim=5000), v)


def test_pays_on_peaked_codes_and_steps_aside_on_incompressible_ones():
    # Heavy-tailed deltas: most q8 codes sit near the middle of the grid, so entropy coding pays.
    v = heavy_tailed(100_000)
    plain, _ = parse_chain("q8").encode(v, None)
    coded, _ = parse_chain("q8 | zstd").encode(v, None)
    assert read_header(coded)[0].support == wire.SUPPORT_DENSE
    assert coded[3] & wire.SUPPORT_ZSTD_FLAG
    assert 4 * v.numel() / len(coded) > 4.0 > 4 * v.numel() / len(plain)
    # Uniform codes carry a full 8 bits each: zstd cannot win, the payload goes out unchanged.
    u = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, 4096).astype(np.float32))
    a, _ = parse_chain("q8:block=4096").encode(u, None)
    b, _ = parse_chain("q8:block=4096 | zstd").encode(u, None)
    assert a == b and not b[3] & wire.SUPPORT_ZSTD_FLAG


def test_spec_and_level_round_trip():
    assert parse_chain("q8|zstd").spec == "q8 | zstd"
    assert parse_chain("q8 | zstd:level=5").spec == "q8 | zstd:level=5"
    assert parse_chain("q8 | zstd:level=1").spec == "q8 | zstd"
    v = heavy_tailed(3000)
    a = decode_payload(parse_chain("q8 | zstd:level=9").encode(v, None)[0])
    assert torch.equal(a, decode_payload(parse_chain("q8").encode(v, None)[0]))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("zstd | q8", "must be the last element"),
        ("zstd | zstd", "must be the last element"),
        ("sketch:0.1 | zstd", "nothing may follow 'sketch'"),
        ("ef | zstd", "'ef' needs a lossy codec"),
        ("q8 | zstd:level=0", r"level must be an integer in \[1, 19\]"),
        ("q8 | zstd:level=x", "level"),
        ("q8 | zstd:fast", "unknown argument 'fast'"),
        ("q8 | zstd:speed=3", "unknown option 'speed'"),
    ],
)
def test_bad_chains_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_chain(spec)


# -- forged zstd bodies (valid magic, version and CRC: only the structural checks stand) --
def forge(support: int, value: int, dim: int, size: int, frame: bytes) -> bytes:
    body = wire.HEADER.pack(wire.MAGIC, wire.VERSION, support | wire.SUPPORT_ZSTD_FLAG, value, dim) + struct.pack("<I", size) + frame
    return body + struct.pack("<I", wire.checksum(body))


def test_a_body_larger_than_the_dimension_allows_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))  # 10 MB of zeros in a few hundred bytes
    with pytest.raises(PayloadError, match="announces 10000000 bytes; a payload of dim 10 holds at most"):
        decode_payload(forge(wire.SUPPORT_DENSE, wire.VALUE_F32, 10, 10_000_000, bomb))


def test_frame_size_must_match_the_announced_size():
    frame = zstandard.ZstdCompressor().compress(bytes(40))
    with pytest.raises(PayloadError, match="zstd frame holds 40 bytes, the payload announces 44"):
        decode_payload(forge(wire.SUPPORT_DENSE, wire.VALUE_F32, 11, 44, frame))
    # the right size decodes (10 float32 zeros)
    assert torch.equal(decode_payload(forge(wire.SUPPORT_DENSE, wire.VALUE_F32, 10, 40, frame)), torch.zeros(10))


def test_garbage_frame_is_refused():
    with pytest.raises(PayloadError, match="does not decompress|zstd frame holds"):
        decode_payload(forge(wire.SUPPORT_DENSE, wire.VALUE_F32, 10, 40, b"\x28\xb5\x2f\xfd" + b"\x00garbage"))
    body = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.SUPPORT_ZSTD_FLAG, wire.VALUE_F32, 10) + b"\x01\x02"
    with pytest.raises(PayloadError, match="zstd body length needs 4 bytes"):
        decode_payload(body + struct.pack("<I", wire.checksum(body)))


def test_a_zstd_coded_sketch_is_refused():
    frame = zstandard.ZstdCompressor().compress(bytes(64))
    with pytest.raises(PayloadError, match="sketch payload cannot be zstd-coded"):
        decode_payload(forge(wire.SUPPORT_SKETCH, wire.VALUE_F32, 10, 64, frame))


@given(cut=st.integers(1, 10**6))
@settings(max_examples=100, deadline=None)
def test_truncated_zstd_payloads_are_refused(cut):
    p, _ = parse_chain("q8 | zstd").encode(heavy_tailed(3000), None)
    assert p[3] & wire.SUPPORT_ZSTD_FLAG
    with pytest.raises(PayloadError):
        decode_payload(p[: cut % len(p)])


def test_consistent_body_with_a_wrong_inner_length_is_refused():
    # A well-formed zstd frame whose plain body is one byte short of what the q8 section needs.
    v = heavy_tailed(1000)
    p, _ = parse_chain("q8").encode(v, None)
    inner = p[wire.HEADER.size : -4][:-1]
    frame = zstandard.ZstdCompressor().compress(inner)
    with pytest.raises(PayloadError, match="truncated or inconsistent"):
        decode_payload(forge(wire.SUPPORT_DENSE, wire.VALUE_QUANT, 1000, len(inner), frame))


BOMB_PROBE = r"""
import resource, struct, sys, zlib
import zstandard
from fleetlearn.compression import decode_payload, wire
from fleetlearn.params import PayloadError

size = int(sys.argv[1])
frame = zstandard.ZstdCompressor().compress(bytes(size))  # zeros: a few KB on the wire
# The sender's header claims a dimension whose body bound (16 * dim) admits `size` bytes.
body = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.SUPPORT_DENSE | wire.SUPPORT_ZSTD_FLAG, wire.VALUE_F32, 2**28 - 1)
body += struct.pack("<I", size) + frame
payload = body + struct.pack("<I", wire.checksum(body))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_payload(payload, dim=1000)
    print("decoded", file=sys.stderr)
except PayloadError as exc:
    print(str(exc), file=sys.stderr)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(payload), (after - before) // 1024)
"""


def test_a_bomb_is_bounded_by_the_receivers_dimension_not_the_senders_header():
    # A ~16 KB payload whose header claims dim 2^28 - 1 announces a 512 MiB zstd body (under
    # that dimension's bound).  The receiver expects dim 1000: it must refuse before it
    # decompresses, so the process's peak memory does not move (measured in a fresh process).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(512 << 20)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    nbytes, grown_mb = map(int, out.stdout.split())
    assert nbytes < 64 << 10
    assert "payload is for a vector of dim 268435455, expected 1000" in out.stderr
    assert grown_mb < 64, f"decoding a {nbytes}-byte payload raised peak memory by {grown_mb} MiB"
