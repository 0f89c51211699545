"""Count sketch: linear, hashed as documented, and it recovers heavy hitters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compression_helpers import heavy_tailed
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import CountSketch, decode_payload, parse_chain, read_sketch, sum_sketches, unsketch
from fleetlearn.compression.sketch import _row_params, sketch_vector
from fleetlearn.params import PayloadError


def int_vector(d: int, seed: int) -> torch.Tensor:
    # small integers: float32 sums of them are exact, so linearity can be checked with ==
    return torch.from_numpy(np.random.default_rng(seed).integers(-1000, 1000, d).astype(np.float32))


@given(d=st.integers(0, 3000), rows=st.integers(1, 7), cols=st.integers(1, 60), seed=st.integers(0, 2**40), vs=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_sketch_of_a_sum_is_the_sum_of_sketches(d, rows, cols, seed, vs):
    a, b = int_vector(d, vs), int_vector(d, vs + 1)
    sa, sb, sab = (sketch_vector(x, rows, cols, seed) for x in (a, b, a + b))
    assert torch.equal(sa + sb, sab)
    assert torch.equal(sketch_vector(3 * a, rows, cols, seed), 3 * sa)


def test_summed_payloads_equal_the_payload_of_the_sum():
    chain = parse_chain("sketch:10,cols=200,rows=5,seed=3")
    rng = np.random.default_rng(0)
    xs = [torch.from_numpy(rng.integers(-50, 50, 3000).astype(np.float32)) for _ in range(4)]
    total = sum_sketches([chain.encode(x, None)[0] for x in xs])
    direct = chain.encode(sum(xs), None)[0]
    assert total == direct
    assert torch.equal(decode_payload(total), chain.decode(direct))
    # weights: the sketch of the weighted sum (floats now, so up to rounding)
    w = [0.1, 0.2, 0.3, 0.4]
    ws = read_sketch(sum_sketches([chain.encode(x, None)[0] for x in xs], weights=w)).table
    ref = read_sketch(chain.encode(sum(wi * x for wi, x in zip(w, xs)), None)[0]).table
    assert torch.allclose(ws, ref, rtol=1e-5, atol=1e-3)


def test_hashes_follow_the_documented_definition():
    # An independent, loop-based count sketch from the module docstring's definition.
    d, rows, cols, seed = 300, 3, 17, 42
    x = heavy_tailed(d)
    ref = np.zeros((rows, cols))
    for r in range(rows):
        a, b = _row_params(seed, r)
        for i in range(d):
            u = ((a * i + b) % 2**64) >> 32
            sign = -1.0 if u >> 31 else 1.0
            bucket = ((u & 0x7FFFFFFF) * cols) >> 31
            ref[r, bucket] += sign * float(x[i])
    assert np.allclose(sketch_vector(x, rows, cols, seed).numpy(), ref, atol=1e-5)


def test_bucket_occupancy_is_uniform():
    from fleetlearn.compression.sketch import sketch_codes

    d, cols = 100_000, 50
    codes = sketch_codes(2, cols, 9, d).numpy()
    for r in range(2):
        bucket = (codes[r] - 2 * r * cols) >> 1
        occ = np.bincount(bucket, minlength=cols)
        assert occ.shape == (cols,)
        z = (occ - d / cols) / np.sqrt(d / cols)
        assert np.abs(z).max() < 5
        neg = (codes[r] & 1).mean()
        assert abs(neg - 0.5) < 5 * 0.5 / np.sqrt(d)


def test_unsketch_recovers_heavy_hitters():
    d, k = 100_000, 20
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal(d) * 1e-3).astype(np.float32))
    hot = np.sort(rng.choice(d, k, replace=False))
    x[torch.from_numpy(hot)] = torch.from_numpy(rng.choice([-1.0, 1.0], k).astype(np.float32) * (1 + rng.random(k)).astype(np.float32))
    chain = parse_chain(f"sketch:{k},cols=2000,rows=5")
    payload, _ = chain.encode(x, None)
    out = chain.decode(payload)
    assert len(payload) == 13 + 18 + 4 * 5 * 2000  # 10x smaller than float32
    assert np.array_equal(np.flatnonzero(out.numpy()), hot)
    assert torch.allclose(out[torch.from_numpy(hot)], x[torch.from_numpy(hot)], atol=0.02)


def test_aggregating_in_sketch_space_finds_the_heavy_hitters_of_the_mean():
    # Each client's update is noisy; the noise averages out in the aggregate sketch.
    d, k, n = 50_000, 10, 8
    rng = np.random.default_rng(1)
    hot = np.sort(rng.choice(d, k, replace=False))
    chain = parse_chain(f"sketch:{k},cols=4000")
    payloads = []
    for i in range(n):
        x = torch.from_numpy((rng.standard_normal(d) * 0.05).astype(np.float32))
        x[torch.from_numpy(hot)] += 1.0
        payloads.append(chain.encode(x, None)[0])
    agg = sum_sketches(payloads, weights=[1 / n] * n)
    out = decode_payload(agg)
    assert np.array_equal(np.flatnonzero(out.numpy()), hot)
    assert torch.allclose(out[torch.from_numpy(hot)], torch.ones(k), atol=0.1)


def test_even_number_of_rows_uses_the_mean_of_the_two_middle_estimates():
    x = torch.zeros(1000)
    x[7] = 5.0
    sk = CountSketch(1, cols=100, rows=4)
    table = sk.sketch(x)
    out = sk.unsketch(table, 1000)
    assert out[7] == 5.0 and torch.count_nonzero(out) == 1
    assert torch.equal(unsketch(table, 1000, 1, 0), out)


def test_sum_refuses_sketches_of_different_shapes():
    a = parse_chain("sketch:5,cols=100").encode(heavy_tailed(1000), None)[0]
    b = parse_chain("sketch:5,cols=101").encode(heavy_tailed(1000), None)[0]
    c = parse_chain("sketch:5,cols=100,seed=1").encode(heavy_tailed(1000), None)[0]
    with pytest.raises(PayloadError, match="cols=101"):
        sum_sketches([a, b])
    with pytest.raises(PayloadError, match="seed=1"):
        sum_sketches([a, c])
    with pytest.raises(PayloadError, match="not a sketch"):
        sum_sketches([a, parse_chain("q8").encode(heavy_tailed(1000), None)[0]])
    with pytest.raises(ValueError, match="weights"):
        sum_sketches([a, a], weights=[1.0])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7])
def test_median_network_matches_sorting(rows):
    from fleetlearn.compression.sketch import _median_

    rng = np.random.default_rng(rows)
    m = torch.from_numpy(rng.integers(-3, 4, (rows, 4000)).astype(np.float32))  # many ties
    got = _median_([r.clone() for r in m])
    s = m.sort(0).values
    want = s[rows // 2] if rows % 2 else (s[rows // 2 - 1] + s[rows // 2]) / 2
    assert torch.equal(got, want)
