"""Value codecs: each stays within its stated error bound; stochastic rounding and subtractive
dither are unbiased, and dither's error is uniform on half a step either side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compression_helpers import heavy_tailed, vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import parse_chain
from fleetlearn.compression.base import CHUNK

BOUNDED = ["fp16", "bf16", "q8", "q4", "q2", "q8:stochastic", "q4:stochastic", "q2:stochastic", "q4:block=7", "q2:block=1", "sign", "sign:block=5",
           "q8:dither", "q2:dither", "q2:block=3,dither"]


def round_trip(spec: str, v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    chain = parse_chain(spec, seed=seed)
    return chain.decode(chain.encode(v, None)[0])


@given(v=vectors(max_dim=900, bound=3e4), spec=st.sampled_from(BOUNDED))
@settings(max_examples=150, deadline=None)
def test_decode_encode_stays_within_the_stated_bound(v, spec):
    out = round_trip(spec, v)
    bound = parse_chain(spec).value.max_abs_error(v)
    assert torch.all((out - v).abs() <= bound), (out - v).abs().max()


@pytest.mark.parametrize("spec", ["q8", "q4:block=7", "q2:stochastic", "q2:dither", "q4:block=7,dither", "fp16", "bf16", "sign:block=3", "sign"])
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


@pytest.mark.parametrize("spec", ["q8:stochastic", "q4:stochastic", "q2:stochastic", "q8:dither", "q4:dither", "q2:dither"])
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
    det = round_trip(spec.split(":")[0] + f":block={B}", v).double()
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


def test_dither_error_is_uniform_on_half_a_step_and_a_third_of_stochastic_rounding():
    # Subtractive dither: x^ - x = (floor(y + u) - (y + u) + 1/2) step is uniform on (-step/2, step/2]
    # whatever x, so the error is bounded like nearest rounding, its variance is step^2 / 12, and
    # for values half-way between two levels (0 on a 2-bit grid, where most of a block's small
    # values sit) that is a third of stochastic rounding's step^2 / 4.
    v = torch.zeros(20_000)
    v[0] = 1.5  # one scale per block of 20k: step = 2 * 1.5 / 3 = 1
    step = 1.0
    dith = round_trip("q2:dither,block=20000", v, seed=3)[1:] - v[1:]
    stoc = round_trip("q2:stochastic,block=20000", v, seed=3)[1:] - v[1:]
    assert float(dith.abs().max()) <= step / 2 * (1 + 1e-6)
    assert abs(float(dith.mean())) < 4 * (1 / 12) ** 0.5 / len(dith) ** 0.5
    assert abs(float(dith.var()) - 1 / 12) < 0.004, float(dith.var())
    assert abs(float(stoc.var()) - 1 / 4) < 0.01, float(stoc.var())
    # Uniform, not two-valued: the decoded values leave the grid and fill the interval evenly.
    hist = torch.histc(dith, bins=10, min=-0.5, max=0.5)
    assert float(hist.min()) > 0.9 * len(dith) / 10


def test_dither_is_reproduced_by_the_decoder_from_the_seed_alone():
    # The decoder has only the bytes: two encodings of one vector differ (fresh seeds), each
    # decodes the same in a fresh process-independent decoder, and the seed is on the wire.
    from fleetlearn.compression import decode_payload, seed_state
    from fleetlearn.compression.values import dither

    v = heavy_tailed(3000, seed=5)
    chain = parse_chain("q2:dither,block=64")
    p1, s1 = chain.encode(v, seed_state(1))
    p2, _ = chain.encode(v, s1)
    assert p1 != p2
    assert torch.equal(decode_payload(p1, 3000), decode_payload(p1, 3000))
    assert len(p1) == len(parse_chain("q2:stochastic,block=64").encode(v, seed_state(1))[0]) + 8
    # The dither stream is the documented splitmix64: its first value for seed 0 is fixed.
    assert float(dither(0, 0, 1)[0]) == (0xE220A8397B1DCDAF >> 40) * 2.0**-24
    assert np.array_equal(dither(7, 5, 3), dither(7, 0, 8)[5:])


def test_dither_is_one_rounding_spec_and_round_trips():
    from fleetlearn.compression import capabilities, needed_capabilities

    assert parse_chain("q4:block=128,dither").spec == "q4:block=128,dither"
    # A client of a build before dither parses 'q2' but not ':dither': the server asks for the capability.
    assert needed_capabilities("subset:0.1 | q2:dither | zstd") == ["subset", "q2", "zstd", "dither"]
    assert needed_capabilities("q2:stochastic") == ["q2"] and "dither" in capabilities()
    with pytest.raises(ValueError, match="two roundings"):
        parse_chain("q2:stochastic,dither")
