"""check_compatible, the [privacy] settings, and the parts driven the way the engine will."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fleetlearn.privacy import PrivacySettings, build_privacy, check_compatible, parse_privacy_mode


# -- compatibility --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["secagg", "central+secagg", "local+secagg", "none+secagg"])
def test_secagg_with_an_aggregator_that_needs_individual_updates_is_refused(mode):
    with pytest.raises(ValueError, match="secure aggregation cannot be combined with aggregator 'krum'.*only ever reveals the SUM"):
        check_compatible(True, mode, aggregator="aggregator 'krum'")


def test_central_dp_with_robust_aggregator_is_refused_with_reason():
    with pytest.raises(ValueError, match="central DP cannot be combined.*SUM of clipped updates.*'local'"):
        check_compatible(True, "central")


@pytest.mark.parametrize(
    "needs,mode,kw,want",
    [
        (False, "central+secagg", {}, ("central", True)),  # SecAgg with central DP works
        (False, "central", {"secure_aggregation": True}, ("central", True)),
        (False, "local+secagg", {}, ("local", True)),
        (True, "local", {}, ("local", False)),  # local DP: any aggregator is post-processing
        (True, "none", {}, ("none", False)),
        (False, "secagg", {}, ("none", True)),
    ],
)
def test_combinations_that_work(needs, mode, kw, want):
    assert check_compatible(needs, mode, **kw) == want


@pytest.mark.parametrize("mode,match", [("central+secagg", "secure aggregation cannot run with asynchronous"), ("central", "central DP accounting assumes synchronous")])
def test_asynchronous_aggregation_refuses_secagg_and_central_dp(mode, match):
    with pytest.raises(ValueError, match=match):
        check_compatible(False, mode, asynchronous=True)
    assert check_compatible(False, "local", asynchronous=True) == ("local", False)


@pytest.mark.parametrize("mode", ["central+local", "bogus", "", "central+sa"])
def test_bad_modes(mode):
    with pytest.raises(ValueError, match="choose one|unknown privacy mode"):
        parse_privacy_mode(mode)


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mode": "global"}, "privacy.mode"),
        ({"mode": "central", "noise_multiplier": -1.0}, "privacy.noise_multiplier"),
        ({"mode": "local", "adaptive_clipping": True}, "privacy.adaptive_clipping"),
        ({"mode": "central", "accounting": "moments"}, "privacy.accounting"),
        ({"budget_epsilon": 3.0}, "privacy.budget_epsilon"),
        ({"secure_aggregation": True, "secagg_neighbors": 3}, "privacy.secagg_neighbors"),
        ({"secure_aggregation": True, "secagg_modulus_bits": 64}, "privacy.secagg_modulus_bits"),
        ({"mode": "central", "secure_aggregation": True, "secagg_clip_range": 0.5}, "privacy.secagg_clip_range"),
        ({"secagg_threshold": 1}, "privacy.secagg_threshold"),
    ],
)
def test_settings_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        build_privacy(PrivacySettings(**kw), cohort=10, population=100)


def test_delta_must_be_below_one_over_population():
    with pytest.raises(ValueError, match="privacy.delta"):
        build_privacy({"mode": "central", "delta": 0.02}, cohort=10, population=100)


def test_defaults_are_off():
    parts = build_privacy(None, cohort=10, population=100)
    assert (parts.central, parts.local, parts.secure, parts.accountant) == (None, None, None, None)
    assert parts.budget_stop_reason(0.1) is None and parts.record_round(0.1) is None


# -- the engine's calls, in order -------------------------------------------------------------
def _round_updates(rng, cohort, d):
    return torch.from_numpy(rng.normal(0, 1, (cohort, d))).float() * 0.2


def test_engine_shaped_loop_stops_on_budget_and_reports_library_epsilon():
    population, cohort, d = 100, 10, 50
    settings = {"mode": "central", "noise_multiplier": 1.5, "clip_norm": 1.0, "accounting": "rdp", "budget_epsilon": 2.0}
    parts = build_privacy(settings, cohort=cohort, population=population, seed=0)
    rng = np.random.default_rng(0)
    params = torch.zeros(d)
    q = cohort / population
    done, reports = 0, []
    while done < 1000:
        reason = parts.budget_stop_reason(q)  # before dispatch
        if reason:
            break
        res = parts.central.aggregate(_round_updates(rng, cohort, d))  # replaces the aggregator
        params = params + res.mean  # server optimizer
        reports.append(parts.record_round(q))  # after the round
        done += 1
    assert reason.startswith("privacy budget: one more round would spend epsilon")
    assert parts.accountant.max_rounds(2.0, q, 1.5) == 0  # nothing more fits
    fresh = build_privacy(settings, cohort=cohort, population=population).accountant
    assert fresh.max_rounds(2.0, q, 1.5) == done
    want = RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5)), done).get_epsilon(1e-5)
    assert reports[-1].epsilon == want <= 2.0
    assert [r.rounds for r in reports] == list(range(1, done + 1))
    assert all(a.epsilon < b.epsilon for a, b in zip(reports, reports[1:]))


def test_checkpoint_resume_is_identical_and_never_rolls_back_privacy():
    population, cohort, d = 200, 20, 30
    settings = {"mode": "central", "noise_multiplier": 0.9, "adaptive_clipping": True, "clip_norm": 0.1, "accounting": "rdp"}
    rng = np.random.default_rng(1)
    batches = [_round_updates(rng, cohort, d) for _ in range(8)]
    q = cohort / population

    ref = build_privacy(settings, cohort=cohort, population=population, seed=4)
    ref_means = []
    for b in batches:
        ref_means.append(ref.central.aggregate(b).mean)
        ref.record_round(q)

    run = build_privacy(settings, cohort=cohort, population=population, seed=4)
    for b in batches[:5]:
        run.central.aggregate(b)
        run.record_round(q)
    meta = json.dumps(run.state_dict())  # goes into the checkpoint's metadata as a string
    resumed = build_privacy(settings, cohort=cohort, population=population, seed=123)  # seed is overridden by the state
    resumed.load_state_dict(json.loads(meta))
    assert resumed.accountant.rounds == 5 and resumed.central.clip_norm == run.central.clip_norm
    for b, want in zip(batches[5:], ref_means[5:]):
        assert torch.equal(resumed.central.aggregate(b).mean, want)
        resumed.record_round(q)
    assert resumed.accountant.epsilon() == ref.accountant.epsilon()


def test_secure_aggregation_with_central_dp_end_to_end():
    parts = build_privacy(
        {"mode": "central", "noise_multiplier": 0.0, "clip_norm": 0.5, "secure_aggregation": True},
        cohort=12, population=100, seed=0,
    )
    u = torch.randn(10, 80)
    res = parts.central.aggregate(u, secure=parts.secure, dropped=2)  # two clients dropped after key sharing
    norms = torch.linalg.vector_norm(u, dim=1)
    want = (u * torch.clamp(0.5 / norms, max=1).unsqueeze(1)).sum(0) / 12
    assert torch.allclose(res.mean, want, atol=1e-6)
    assert len(parts.secure.last.dropped) == 2


def test_local_mode_parts():
    parts = build_privacy({"mode": "local", "noise_multiplier": 2.0, "clip_norm": 1.0, "accounting": "rdp"}, cohort=10, population=100)
    v = parts.local.apply(torch.zeros(10_000), parts.local.client_generator(0, 1, 5))
    assert float(v.std()) == pytest.approx(2.0, rel=0.03)
    spent = parts.record_round(0.1)
    assert spent.epsilon == RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0), 1).get_epsilon(1e-5)
    assert not math.isnan(parts.noise_multiplier)
