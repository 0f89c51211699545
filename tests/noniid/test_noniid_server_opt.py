"""Server optimizers (Reddi et al. 2021, Alg. 2; Hsu et al. 2019) against a hand-written numpy
reference, FedAdam's documented reductions, and checkpoint round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.aggregation import SERVER_OPTIMIZERS, ServerAdagrad, ServerAdam, ServerMomentum, ServerSGD, ServerYogi
from fleetlearn.aggregation.schedules import PlateauSchedule, StepSchedule
from fleetlearn.aggregation.server_opt import ServerLR


def reference(kind: str, w0: np.ndarray, deltas: list[np.ndarray], lr: float, b1=0.9, b2=0.99, tau=1e-3, beta=0.9, v0=None):
    """The update rules written out in float64, straight from the papers."""
    w = w0.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w) if kind == "momentum" else np.full_like(w, tau**2 if v0 is None else v0)
    out = []
    for d in deltas:
        d = d.astype(np.float64)
        if kind == "momentum":
            v = beta * v + d
            w = w + lr * v
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d**2
            elif kind == "yogi":
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            elif kind == "adagrad":
                v = v + d**2
            w = w + lr * m / (np.sqrt(v) + tau)
        out.append(w.copy())
    return out


def run(opt, w0: np.ndarray, deltas: list[np.ndarray], dtype=torch.float64):
    params = torch.tensor(w0, dtype=dtype)
    state = opt.init(params)
    out = []
    for d in deltas:
        params, state = opt.step(params, torch.tensor(d, dtype=dtype), state)
        out.append(params.numpy().astype(np.float64))
    return out, params, state


@pytest.fixture
def trajectory():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=50)
    # Deltas of varied scale, some coordinates tiny, so sign(v - Delta^2) flips for yogi.
    deltas = [rng.normal(size=50) * rng.choice([1e-4, 1e-2, 1.0], size=50) for _ in range(8)]
    return w0, deltas


@pytest.mark.parametrize(
    "kind,opt",
    [
        ("momentum", ServerMomentum(server_lr=0.7, momentum=0.9)),
        ("adam", ServerAdam(server_lr=0.03, beta1=0.9, beta2=0.99, tau=1e-3)),
        ("yogi", ServerYogi(server_lr=0.03, beta1=0.9, beta2=0.99, tau=1e-3)),
        ("adagrad", ServerAdagrad(server_lr=0.03, beta1=0.9, tau=1e-3)),
        ("adam", ServerAdam(server_lr=0.1, beta1=0.5, beta2=0.9, tau=1e-2)),
        ("yogi", ServerYogi(server_lr=0.1, beta1=0.0, beta2=0.5, tau=1e-1)),
    ],
)
def test_matches_numpy_reference_over_several_steps(kind, opt, trajectory):
    w0, deltas = trajectory
    got, _, _ = run(opt, w0, deltas)
    kw = {"beta": opt.momentum} if kind == "momentum" else {"b1": opt.beta1, "b2": opt.beta2, "tau": opt.tau}
    want = reference(kind, w0, deltas, opt.server_lr, **kw)
    for t, (g, r) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg=f"{kind} step {t + 1}")


def test_float32_params_stay_float32_and_close_to_reference(trajectory):
    w0, deltas = trajectory
    opt = ServerYogi(server_lr=0.03)
    got, params, state = run(opt, w0, deltas, dtype=torch.float32)
    moments = {k: v for k, v in state.items() if k not in ServerLR.entries(state)}  # the lr entries are float64 scalars
    assert params.dtype == torch.float32 and moments and all(v.dtype == torch.float32 for v in moments.values())
    want = reference("yogi", w0, deltas, 0.03)
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5)


def test_yogi_sign_flip_differs_from_adam():
    """With v > Delta^2 Yogi shrinks v by an additive (1-b2) Delta^2, Adam multiplicatively: they must differ."""
    p = torch.zeros(3, dtype=torch.float64)
    d = torch.tensor([1e-3, 1.0, 0.0], dtype=torch.float64)
    adam, yogi = ServerAdam(0.1, tau=0.1), ServerYogi(0.1, tau=0.1)
    _, sa = adam.step(p, d, adam.init(p))
    _, sy = yogi.step(p, d, yogi.init(p))
    v0 = 0.01
    # coordinate 0: v0 > d^2 -> yogi v = v0 - 0.01 d^2; coordinate 1: v0 < d^2 -> v0 + 0.01 d^2; 2: sign(v0) -> v0
    np.testing.assert_allclose(sy["v"].numpy(), [v0 - 0.01 * 1e-6, v0 + 0.01, v0], rtol=1e-12)
    np.testing.assert_allclose(sa["v"].numpy(), [0.99 * v0 + 0.01 * 1e-6, 0.99 * v0 + 0.01, 0.99 * v0], rtol=1e-12)


def test_paper_defaults_and_initial_accumulator():
    for cls in (ServerAdam, ServerYogi, ServerAdagrad):
        opt = cls()
        assert (opt.beta1, opt.beta2, opt.tau) == (0.9, 0.99, 1e-3)
        state = opt.init(torch.zeros(4))
        assert torch.equal(state["m"], torch.zeros(4))
        assert torch.allclose(state["v"], torch.full((4,), 1e-6))  # v_{-1} = tau^2 (Alg. 2)
    assert ServerAdam(initial_accumulator=0.0).init(torch.zeros(2))["v"].eq(0).all()


def test_no_bias_correction_first_step():
    """Kingma-Ba Adam's bias-corrected first step is about lr * sign(Delta); Reddi et al.'s is
    lr (1-b1) Delta / (sqrt(b2 tau^2 + (1-b2) Delta^2) + tau), about lr (1-b1)/sqrt(1-b2) sign(Delta).
    (With the defaults 0.9/0.99 that factor is 1, so b1 = 0.5 tells them apart.)"""
    d = torch.tensor([0.5, -2.0], dtype=torch.float64)
    opt = ServerAdam(server_lr=1.0, beta1=0.5, beta2=0.99, tau=1e-3)
    p, _ = opt.step(torch.zeros(2, dtype=torch.float64), d, opt.init(torch.zeros(2, dtype=torch.float64)))
    want = 0.5 * d / (torch.sqrt(0.01 * d**2 + 0.99 * 1e-6) + 1e-3)
    torch.testing.assert_close(p, want, rtol=1e-12, atol=0)
    bias_corrected = d / (torch.sqrt(d**2) + 1e-3)
    assert (p.abs() > 4 * bias_corrected.abs()).all()


def test_momentum_zero_is_sgd_and_registry_names():
    rng = np.random.default_rng(1)
    w0, deltas = rng.normal(size=9), [rng.normal(size=9) for _ in range(4)]
    a, _, _ = run(ServerMomentum(server_lr=0.5, momentum=0.0), w0, deltas)
    b, _, _ = run(ServerSGD(server_lr=0.5), w0, deltas)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    assert {name: cls.name for name, cls in SERVER_OPTIMIZERS.items()} == {n: n for n in ("sgd", "momentum", "adam", "yogi", "adagrad")}
    for cls in SERVER_OPTIMIZERS.values():  # the factory passes server_lr positionally
        assert cls(0.25).server_lr == 0.25


# -- FedAdam's documented reductions (ServerAdam docstring) ---------------------------------


def fedavg_deltas(rng, steps=10, d=40):
    return [rng.normal(scale=0.1, size=d) for _ in range(steps)]


@pytest.mark.parametrize("variant", [{"initial_accumulator": 0.0, "beta2": 0.99}, {"beta2": 0.0}])
def test_fedadam_beta1_zero_large_tau_is_fedavg_with_lr_over_tau(variant):
    """beta1 = 0, tau >> |Delta| and no tau^2 start in v  =>  ServerSGD(server_lr = lr / tau)."""
    rng = np.random.default_rng(2)
    w0, deltas = rng.normal(size=40), fedavg_deltas(rng)
    tau, lr_eff = 1e6, 0.7
    adam, _, _ = run(ServerAdam(server_lr=lr_eff * tau, beta1=0.0, tau=tau, **variant), w0, deltas)
    sgd, _, _ = run(ServerSGD(server_lr=lr_eff), w0, deltas)
    for a, s in zip(adam, sgd):
        # relative error of a step is about max|Delta| / tau ~ 4e-7
        np.testing.assert_allclose(a, s, rtol=0, atol=1e-6)
    # and the tolerance is tight: it would catch a factor-of-2 slip in the step
    assert np.abs(np.asarray(sgd[0]) - w0).max() > 1e-2


def test_fedadam_beta1_zero_large_tau_paper_init_is_fedavg_with_warmup():
    """With the paper's v_0 = tau^2, round t's step is lr Delta_t / (tau (1 + b2^(t/2)))."""
    rng = np.random.default_rng(3)
    w0, deltas = rng.normal(size=40), fedavg_deltas(rng)
    tau, lr, b2 = 1e6, 0.7e6, 0.9
    got, _, _ = run(ServerAdam(server_lr=lr, beta1=0.0, beta2=b2, tau=tau), w0, deltas)
    w = w0.copy()
    for t, d in enumerate(deltas, start=1):
        w = w + lr / (tau * (1 + b2 ** (t / 2))) * d
        np.testing.assert_allclose(got[t - 1], w, rtol=0, atol=1e-6)
    # the warm-up is real: round 1 moves about half as far as FedAvg at lr/tau
    step1 = np.abs(got[0] - w0).max() / np.abs(0.7 * deltas[0]).max()
    assert step1 == pytest.approx(1 / (1 + np.sqrt(b2)), rel=1e-5)


# -- state: explicit, not mutated, checkpointable --------------------------------------------


@pytest.mark.parametrize("name", ["momentum", "adam", "yogi", "adagrad", "sgd"])
def test_state_round_trips_through_a_checkpoint(name, tmp_path):
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(4)
    opt = SERVER_OPTIMIZERS[name](0.05)
    deltas = [torch.tensor(rng.normal(size=30), dtype=torch.float32) for _ in range(6)]
    params = torch.tensor(rng.normal(size=30), dtype=torch.float32)
    state = opt.init(params)
    for d in deltas[:3]:
        params, state = opt.step(params, d, state)
    # checkpoint: a dict of tensors, as the run store writes it
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if state:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "opt.safetensors")
        restored = load_file(tmp_path / "opt.safetensors")
    else:
        restored = {}
    fresh = SERVER_OPTIMIZERS[name](0.05)
    p_a, s_a, p_b, s_b = params, state, params.clone(), restored
    for d in deltas[3:]:
        p_a, s_a = opt.step(p_a, d, s_a)
        p_b, s_b = fresh.step(p_b, d, s_b)
    assert torch.equal(p_a, p_b)
    assert s_a.keys() == s_b.keys() and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


@pytest.mark.parametrize("name", ["momentum", "adam", "yogi", "adagrad"])
def test_step_does_not_write_into_its_inputs(name):
    opt = SERVER_OPTIMIZERS[name](0.1)
    params = torch.randn(10)
    delta = torch.randn(10)
    state = opt.step(params, delta, opt.init(params))[1]
    before = (params.clone(), delta.clone(), {k: v.clone() for k, v in state.items()})
    new_params, new_state = opt.step(params, delta, state)
    assert torch.equal(params, before[0]) and torch.equal(delta, before[1])
    assert all(torch.equal(state[k], before[2][k]) for k in state)
    assert all(new_state[k].data_ptr() != state[k].data_ptr() for k in state)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="beta1"):
        ServerAdam(beta1=1.0)
    with pytest.raises(ValueError, match="tau"):
        ServerYogi(tau=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ServerMomentum(momentum=-0.1)
    opt = ServerAdam()
    with pytest.raises(ValueError, match="state lacks"):
        opt.step(torch.zeros(3), torch.zeros(3), {})
    with pytest.raises(ValueError, match="shape"):
        opt.step(torch.zeros(3), torch.zeros(4), opt.init(torch.zeros(3)))


# -- the learning rate as state ---------------------------------------------------------------


def test_the_step_uses_the_rate_in_its_state_and_keeps_it():
    opt = ServerMomentum(server_lr=0.5, momentum=0.9)
    p, g = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    state = opt.init(p)
    assert opt.lr.value(state) == opt.lr.base(state) == 0.5 and state["lr"].dtype == torch.float64
    halved = opt.lr.scaled(state, 0.5)
    assert opt.lr.value(state) == 0.5  # a new state: the input is untouched (kept versions share theirs)
    new, after = opt.step(p, g, halved)
    torch.testing.assert_close(new, 0.25 * g, rtol=0, atol=0)
    assert opt.lr.value(after) == opt.lr.base(after) == 0.25
    # A state written before the entries existed (an older checkpoint) steps at the configured rate.
    new, after = opt.step(p, g, {"v": torch.zeros(3, dtype=torch.float64)})
    torch.testing.assert_close(new, 0.5 * g, rtol=0, atol=0)
    assert opt.lr.value(opt.lr.filled({"v": torch.zeros(3)})) == 0.5


def test_the_schedule_steps_on_the_state_from_the_base_rate():
    opt = ServerSGD(server_lr=1.0, schedule=StepSchedule(step_size=2, gamma=0.5))
    state = opt.init(torch.zeros(2))
    rates = []
    for r in range(1, 7):
        state = opt.lr.at_round(state, r)
        rates.append(opt.lr.value(state))
        if r == 3:  # a guardrail's response scales the base: the schedule keeps scaling the lower rate
            state = opt.lr.scaled(state, 0.1, floor=0.0)
    assert rates == pytest.approx([1.0, 1.0, 0.5, 0.05, 0.025, 0.025])
    assert opt.lr.value(opt.lr.scaled(state, 1e-9, floor=0.01)) == 0.01  # not below the floor
    # A rollback puts back the moments, not the rate (the response persists).
    carried = opt.lr.carry({"lr": torch.tensor(1.0, dtype=torch.float64)}, state)
    assert opt.lr.value(carried) == opt.lr.value(state)


def test_plateau_memory_lives_in_the_state():
    """Two optimizers with their own plateau schedules give the same rates from the same states:
    the schedule's memory is read from the state, not kept in the object."""
    a = ServerSGD(1.0, schedule=PlateauSchedule(factor=0.5, patience=1))
    b = ServerSGD(1.0, schedule=PlateauSchedule(factor=0.5, patience=1))
    state = a.lr.init()
    losses = [1.0, 0.9, 0.95, 0.97, 0.5, 0.6]
    got = []
    for r, loss in enumerate(losses, start=1):
        state = (a if r % 2 else b).lr.at_round(state, r, loss)
        got.append(a.lr.value(state))
    assert got == [1.0, 1.0, 0.5, 0.25, 0.25, 0.125]
    assert float(state["lr/schedule/scale"]) == 0.125
    # An older side file's `schedule/server/*` fills a state that lacks the memory.
    old = {k: v for k, v in state.items() if not k.startswith("lr/schedule/")}
    filled = a.lr.filled(old, {"scale": 0.25, "best": 0.5, "bad_rounds": 0.0, "last_round": 5.0})
    assert float(filled["lr/schedule/scale"]) == 0.25 and float(filled["lr/schedule/last_round"]) == 5.0
