"""LoRA through the engine on the tiny BERT: the wire carries adapters and head only, codecs
and central DP work on them, F1 in the summary, heterogeneous ranks aggregate correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fleetlearn.api import build
from fleetlearn.config import load_config
from fleetlearn.engine.evaluation import binary_f1
from fleetlearn.learners.hf import LoraRankPlan, full_model_params, load_encoder, lora_classifier_factory, rank_slices


def _cfg(bert_dir, spam_dir, **over):
    base = {
        "data": {"dataset": "spam_assassin", "path": str(spam_dir), "clients": 8, "text_seq_len": 20},
        "model": {"name": f"hf:{bert_dir}", "lora_rank": 4},
        "client": {"local_steps": 3, "batch_size": 8, "lr": 0.05},
        "server": {"rounds": 2, "cohort": 4},
        "engine": {"threads": 1},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(base)


def _run(cfg):
    c = build(cfg, store=False)
    summary = c.run()
    return c, summary


def test_the_wire_carries_adapters_and_head_and_the_base_stays(bert_dir, spam_dir):
    c, s = _run(_cfg(bert_dir, spam_dir))
    d = c.learner.spec.dim
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("head.") for n in c.learner.spec.names)
    accepted = [cl for r in s.records for cl in r.clients if cl.status == "accepted"]
    assert len(accepted) == 8
    # uncompressed: float32 adapters + head and the wire header, nothing of the base
    assert all(4 * d <= cl.uplink_bytes < 4 * d + 64 for cl in accepted)
    assert max(cl.uplink_bytes for cl in accepted) < 4 * full_model_params(f"hf:{bert_dir}", 2) / 10
    # the frozen base in memory is still the file's
    disk = load_file(str(bert_dir / "model.safetensors"))
    base = load_encoder(f"hf:{bert_dir}").module.state_dict()
    for k in ("embeddings.word_embeddings.weight", "encoder.layer.1.attention.self.query.weight"):
        torch.testing.assert_close(base[k], disk[k], rtol=0, atol=0)
    # the model moved: adapters and head differ from their initialisation
    assert not torch.equal(c.params, c.learner.init_params(0))


def test_summary_has_accuracy_and_f1_of_the_final_model(bert_dir, spam_dir):
    c, s = _run(_cfg(bert_dir, spam_dir))
    loss, correct = c.learner.per_example(c.params, c.evaluator.data.central_x, c.evaluator.data.central_y)
    assert s.final_accuracy == pytest.approx(float(correct.mean()))
    f1 = binary_f1(correct, c.evaluator.data.central_y)
    assert (math.isnan(f1) and math.isnan(s.final_f1)) or s.final_f1 == pytest.approx(f1)
    assert all("f1" in r.extra for r in s.records if not math.isnan(r.accuracy))


def test_q8_zstd_on_the_adapters(bert_dir, spam_dir):
    _, plain = _run(_cfg(bert_dir, spam_dir))
    _, q8 = _run(_cfg(bert_dir, spam_dir, compression={"uplink": "q8 | zstd"}))
    assert q8.uplink_bytes * 3.5 < plain.uplink_bytes
    assert q8.compression_ratio > 3.5


def test_central_dp_clips_the_adapter_updates_to_the_accountants_bound(bert_dir, spam_dir):
    clip = 1e-3
    cfg = _cfg(bert_dir, spam_dir, server={"rounds": 1, "cohort": 4},
               privacy={"mode": "central", "noise_multiplier": 0.0, "clip_norm": clip})
    c = build(cfg, store=False)
    start = c.params.clone()
    s = c.run()
    moved = float(torch.linalg.vector_norm(c.params - start))
    r = s.records[0]
    assert r.extra["dp_clip_norm"] == clip  # the bound the accountant composes with
    norms = [cl.update_norm for cl in r.clients if cl.status == "accepted"]
    assert min(norms) > clip  # every adapter update needed clipping...
    # ...and each moved the model by at most clip / (expected cohort): the sum of clipped rows
    # over the fixed denominator (DP-FedAvg), server lr 1
    expected = r.extra["dp_sampling_rate"] * r.extra["dp_pool"]
    assert 0 < moved <= len(norms) * clip / expected * (1 + 1e-5)
    cfg = _cfg(bert_dir, spam_dir, server={"rounds": 1, "cohort": 4},
               privacy={"mode": "central", "noise_multiplier": 1.0, "clip_norm": clip})
    _, noisy = _run(cfg)
    assert math.isfinite(noisy.dp_epsilon) and noisy.dp_epsilon > 0


# -- heterogeneous ranks ------------------------------------------------------------------------


def test_a_rank_r_model_is_the_first_r_components_of_the_full_one(bert_dir):
    name = f"hf:{bert_dir}"
    from fleetlearn.learners.hf import LoraLearner

    full = LoraLearner(lora_classifier_factory(name, 16, 2, 8, 16.0, ["query", "value"], max_rank=8))
    small = LoraLearner(lora_classifier_factory(name, 16, 2, 2, 16.0, ["query", "value"], max_rank=8))
    p = full.init_params(0)
    p = p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))  # B non-zero
    idx = rank_slices(full.spec, 2)
    zeroed = torch.zeros_like(p)
    zeroed[idx] = p[idx]  # the full model with its components beyond rank 2 set to zero
    x = torch.randint(5, 40, (3, 16)).float()
    with torch.no_grad():
        a = torch.func.functional_call(full.module, full.spec.split(zeroed), (x,))
        b = torch.func.functional_call(small.module, small.spec.split(p[idx]), (x,))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_zero_padded_aggregation_averages_each_component_over_its_ranks(bert_dir):
    name = f"hf:{bert_dir}"
    plan = LoraRankPlan(
        __import__("fleetlearn.learners.hf", fromlist=["LoraLearner"]).LoraLearner(
            lora_classifier_factory(name, 16, 2, 4, 16.0, ["query"], max_rank=4)).spec,
        [4, 2], lambda r: lora_classifier_factory(name, 16, 2, r, 16.0, ["query"], max_rank=4)())
    d = plan.dim
    w4, w2 = 1.0, 0.5
    u_full = torch.full((plan.sub_dim(w4),), 1.0)
    u_small = torch.full((plan.sub_dim(w2),), 3.0)
    agg = plan.aggregate([w4, w2], [u_full, u_small], [1.0, 1.0])
    covered_by_both = torch.zeros(d, dtype=torch.bool)
    covered_by_both[plan.index[w2]] = True
    assert torch.allclose(agg[covered_by_both], torch.tensor(2.0))  # (1 + 3) / 2
    assert torch.allclose(agg[~covered_by_both], torch.tensor(1.0))  # only the rank-4 client: its own value
    assert (~covered_by_both).sum() > 0


def test_heterogeneous_ranks_in_a_run(bert_dir, spam_dir):
    cfg = _cfg(bert_dir, spam_dir, model={"lora_rank": 8, "lora_ranks": [8, 4, 2], "width_rule": "memory", "full_width_memory_mb": 400},
               devices={"profile": "mixed_fleet"}, server={"rounds": 1, "cohort": 8})
    c, s = _run(cfg)
    mem = np.asarray(c.transport.fleet.memory_mb)
    accepted = [cl for cl in s.records[0].clients if cl.status == "accepted"]
    by_width = {}
    for cl in accepted:
        by_width.setdefault(cl.width, set()).add(cl.uplink_bytes)
    assert len(by_width) >= 2  # the fleet's memory spread gives several ranks
    sizes = {w: max(b) for w, b in by_width.items()}
    ws = sorted(sizes)
    assert all(sizes[a] < sizes[b] for a, b in zip(ws, ws[1:]))  # a smaller rank sends fewer bytes
    widths = c.learner.client_widths
    order = np.argsort(mem)
    assert np.all(np.diff(widths[order]) >= 0)  # more memory never gets a smaller rank
    assert s.records[0].status == "ok"


# -- engine.device ----------------------------------------------------------------------------


def test_device_auto_runs_where_cuda_is_or_on_the_cpu(bert_dir, spam_dir):
    # The same run on "auto" (CUDA when present, else the CPU) and on "cpu": same bytes, and
    # the same model to float tolerance (on a CPU-only machine both are the CPU).
    c_auto, s_auto = _run(_cfg(bert_dir, spam_dir, engine={"device": "auto"}))
    c_cpu, s_cpu = _run(_cfg(bert_dir, spam_dir, engine={"device": "cpu"}))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert c_auto.learner.device.type == want and c_cpu.learner.device.type == "cpu"
    assert c_auto.params.device.type == "cpu"  # the vector everything else sees stays on the CPU
    assert s_auto.uplink_bytes == s_cpu.uplink_bytes
    torch.testing.assert_close(c_auto.params, c_cpu.params, atol=1e-4, rtol=1e-3)


def test_device_refusals():
    from fleetlearn.errors import ConfigError
    from fleetlearn.learners.hf import resolve_device

    with pytest.raises(ConfigError, match=r"engine\.device = 'cuda'.*HeteroFL's sub-models"):
        load_config({"model": {"widths": [1.0, 0.5]}, "engine": {"device": "cuda"}})
    with pytest.raises(ConfigError, match=r"engine\.device.*'cpu', 'cuda', 'cuda:N' or 'auto'"):
        load_config({"model": {"name": "hf:x"}, "engine": {"device": "tpu"}})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"engine\.device = 'cuda': no CUDA device"):
            resolve_device("cuda")
