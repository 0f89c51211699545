"""`CodecChain.encode_many`: a cohort's payloads, the same as one `encode` per vector."""

from __future__ import annotations

import pytest
import torch

from fleetlearn.compression import parse_chain
from fleetlearn.compression.codec import rows_finite, seed_state


def _rows(n=6, d=40, groups=(4, 2)):
    """Rows of several matrices, as a learner's groups return them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for size in groups:
        m = torch.randn(size, d, generator=g)
        out.extend(m[i] for i in range(size))
    return out[:n]


@pytest.mark.parametrize("spec", ["", "fp16", "q8", "ef | topk:0.25 | q4", "randk:0.5", "topk:0.2 | zstd"])
def test_encode_many_gives_the_payloads_and_states_of_encode(spec):
    vecs = _rows()
    vecs[3] = vecs[3].clone()
    vecs[3][5] = float("nan")  # refused, alone
    chain = parse_chain(spec)
    states = [seed_state(100 + i) if chain.stochastic else None for i in range(len(vecs))]
    many = chain.encode_many(vecs, states)
    for i, (v, st) in enumerate(zip(vecs, states)):
        if i == 3:
            assert isinstance(many[i], ValueError) and "NaN or inf" in str(many[i])
            with pytest.raises(ValueError, match="NaN or inf"):
                parse_chain(spec).encode(v, st)
            continue
        payload, state = parse_chain(spec).encode(v, st)
        assert many[i][0] == payload
        assert (many[i][1] is None) == (state is None)
        if state is not None:
            assert many[i][1].keys() == state.keys() and all(torch.equal(many[i][1][k], state[k]) for k in state)


def test_rows_finite_is_one_pass_over_the_rows_matrices_and_false_elsewhere():
    vecs = _rows()
    assert rows_finite(vecs) == [True] * 6
    vecs[1] = vecs[1].clone()  # not a row of a matrix any more: judged by encode itself
    assert rows_finite(vecs) == [False] * 6
    big = torch.full((2, 3), 3e38)  # finite, but the sum overflows: flagged, and encode's exact check passes it
    assert rows_finite([big[0], big[1]]) == [False, False]
    assert [p for p, _ in parse_chain("").encode_many([big[0], big[1]], [None, None])] == [parse_chain("").encode(big[0])[0]] * 2
