import math

import numpy as np
import pytest
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.monitoring import DebugMeasurements, update_statistics
from fleetlearn.records import RoundRecord

SMALL = {"data": {"clients": 20}, "server": {"rounds": 2, "cohort": 6}, "client": {"local_epochs": 1}}


def reference(u: np.ndarray, p: np.ndarray, a: np.ndarray, s: np.ndarray) -> dict:
    """The same quantities, client by client, straight from their definitions."""
    u = u.astype(np.float64)
    p = p / p.sum()
    n, d = u.shape
    norms = np.array([np.sqrt(np.sum(u[k] ** 2)) for k in range(n)])
    m = sum(p[k] * u[k] for k in range(n))
    sq = sum(p[k] * np.sum((u[k] - m) ** 2) for k in range(n))
    cos = np.array([u[k] @ a / (norms[k] * np.linalg.norm(a)) for k in range(n)])
    div = np.array([np.linalg.norm(u[k] - s) for k in range(n)])
    pairs = [np.linalg.norm(u[i] - u[j]) for i in range(n) for j in range(i + 1, n)]
    return {
        "norms": norms, "update_norm_p50": np.percentile(norms, 50), "update_norm_p90": np.percentile(norms, 90),
        "update_variance": sq / d, "update_sq_dist_to_mean": sq, "cosines": cos, "cosine_mean": cos.mean(),
        "cosine_std": cos.std(), "divergences": div, "weight_divergence_mean": float(p @ div),
        "pairwise_distance_mean": np.mean(pairs),
    }


def check_against_reference(got: dict, ref: dict, rtol: float = 1e-9) -> None:
    for key in ("update_norm_p50", "update_norm_p90", "update_variance", "update_sq_dist_to_mean", "cosine_mean", "cosine_std", "weight_divergence_mean", "pairwise_distance_mean"):
        assert got[key] == pytest.approx(ref[key], rel=rtol, abs=1e-12), key
    assert got["update_norm_min"] == pytest.approx(ref["norms"].min(), rel=rtol)
    assert got["update_norm_max"] == pytest.approx(ref["norms"].max(), rel=rtol)
    for key in ("norms", "cosines", "divergences"):
        np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=1e-12, err_msg=key)


def test_update_statistics_equal_a_client_by_client_computation():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(7, 33)) * rng.uniform(0.1, 3.0, size=(7, 1))
    p = rng.uniform(1, 50, size=7)
    a = rng.normal(size=33)
    s = 0.5 * a
    got = update_statistics(torch.from_numpy(u), torch.from_numpy(p), torch.from_numpy(a), torch.from_numpy(s))
    check_against_reference(got, reference(u, p, a, s))
    assert got["n"] == 7 and got["dim"] == 33


def test_defaults_are_uniform_weights_and_the_mean_as_aggregate_and_step():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(5, 12))
    m = u.mean(0)
    got = update_statistics(u)
    check_against_reference(got, reference(u, np.ones(5), m, m))


def test_variance_survives_a_large_common_offset():
    # The Gram identity subtracts nearly equal numbers (here 1e5-fold larger than the spread:
    # it would be off by orders of magnitude); direct differences in float32 with the mean's
    # rounding corrected stay within float32 rounding of the spread itself.
    rng = np.random.default_rng(2)
    noise = rng.normal(scale=1e-3, size=(6, 40))
    u = (100.0 + noise).astype(np.float32)  # the engine's updates are float32
    got = update_statistics(torch.from_numpy(u))
    u = u.astype(np.float64)
    exact = np.mean(np.sum((u - u.mean(0)) ** 2, axis=1)) / 40
    assert got["update_variance"] == pytest.approx(exact, rel=1e-5)


def test_a_zero_update_has_nan_cosine_not_a_crash():
    u = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    got = update_statistics(u)
    assert math.isnan(got["cosines"][0]) and got["cosines"][1] == pytest.approx(1 / math.sqrt(5))
    assert math.isfinite(got["cosine_mean"])


def test_a_single_update_has_no_pairwise_distance():
    got = update_statistics(np.ones((1, 4)))
    assert math.isnan(got["pairwise_distance_mean"]) and got["update_variance"] == 0.0


def test_hook_on_a_real_round_matches_numpy_and_the_client_records():
    hook = DebugMeasurements()
    c = build_coordinator(load_config(SMALL), store=False, hooks=[hook])
    rec = c.run_round()
    dbg = rec.extra["debug"]
    u = c.last_updates.numpy().astype(np.float64)
    p = c.last_weights.numpy().astype(np.float64)
    a = c.last_aggregate.numpy().astype(np.float64)
    s = (c.params.double() - c.prev_params.double()).numpy()
    ref = reference(u, p, a, s)
    got = {**dbg, "norms": dbg["clients"]["norm"], "cosines": dbg["clients"]["cosine"], "divergences": dbg["clients"]["divergence"]}
    # The engine's updates are float32 and are measured in float32 (one pass, no float64 copy
    # of the matrix): float32 rounding of sums over d = 9610 coordinates, against a float64 reference.
    check_against_reference(got, ref, rtol=1e-5)
    # FedAvg with server_lr 1: the step is the weighted mean, so every client's divergence
    # from the new model is its distance to the mean.
    div = np.array(dbg["clients"]["divergence"])
    assert dbg["update_sq_dist_to_mean"] == pytest.approx(float(p / p.sum() @ div**2), rel=1e-4)
    accepted = [cr for cr in rec.clients if cr.status == "accepted"]
    assert dbg["clients"]["id"] == [cr.client_id for cr in accepted]
    np.testing.assert_allclose(dbg["clients"]["norm"], [cr.update_norm for cr in accepted], rtol=1e-5)
    assert dbg["model_norm"] == pytest.approx(float(np.linalg.norm(c.params.double().numpy())), rel=1e-12)
    assert dbg["step_norm"] == pytest.approx(float(np.linalg.norm(s)), rel=1e-12)
    assert dbg["participation_rate"] == rec.accepted / rec.selected
    assert dbg["replied"] == rec.accepted + rec.rejected + rec.late


def test_a_failed_round_is_measured_without_updates():
    hook = DebugMeasurements()
    c = build_coordinator(load_config({**SMALL, "devices": {"dropout": 1.0}}), store=False, hooks=[hook])
    rec = c.run_round()
    assert rec.status == "failed"
    dbg = rec.extra["debug"]
    assert "update_norm_p50" not in dbg and "clients" not in dbg
    assert dbg["model_norm"] == pytest.approx(float(torch.linalg.vector_norm(c.params.double())))


def test_per_update_statistics_are_withheld_under_secure_aggregation_or_central_dp():
    c = build_coordinator(load_config(SMALL), store=False)
    c.run_round()
    hook = DebugMeasurements()
    for parts, word in ((type("P", (), {"secure": object(), "central": None})(), "secure aggregation"), (type("P", (), {"secure": None, "central": object()})(), "central DP")):
        c.privacy = parts
        rec = RoundRecord(round=1, version=1)
        hook.after_round(rec, c)
        dbg = rec.extra["debug"]
        assert word in dbg["updates_hidden"] and "update_norm_p50" not in dbg and "clients" not in dbg
        assert "model_norm" in dbg and "step_norm" in dbg


def test_pairwise_distance_is_sampled_beyond_256_pairs_and_stays_close():
    rng = np.random.default_rng(5)
    # Two groups far apart: a sample that missed the cross-group pairs (or only drew them) is far off.
    u = np.concatenate([rng.normal(size=(300, 16)), 5.0 + rng.normal(size=(300, 16))])
    got = update_statistics(u)
    assert got["pairwise_pairs"] == 256 and got["pairwise_exact"] is False
    dist = np.linalg.norm(u[:, None, :] - u[None, :, :], axis=2)
    exact = dist[np.triu_indices(600, 1)].mean()
    assert got["pairwise_distance_mean"] == pytest.approx(exact, rel=0.05)
    assert update_statistics(u)["pairwise_distance_mean"] == got["pairwise_distance_mean"]  # seeded
    small = update_statistics(u[:23])  # 253 pairs: all of them
    assert small["pairwise_pairs"] == 253 and small["pairwise_exact"] is True
    sub = dist[:23, :23][np.triu_indices(23, 1)].mean()
    assert small["pairwise_distance_mean"] == pytest.approx(sub, rel=1e-12)


@pytest.mark.parametrize("near_rows", [0, 2, 5])
def test_rows_close_to_the_mean_or_the_step_are_measured_as_exactly_as_the_rest(near_rows):
    # Distances come from norms and dot products except where that would cancel (a row close
    # to the mean or to the step): those rows, or the whole matrix when they carry much of
    # the weight, are measured directly.  Every mix stays within float32 rounding.
    rng = np.random.default_rng(7)
    n, d = 12, 3000
    centre = rng.normal(size=d)
    u = centre + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    p = rng.uniform(1, 5, size=n)
    m = (p / p.sum()) @ u
    u[:near_rows] = m + 1e-3 * rng.normal(size=(near_rows, d))  # within a thousandth of the mean
    u = u.astype(np.float32)
    u64 = u.astype(np.float64)
    a = ((p / p.sum()) @ u64).astype(np.float32)
    s = a * np.float32(0.999)
    got = update_statistics(torch.from_numpy(u), torch.from_numpy(p), torch.from_numpy(a), torch.from_numpy(s))
    ref = reference(u64, p, a.astype(np.float64), s.astype(np.float64))
    check_against_reference(got, ref, rtol=2e-5)
