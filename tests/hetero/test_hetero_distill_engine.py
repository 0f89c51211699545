"""FedDF as the engine's server step after aggregation, and the on-device student hook."""

import math

import numpy as np
import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.learners.distill import ensemble_logits, split_unlabeled

HETERO = {
    "data": {"dataset": "digits", "clients": 40, "alpha": 0.5},
    "model": {"widths": [1.0, 0.5, 0.25], "width_rule": "round_robin"},
    "server": {"rounds": 5, "cohort": 10},
}


def _cfg(distill, **over):
    d = {k: dict(v) for k, v in HETERO.items()}
    for k, v in over.items():
        d.setdefault(k, {}).update(v)
    d["distill"] = distill
    return load_config(d)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"distill": {"method": "distill_all"}}, r"distill\.method"),
        ({"distill": {"method": "feddf", "server_fraction": 1.0}}, r"distill\.server_fraction"),
        ({"distill": {"method": "feddf", "temperature": 0}}, r"distill\.temperature"),
        ({"distill": {"method": "feddf"}, "server": {"mode": "async"}}, r"distill\.method = 'feddf'.*async"),
        ({"distill": {"method": "feddf"}, "privacy": {"mode": "central"}}, r"distill\.method = 'feddf'.*central DP"),
        ({"distill": {"student_hidden": [0]}}, r"distill\.student_hidden"),
        ({"distill": {"student_hidden": [8]}, "model": {"name": "logistic"}}, r"distill\.student_hidden.*mlp"),
    ],
)
def test_bad_distill_config_names_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_unlabeled_slice_is_disjoint_from_the_test_set_and_seeded():
    x = torch.arange(100, dtype=torch.float32)[:, None]
    y = torch.arange(100) % 10
    xu, xt, yt = split_unlabeled(x, y, 0.3, seed=4)
    assert len(xu) == 30 and len(xt) == 70 and torch.equal(yt, xt[:, 0].long() % 10)
    assert set(xu[:, 0].tolist()).isdisjoint(xt[:, 0].tolist())
    assert torch.equal(split_unlabeled(x, y, 0.3, seed=4)[0], xu)
    with pytest.raises(ValueError, match="server_fraction"):
        split_unlabeled(x[:2], y[:2], 0.1, seed=0)


def test_feddf_with_zero_steps_leaves_training_unchanged():
    """The server step is wired where it should be: with no distillation step the run equals
    the plain run bit for bit (same cohorts, seeds and model), and the held-out slice is
    taken from the central set only."""
    quick = {"server": {"rounds": 2}, "client": {"local_epochs": 2}}
    plain = build_coordinator(_cfg({"method": "none"}, **quick), store=False)
    zero = build_coordinator(_cfg({"method": "feddf", "steps": 0}, **quick), store=False)
    assert len(zero.evaluator.data.central_y) + len(zero.server_steps[0].x) == len(plain.evaluator.data.central_y)
    plain.run()
    zero.run()
    assert torch.equal(plain.params, zero.params)
    assert all(r.extra["feddf_best_step"] == 0 for r in zero.records)


def test_heterogeneous_teacher_equals_the_plans_ensemble():
    """FedDF's teacher under HeteroFL (each client at its width) equals `HeteroFLPlan.ensemble_logits`
    computed from the sub-model deltas, and with every width 1 the plain vmap ensemble."""
    c = build_coordinator(_cfg({"method": "feddf"}), store=False)
    step, plan = c.server_steps[0], c.learner.plan
    g = torch.Generator().manual_seed(0)
    ids = [0, 1, 2, 4, 5, 9]  # round robin: widths 1, 0.5, 0.25, 0.5, 0.25, 1
    widths = [float(w) for w in c.learner.widths_of(ids)]
    subs = [0.1 * torch.randn(plan.sub_dim(w), generator=g) for w in widths]
    matrix = torch.stack([plan.embed(s, w) for s, w in zip(subs, widths)])
    weights = torch.tensor([3.0, 1.0, 2.0, 5.0, 1.0, 4.0])
    got = step.teacher(c.params, ids, matrix, weights)
    ref = plan.ensemble_logits(c.params, widths, subs, step.x, weights)
    assert torch.allclose(got, ref, atol=1e-5)
    full = ensemble_logits(c.learner.module, c.learner.spec, c.params[None] + matrix, step.x, weights)
    assert not torch.allclose(got, full, atol=1e-3)  # the sub-models are not the full models with zeros


@pytest.mark.slow
def test_feddf_in_the_engine_improves_or_matches_the_fused_model():
    """HeteroFL widths 1 / 0.5 / 0.25 on label-skewed digits (Dirichlet 0.5, 40 clients).  Both
    runs have the same cohorts and client seeds, so after round 1 the plain run's model *is* the
    fused model FedDF starts from.  FedDF moves it to the ensemble (the held-out KL falls) and
    is within 1 pp of its accuracy or above; after 5 rounds it stays within 1 pp of FedAvg or above.
    Measured (seed 0): round 1 fused 56.4% -> distilled 60.9%; round 5 FedAvg 91.6%, FedDF 92.2%;
    since issue 19's batch draws (another trajectory): 54.75% -> 54.19%; 91.62% / 91.62%."""
    plain = build_coordinator(_cfg({"method": "none"}), store=False)
    fed = build_coordinator(_cfg({"method": "feddf"}), store=False)
    cx, cy = fed.evaluator.data.central_x, fed.evaluator.data.central_y
    acc = lambda c: float(c.learner.per_example(c.params, cx, cy)[1].mean())
    firsts = []
    for r in range(5):
        plain.run_round()
        rec = fed.run_round()
        assert rec.extra["feddf_kl_after"] <= rec.extra["feddf_kl_before"]
        if r == 0:
            firsts = (acc(plain), acc(fed))
            assert rec.extra["feddf_best_step"] > 0 and rec.extra["feddf_kl_after"] < 0.5 * rec.extra["feddf_kl_before"]
    print(f"round 1: fused {firsts[0]:.4f} -> FedDF {firsts[1]:.4f}; round 5: FedAvg {acc(plain):.4f}, FedDF {acc(fed):.4f}")
    # Distillation matches the ensemble's soft labels (the KL checks above), not the test
    # labels: on a given seed it may land a little below the fused model's accuracy, never far.
    assert firsts[1] >= firsts[0] - 0.01
    assert acc(fed) >= acc(plain) - 0.01
    assert fed.records[-1].accuracy == pytest.approx(acc(fed))


def test_student_is_distilled_recorded_and_saved(tmp_path):
    cfg = _cfg({"student_hidden": [16], "student_every": 2, "student_steps": 200}, model={"widths": [1.0]},
               server={"rounds": 4}, store={"root": str(tmp_path)})
    c = build_coordinator(cfg, store=True)
    s = c.run()
    recs = s.records
    assert "student_accuracy" not in recs[0].extra and "student_accuracy" in recs[1].extra and "student_accuracy" in recs[3].extra
    last = recs[-1].extra
    assert last["student_dim"] == 64 * 16 + 16 + 16 * 10 + 10 and last["student_dim"] < c.learner.spec.dim / 5
    # The student follows the global model: high agreement, accuracy close to the teacher's.
    assert last["student_agreement"] > 0.8, last
    assert last["student_accuracy"] > recs[-1].accuracy - 0.15, (last, recs[-1].accuracy)
    from safetensors.torch import load_file

    saved = load_file(str(c.store.run_dir / "student.safetensors"))["params"]
    assert saved.shape == (last["student_dim"],)
