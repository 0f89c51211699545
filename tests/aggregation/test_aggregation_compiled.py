"""The compiled median / trimmed mean (`fleetlearn.aggregation.compiled`): bit-identical
to the numpy comparator network, the same NaN/inf errors, the background compile of
"auto", and the fallback when compiling fails or no compiler is installed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fleetlearn import toolchain
from fleetlearn.aggregation import compiled, median, trimmed_mean
from fleetlearn.config import ConfigError, load_config

needs_compiler = pytest.mark.skipif(compiled.compiler() is None, reason="no C++ compiler for torch.compile")


def _matrix(n: int, d: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d))).to(dtype)
    x[0] *= 50  # an outlier row, and ties: trimming must pick the right values
    x[1, : d // 2] = x[2, : d // 2]
    return x


def _numpy_network(fn):
    with compiled.mode("numpy"):
        return fn()


# Three kernels (m = 1, m = 2 and the float64 sum of m = 5), compiled once for the module.
CASES = [
    ("median odd", lambda x: median(x), 5, torch.float32),
    ("median even", lambda x: median(x), 6, torch.float32),
    ("trimmed 0.15", lambda x: trimmed_mean(x, 0.15), 7, torch.float64),
]


@needs_compiler
@pytest.mark.parametrize("name,rule,n,dtype", CASES, ids=[c[0] for c in CASES])
def test_compiled_equals_numpy_network_bit_for_bit(name, rule, n, dtype):
    x = _matrix(n, 1001, dtype)
    expected = _numpy_network(lambda: rule(x))
    with compiled.mode("compiled"):
        got = rule(x)
        assert compiled.middle_mean(x, (n - 1) // 2 if "median" in name else 1) is not None, "the compiled kernel did not run"
        other = rule(_matrix(n, 3, dtype, seed=1))  # another column count reuses the kernel (dynamic columns)
    assert got.dtype == dtype
    assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max().item():.3g}"
    assert torch.equal(other, _numpy_network(lambda: rule(_matrix(n, 3, dtype, seed=1))))
    # numpy in, numpy out, as the numpy network
    with compiled.mode("compiled"):
        out = rule(x.numpy())
    assert isinstance(out, np.ndarray) and np.array_equal(out, expected.numpy())


@needs_compiler
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_compiled_path_refuses_nan_and_inf_naming_the_row(bad):
    x = _matrix(5, 1001)
    x[3, 777] = bad  # trimmed away by the median's comparators: only the finiteness check can see it
    with compiled.mode("compiled"), pytest.raises(ValueError, match=r"median: updates contain NaN or inf in 1 row\(s\): 3"):
        median(x)


@needs_compiler
def test_auto_compiles_in_the_background_and_the_numpy_network_answers_meanwhile(monkeypatch):
    monkeypatch.setattr(compiled, "AUTO_MIN_ELEMENTS", 4000)
    monkeypatch.setattr(compiled, "_kernels", {})  # built afresh here, whatever other tests built
    x = _matrix(6, 1001)
    expected = _numpy_network(lambda: median(x))
    small = _matrix(6, 500)  # below the threshold: never compiled in "auto"
    with compiled.mode("auto"):
        assert compiled.middle_mean(small, 2) is None
        assert torch.equal(median(x), expected)  # answered at once: the numpy network (the kernel is being built)
        assert len(compiled._kernels) == 1
        building = next(iter(compiled._kernels.values()))
    with compiled.mode("compiled"):  # a caller that wants the kernel waits for the thread building it
        assert torch.equal(median(x), expected)
        assert building.done() and building.exception() is None
    assert len(compiled._kernels) == 1, "the kernel must be built once, not again by the waiting caller"
    with compiled.mode("auto"):
        assert compiled.wait(timeout=600)
        assert compiled.middle_mean(x, 2) is not None
        assert torch.equal(median(x), expected)


def test_a_kernel_that_fails_to_compile_falls_back_once_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(toolchain, "_compiler", "/usr/bin/c++")
    calls = []

    def broken(*key):
        calls.append(key)
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(compiled, "_build", broken)
    monkeypatch.setattr(compiled, "_kernels", {})
    monkeypatch.setattr(compiled, "_failed", set())
    x = _matrix(9, 300)
    expected = _numpy_network(lambda: trimmed_mean(x, 0.2))
    with caplog.at_level(logging.WARNING, logger="fleetlearn.aggregation.compiled"), compiled.mode("compiled"):
        assert torch.equal(trimmed_mean(x, 0.2), expected)
        assert torch.equal(trimmed_mean(x, 0.2), expected)
    assert len(calls) == 1, "a failed kernel must not be compiled again"
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "inductor exploded" in warnings[0].getMessage() and "9 rows" in warnings[0].getMessage()


def test_without_a_compiler_or_off_the_cpu_the_numpy_network_answers(monkeypatch):
    x = _matrix(5, 100)
    monkeypatch.setattr(toolchain, "_compiler", None)
    with compiled.mode("compiled"):
        assert compiled.middle_mean(x, 2) is None
        assert torch.equal(median(x), _numpy_network(lambda: median(x)))
    monkeypatch.setattr(toolchain, "_compiler", "/usr/bin/c++")
    with compiled.mode("numpy"):
        assert compiled.middle_mean(x, 2) is None
    with compiled.mode("compiled"):
        assert compiled.middle_mean(x.to(torch.float16), 2) is None  # dtypes the kernels do not cover
        assert compiled.middle_mean(x[:, ::2], 2) is None  # a strided view


def test_mode_names_are_checked_in_code_and_config():
    with pytest.raises(ValueError, match="aggregation_kernels: allowed: auto, compiled, numpy; got 'fast'"):
        compiled.set_mode("fast")
    assert compiled.get_mode() == "auto"
    with pytest.raises(ConfigError, match="aggregation_kernels"):
        load_config({"engine": {"aggregation_kernels": "fast"}})
    assert load_config({}).engine.aggregation_kernels == "auto"


def test_a_run_sets_the_mode_and_puts_it_back():
    from fleetlearn.engine.running import running

    class C:
        dim = 10
        monitoring = None
        config = load_config({"engine": {"aggregation_kernels": "numpy"}})

    assert compiled.get_mode() == "auto"
    with running(C()):
        assert compiled.get_mode() == "numpy"
    assert compiled.get_mode() == "auto"
