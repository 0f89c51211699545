"""Value codecs: each stays within its stated error bound; stochastic rounding is unbiased."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compression_helpers import heavy_tailed, vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import parse_chain
from fleetlearn.compression.base import CHUNK

BOUNDED = ["fp16", "bf16", "q8", "q4", "q2", "q8:stochastic", "q4:stochastic", "q2:stochastic", "q4:block=7", "q2:block=1", "sign", "sign:block=5"]


def round_trip(spec: str, v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    chain = parse_chain(spec, seed=seed)
    return chain.decode(chain.encode(v, None)[0])


@given(v=vectors(max_dim=900, bound=3e4), spec=st.sampled_from(BOUNDED))
@settings(max_examples=150, deadline=None)
def test_decode_encode_stays_within_the_stated_bound(v, spec):
    out = round_trip(spec, v)
    bound = parse_chain(spec).value.max_abs_error(v)
    assert torch.all((out - v).abs() <= bound), (out - v).abs().max()


@pytest.mark.parametrize("spec", ["q8", "q4:block=7", "q2:stochastic", "fp16", "bf16", "sign:block=3", "sign"])
def test_bound_holds_across_chunk_boundaries(spec):
    d = 2 * CHUNK + 37  # a partial last chunk and a partial last block
    v = heavy_tailed(d, seed=3) * torch.linspace(0.01, 10, d)
    out = round_trip(spec, v)
    assert torch.all((out - v).abs() <= parse_chain(spec).value.max_abs_error(v))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_deterministic_quantizer_bound_is_s_over_2b_minus_1(bits):
    # The documented bound, computed independently of the codec: |x - x^| <= s / (2^b - 1) per block.
    B = 64
    v = heavy_tailed(B * 50 + 3, seed=bits)
    out = round_trip(f"q{bits}:block={B}", v)
    pad = torch.zeros(51 * B)
    pad[: v.numel()] = v
    s = pad.view(-1, B).abs().amax(1).repeat_interleave(B)[: v.numel()]
    err = (out - v).abs()
    assert torch.all(err <= s / (2**bits - 1) * (1 + 1e-5))
    assert err.max() > 0.4 * (s / (2**bits - 1)).max()  # the bound is tight, not vacuous


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantizer_ends_of_each_block_are_exact(bits):
    v = heavy_tailed(4096, seed=bits)
    out = round_trip(f"q{bits}:block=256", v)
    i = v.view(-1, 256).abs().argmax(1) + torch.arange(16) * 256
    assert torch.allclose(out[i], v[i], rtol=1e-6, atol=0)


@pytest.mark.parametrize("spec", ["q8:stochastic", "q4:stochastic", "q2:stochastic"])
def test_stochastic_quantizer_is_unbiased(spec):
    # Fixed seeds make the test deterministic; the tolerance is still a principled one:
    # each encoding errs by at most one step, so the mean of N has std <= step / (2 sqrt(N)).
    torch.manual_seed(0)
    B, N = 32, 3000
    v = torch.randn(B * 4)
    chain = parse_chain(f"{spec},block={B}", seed=1)
    acc = torch.zeros_like(v, dtype=torch.float64)
    for _ in range(N):
        acc += chain.decode(chain.encode(v, None)[0])
    mean = acc / N
    bits = int(spec[1])
    step = (v.view(-1, B).abs().amax(1) * 2 / (2**bits - 1)).repeat_interleave(B).double()
    z = (mean - v.double()).abs() / (step / (2 * N**0.5))
    assert z.max() < 6.0, z.max()
    # The same check catches a biased quantizer: deterministic rounding fails it.
    det = round_trip(spec.replace(":stochastic", f":block={B}"), v).double()
    assert ((det - v.double()).abs() / (step / (2 * N**0.5))).max() > 6.0


def test_stochastic_error_is_below_one_step_and_hits_both_neighbours():
    v = torch.full((1000,), 0.3)
    v[0] = 1.0  # scale 1: q2 levels are -1, -1/3, 1/3, 1
    chain = parse_chain("q2:stochastic,block=1000", seed=0)
    x = chain.decode(chain.encode(v, None)[0])
    assert set(np.round(x[1:].numpy(), 5)) == {np.float32(-1 / 3).round(5), np.float32(1 / 3).round(5)}
    # P(round up to 1/3) = (0.3 + 1/3) / (2/3) = 0.95
    frac_up = float((x[1:] > 0).float().mean())
    assert 0.92 < frac_up < 0.98


@given(v=vectors(max_dim=500, bound=1e3, subnormal=False), block=st.sampled_from([0, 1, 7, 64]))
@settings(max_examples=80, deadline=None)
def test_sign_error_identity(v, block):
    # Karimireddy et al. 2019: ||x - s sign(x)||^2 = ||x||^2 - ||x||_1^2 / n per block, s = ||x||_1 / n.
    spec = f"sign:block={block}" if block else "sign"
    out = round_trip(spec, v).double()
    x = v.double()
    n = x.numel()
    B = block or max(n, 1)
    err2, want = 0.0, 0.0
    for s in range(0, n, B):
        xb, ob = x[s : s + B], out[s : s + B]
        err2 += float(((xb - ob) ** 2).sum())
        want += float((xb**2).sum() - xb.abs().sum() ** 2 / xb.numel())
    scale = float((x**2).sum()) + 1e-30
    assert abs(err2 - want) <= 1e-5 * scale
    assert err2 <= scale * (1 + 1e-6)
    nz = x != 0
    assert torch.equal(torch.sign(out[nz]), torch.sign(x[nz]))


def test_sign_scale_is_mean_magnitude():
    v = torch.tensor([3.0, -1.0, 0.0, -4.0])
    assert torch.equal(round_trip("sign", v), torch.tensor([2.0, -2.0, 2.0, -2.0]))
    assert torch.equal(round_trip("sign:block=2", v), torch.tensor([2.0, -2.0, 2.0, -2.0]))


def test_fp16_and_bf16_relative_error():
    v = heavy_tailed(10_000) * 100
    for spec, u in [("fp16", 2.0**-11), ("bf16", 2.0**-8)]:
        out = round_trip(spec, v)
        normal = v.abs() > 1e-3
        assert torch.all((out - v)[normal].abs() <= u * v[normal].abs())
        assert torch.equal(out, v.to({"fp16": torch.float16, "bf16": torch.bfloat16}[spec]).float())
