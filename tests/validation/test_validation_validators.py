"""Every validator's refusal reason, the cohort-level relative norm bound,
build_validators, and hypothesis fuzzing of all of them."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.messages import ClientMetrics, Update
from fleetlearn.validation import (
    VALIDATORS,
    DuplicateValidator,
    ExampleCountCapValidator,
    ExampleCountValidator,
    FiniteValidator,
    NormBoundValidator,
    RelativeNormFilter,
    RoundValidator,
    ShapeValidator,
    StalenessValidator,
    ValidationContext,
    build_validators,
    default_validators,
    filter_by_relative_norm,
)

METRICS = ClientMetrics(1.0, 0.5, 0.9, 0.1, 10, 100)


def update(client_id=1, round=5, base_version=4, num_examples=10):
    return Update(client_id, round, base_version, b"", "none", num_examples, METRICS, 0)


def ctx(round=5, version=4, dim=3, seen=()):
    return ValidationContext(round=round, version=version, dim=dim, seen=set(seen))


VEC = torch.tensor([3.0, 4.0, 0.0])  # norm 5


def test_round_validator_reasons():
    v = RoundValidator()
    assert v.check(update(), VEC, ctx()) is None
    assert v.check(update(round=4), VEC, ctx()) == "wrong round: update for round 4, current round is 5"
    assert v.check(update(base_version=3), VEC, ctx()) == "stale: computed from model version 3, current version is 4"
    assert RoundValidator(check_version=False).check(update(base_version=3), VEC, ctx()) is None


def test_duplicate_validator_refuses_a_second_update_and_a_future_round():
    v = DuplicateValidator()
    assert v.check(update(client_id=7), VEC, ctx(seen={1, 2})) is None
    assert v.check(update(client_id=2), VEC, ctx(seen={1, 2})) == "duplicate: client 2 already sent an update in round 5"
    assert v.check(update(round=9), VEC, ctx()) == "replay: update for round 9, which is in the future (current round is 5)"
    assert v.check(update(round=4), VEC, ctx()) is None  # the past is the round/staleness validators' business


def test_shape_and_finite_reasons():
    assert ShapeValidator().check(update(), None, ctx()) == "no decoded vector"
    assert ShapeValidator().check(update(), torch.zeros(4), ctx()) == "wrong shape: got torch.float32 (4,), expected float32 (3,)"
    assert ShapeValidator().check(update(), torch.zeros(3, dtype=torch.float64), ctx()) == "wrong shape: got torch.float64 (3,), expected float32 (3,)"
    bad = torch.tensor([1.0, math.nan, math.inf])
    assert FiniteValidator().check(update(), bad, ctx()) == "non-finite: 2 NaN/inf values (first at index 1)"
    assert FiniteValidator().check(update(), VEC, ctx()) is None


def test_example_count_reasons():
    assert ExampleCountValidator().check(update(num_examples=0), VEC, ctx()) == "bad example count: 0"
    assert ExampleCountValidator().check(update(num_examples=2.5), VEC, ctx()) == "bad example count: 2.5"
    assert ExampleCountValidator().check(update(num_examples=True), VEC, ctx()) == "bad example count: True"
    cap = ExampleCountCapValidator(1000)
    assert cap.check(update(num_examples=1000), VEC, ctx()) is None
    assert cap.check(update(num_examples=1_000_000), VEC, ctx()) == "claims 1000000 examples, above the cap of 1000"
    assert cap.check(update(num_examples="many"), VEC, ctx()) == "bad example count: 'many'"


def test_norm_bound_reasons():
    v = NormBoundValidator(100.0)
    assert v.check(update(), VEC, ctx()) is None
    assert NormBoundValidator(5.0).check(update(), VEC, ctx()) is None  # the bound itself is allowed
    assert v.check(update(), torch.tensor([1.2e6, 0.0, 0.0]), ctx()) == "norm 1.2e+06 exceeds bound 100"
    assert v.check(update(), torch.tensor([1e30, 1e30, 0.0]), ctx()) == "norm 1.414e+30 exceeds bound 100"  # float64, no overflow
    assert v.check(update(), torch.tensor([math.nan, 0.0, 0.0]), ctx()) == "norm is nan (NaN or inf values), bound is 100"
    assert v.check(update(), None, ctx()) == "no decoded vector"


def test_staleness_reasons():
    v = StalenessValidator(2)
    assert v.check(update(base_version=4), VEC, ctx(version=4)) is None
    assert v.check(update(base_version=2), VEC, ctx(version=4)) is None
    assert v.check(update(base_version=1), VEC, ctx(version=4)) == "staleness 3 exceeds bound 2 (computed from version 1, current version is 4)"
    assert v.check(update(base_version=6), VEC, ctx(version=4)) == "base version 6 is newer than the current version 4"
    assert v.check(update(base_version=None), VEC, ctx(version=4)) == "bad base version: None"
    assert StalenessValidator(0).check(update(base_version=3), VEC, ctx(version=4)) == "staleness 1 exceeds bound 0 (computed from version 3, current version is 4)"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NormBoundValidator(0), "norm: max_norm must be a finite number > 0, got 0"),
        (lambda: NormBoundValidator(math.inf), "norm: max_norm must be a finite number > 0, got inf"),
        (lambda: StalenessValidator(-1), "staleness: max_staleness must be an integer >= 0, got -1"),
        (lambda: StalenessValidator(1.5), "staleness: max_staleness must be an integer >= 0, got 1.5"),
        (lambda: ExampleCountCapValidator(0), "examples_cap: max_examples must be an integer >= 1, got 0"),
        (lambda: RelativeNormFilter(-2), "relative_norm: factor must be a finite number > 0, got -2"),
    ],
)
def test_bad_validator_parameters(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_relative_norm_filter_keeps_norms_up_to_k_times_the_median():
    norms = [1.0, 2.0, 1.5, 4.0, 100.0, math.nan, math.inf]
    # median of the finite norms [1, 2, 1.5, 4, 100] is 2: bound 3 x 2 = 6
    np.testing.assert_array_equal(filter_by_relative_norm(norms, 3.0), [True, True, True, True, False, False, False])
    reasons = RelativeNormFilter(3.0).reasons(norms)
    assert reasons[:4] == [None] * 4
    assert reasons[4] == "norm 100 exceeds bound 6 (3 x the cohort's median norm 2)"
    assert reasons[5] == "norm is nan (NaN or inf values)" and reasons[6] == "norm is inf (NaN or inf values)"
    # even count: np.median averages the middle two
    np.testing.assert_array_equal(filter_by_relative_norm([1.0, 3.0, 5.0, 7.0], 1.0), [True, True, False, False])
    assert filter_by_relative_norm([], 2.0).shape == (0,)
    np.testing.assert_array_equal(filter_by_relative_norm([math.nan, math.nan], 2.0), [False, False])
    np.testing.assert_array_equal(filter_by_relative_norm([0.0, 0.0, 1.0], 2.0), [True, True, False])


def test_relative_norm_filter_cannot_be_gamed_by_a_minority():
    honest = np.ones(11)
    attacked = np.concatenate([honest, np.full(10, 1e9)])  # 10 of 21 attackers
    assert filter_by_relative_norm(attacked, 3.0).tolist() == [True] * 11 + [False] * 10


def test_build_validators_defaults_and_options():
    names = lambda vs: [v.name for v in vs]  # noqa: E731
    assert names(build_validators()) == names(default_validators()) == ["round", "duplicate", "examples", "shape", "finite"]
    vs = build_validators(max_norm=10.0, max_staleness=2, max_examples=500)
    assert names(vs) == ["round", "staleness", "duplicate", "examples", "examples_cap", "shape", "finite", "norm"]
    assert vs[0].check_version is False and vs[1].max_staleness == 2 and vs[4].max_examples == 500 and vs[7].max_norm == 10.0
    assert build_validators()[0].check_version is True
    explicit = build_validators(["shape", "norm", "finite"], max_norm=3.0)
    assert names(explicit) == ["shape", "norm", "finite"]
    # a stale update passes round + staleness, and is refused by round alone
    stale = update(base_version=3)
    assert all(v.check(stale, VEC, ctx()) is None for v in build_validators(["round", "staleness"], max_staleness=1))
    assert build_validators(["round"])[0].check(stale, VEC, ctx()) is not None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_validators(["round", "nope"]), "unknown validator 'nope'; allowed: duplicate, examples, examples_cap, finite, norm, round, shape, staleness"),
        (lambda: build_validators(["norm"]), "validator 'norm' needs max_norm"),
        (lambda: build_validators(["staleness"]), "validator 'staleness' needs max_staleness"),
        (lambda: build_validators(["round"], max_norm=3.0), "max_norm = 3.0 is set but the 'norm' validator is not in ['round']"),
        (lambda: build_validators(["shape", "shape"]), "validators listed more than once: shape"),
        (lambda: build_validators("round"), "validators must be a list of names, got the string 'round'"),
        (lambda: build_validators(max_norm=-1.0), "norm: max_norm must be a finite number > 0, got -1.0"),
    ],
)
def test_build_validators_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# -- fuzzing ----------------------------------------------------------------------------

ODD = st.one_of(st.integers(-(2**63), 2**63), st.floats(), st.none(), st.booleans(), st.text(max_size=3))
def _cast(a, dtype):
    with np.errstate(over="ignore"):  # 1e30 becomes inf in float16: intended
        return torch.from_numpy(a.astype(dtype))


SHAPES = hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5)
FLOATS = hnp.arrays(np.float64, SHAPES, elements=st.one_of(st.floats(-1e3, 1e3), st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0])))
VECS = st.one_of(
    st.none(),
    st.tuples(FLOATS, st.sampled_from([np.float32, np.float64, np.float16])).map(lambda a: _cast(*a)),
    hnp.arrays(np.int32, SHAPES).map(torch.from_numpy),
)


@settings(max_examples=200, deadline=None)
@given(
    client_id=st.integers(0, 5),
    round=st.one_of(st.integers(0, 10), ODD),
    base_version=st.one_of(st.integers(0, 10), ODD),
    num_examples=st.one_of(st.integers(-5, 10**7), ODD),
    vec=VECS,
    ctx_round=st.one_of(st.none(), st.integers(0, 10)),  # None: the update's own round
    ctx_version=st.one_of(st.none(), st.integers(0, 10)),  # None: the update's own base version
    dim=st.integers(0, 5),
    seen=st.sets(st.integers(0, 5), max_size=3),
)
def test_fuzz_every_validator_returns_none_or_a_reason(client_id, round, base_version, num_examples, vec, ctx_round, ctx_version, dim, seen):
    u = Update(client_id, round, base_version, b"", "none", num_examples, METRICS, 0)
    ctx_round = round if ctx_round is None and isinstance(round, int) else (ctx_round or 0)
    ctx_version = base_version if ctx_version is None and isinstance(base_version, int) else (ctx_version or 0)
    if vec is not None and ctx_round % 2 == 0:
        dim = vec.numel()  # often the right size, so the whole chain can accept
    c = ValidationContext(round=ctx_round, version=ctx_version, dim=dim, seen=seen)
    for v in build_validators(VALIDATORS.keys(), max_norm=100.0, max_staleness=2, max_examples=1000):
        reason = v.check(u, vec, c)
        assert reason is None or (isinstance(reason, str) and reason)
    chain = build_validators(max_norm=100.0)
    first = next((r for r in (v.check(u, vec, c) for v in chain) if r), None)
    if first is None:  # accepted by the whole default chain + norm: a sound update
        event("accepted")
        assert vec is not None and vec.dtype == torch.float32 and tuple(vec.shape) == (dim,)
        assert bool(torch.isfinite(vec).all()) and float(torch.linalg.vector_norm(vec.double())) <= 100.0
        assert isinstance(num_examples, int) and num_examples >= 1 and round == ctx_round and base_version == ctx_version
        assert client_id not in seen


@settings(max_examples=200, deadline=None)
@given(norms=hnp.arrays(np.float64, st.integers(0, 12), elements=st.one_of(st.floats(0, 1e300), st.sampled_from([np.nan, np.inf]))), factor=st.floats(0.01, 100))
def test_fuzz_relative_norm_filter(norms, factor):
    mask = filter_by_relative_norm(norms, factor)
    assert mask.shape == norms.shape and mask.dtype == bool
    finite = norms[np.isfinite(norms)]
    if finite.size:
        assert np.all(mask == (np.isfinite(norms) & (norms <= factor * np.median(finite))))
        if factor >= 1:  # at least the smaller half is always kept
            assert mask.sum() >= (finite.size + 1) // 2
    else:
        assert not mask.any()
    reasons = RelativeNormFilter(factor).reasons(norms)
    assert [r is None for r in reasons] == mask.tolist()


CORRUPTIONS = {
    "round": lambda u, v, c: (Update(u.client_id, c.round + 1, u.base_version, b"", "none", u.num_examples, METRICS, 0), v),
    "version": lambda u, v, c: (Update(u.client_id, u.round, c.version - 3, b"", "none", u.num_examples, METRICS, 0), v),
    "examples": lambda u, v, c: (Update(u.client_id, u.round, u.base_version, b"", "none", 0, METRICS, 0), v),
    "examples_cap": lambda u, v, c: (Update(u.client_id, u.round, u.base_version, b"", "none", 10**9, METRICS, 0), v),
    "duplicate": lambda u, v, c: (Update(next(iter(c.seen)), u.round, u.base_version, b"", "none", u.num_examples, METRICS, 0), v),
    "shape": lambda u, v, c: (u, torch.cat([v, v[:1]])),
    "dtype": lambda u, v, c: (u, v.double()),
    "finite": lambda u, v, c: (u, v.clone().index_fill_(0, torch.tensor([0]), math.nan)),
    "norm": lambda u, v, c: (u, v * 1e6 + 1e3),
}


@settings(max_examples=200, deadline=None)
@given(
    dim=st.integers(1, 8),
    rnd=st.integers(1, 50),
    stale=st.integers(0, 2),
    examples=st.integers(1, 1000),
    seen=st.sets(st.integers(100, 110), min_size=1, max_size=3),
    corruption=st.one_of(st.none(), st.sampled_from(sorted(CORRUPTIONS))),
    data=st.data(),
)
def test_fuzz_sound_updates_pass_and_any_corruption_is_refused(dim, rnd, stale, examples, seen, corruption, data):
    vec = torch.from_numpy(data.draw(hnp.arrays(np.float32, (dim,), elements=st.floats(-10, 10, width=32))))
    c = ValidationContext(round=rnd, version=rnd + 3, dim=dim, seen=seen)
    u = Update(1, rnd, c.version - stale, b"", "none", examples, METRICS, 0)
    chain = build_validators(max_norm=100.0, max_staleness=2, max_examples=1000)
    if corruption is not None:
        u, vec = CORRUPTIONS[corruption](u, vec, c)
    reasons = [(v.name, v.check(u, vec, c)) for v in chain]
    refused = [(name, r) for name, r in reasons if r]
    if corruption is None:
        assert refused == []
    else:
        assert refused and all(isinstance(r, str) and r for _, r in refused)
