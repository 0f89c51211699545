"""Learning-rate schedules: each against an independent computation, plateau's state, the parser."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlearn.aggregation.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    PlateauSchedule,
    StepSchedule,
    schedule_from_config,
)


def test_constant():
    s = ConstantSchedule()
    assert [s.lr_at(r, 0.3) for r in (1, 2, 100)] == [0.3, 0.3, 0.3]


def test_step_matches_torch_steplr():
    """torch's StepLR as the independent computation (its epoch 0 = our round 1)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.8)
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.25)
    ours = StepSchedule(step_size=3, gamma=0.25)
    for r in range(1, 13):
        assert ours.lr_at(r, 0.8) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        torch_sched.step()


def test_cosine_endpoints_midpoint_and_torch():
    s = CosineSchedule(total_rounds=11, min_lr=0.01)
    assert s.lr_at(1, 0.5) == 0.5
    assert s.lr_at(6, 0.5) == pytest.approx((0.5 + 0.01) / 2)
    assert s.lr_at(11, 0.5) == pytest.approx(0.01)
    assert s.lr_at(40, 0.5) == pytest.approx(0.01)
    # torch's CosineAnnealingLR with T_max = total_rounds - 1 computes the same curve
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    for r in range(1, 12):
        assert s.lr_at(r, 0.5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step()
    lrs = [s.lr_at(r, 0.5) for r in range(1, 12)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def reference_plateau(metrics, base, factor, patience, threshold=0.0, mode="min"):
    """Plain loop: count rounds since the best; every `patience` of them, multiply by factor."""
    best, bad, lr, out = None, 0, base, []
    for m in metrics:
        better = best is None or (m < best * (1 - threshold) if mode == "min" else m > best * (1 + threshold))
        if better:
            best, bad = m, 0
        else:
            bad += 1
            if bad == patience:
                lr, bad = lr * factor, 0
        out.append(lr)
    return out


def test_plateau_against_reference():
    metrics = [1.0, 0.9, 0.95, 0.92, 0.91, 0.85, 0.86, 0.86, 0.87, 0.86, 0.85, 0.84, 0.9, 0.9]
    s = PlateauSchedule(factor=0.5, patience=2, threshold=0.0)
    got = [s.lr_at(r, 0.1, m) for r, m in enumerate(metrics, start=1)]
    assert got == pytest.approx(reference_plateau(metrics, 0.1, 0.5, 2))
    assert got[-1] < 0.1  # it did reduce


def test_plateau_max_mode_threshold_and_min_lr():
    s = PlateauSchedule(factor=0.1, patience=1, mode="max", threshold=0.01, min_lr=0.002)
    # 0.5 -> 0.504 is not a 1% improvement: reduce; then floor at min_lr
    assert s.lr_at(1, 0.1, 0.5) == 0.1
    assert s.lr_at(2, 0.1, 0.504) == pytest.approx(0.01)
    assert s.lr_at(3, 0.1, 0.6) == pytest.approx(0.01)  # improved: no change
    assert s.lr_at(4, 0.1, 0.59) == pytest.approx(0.002)  # 0.001 floored at min_lr


def test_plateau_counts_each_round_once_and_none_keeps_rate():
    s = PlateauSchedule(factor=0.5, patience=1)
    s.lr_at(1, 1.0, 1.0)
    assert s.lr_at(2, 1.0, 2.0) == 0.5
    assert s.lr_at(2, 1.0, 2.0) == 0.5  # asked again for round 2 (e.g. client and server)
    assert s.lr_at(3, 1.0, None) == 0.5


def test_plateau_state_round_trip_continues_identically():
    metrics = [1.0, 1.1, 0.9, 0.95, 0.97, 0.99, 0.8, 0.81, 0.82, 0.83]
    a = PlateauSchedule(factor=0.3, patience=2)
    for r, m in enumerate(metrics[:5], start=1):
        a.lr_at(r, 0.2, m)
    state = a.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    b = PlateauSchedule(factor=0.3, patience=2)
    b.load_state_dict(dict(state))
    for r, m in enumerate(metrics[5:], start=6):
        assert a.lr_at(r, 0.2, m) == b.lr_at(r, 0.2, m)
    fresh = PlateauSchedule()
    fresh.load_state_dict(PlateauSchedule().state_dict())  # NaN "best" survives the trip
    assert math.isnan(fresh.best)
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"scale": 1.0})


def test_parser_builds_each_schedule():
    assert isinstance(schedule_from_config({}), ConstantSchedule)
    s = schedule_from_config({"lr": 0.1, "lr_schedule": "step", "lr_step_size": 5, "lr_gamma": 0.1})
    assert isinstance(s, StepSchedule) and (s.step_size, s.gamma) == (5, 0.1)
    c = schedule_from_config({"server_lr": 1.0, "server_lr_schedule": "cosine", "server_lr_min": 0.1}, prefix="server_lr_", total_rounds=50)
    assert isinstance(c, CosineSchedule) and (c.total_rounds, c.min_lr) == (50, 0.1)
    p = schedule_from_config({"lr_schedule": "plateau", "lr_patience": 3, "lr_factor": 0.2, "lr_mode": "max"})
    assert isinstance(p, PlateauSchedule) and (p.patience, p.factor, p.mode) == (3, 0.2, "max")
    assert set(SCHEDULES) == {"constant", "step", "cosine", "plateau"}


def test_parser_and_constructors_reject_bad_input():
    with pytest.raises(ValueError, match="lr_gamma"):
        schedule_from_config({"lr_schedule": "cosine", "lr_gamma": 0.5}, total_rounds=10)
    with pytest.raises(ValueError, match="not a schedule"):
        schedule_from_config({"lr_schedule": "exponential"})
    with pytest.raises(ValueError, match="total_rounds"):
        schedule_from_config({"lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="gamma"):
        StepSchedule(step_size=2, gamma=1.5)
    with pytest.raises(ValueError, match="round"):
        ConstantSchedule().lr_at(0, 0.1)
    with pytest.raises(ValueError, match="base_lr"):
        StepSchedule().lr_at(1, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        PlateauSchedule().lr_at(1, 0.1, float("nan"))
