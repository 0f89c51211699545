"""Error feedback: e <- v + e - C(v + e), kept in the state across rounds."""

from __future__ import annotations

import pytest
import torch
from compression_helpers import heavy_tailed
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.compression import RESIDUAL, parse_chain, seed_state

EF_CHAINS = ["ef | topk:0.05", "ef | topk:0.2,block=16 | q2", "ef | topk:0.1 | q8", "ef | q2", "ef | sign", "ef | randk:0.2 | q4:stochastic", "ef | fp16", "ef | sketch:0.1,rows=3"]


@given(spec=st.sampled_from(EF_CHAINS), d=st.integers(1, 400), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_residual_is_input_plus_old_residual_minus_decoded_output(spec, d, seed):
    chain = parse_chain(spec, seed=seed)
    state = None
    for r in range(4):
        v = heavy_tailed(d, seed=seed + r)
        old = state[RESIDUAL].clone() if state else torch.zeros(d)
        payload, state = chain.encode(v, state)
        assert torch.equal(state[RESIDUAL], (v + old) - chain.decode(payload))
        assert state[RESIDUAL].dtype == torch.float32 and state[RESIDUAL].shape == (d,)


def test_error_feedback_telescopes_nothing_is_lost():
    # sum of decoded outputs + final residual = sum of inputs (up to float32 rounding)
    chain = parse_chain("ef | topk:0.01 | q4")
    d, T = 5000, 30
    state, sent, total = None, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for t in range(T):
        v = heavy_tailed(d, seed=t)
        payload, state = chain.encode(v, state)
        sent += chain.decode(payload).double()
        total += v.double()
    assert torch.allclose(sent + state[RESIDUAL].double(), total, atol=1e-5)


def test_error_feedback_eventually_sends_every_coordinate():
    # A constant gradient under top-1 with EF: every coordinate gets its turn.
    d = 20
    chain = parse_chain("ef | topk:1")
    v = torch.linspace(1, 2, d)
    seen, state = set(), None
    for _ in range(3 * d):
        payload, state = chain.encode(v, state)
        seen |= set(torch.nonzero(chain.decode(payload)).flatten().tolist())
    assert seen == set(range(d))


def test_state_keeps_other_keys_and_is_a_new_dict():
    chain = parse_chain("ef | q8:stochastic")
    st0 = seed_state(3) | {"scaffold.c": torch.ones(2)}
    _, st1 = chain.encode(heavy_tailed(100), st0)
    assert st1 is not st0 and RESIDUAL not in st0
    assert set(st1) == {RESIDUAL, "rng.seed", "scaffold.c"}
    assert torch.equal(st1["scaffold.c"], torch.ones(2))


def test_chains_without_ef_keep_the_residual_untouched():
    # a client whose adaptive level changes keeps its residual for when it returns to an ef level
    res = torch.ones(10)
    _, st = parse_chain("q8").encode(heavy_tailed(10), {RESIDUAL: res})
    assert st[RESIDUAL] is res


def test_residual_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="ef.residual.*shape"):
        parse_chain("ef | q8").encode(heavy_tailed(10), {RESIDUAL: torch.zeros(11)})


def test_residual_survives_a_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    chain = parse_chain("ef | topk:0.1 | q8")
    _, st = chain.encode(heavy_tailed(300, seed=1), None)
    save_file(st, str(tmp_path / "state.safetensors"))
    back = load_file(str(tmp_path / "state.safetensors"))
    v = heavy_tailed(300, seed=2)
    assert chain.encode(v, back)[0] == chain.encode(v, st)[0]
