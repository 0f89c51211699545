"""Quantization into Z_{2^k} and Shamir secret sharing over GF(2^127 - 1)."""

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fleetlearn.privacy import Quantizer, ShamirError, combine_shares, split_secret
from fleetlearn.privacy.shamir import PRIME


# -- quantization -------------------------------------------------------------------------
@pytest.mark.parametrize("rounding,per", [("stochastic", 1.0), ("deterministic", 0.5)])
def test_roundtrip_error_bound(rounding, per):
    rng = np.random.default_rng(0)
    q = Quantizer(clip_range=2.0, max_clients=50, modulus_bits=24, rounding=rounding)
    x = rng.uniform(-2, 2, 5000)
    err = np.abs(q.dequantize(q.quantize(x, rng)) - x)
    assert err.max() <= per / q.scale + 1e-12
    assert np.linalg.norm(q.dequantize(q.quantize(x, rng)) - x) <= q.max_l2_error(x.size)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    q = Quantizer(clip_range=1.0, max_clients=1, modulus_bits=8)  # coarse: 126 levels
    x = np.full(200_000, 0.3 / q.scale + 0.25)  # a quarter of a level above a grid point
    got = q.dequantize(q.quantize(x, rng)).mean()
    assert got == pytest.approx(x[0], abs=0.01 / q.scale)


def test_values_outside_range_are_clipped():
    q = Quantizer(clip_range=1.0, max_clients=4, rounding="deterministic")
    assert np.array_equal(q.dequantize(q.quantize(np.array([5.0, -7.0, 0.5]))), [1.0, -1.0, 0.5])


@pytest.mark.parametrize("bits", [8, 16, 32, 48, 62])
def test_headroom_sum_of_max_clients_never_wraps(bits):
    n = 37
    q = Quantizer(clip_range=3.0, max_clients=n, modulus_bits=bits, rounding="deterministic")
    assert n * q.levels < 2 ** (bits - 1) and q.levels % 2 == 0
    for sign in (+1.0, -1.0):
        field = q.quantize(np.full((n, 5), sign * 3.0))
        assert (field < 2**bits).all()
        total = Quantizer.field_sum(field, bits)
        assert np.allclose(q.dequantize(total, count=n), sign * 3.0 * n)
    with pytest.raises(ValueError, match="wrap"):
        q.dequantize(total, count=n + 1)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 20)), elements=st.floats(-10, 10)), st.integers(8, 40))
def test_field_sum_equals_integer_sum(x, bits):
    """Summation in the ring is exactly the integer sum of the signed levels."""
    q = Quantizer(clip_range=4.0, max_clients=12, modulus_bits=bits)
    field = q.quantize(x, np.random.default_rng(0))
    signed = q.to_signed(field)
    assert np.abs(signed).max() <= q.levels
    assert np.array_equal(q.to_signed(Quantizer.field_sum(field, bits)), signed.sum(0))


def test_quantizer_errors():
    with pytest.raises(ValueError, match="modulus_bits"):
        Quantizer(1.0, 10, modulus_bits=64)
    with pytest.raises(ValueError, match="headroom"):
        Quantizer(1.0, 1000, modulus_bits=8)
    with pytest.raises(ValueError, match="non-finite"):
        Quantizer(1.0, 10).quantize(np.array([np.nan]))
    with pytest.raises(ValueError, match="clip_range"):
        Quantizer(0.0, 10)


# -- Shamir -------------------------------------------------------------------------------
def test_any_t_shares_reconstruct_and_fewer_do_not():
    secret = os.urandom(32)
    xs = list(range(1, 8))
    shares = split_secret(secret, xs, 4, os.urandom)
    assert shares.shape == (7, 3)
    for subset in itertools.combinations(range(7), 4):
        assert combine_shares([xs[i] for i in subset], shares[list(subset)], 32) == secret
    # t - 1 shares interpolate a different polynomial: not the secret (w.p. 1 - 2^-120)
    try:
        wrong = combine_shares(xs[:3], shares[:3], 32)
    except ShamirError:
        wrong = None
    assert wrong != secret


def test_modified_share_changes_or_breaks_the_secret():
    secret = os.urandom(32)
    xs = [3, 5, 9]
    shares = split_secret(secret, xs, 3, os.urandom)
    shares[1, 0] = (shares[1, 0] + 1) % PRIME
    try:
        got = combine_shares(xs, shares, 32)
    except ShamirError:
        got = None
    assert got != secret


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 6), st.integers(0, 4), st.randoms(use_true_random=False))
def test_shamir_property(secret, t, extra, rnd):
    n = t + extra
    xs = rnd.sample(range(1, 10_000), n)
    shares = split_secret(secret, xs, t, lambda k: rnd.randbytes(k))
    pick = rnd.sample(range(n), t)
    assert combine_shares([xs[i] for i in pick], shares[pick], len(secret)) == secret


def test_shamir_errors():
    with pytest.raises(ShamirError, match="threshold"):
        split_secret(b"x" * 32, [1, 2], 3, os.urandom)
    with pytest.raises(ShamirError, match="distinct"):
        split_secret(b"x" * 32, [1, 1, 2], 2, os.urandom)
    with pytest.raises(ShamirError, match="distinct"):
        split_secret(b"x" * 32, [0, 1, 2], 2, os.urandom)
    shares = split_secret(b"x" * 32, [1, 2, 3], 2, os.urandom)
    with pytest.raises(ShamirError, match="duplicate"):
        combine_shares([1, 1], shares[:2], 32)
