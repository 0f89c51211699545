"""Private telemetry: client statistics leave the server only as noised means,
calibrated to their sensitivity and counted in the privacy budget."""

import math

import dp_accounting
import numpy as np
import pytest

import fleetlearn
from fleetlearn.config import ConfigError, load_config
from fleetlearn.privacy import PrivateTelemetry

BASE = {"data": {"clients": 50}, "server": {"rounds": 3, "cohort": 10}, "client": {"local_epochs": 1},
        "privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-3, "accounting": "rdp"}}


def test_release_clips_and_counts_what_was_reported():
    t = PrivateTelemetry(1e-9, {"loss_after": 2.0, "accuracy": 1.0})
    stats = np.array([[5.0, 0.5], [1.0, np.nan], [0.5, 1.0], [np.nan, 0.0]])
    out = t.release(stats, round=1)
    assert out["loss_after"] == pytest.approx((2.0 + 1.0 + 0.5) / 3)  # 5.0 clipped to the bound 2
    assert out["accuracy"] == pytest.approx(0.5)  # the mean of those who reported
    with pytest.raises(ValueError, match="bounds"):
        PrivateTelemetry(1.0, {"bogus": 1.0})
    with pytest.raises(ValueError, match="noise multiplier"):
        PrivateTelemetry(0.0, {"accuracy": 1.0})


def test_noise_matches_the_sensitivity_calibration():
    # 100 clients all at half the bound: mean = B (50 + e1) / (100 + e2), e ~ N(0, (z sqrt(2k))^2),
    # so its std is about B sigma sqrt(1.25) / 100 (first order).
    z, B = 2.0, 4.0
    t = PrivateTelemetry(z, {"loss_before": B, "loss_after": B})
    sigma = z * math.sqrt(4)
    assert t.noise_std == pytest.approx(sigma)
    stats = np.full((100, 2), B / 2)
    means = np.array([t.release(stats, r)["loss_after"] for r in range(2000)])
    assert means.mean() == pytest.approx(B / 2, abs=0.01)
    assert means.std() == pytest.approx(B * sigma * math.sqrt(1.25) / 100, rel=0.1)


def test_a_private_run_stores_only_noised_means_and_counts_them_in_epsilon(tmp_path):
    zt = 2.0
    cfg = {**BASE, "privacy": {**BASE["privacy"], "telemetry_noise_multiplier": zt}, "store": {"root": str(tmp_path)}}
    s = fleetlearn.run(cfg)
    plain = fleetlearn.run(BASE, store=False)
    from fleetlearn.ops import RunStore

    stored = RunStore.open(s.run_dir).records()
    for r in stored:
        assert all(math.isnan(c.loss_before) and math.isnan(c.accuracy) and math.isnan(c.update_norm) for c in r.clients)
        assert not (r.extra.get("debug") or {}).get("clients")
        assert 0 <= r.train_loss_after <= 10 and 0 <= r.local_accuracy <= 1 and math.isnan(r.update_norm_max)
        assert r.extra["telemetry"]["noise_multiplier"] == zt
    # Epsilon: each round is the model's subsampled Gaussian and the telemetry's, composed.
    q = 10 / 50
    acc = dp_accounting.rdp.RdpAccountant()
    for _ in range(3):
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(zt)))
    assert stored[-1].extra["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    assert stored[-1].extra["dp_epsilon"] > plain.records[-1].extra["dp_epsilon"]
    assert not math.isnan(plain.records[-1].clients[0].loss_before)  # without telemetry: reported in clear


def test_the_budget_stop_counts_the_telemetry_release():
    budget_cfg = {**BASE, "server": {**BASE["server"], "rounds": 20}}
    with_t = fleetlearn.run({**budget_cfg, "privacy": {**BASE["privacy"], "telemetry_noise_multiplier": 1.0, "budget_epsilon": 3.0}}, store=False)
    without = fleetlearn.run({**budget_cfg, "privacy": {**BASE["privacy"], "budget_epsilon": 3.0}}, store=False)
    assert "privacy budget" in with_t.stopped_reason and with_t.rounds < without.rounds
    assert with_t.records[-1].extra["dp_epsilon"] <= 3.0


def test_telemetry_needs_central_mode():
    with pytest.raises(ConfigError, match="privacy.telemetry_noise_multiplier"):
        from fleetlearn.engine import build_coordinator

        build_coordinator(load_config({"privacy": {"mode": "local", "telemetry_noise_multiplier": 1.0, "delta": 1e-3}}), store=False)
