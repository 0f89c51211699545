"""Clear ValueErrors for bad input, bad parameters and violated preconditions;
hypothesis fuzzing: nothing but a ValueError ever comes out."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.aggregation import (
    AGGREGATORS,
    bulyan,
    centered_clipping,
    dnc,
    geometric_median,
    krum,
    mean,
    median,
    norm_bounded_mean,
    trimmed_mean,
)

X = np.random.default_rng(5).normal(size=(10, 4))
FUNCS = {
    "median": lambda u: median(u),
    "trimmed_mean": lambda u: trimmed_mean(u, 0.1),
    "krum": lambda u: krum(u, 0),
    "bulyan": lambda u: bulyan(u, 0),
    "geometric_median": lambda u: geometric_median(u),
    "norm_bounded_mean": lambda u: norm_bounded_mean(u, 1.0),
    "centered_clipping": lambda u: centered_clipping(u, 1.0),
    "dnc": lambda u: dnc(u, 0),
}


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_input_errors_name_the_problem(name):
    fn = FUNCS[name]
    with pytest.raises(ValueError, match=re.escape("updates must be an (n, d) matrix, got shape (4,)")):
        fn(np.zeros(4))
    with pytest.raises(ValueError, match=re.escape("got shape (2, 3, 4)")):
        fn(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=re.escape("cannot aggregate an empty cohort (n = 0)")):
        fn(np.zeros((0, 4)))
    bad = X.copy()
    bad[3, 1], bad[7, 0] = np.nan, -np.inf
    with pytest.raises(ValueError, match=re.escape("NaN or inf in 2 row(s): 3, 7")):
        fn(bad)
    with pytest.raises(ValueError, match=re.escape("NaN or inf in 1 row(s): 3")):
        fn(torch.from_numpy(bad[4:]).float())
    with pytest.raises(ValueError, match="real"):
        fn(X.astype(np.complex64))
    with pytest.raises(ValueError, match="numeric"):
        fn(np.array([["a", "b"]]))


def test_nan_rows_are_listed_up_to_ten():
    bad = np.full((15, 2), np.nan)
    with pytest.raises(ValueError, match=re.escape("in 15 row(s): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...")):
        median(bad)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: krum(X[:5], 2), "krum needs n > 2f + 2: n = 5, f = 2"),
        (lambda: krum(X[:2], 0), "krum needs n > 2f + 2: n = 2, f = 0"),
        (lambda: krum(X[:1], 0), "krum needs n > 2f + 2: n = 1, f = 0"),
        (lambda: krum(X[:6], 2, m=3), "multi_krum needs n > 2f + 2: n = 6, f = 2"),
        (lambda: krum(X[:7], 2, m=8), "multi_krum needs m <= n: m = 8, n = 7"),
        (lambda: bulyan(X[:10], 2), "bulyan needs n >= 4f + 3: n = 10, f = 2"),
        (lambda: bulyan(X[:2], 0), "bulyan needs n >= 4f + 3: n = 2, f = 0"),
    ],
)
def test_preconditions(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: trimmed_mean(X, 0.5), "trimmed_mean: beta is the fraction trimmed per side and must satisfy 0 <= beta < 0.5, got 0.5"),
        (lambda: trimmed_mean(X, -0.1), "0 <= beta < 0.5, got -0.1"),
        (lambda: trimmed_mean(X, float("nan")), "0 <= beta < 0.5, got nan"),
        (lambda: trimmed_mean(X, "0.1"), "0 <= beta < 0.5, got '0.1'"),
        (lambda: krum(X, -1), "krum: f (the number of Byzantine clients) must be an integer >= 0, got -1"),
        (lambda: krum(X, 1.5), "must be an integer >= 0, got 1.5"),
        (lambda: krum(X, True), "must be an integer >= 0, got True"),
        (lambda: krum(X, 1, 0), "m (the number of rows averaged) must be an integer >= 1, got 0"),
        (lambda: bulyan(X, None), "bulyan: f (the number of Byzantine clients) must be an integer >= 0, got None"),
        (lambda: geometric_median(X, eps=0), "geometric_median: eps (the smoothing) must be a finite number > 0, got 0"),
        (lambda: geometric_median(X, max_iter=0), "geometric_median: max_iter must be an integer >= 1, got 0"),
        (lambda: geometric_median(X, ftol=-1.0), "geometric_median: ftol must be a finite number >= 0, got -1.0"),
        (lambda: geometric_median(X, np.ones(3)), "geometric_median: weights must have shape (10,), got (3,)"),
        (lambda: geometric_median(X, -np.ones(10)), "weights must be finite and non-negative"),
        (lambda: geometric_median(X, np.full(10, np.nan)), "weights must be finite and non-negative"),
        (lambda: geometric_median(X, np.zeros(10)), "geometric_median: weights sum to zero"),
        (lambda: norm_bounded_mean(X, 0.0), "norm_bounded_mean: max_norm must be a finite number > 0, got 0.0"),
        (lambda: norm_bounded_mean(X, math.inf), "max_norm must be a finite number > 0, got inf"),
        (lambda: norm_bounded_mean(X, 1.0, torch.ones(10, 1)), "weights must have shape (10,), got (10, 1)"),
        (lambda: centered_clipping(X, -1.0), "centered_clipping: tau must be a finite number > 0, got -1.0"),
        (lambda: centered_clipping(X, 1.0, 0), "centered_clipping: iters must be an integer >= 1, got 0"),
        (lambda: centered_clipping(X, 1.0, 1, center=np.zeros(3)), "centered_clipping: center must have shape (4,), got (3,)"),
        (lambda: centered_clipping(X, 1.0, 1, center=np.full(4, np.inf)), "centered_clipping: center contains NaN or inf"),
        (lambda: AGGREGATORS["trimmed_mean"](beta=0.7), "trimmed_mean: beta must satisfy 0 <= beta < 0.5, got 0.7"),
        (lambda: AGGREGATORS["krum"](f=-2), "krum: f (the number of Byzantine clients) must be an integer >= 0, got -2"),
        (lambda: AGGREGATORS["multi_krum"](m=0), "multi_krum: m (the number of rows averaged) must be an integer >= 1, got 0"),
        (lambda: AGGREGATORS["norm_bounded_mean"](max_norm=-1), "norm_bounded_mean: max_norm must be a finite number > 0, got -1"),
        (lambda: AGGREGATORS["centered_clipping"](iters=0), "centered_clipping: iters must be an integer >= 1, got 0"),
    ],
)
def test_bad_parameters(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_a_cohort_too_small_for_a_configured_f_fails_at_aggregation_time():
    part = AGGREGATORS["krum"](f=3)
    with pytest.raises(ValueError, match=re.escape("krum needs n > 2f + 2: n = 7, f = 3")):
        part.aggregate(torch.zeros(7, 2), torch.ones(7))
    with pytest.raises(ValueError, match=re.escape("bulyan needs n >= 4f + 3: n = 2, f = 0")):
        AGGREGATORS["bulyan"]().aggregate(torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match=re.escape("krum needs n > 2f + 2: n = 1, f = 0")):
        AGGREGATORS["multi_krum"]().aggregate(torch.zeros(1, 2), torch.ones(1))


# -- fuzzing ---------------------------------------------------------------------------

HUGE = float(np.float32(1e30))  # exactly representable in float32 and float64
FINITE_SPECIAL = st.sampled_from([HUGE, -HUGE, 0.0, -0.0, float(np.float32(1e-30)), float(np.float32(3e38))])
FINITE = st.one_of(st.floats(-HUGE, HUGE, width=32), FINITE_SPECIAL)
ANY = st.one_of(FINITE, st.sampled_from([np.nan, np.inf, -np.inf]))
SHAPE_2D = hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=9)
MATRIX = st.one_of(
    hnp.arrays(np.float32, SHAPE_2D, elements=FINITE),  # mostly well-formed: the success paths
    hnp.arrays(np.float64, SHAPE_2D, elements=FINITE),
    hnp.arrays(np.float32, SHAPE_2D, elements=ANY),  # NaN / inf somewhere
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), elements=ANY),  # any shape
)
BAD = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(), st.text(max_size=2))
WEIGHTS = st.one_of(
    st.none(),
    hnp.arrays(np.float64, st.integers(0, 9), elements=st.floats(0, 1e30)),
    hnp.arrays(np.float64, st.integers(0, 9), elements=st.one_of(st.floats(-1, 1e30), st.sampled_from([np.nan, np.inf]))),
)
# name -> (call, strategy of a valid first parameter, of a valid second parameter)
CALLS = {
    "mean": (lambda u, p, q, w: mean(u, w), st.none(), st.none()),
    "median": (lambda u, p, q, w: median(u), st.none(), st.none()),
    "trimmed_mean": (lambda u, p, q, w: trimmed_mean(u, p), st.floats(0, 0.4999), st.none()),
    "krum": (lambda u, p, q, w: krum(u, p, q), st.integers(0, 3), st.integers(1, 9)),
    "bulyan": (lambda u, p, q, w: bulyan(u, p), st.integers(0, 2), st.none()),
    "geometric_median": (lambda u, p, q, w: geometric_median(u, w, eps=p, max_iter=q), st.floats(1e-12, 1.0), st.integers(1, 30)),
    "norm_bounded_mean": (lambda u, p, q, w: norm_bounded_mean(u, p, w), st.one_of(st.none(), st.floats(1e-6, 1e30)), st.none()),
    "centered_clipping": (lambda u, p, q, w: centered_clipping(u, p, q), st.one_of(st.none(), st.floats(1e-6, 1e30)), st.integers(1, 5)),
    "dnc": (lambda u, p, q, w: dnc(u, p, clip=True, max_norm=q), st.integers(0, 4), st.one_of(st.none(), st.floats(1e-6, 1e30))),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), updates=MATRIX, weights=WEIGHTS, as_torch=st.booleans())
def test_fuzz_only_value_errors(name, data, updates, weights, as_torch):
    call, valid_p, valid_q = CALLS[name]
    p = data.draw(st.one_of(valid_p, BAD) if data.draw(st.integers(0, 4)) == 0 else valid_p)
    q = data.draw(st.one_of(valid_q, BAD) if data.draw(st.integers(0, 4)) == 0 else valid_q)
    if name == "krum" and q is None:
        q = 1
    if name in ("geometric_median", "centered_clipping") and q is None:
        q = 3
    u = torch.from_numpy(updates) if as_torch else updates
    try:
        out = call(u, p, q, weights)
    except ValueError as exc:
        event("ValueError")
        assert str(exc)
        return
    event("aggregated")
    assert updates.ndim == 2 and updates.shape[0] >= 1
    assert tuple(out.shape) == (updates.shape[1],)
    assert isinstance(out, torch.Tensor) == as_torch
    if name != "mean":  # the plain mean does not check its input (the validators do)
        assert np.isfinite(updates).all()
        if np.abs(updates).max(initial=0) <= HUGE:
            assert np.isfinite(np.asarray(out)).all()


@given(n=st.integers(1, 12), d=st.integers(0, 5), f=st.integers(0, 4), data=st.data())
@settings(max_examples=150, deadline=None)
def test_fuzz_registry_parts_on_every_cohort_size(n, d, f, data):
    matrix = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, d), elements=st.floats(-HUGE, HUGE, width=32))))
    weights = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n,), elements=st.floats(1, 1e6, width=32))))
    for name, cls in AGGREGATORS.items():
        for part in (cls(), cls(f=f)) if "f" in getattr(cls, "config_keys", {}).values() else (cls(),):
            try:
                out = part.aggregate(matrix, weights)
            except ValueError as exc:
                assert "needs n" in str(exc), (name, exc)
                continue
            assert out.shape == (d,) and torch.isfinite(out).all(), name
