"""The composed aggregation pipeline: one call from the engine, central DP around robust rules
where the math allows it, refusals by capability."""

import dp_accounting
import pytest
import torch

import fleetlearn
from fleetlearn.aggregation.pipeline import Batch, CentralDPStage, HierarchyStage, RuleStage, SketchSpaceStage, build_pipeline
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator


def dp_config(aggregator, z=0.0, **server):
    return {
        "data": {"clients": 40},
        "model": {"hidden": [16]},
        "server": {"rounds": 3, "cohort": 8, "aggregator": aggregator, "min_replies": 1, **server},
        "client": {"local_epochs": 1},
        "privacy": {"mode": "central", "noise_multiplier": z, "clip_norm": 0.5, "accounting": "rdp", "delta": 1e-3},
    }


def clip_rows(x, bound):
    norms = torch.linalg.vector_norm(x.double(), dim=1)
    return x.double() * torch.clamp(bound / norms, max=1.0)[:, None]


def test_norm_bounded_mean_under_central_dp_is_the_dp_sum_of_its_clipped_rows():
    c = build_coordinator(load_config(dp_config("norm_bounded_mean", norm_bound=0.2)), store=False)
    assert isinstance(c.pipeline, CentralDPStage) and c.pipeline.inner_name == "norm_bounded_mean"
    rec = c.run_round()
    assert rec.status == "ok" and rec.extra["dp_inner_rule"] == "norm_bounded_mean"
    # z = 0: no noise, so the aggregate is exactly sum(clip_0.5(clip_0.2(u_i))) / expected cohort.
    want = clip_rows(clip_rows(c.last_updates, 0.2), 0.5).sum(0) / 8
    torch.testing.assert_close(c.last_aggregate.double(), want, rtol=1e-5, atol=1e-7)


def test_centered_clipping_under_central_dp_steps_once_from_the_last_released_aggregate():
    c = build_coordinator(load_config(dp_config("centered_clipping", cc_tau=0.3, cc_iters=1)), store=False)
    c.run_round()
    center = c.last_aggregate.clone()
    assert torch.equal(c.pipeline.center, center)
    c.run_round()
    want = center.double() + clip_rows(clip_rows(c.last_updates.double() - center.double(), 0.3), 0.5).sum(0) / 8
    torch.testing.assert_close(c.last_aggregate.double(), want, rtol=1e-5, atol=1e-7)
    # The centre is checkpointed with the aggregator's side state.
    assert torch.equal(c.side_state()["aggregator/dp_center"], c.pipeline.center)


@pytest.mark.parametrize("rule, extra", [("norm_bounded_mean", {"norm_bound": 0.2}), ("centered_clipping", {"cc_tau": 0.3, "cc_iters": 1})])
def test_robust_rules_under_central_dp_spend_epsilon_as_the_mean_does(rule, extra):
    robust = fleetlearn.run(dp_config(rule, z=1.0, **extra), store=False)
    plain = fleetlearn.run(dp_config("mean", z=1.0), store=False)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(8 / 40, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert robust.dp_epsilon == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9) == plain.dp_epsilon


@pytest.mark.parametrize("rule, extra, named", [
    ("median", {}, "capability 'bounded per-client contributions' missing"),
    ("krum", {}, "capability 'bounded per-client contributions' missing"),
    ("mifa", {}, "capability 'bounded per-client contributions' missing"),
    ("norm_bounded_mean", {}, "set server.norm_bound"),
    ("centered_clipping", {"cc_tau": 0.3}, "server.cc_iters = 3"),
    ("centered_clipping", {"cc_iters": 1}, "set server.cc_tau"),
])
def test_rules_that_do_not_compose_with_central_dp_are_refused_by_capability(rule, extra, named):
    with pytest.raises(ConfigError) as err:
        build_coordinator(load_config(dp_config(rule, **extra)), store=False)
    msg = str(err.value)
    assert f"server.aggregator = {rule!r}" in msg and named in msg and "central DP cannot wrap" in msg


def test_secure_aggregation_still_needs_a_sum():
    cfg = dp_config("norm_bounded_mean", norm_bound=0.2)
    cfg["privacy"]["secure_aggregation"] = True
    with pytest.raises(ConfigError, match="secure aggregation cannot be combined"):
        build_coordinator(load_config(cfg), store=False)


def test_validators_robust_rule_central_dp_codec_and_guardrail_in_one_round():
    cfg = dp_config("norm_bounded_mean", z=0.5, norm_bound=0.2, validators=["finite", "shape", "norm"], max_update_norm=50.0)
    cfg["server"]["rounds"] = 4
    cfg["compression"] = {"uplink": "q8 | zstd"}
    cfg["monitoring"] = {"detectors": ["divergence"], "guardrail": ["divergence"]}
    c = build_coordinator(load_config(cfg), store=False)
    for _ in range(2):
        rec = c.run_round()
        assert rec.status == "ok" and rec.extra["dp_inner_rule"] == "norm_bounded_mean" and rec.extra["dp_epsilon"] > 0
        assert all(cr.codec == "q8 | zstd" and cr.uplink_bytes < 4 * c.dim for cr in rec.clients if cr.status == "accepted")
    good = c.version
    c.server_state = c.server_optimizer.lr.set(c.server_state, base=1e4)  # a broken server step (the schedule scales this lr): the loss explodes
    rec = c.run_round()
    assert rec.status == "rolled_back" and rec.version == good and "guardrail" in rec.extra
    assert rec.extra["dp_epsilon"] > 0  # the rolled-back round's privacy spend stays spent
    assert c.privacy.accountant.rounds == 3


def test_the_engine_builds_one_stage_per_run_from_its_parts():
    def stage(cfg):
        return build_coordinator(load_config(cfg), store=False).pipeline

    base = {"data": {"clients": 20}, "server": {"cohort": 4}}
    assert isinstance(stage(base), RuleStage) and stage(base).label == "aggregator mean"
    sketched = stage({**base, "compression": {"uplink": "sketch:200"}})
    assert isinstance(sketched, SketchSpaceStage) and isinstance(sketched.inner, RuleStage)
    assert isinstance(stage({**base, "engine": {"regions": 2}}), HierarchyStage)
    assert isinstance(stage({**base, "privacy": {"mode": "central", "delta": 1e-3}}), CentralDPStage)


def test_a_rule_stage_reports_rows_left_out_as_client_ids():
    from fleetlearn.aggregation import DnCAggregator

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    x[2] += 100.0
    st = RuleStage(DnCAggregator(f=1, c=1.0, clip=False))
    res = st.next(Batch(x, torch.ones(6).numpy().astype("float64"), [10, 11, 12, 13, 14, 15]))
    assert res.measurements["aggregator_removed"] == [12]
    with pytest.raises(ValueError):
        build_pipeline(__import__("fleetlearn.aggregation", fromlist=["MedianAggregator"]).MedianAggregator(),
                       privacy=build_coordinator(load_config(dp_config("mean")), store=False).privacy)
