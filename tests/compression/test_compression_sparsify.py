"""Top-k and random-k: the right entries, exactly k of them, and compact indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compression_helpers import heavy_tailed, kept_indices, vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import parse_chain
from fleetlearn.compression.sparsify import randk_indices, topk_block_indices, topk_indices


def assert_is_topk(v: torch.Tensor, idx: np.ndarray, k: int) -> None:
    a = v.abs().numpy()
    assert idx.shape == (k,)
    assert np.all(np.diff(idx) > 0)  # sorted, distinct
    rest = np.ones(a.shape[0], dtype=bool)
    rest[idx] = False
    if k and rest.any():
        assert a[idx].min() >= a[rest].max()


@given(v=vectors(max_dim=800, min_dim=1), amount=st.one_of(st.integers(1, 900), st.floats(0.001, 1.0)))
@settings(max_examples=120, deadline=None)
def test_topk_keeps_exactly_k_largest_and_they_decode_exactly(v, amount):
    spec = f"topk:{amount}" if isinstance(amount, int) else f"topk:{amount!r}"
    chain = parse_chain(spec)
    k = chain.support.k(v.numel())
    payload, _ = chain.encode(v, None)
    idx = kept_indices(payload)
    assert_is_topk(v, idx, k)
    out = chain.decode(payload)
    assert torch.equal(out[idx], v[idx])
    rest = np.ones(v.numel(), dtype=bool)
    rest[idx] = False
    assert torch.all(out[torch.from_numpy(rest)] == 0)


@given(v=vectors(max_dim=800, min_dim=1), frac=st.floats(0.001, 1.0), block=st.integers(1, 40))
@settings(max_examples=120, deadline=None)
def test_block_topk_keeps_the_whole_blocks_of_largest_norm(v, frac, block):
    chain = parse_chain(f"topk:{frac!r},block={block}")
    d = v.numel()
    nb = -(-d // block)
    kb = chain.support.blocks(d)
    assert kb == min(nb, max(1, round(max(1, round(frac * d)) / block)))
    payload, _ = chain.encode(v, None)
    idx = kept_indices(payload)
    assert idx.size <= chain.support.k(d)  # the bound estimate_bytes relies on
    assert len(payload) <= chain.estimate_bytes(d)
    kept_blocks = np.unique(idx // block)
    assert kept_blocks.size == kb
    # whole blocks: every entry of a kept block is kept
    want = np.concatenate([np.arange(b * block, min(d, (b + 1) * block)) for b in kept_blocks])
    assert np.array_equal(idx, want)
    # and no block left out has a larger L2 norm than a kept one
    pad = np.zeros(nb * block, dtype=np.float64)
    pad[:d] = v.double().numpy()
    norms = np.sqrt((pad.reshape(nb, block) ** 2).sum(1))
    rest = np.ones(nb, dtype=bool)
    rest[kept_blocks] = False
    if rest.any():
        assert norms[kept_blocks].min() >= norms[rest].max() * (1 - 1e-6)
    out = chain.decode(payload)
    assert torch.equal(out[idx], v[idx])
    assert np.count_nonzero(out.numpy()) <= idx.size


def test_block_topk_partial_last_block_and_ties():
    v = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 5.0])  # d = 13, blocks of 4: the last holds one entry
    assert topk_block_indices(v, 1, 4).tolist() == [12]  # norm 5 beats norm 2
    assert topk_block_indices(v, 2, 4).tolist() == [4, 5, 6, 7, 12]
    assert topk_block_indices(v, 9, 4).tolist() == list(range(13))
    assert topk_block_indices(torch.ones(8), 1, 4).tolist() == [0, 1, 2, 3]  # equal norms: the lower block


def test_block_topk_indices_cost_almost_nothing():
    # Same payload budget, about five times the coordinates: a kept block's gaps are zeros, which zstd removes.
    v = heavy_tailed(100_000, seed=3)
    flat = len(parse_chain("topk:0.03 | q2 | zstd").encode(v, None)[0])
    blocked = parse_chain("topk:0.15,block=16 | q2 | zstd")
    payload = blocked.encode(v, None)[0]
    assert kept_indices(payload).size == 15_008  # 938 blocks of 16
    assert len(payload) < 1.6 * flat
    # only block numbers travel, so the upper bound stays close to the real size (adaptive ladders plan with it)
    assert len(payload) <= blocked.estimate_bytes(100_000) < 2.5 * len(payload)
    assert blocked.estimate_bytes(100_000) < parse_chain("q2").estimate_bytes(100_000) / 3


def _adversarial(d: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    ht = heavy_tailed(d, seed=2)
    sparse = torch.zeros(d)
    sparse[torch.from_numpy(rng.choice(d, 5000, replace=False))] = 1.0 + torch.rand(5000)
    return {
        "heavy_tailed": ht,
        "ascending": torch.linspace(-1, 3, d),  # a strided sample sees a skewed picture
        "constant": torch.full((d,), 0.25),  # every entry ties
        "few_levels": torch.from_numpy(rng.integers(-3, 4, d).astype(np.float32)),
        "mostly_zero": sparse,
        "spike_train": torch.where(torch.arange(d) % 64 == 0, 1.0, 1e-3 * ht),  # lines up with the sample stride
    }


@pytest.mark.parametrize("frac", [1e-5, 0.01, 0.2])
def test_fast_topk_on_large_vectors_is_exact(frac):
    d = 1_100_003  # above the size where the sampled threshold kicks in
    for v in _adversarial(d).values():
        k = max(1, round(frac * d))
        assert_is_topk(v, topk_indices(v, k), k)  # exactly k, none smaller than any left out


def test_topk_ties_are_broken_by_lower_index():
    v = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0])
    assert topk_indices(v, 2).tolist() == [1, 2]


@given(d=st.integers(1, 5000), frac=st.floats(0.0001, 1.0), seed=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_randk_picks_exactly_k_distinct_indices(d, frac, seed):
    k = max(1, min(d, round(frac * d)))
    idx = randk_indices(d, k, np.random.default_rng(seed))
    assert idx.shape == (k,) and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < d


@pytest.mark.parametrize("d, k", [(50, 5), (50, 40), (20_000, 400)])
def test_randk_is_uniform(d, k):
    # Every coordinate is kept with probability k/d: counts over N draws are Binomial(N, k/d).
    rng = np.random.default_rng(7)
    N = 4000 if d == 50 else 400
    counts = np.zeros(d)
    for _ in range(N):
        counts[randk_indices(d, k, rng)] += 1
    p = k / d
    z = (counts - N * p) / np.sqrt(N * p * (1 - p))
    assert np.abs(z).max() < 5.5
    assert abs(z.mean()) < 5.5 / np.sqrt(d) + 1e-9  # exactly k per draw: the mean is pinned


def test_randk_unbiased_scaling_makes_the_mean_converge():
    v = heavy_tailed(64, seed=4)
    chain = parse_chain("randk:0.25,unbiased", seed=3)
    N = 6000
    acc = torch.zeros(64, dtype=torch.float64)
    for _ in range(N):
        acc += chain.decode(chain.encode(v, None)[0])
    x = v.double()
    std = x.abs() * np.sqrt((1 / 0.25 - 1) / N)  # per-coordinate std of the mean
    assert torch.all((acc / N - x).abs() <= 6 * std + 1e-12)
    # without the scaling the mean is k/d of the input: clearly biased
    plain = parse_chain("randk:0.25", seed=3)
    m = sum(plain.decode(plain.encode(v, None)[0]).double() for _ in range(2000)) / 2000
    assert torch.allclose(m, 0.25 * x, atol=float(6 * x.abs().max() * np.sqrt(3 / 2000)))


def test_indices_are_delta_coded_and_zstd_only_when_it_pays():
    d = 1_000_000
    v = torch.zeros(d)
    v[::100] = 1.0  # regular gaps: compress to almost nothing
    p_regular, _ = parse_chain("topk:10000").encode(v, None)
    assert len(p_regular) < 13 + 14 + 4 * 10000 + 2000  # values + a few hundred bytes of indices
    rnd = heavy_tailed(d, seed=9)
    p_random, _ = parse_chain("topk:0.01").encode(rnd, None)
    idx_bytes = len(p_random) - 13 - 14 - 4 * 10000
    assert idx_bytes < 1.5 * 10000  # ~1.3 bytes an index for 1 % of a million
    assert np.array_equal(kept_indices(p_random), topk_indices(rnd, 10000))


def test_wide_gaps_use_four_byte_indices():
    v = torch.zeros(300_000)
    v[[0, 5, 299_999]] = 1.0
    p, _ = parse_chain("topk:3").encode(v, None)
    assert kept_indices(p).tolist() == [0, 5, 299_999]


def test_topk_then_value_codec_quantizes_only_the_kept_values():
    v = heavy_tailed(20_000, seed=5)
    for spec in ["topk:0.05 | q8", "topk:0.05 | fp16", "topk:0.05 | sign"]:
        chain = parse_chain(spec)
        payload, _ = chain.encode(v, None)
        idx = kept_indices(payload)
        assert_is_topk(v, idx, 1000)
        out = chain.decode(payload)
        kept = v[torch.from_numpy(idx)]
        assert torch.all((out[torch.from_numpy(idx)] - kept).abs() <= chain.value.max_abs_error(kept))
        assert np.count_nonzero(out.numpy()) <= 1000
