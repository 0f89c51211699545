import inspect
import math

import numpy as np
import pytest

from fleetlearn.monitoring import (
    DETECTORS,
    DivergenceDetector,
    DriftDetector,
    MonitoringSettings,
    MonitorHook,
    OscillationDetector,
    OutlierUpdateDetector,
    ParticipationCollapseDetector,
    StagnationDetector,
    make_detector,
    replay,
    robust_z,
)
from fleetlearn.config import DETECTOR_NAMES, MonitoringConfig
from fleetlearn.records import ClientRecord, RoundRecord

NAN = math.nan


def history(accuracy=None, loss=None, **cols) -> list[RoundRecord]:
    """Records 1..n from per-round columns (None: not given)."""
    n = max(len(v) for v in (accuracy or [], loss or [], *cols.values()))
    out = []
    for i in range(n):
        r = RoundRecord(round=i + 1, version=i + 1)
        if accuracy is not None:
            r.accuracy = accuracy[i]
        if loss is not None:
            r.loss = loss[i]
            if accuracy is None:
                r.accuracy = 0.5 if not math.isnan(loss[i]) else NAN
        for k, v in cols.items():
            setattr(r, k, v[i])
        out.append(r)
    return out


# -- divergence -----------------------------------------------------------------------
def test_divergence_fires_when_loss_rises_for_patience_rounds():
    det = DivergenceDetector(patience=3, max_ratio=None, warn_ratio=1.0)
    a = det.check(history(loss=[1.0, 0.9, 0.95, 1.0, 1.05]))
    assert a is not None and a.detector == "divergence" and a.round == 5 and "rose" in a.message and a.severity == "warning"


def test_divergence_by_default_needs_the_rise_to_end_far_above_the_best_loss():
    # A healthy Dirichlet-0.1 run rises for 3 evaluated rounds to 1.85x its best and recovers.
    det = DivergenceDetector()
    assert det.check(history(loss=[1.0, 0.4, 0.45, 0.6, 0.74])) is None
    a = det.check(history(loss=[1.0, 0.4, 0.5, 0.7, 0.85]))
    assert a is not None and a.severity == "warning" and "2.12x the best" in a.message


def test_divergence_quiet_when_the_rise_is_interrupted():
    det = DivergenceDetector(patience=3, max_ratio=None)
    assert det.check(history(loss=[1.0, 0.9, 0.95, 0.93, 1.0])) is None
    assert det.check(history(loss=[2.3, 2.1, 1.9, 1.95, 1.7, 1.6])) is None


def test_divergence_fires_on_a_loss_blow_up_against_the_best_loss():
    det = DivergenceDetector(max_ratio=1.5)
    a = det.check(history(loss=[2.0, 1.0, 1.6]))
    assert a is not None and a.severity == "critical" and a.value == pytest.approx(1.6)
    assert det.check(history(loss=[2.0, 1.0, 1.4])) is None
    # The default (3x) lets a healthy non-IID excursion (1.85x) pass and still catches a blow-up.
    assert DivergenceDetector().check(history(loss=[2.0, 1.0, 1.85])) is None
    assert DivergenceDetector().check(history(loss=[2.0, 1.0, 7.0])).severity == "critical"


@pytest.mark.parametrize("loss", [math.inf, NAN])
def test_divergence_fires_on_a_non_finite_loss(loss):
    h = history(accuracy=[0.3, 0.4, 0.1], loss=[2.0, 1.5, loss])
    a = DivergenceDetector().check(h)
    assert a is not None and a.severity == "critical" and "loss" in a.message


def test_divergence_ignores_a_round_that_was_not_evaluated():
    h = history(accuracy=[0.3, 0.4, NAN], loss=[2.0, 1.5, NAN])
    assert DivergenceDetector().check(h) is None


def test_divergence_fires_on_non_finite_or_exploding_parameters():
    h = history(loss=[2.0, 1.8, 1.7])
    for i, r in enumerate(h):
        r.extra["debug"] = {"model_norm": 7.0 + i, "model_finite": True}
    assert DivergenceDetector().check(h) is None
    h[-1].extra["debug"] = {"model_norm": 9.0e3, "model_finite": True}
    a = DivergenceDetector(param_growth=10).check(h)
    assert a is not None and "grew" in a.message and a.value == pytest.approx(9e3 / 8.0)
    h[-1].extra["debug"] = {"model_norm": None, "model_finite": False}
    assert "non-finite" in DivergenceDetector().check(h).message


def test_divergence_reports_a_refused_non_finite_step():
    h = history(loss=[2.0, NAN])
    h[-1].status, h[-1].reason = "failed", "the aggregate produced non-finite parameters; model unchanged"
    h[-1].accuracy = NAN
    assert DivergenceDetector().check(h).severity == "critical"


# -- oscillation ----------------------------------------------------------------------
def test_oscillation_fires_on_alternating_swings():
    a = OscillationDetector(window=6, amplitude=0.02, min_flips=4).check(history(accuracy=[0.5, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5]))
    assert a is not None and a.value >= 4


def test_oscillation_while_improving_is_info_and_without_progress_a_warning():
    det = OscillationDetector(window=6, amplitude=0.02, min_flips=4)
    improving = det.check(history(accuracy=[0.3, 0.4, 0.5, 0.6, 0.55, 0.7, 0.62, 0.8, 0.7, 0.85]))
    assert improving is not None and improving.severity == "info" and "still improving" in improving.message
    stuck = det.check(history(accuracy=[0.3, 0.7, 0.72, 0.6, 0.7, 0.6, 0.7, 0.6, 0.7, 0.6]))
    assert stuck is not None and stuck.severity == "warning"


def test_oscillation_ignores_small_wiggles_and_steady_progress():
    det = OscillationDetector(window=6, amplitude=0.02, min_flips=4)
    assert det.check(history(accuracy=[0.5, 0.55, 0.6, 0.61, 0.605, 0.62, 0.615, 0.63])) is None
    assert det.check(history(accuracy=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])) is None


# -- stagnation -----------------------------------------------------------------------
def test_stagnation_fires_on_a_plateau():
    acc = [0.3, 0.6, 0.8] + [0.799, 0.8, 0.798, 0.801, 0.8]
    a = StagnationDetector(window=5, eps=0.005).check(history(accuracy=acc))
    assert a is not None and a.value == pytest.approx(0.001)


def test_stagnation_quiet_while_improving_or_too_early():
    det = StagnationDetector(window=5, eps=0.005)
    assert det.check(history(accuracy=[0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.64, 0.66])) is None
    assert det.check(history(accuracy=[0.8, 0.8, 0.8, 0.8, 0.8])) is None  # not more than a window yet


# -- outliers -------------------------------------------------------------------------
def test_robust_z_is_the_modified_z_score_of_iglewicz_and_hoaglin():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    med, mad = 3.0, 1.0  # |x - 3| = 2, 1, 0, 1, 97 -> median 1
    np.testing.assert_allclose(robust_z(x), 0.6745 * (x - med) / mad)
    y = np.array([5.0, 5.0, 5.0, 5.0, 9.0])  # MAD 0: mean absolute deviation fallback
    np.testing.assert_allclose(robust_z(y), (y - 5.0) / (1.2533 * 0.8))
    assert not robust_z(np.ones(4)).any()


def outlier_round(norms, cosines=None, with_debug=True) -> RoundRecord:
    r = RoundRecord(round=3, version=3)
    ids = list(range(100, 100 + len(norms)))
    r.clients = [ClientRecord(cid, "accepted", update_norm=n) for cid, n in zip(ids, norms)] + [ClientRecord(999, "dropped")]
    if with_debug:
        r.extra["debug"] = {"clients": {"id": ids, "norm": list(norms), "cosine": list(cosines if cosines is not None else [0.5] * len(norms))}}
    return r


def test_outliers_name_the_clients_with_scaled_updates():
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.1 * rng.standard_normal(12))
    norms[3], norms[8] = 10.0, 12.0
    a = OutlierUpdateDetector(threshold=3.5, min_clients=5).check([outlier_round(norms)])
    assert a is not None and a.clients == [103, 108] and "client 103" in a.message


def test_outliers_name_a_client_pointing_away_from_the_aggregate():
    cos = list(np.linspace(0.4, 0.6, 12))
    cos[5] = -0.9
    a = OutlierUpdateDetector().check([outlier_round([1.0 + 0.01 * i for i in range(12)], cos)])
    assert a is not None and a.clients == [105] and "cosine" in a.message


def test_outliers_fall_back_to_the_client_records_norms():
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.03, 30.0]
    a = OutlierUpdateDetector().check([outlier_round(norms, with_debug=False)])
    assert a is not None and a.clients == [110]


def test_outliers_quiet_on_a_homogeneous_cohort_or_a_small_one():
    rng = np.random.default_rng(2)
    det = OutlierUpdateDetector()
    assert det.check([outlier_round(list(1.0 + 0.1 * rng.standard_normal(20)), list(0.5 + 0.05 * rng.standard_normal(20)))]) is None
    assert det.check([outlier_round([1.0, 1.0, 1.0, 50.0])]) is None  # fewer than min_clients


# -- participation --------------------------------------------------------------------
def test_participation_collapse_fires_below_the_fraction():
    h = history(selected=[10, 10, 10], accepted=[10, 9, 3])
    a = ParticipationCollapseDetector(min_fraction=0.5).check(h)
    assert a is not None and a.value == pytest.approx(0.3)


def test_participation_collapse_fires_on_a_sharp_drop():
    h = history(selected=[8, 8, 8, 8, 3], accepted=[8, 8, 8, 8, 3])
    a = ParticipationCollapseDetector(drop_fraction=0.5).check(h)
    assert a is not None and "median" in a.message


def test_participation_collapse_quiet_on_normal_attrition():
    h = history(selected=[10, 10, 10, 10], accepted=[10, 9, 8, 9])
    assert ParticipationCollapseDetector().check(h) is None


# -- drift ----------------------------------------------------------------------------
def test_drift_fires_when_accuracy_falls_below_its_best():
    a = DriftDetector(threshold=0.1, patience=1).check(history(accuracy=[0.5, 0.8, 0.85, 0.7]))
    assert a is not None and a.value == pytest.approx(0.15)


def test_drift_by_default_ignores_one_dip():
    assert DriftDetector().check(history(accuracy=[0.5, 0.8, 0.9, 0.66])) is None  # one round, 0.24 below
    assert DriftDetector().check(history(accuracy=[0.5, 0.8, 0.9, 0.7, 0.72])) is not None  # two rounds


def test_drift_quiet_within_threshold_and_patience_needs_consecutive_rounds():
    assert DriftDetector(threshold=0.1, patience=1).check(history(accuracy=[0.5, 0.8, 0.85, 0.8])) is None
    det = DriftDetector(threshold=0.1, patience=2)
    assert det.check(history(accuracy=[0.5, 0.85, 0.8, 0.7])) is None
    assert det.check(history(accuracy=[0.5, 0.85, 0.7, 0.72])) is not None
    assert DriftDetector(metric="fed_accuracy", patience=1).check(history(fed_accuracy=[0.5, 0.9, 0.6])) is not None


# -- the hook and the registry --------------------------------------------------------
class FakeCoordinator:
    def __init__(self):
        self.records: list[RoundRecord] = []


def test_monitor_hook_records_alerts_as_dicts_and_keeps_them():
    seen = []
    hook = MonitorHook([DriftDetector(threshold=0.1, patience=1), StagnationDetector(window=1)], on_alert=seen.append)
    c = FakeCoordinator()
    for r in history(accuracy=[0.5, 0.9, 0.7]):
        hook.after_round(r, c)
        c.records.append(r)
    last = c.records[-1].extra["alerts"]
    assert [a["detector"] for a in last] == ["drift", "stagnation"]
    assert last[0]["round"] == 3 and last[0]["severity"] == "warning" and isinstance(last[0]["message"], str)
    assert "alerts" not in c.records[0].extra or c.records[0].extra["alerts"] == []
    assert [a.detector for a in hook.alerts] == ["drift", "stagnation"] and seen == hook.alerts


def test_replay_runs_detectors_over_a_finished_run():
    alerts = replay(history(accuracy=[0.5, 0.9, 0.7, 0.95, 0.6]), [DriftDetector(threshold=0.1, patience=1)])
    assert [a.round for a in alerts] == [3, 5]


def test_make_detector_maps_flat_config_keys():
    det = make_detector("divergence", {"divergence_patience": 5, "drift_threshold": 0.3, "divergence_max_ratio": None})
    assert det.patience == 5 and det.max_ratio == 3.0  # None keeps the default
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        make_detector("nope")


def test_settings_defaults_are_the_detectors_defaults():
    s = MonitoringSettings()
    assert MonitoringSettings is MonitoringConfig  # one definition of [monitoring]
    assert DETECTOR_NAMES == tuple(DETECTORS)  # the config's copy of the names, in the registry's order
    for cls in DETECTORS.values():
        params = inspect.signature(cls).parameters
        for key, arg in cls.config_keys.items():
            assert getattr(s, key) == params[arg].default, key


def test_monitor_hook_keeps_its_own_history_when_the_coordinator_has_none():
    hook = MonitorHook([DriftDetector(threshold=0.1, patience=1)])
    recs = history(accuracy=[0.5, 0.9, 0.7])
    for r in recs:
        hook.after_round(r, object())
    assert [a.round for a in hook.alerts] == [3]
