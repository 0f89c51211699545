"""A byte budget per update (`budget:N`) and `[compression] target_ratio`: every payload
fits the budget, the encoder spends the budget on as many entries as fit (measured
sizes, so zstd's gain buys entries), error feedback keeps what was cut, and the run
records the chain it chose."""

import pytest
import torch

import fleetlearn
from fleetlearn.compression import decode_payload, needed_capabilities, parse_chain
from fleetlearn.compression.budget import BUDGET_STATE
from fleetlearn.compression.ratio import chain_for_ratio
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator


def deltas(d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * torch.rand(d, generator=g) ** 4 for _ in range(n)]


@pytest.mark.parametrize("spec", ["ef | topk:1.0,block=16 | q2 | zstd | budget:700", "topk:0.5 | q8 | budget:700",
                                  "ef | randk:0.5 | q4 | budget:700"])
def test_every_payload_fits_the_budget(spec):
    chain = parse_chain(spec, seed=1)
    state = None
    for x in deltas(20_000, 5):
        payload, state = chain.encode(x, state)
        kept = int(state[BUDGET_STATE])
        assert len(payload) <= 700
        assert 0 < int((decode_payload(payload) != 0).sum()) <= kept


@pytest.mark.parametrize("spec", ["topk:1.0,block=16 | q2 | zstd", "topk:0.5 | q8"])
def test_the_budget_is_spent_on_as_many_entries_as_fit(spec):
    """4 % more entries (one block more at least) than the encoder kept would not fit:
    sizes are measured, so the entropy coder's gain buys entries."""
    budgeted, plain = parse_chain(f"{spec} | budget:700"), parse_chain(spec)
    for x in deltas(20_000, 3, seed=2):
        payload, state = budgeted.encode(x, None)
        kept, unit = int(state[BUDGET_STATE]), plain.support.block
        same, _ = parse_chain(spec.replace("1.0", str(kept)).replace("0.5", str(kept))).encode(x, None)
        assert same == payload  # the payload is the plain chain's at the count it chose
        more = max(kept + unit, -(-int(kept * 1.04) // unit) * unit)
        bigger, _ = parse_chain(spec.replace("1.0", str(more)).replace("0.5", str(more))).encode(x, None)
        assert len(bigger) > 700
    if "q2" in spec:  # 2-bit values, one index per block of 16, zstd: far more entries than bytes
        assert kept > 2 * 700


def test_error_feedback_keeps_what_the_budget_cut():
    chain = parse_chain("ef | topk:1.0,block=16 | q2 | zstd | budget:500")
    x = deltas(10_000, 1, seed=3)[0]
    payload, state = chain.encode(x, None)
    torch.testing.assert_close(state["ef.residual"], x - decode_payload(payload))
    assert float(state["ef.residual"].norm()) > 0.5 * float(x.norm())  # most of the vector waits for later rounds


def test_the_budget_is_part_of_the_chain_and_checked():
    assert parse_chain("topk:0.1 | q8 | zstd | budget:384").spec == "topk:0.1 | q8 | zstd | budget:384"
    assert "budget" in needed_capabilities("topk:0.1 | q8 | budget:384")  # an older client cannot be handed it
    assert parse_chain("topk:0.1 | q8 | budget:384").estimate_bytes(100_000) == 384
    with pytest.raises(ValueError, match="'budget' must be the last element"):
        parse_chain("topk:0.1 | budget:384 | q8")
    with pytest.raises(ValueError, match="needs a sparsifier"):
        parse_chain("q8 | budget:384")
    with pytest.raises(ValueError, match="takes one argument"):
        parse_chain("topk:0.1 | budget")
    with pytest.raises(ValueError, match="no payload fits"):
        parse_chain("topk:0.1,block=64 | q8 | budget:40").encode(torch.randn(5000), None)


def test_chain_for_ratio_sizes_the_budget_from_the_model():
    assert chain_for_ratio(100, 101_770) == "subset:1.0,block=16 | q2:dither | zstd | budget:4070"
    assert chain_for_ratio(100, 9_610) == "subset:1.0,block=16 | q2:dither | zstd | budget:384"
    assert chain_for_ratio(4, 60) == "subset:1.0,block=4 | q2:dither | zstd | budget:60"  # too small for blocks of 16 or 8
    # A run that cannot average by coverage (a robust rule, central DP, ...) gets error feedback and block top-k.
    assert chain_for_ratio(100, 9_610, coverage=False) == "ef | topk:1.0,block=16 | q2:stochastic | zstd | budget:384"
    assert chain_for_ratio(4, 60, coverage=False) == "ef | topk:1.0,block=4 | q2:stochastic | zstd | budget:60"
    with pytest.raises(ValueError, match=r"target_ratio = 5000 needs updates of at most 7 bytes .* largest ratio it can reach is about"):
        chain_for_ratio(5000, 9_610)


def test_target_ratio_meets_the_ratio_and_records_the_chain():
    s = fleetlearn.run({"seed": 1, "data": {"clients": 30}, "server": {"rounds": 3, "cohort": 10}, "compression": {"target_ratio": 100}},
                       store=False)
    assert s.compression_ratio >= 100
    assert s.uplink_chain == chain_for_ratio(100, 9_610)
    codecs = {c.codec for r in s.records for c in r.clients if c.status == "accepted"}
    assert codecs == {s.uplink_chain}
    assert all(c.uplink_bytes <= 384 for r in s.records for c in r.clients if c.status == "accepted")
    assert s.final_accuracy > 0.5
    # The subset chain is averaged by coverage: the stage's measurements are in every round's record.
    assert all(0 < r.extra["coverage_clients"] < 10 and 0 <= r.extra["coverage_missed"] < 1 for r in s.records)


@pytest.mark.parametrize("extra", [{"server": {"aggregator": "trimmed_mean"}}, {"privacy": {"mode": "central"}}])
def test_target_ratio_picks_block_topk_where_the_run_cannot_average_by_coverage(extra):
    server = {"rounds": 2, "cohort": 10, **extra.get("server", {})}
    s = fleetlearn.run({"seed": 1, "data": {"clients": 30}, **extra, "server": server, "compression": {"target_ratio": 100}},
                       store=False)
    assert s.uplink_chain == chain_for_ratio(100, 9_610, coverage=False)
    assert s.compression_ratio >= 100
    assert "coverage_clients" not in s.records[-1].extra


def test_target_ratio_refusals_name_the_keys():
    with pytest.raises(ConfigError, match=r"compression.target_ratio = 100 chooses the uplink chain .* compression.uplink = 'q8'"):
        load_config({"compression": {"target_ratio": 100, "uplink": "q8"}})
    with pytest.raises(ConfigError, match="target_ratio"):
        load_config({"compression": {"target_ratio": 0.5}})
    with pytest.raises(ConfigError, match="compression.target_ratio: target_ratio = 1e\\+06 needs updates of at most 0 bytes"):
        build_coordinator(load_config({"compression": {"target_ratio": 1e6}}), store=False)
