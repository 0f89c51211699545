"""Chain syntax, validation, byte-exact sizes and the codec contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from compression_helpers import heavy_tailed, vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import (
    CODECS,
    CodecChain,
    UniformQuantizer,
    decode_payload,
    estimate_bytes,
    parse_chain,
    seed_state,
)
from fleetlearn.params import PayloadError

FIXED = ["none", "fp16", "bf16", "q8", "q4", "q2", "q4:block=7", "q8:stochastic", "sign", "sign:block=10"]
SPARSE = ["topk:0.1", "topk:5", "topk:0.2,block=8", "randk:0.2", "topk:0.05 | q8", "topk:0.2 | fp16", "randk:0.3,unbiased | q4:stochastic", "topk:0.1 | sign",
          "subset:7", "subset:0.2,block=4 | q8:stochastic"]
ALL = FIXED + SPARSE + ["sketch:0.05", "ef | q4", "ef | topk:0.1 | q8", "ef | sketch:0.1,rows=3", "zstd", "q8 | zstd", "ef | topk:0.1 | q4 | zstd"]


def size_formula(spec: str, d: int) -> int:
    """The documented payload sizes of fixed-size chains (13 = header + CRC)."""
    c = parse_chain(spec)
    v = c.value
    if v.name == "none":
        body = 4 * d
    elif v.name in ("fp16", "bf16"):
        body = 2 * d
    elif v.name.startswith("q"):
        body = 6 + 4 * math.ceil(d / v.block) + math.ceil(d * v.bits / 8)
    elif v.name == "sign":
        nb = (1 if d else 0) if v.block == 0 else math.ceil(d / v.block)
        body = 4 + 4 * nb + math.ceil(d / 8)
    else:
        raise AssertionError(spec)
    return 13 + body


# -- syntax ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, normal",
    [
        ("", "none"),
        ("  none ", "none"),
        ("topk:0.01|q8", "topk:0.01 | q8"),
        ("  TopK : 0.01 |  Q8:block=256 ", "topk:0.01 | q8"),
        ("q4:block=128 , stochastic", "q4:block=128,stochastic"),
        ("q4:STOCHASTIC", "q4:stochastic"),
        ("topk:100 | none", "topk:100"),
        ("ef|topk:1e-3|q4", "ef | topk:0.001 | q4"),
        ("sketch:0.01, rows=5, seed=0", "sketch:0.01"),
        ("sketch:50,cols=0.1,rows=3,seed=7", "sketch:50,cols=0.1,rows=3,seed=7"),
        ("randk:0.5,unbiased|q8", "randk:0.5,unbiased | q8"),
        ("sign:block=0", "sign"),
        ("topk:0.16, BLOCK=16 | q2", "topk:0.16,block=16 | q2"),
        ("topk:0.1,block=1", "topk:0.1"),
    ],
)
def test_spec_is_normalised_and_round_trips(spec, normal):
    chain = parse_chain(spec)
    assert chain.spec == normal
    assert parse_chain(chain.spec).spec == normal


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("q3", ["'q3'", "allowed", "q8", "topk"]),
        ("topk", ["'topk'", "exactly one amount", "fraction"]),
        ("topk:0", ["'topk'", "'0'", "fraction 0 < F <= 1"]),
        ("topk:1.5", ["'topk'", "'1.5'", "fraction"]),
        ("topk:-3", ["'topk'", "'-3'"]),
        ("topk:abc", ["'topk'", "'abc'", "not a number"]),
        ("topk:nan", ["'topk'", "'nan'"]),
        ("topk:0.1,k=3", ["'topk'", "'k'", "allowed", "block=B"]),
        ("topk:0.1,block=0", ["'topk'", "block='0'", "[1, 65536]"]),
        ("topk:0.1,block=2.5", ["'topk'", "block='2.5'", "integer"]),
        ("randk:0.1,block=4", ["'randk'", "'block'", "allowed"]),
        ("q8:block=0", ["'q8'", "block", "[1, 65536]"]),
        ("q8:block=abc", ["'q8'", "block='abc'", "integer"]),
        ("q8:fast", ["'q8'", "'fast'", "stochastic", "block=N"]),
        ("q8:block=64,block=32", ["'q8'", "'block' given twice"]),
        ("q4:bits=3", ["'q4'", "'bits'", "block=N"]),
        ("fp16:1", ["'fp16'", "takes no arguments"]),
        ("ef:0.9 | q8", ["'ef'", "takes no arguments"]),
        ("sketch", ["'sketch'", "heavy-hitter"]),
        ("sketch:0.01,rows=40", ["'sketch'", "rows", "[1, 15]"]),
        ("sketch:0.01,width=3", ["'sketch'", "'width'", "cols, rows, seed"]),
        ("topk:0.1 | randk:0.1", ["2 sparsifiers", "'topk:0.1'", "'randk:0.1'"]),
        ("topk:0.1 | sketch:0.1", ["at most one"]),
        ("fp16 | q8", ["2 value codecs", "'fp16'", "'q8'"]),
        ("q8 | topk:0.01", ["'q8' comes before 'topk:0.01'", "topk:0.01 | q8"]),
        ("sketch:0.01 | q8", ["nothing may follow 'sketch'", "float32"]),
        ("q8 | ef", ["'ef' must be the first"]),
        ("ef | ef | q8", ["'ef' must be the first"]),
        ("ef", ["'ef' needs a lossy codec"]),
        ("ef | none", ["'ef' needs a lossy codec"]),
        ("topk:0.1 || q8", ["empty element"]),
        ("q8 |", ["empty element"]),
        ("q8:", ["':' must be followed"]),
        ("q8:block=", ["key=value"]),
    ],
)
def test_parse_errors_are_value_errors_that_say_what_is_allowed(spec, needles):
    with pytest.raises(ValueError) as info:
        parse_chain(spec)
    assert not isinstance(info.value, PayloadError)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_non_string_spec_is_refused():
    with pytest.raises(ValueError, match="string"):
        parse_chain(None)  # type: ignore[arg-type]


def test_amount_integer_is_a_count_and_decimal_is_a_fraction():
    v = heavy_tailed(1000)
    assert np.count_nonzero(parse_chain("topk:1").decode(parse_chain("topk:1").encode(v)[0]).numpy()) == 1
    full = parse_chain("topk:1.0")
    assert torch.equal(full.decode(full.encode(v)[0]), v)
    assert parse_chain("topk:0.0104").support.k(1000) == 10  # rounds to the nearest count
    assert parse_chain("topk:0.0001").support.k(1000) == 1  # at least one
    assert parse_chain("topk:5000").support.k(1000) == 1000  # at most d


def test_lossy_flags():
    assert not parse_chain("none").lossy
    for spec in ["fp16", "bf16", "q8", "sign", "topk:0.1", "subset:0.1", "sketch:0.1", "ef | q8"]:
        assert parse_chain(spec).lossy, spec
    assert not parse_chain("zstd").lossy and parse_chain("q8 | zstd").lossy
    assert set(CODECS) == {"none", "fp16", "bf16", "q8", "q4", "q2", "sign", "topk", "randk", "subset", "sketch", "ef", "zstd", "budget"}


# -- contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("d", [0, 1, 2, 9, 257, 3001])
def test_round_trip_shape_dtype_and_sizes(spec, d):
    chain = parse_chain(spec)
    v = heavy_tailed(d, seed=d)
    payload, _ = chain.encode(v, None)
    assert isinstance(payload, bytes)
    out = chain.decode(payload)
    assert out.dtype == torch.float32 and out.shape == (d,)
    assert torch.isfinite(out).all()
    est = estimate_bytes(spec, d)
    if chain.exact_size:
        assert len(payload) == est
    else:
        assert len(payload) <= est


@given(v=vectors(max_dim=600), spec=st.sampled_from(FIXED))
@settings(max_examples=60, deadline=None)
def test_fixed_size_payloads_match_the_documented_formula(v, spec):
    if spec == "fp16":
        v = v.clamp(-6e4, 6e4)
    payload, _ = parse_chain(spec).encode(v, None)
    assert len(payload) == size_formula(spec, v.numel()) == estimate_bytes(spec, v.numel())


def test_q8_is_at_least_3_9_times_smaller_than_float32():
    d = 10_000
    payload, _ = parse_chain("q8").encode(heavy_tailed(d), None)
    assert 4 * d / len(payload) >= 3.9
    assert len(payload) == 13 + 6 + 4 * 40 + d


def test_sketch_size_is_exact():
    chain = parse_chain("sketch:20,cols=300,rows=3")
    payload, _ = chain.encode(heavy_tailed(5000), None)
    assert len(payload) == 13 + 18 + 4 * 3 * 300 == estimate_bytes("sketch:20,cols=300,rows=3", 5000)


def test_identity_is_float32_bytes_with_a_13_byte_frame():
    v = heavy_tailed(100)
    payload, state = parse_chain("none").encode(v, None)
    assert state is None
    assert len(payload) == 4 * 100 + 13
    assert payload[9 : 9 + 400] == v.numpy().astype("<f4").tobytes()
    assert torch.equal(decode_payload(payload), v)


def test_any_chain_decodes_any_payload():
    v = heavy_tailed(2000)
    payloads = {s: parse_chain(s).encode(v, None)[0] for s in ALL}
    reader = parse_chain("none")
    for s, p in payloads.items():
        assert torch.equal(reader.decode(p), parse_chain(s).decode(p)), s


def test_decode_checks_the_expected_dimension():
    p, _ = parse_chain("q8").encode(heavy_tailed(100), None)
    assert parse_chain("q8").decode(p, dim=100).shape == (100,)
    with pytest.raises(PayloadError, match="dim 100, expected 99"):
        parse_chain("q8").decode(p, dim=99)


def test_a_stage_object_is_a_codec_as_a_one_element_chain():
    # Stages are chain elements; CodecChain([stage]) is the codec (compression/base.py no longer
    # imports codec.py back: no import circle).
    v = heavy_tailed(1000)
    q = CodecChain([UniformQuantizer(8)])
    payload, state = q.encode(v)
    assert state is None and q.spec == "q8"
    assert torch.equal(q.decode(payload), parse_chain("q8").decode(parse_chain("q8").encode(v)[0]))


def test_chain_built_from_objects_is_validated():
    with pytest.raises(ValueError, match="2 value codecs"):
        CodecChain([UniformQuantizer(8), UniformQuantizer(4)])


# -- edge cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL)
def test_all_zeros_decode_to_zeros(spec):
    v = torch.zeros(777)
    chain = parse_chain(spec)
    assert torch.equal(chain.decode(chain.encode(v, None)[0]), v)


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(spec, bad):
    v = heavy_tailed(50)
    v[17] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        parse_chain(spec).encode(v, None)


@pytest.mark.parametrize("shape", [(3, 4), ()])
def test_non_flat_input_is_refused(shape):
    with pytest.raises(ValueError, match=r"flat \(d,\) vector"):
        parse_chain("q8").encode(torch.zeros(shape), None)


def test_other_dtypes_and_grad_tensors_are_accepted():
    v64 = heavy_tailed(300).double().requires_grad_()
    out = parse_chain("none").decode(parse_chain("none").encode(v64, None)[0])
    assert torch.equal(out, v64.detach().float())


def test_fp16_refuses_values_it_would_turn_into_inf():
    with pytest.raises(ValueError, match="fp16 cannot represent"):
        parse_chain("fp16").encode(torch.tensor([1.0, 7e4]), None)
    assert parse_chain("bf16").decode(parse_chain("bf16").encode(torch.tensor([1.0, 7e4]), None)[0])[1] == 70144.0


# -- randomness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["q4:stochastic", "randk:0.1", "ef | randk:0.05 | q2:stochastic"])
def test_stochastic_chains_are_deterministic_under_a_seed(spec):
    v = heavy_tailed(3000)
    a = parse_chain(spec, seed=5)
    b = parse_chain(spec, seed=5)
    assert [a.encode(v, None)[0] for _ in range(3)] == [b.encode(v, None)[0] for _ in range(3)]
    assert parse_chain(spec, seed=6).encode(v, None)[0] != parse_chain(spec, seed=5).encode(v, None)[0]


def test_seed_in_the_state_gives_a_per_client_stream_independent_of_call_order():
    v = heavy_tailed(3000)
    chain = parse_chain("q2:stochastic")
    p1, s1 = chain.encode(v, seed_state(11))
    chain.encode(v, seed_state(99))  # another client in between changes nothing
    p1b, s1b = parse_chain("q2:stochastic").encode(v, seed_state(11))
    assert p1 == p1b and torch.equal(s1["rng.seed"], s1b["rng.seed"])
    p2, _ = chain.encode(v, s1)  # the next round uses the advanced seed
    assert p2 != p1


def test_deterministic_chains_leave_the_state_alone():
    st = {"other": torch.ones(2)}
    _, out = parse_chain("q8").encode(heavy_tailed(10), st)
    assert out is st
