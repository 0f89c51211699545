"""MIFA (Gu et al., NeurIPS 2021): the latest update of every client seen, averaged each round."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fleetlearn.aggregation.mifa import MIFA


def _rounds(population, dim, rounds, seed, max_cohort=12):
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        n = int(rng.integers(1, max_cohort + 1))
        ids = rng.choice(population, size=n, replace=False)
        yield ids.tolist(), torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32)), rng.uniform(0.5, 20.0, size=n)


class LatestUpdates:
    """The definition, written independently: an LRU dict client -> (latest update, weight)."""

    def __init__(self, max_clients=None):
        self.max_clients = max_clients
        self.store: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self.store_round: dict[int, int] = {}
        self.t = 0  # the current round; the caller advances it

    def round(self, ids, mat, weights):
        for c in ids:  # refresh this round's clients first, so none of them is evicted
            self.store.pop(c, None)
        for c, row, w in zip(ids, np.asarray(mat, dtype=np.float64), weights):
            if self.max_clients is not None and len(self.store) >= self.max_clients:
                # least recently updated first; among equals (same round) the smallest id
                oldest_round = self.store_round[next(iter(self.store))]
                ties = [k for k in self.store if self.store_round[k] == oldest_round]
                del self.store[min(ties)]
            self.store[c] = (row, float(w))
            self.store_round[c] = self.t
        rows = np.stack([v[0] for v in self.store.values()])
        w = np.array([v[1] for v in self.store.values()])
        return (w[:, None] * rows).sum(0) / w.sum()


def test_equals_weighted_mean_over_every_stored_update():
    dim, population = 37, 150  # more than the initial 64 slots: the store grows
    agg = MIFA(dim, max_clients=population)
    ref = LatestUpdates()
    for ids, mat, w in _rounds(population, dim, rounds=40, seed=0):
        ref.t += 1
        got = agg.aggregate_round(ids, mat, w)
        want = ref.round(ids, mat, w)
        assert got.dtype == torch.float32 and got.shape == (dim,)
        assert np.allclose(got.numpy(), want, atol=1e-5)
    assert agg.stored_clients() == sorted(ref.store)
    assert agg.evictions == 0 and agg.num_stored > 64


def test_uniform_weights_give_the_papers_mean_and_absent_clients_still_count():
    agg = MIFA(3, max_clients=10)
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 4.0])
    out1 = agg.aggregate_round([0, 1], torch.stack([a, b]), [1, 1])
    assert torch.allclose(out1, (a + b) / 2)
    # Round 2: only client 2 replies, 0 and 1 still count with their stored updates.
    out2 = agg.aggregate_round([2], c[None], [1])
    assert torch.allclose(out2, (a + b + c) / 3)
    # Round 3: client 0 replies again; its fresh update replaces the stored one.
    a2 = torch.tensor([-3.0, 0, 0])
    out3 = agg.aggregate_round([0], a2[None], [1])
    assert torch.allclose(out3, (a2 + b + c) / 3)
    assert torch.equal(agg.stored_update(0), a2)
    assert agg.ages() == {0: 0, 1: 2, 2: 1}


def test_lru_eviction_keeps_the_most_recently_updated_clients():
    agg = MIFA(2, max_clients=3)
    e = torch.eye(2)
    agg.aggregate_round([5, 1], torch.stack([e[0], e[1]]), [1, 1])  # round 1: 5 and 1
    agg.aggregate_round([7], e[:1], [2])  # round 2: 7 (store full: 1, 5, 7)
    agg.aggregate_round([5], e[1:], [1])  # round 3: 5 refreshed
    out = agg.aggregate_round([9], torch.tensor([[4.0, 4.0]]), [1])  # round 4: 9 evicts 1 (updated longest ago)
    assert agg.stored_clients() == [5, 7, 9] and agg.evictions == 1
    assert torch.allclose(out, (e[1] + 2 * e[0] + torch.tensor([4.0, 4.0])) / 4)
    # A round's own clients are never evicted to make room for each other.
    agg.aggregate_round([1, 2, 5], torch.zeros(3, 2), [1, 1, 1])
    assert agg.stored_clients() == [1, 2, 5] and agg.evictions == 3
    with pytest.raises(ValueError, match="exceed max_clients"):
        agg.aggregate_round([1, 2, 3, 4], torch.zeros(4, 2), [1, 1, 1, 1])


def test_bounded_store_equals_the_independent_lru_reference():
    dim, population, cap = 11, 60, 15
    agg = MIFA(dim, max_clients=cap)
    ref = LatestUpdates(cap)
    for ids, mat, w in _rounds(population, dim, rounds=50, seed=3, max_cohort=8):
        ref.t += 1
        got = agg.aggregate_round(ids, mat, w)
        assert np.allclose(got.numpy(), ref.round(ids, mat, w), atol=1e-5)
        assert agg.num_stored <= cap
    assert agg.stored_clients() == sorted(ref.store)
    assert agg.evictions > 0
    assert agg.nbytes <= MIFA.bytes_needed(dim, cap)


def test_state_round_trips_through_a_safetensors_checkpoint(tmp_path):
    dim = 9
    agg = MIFA(dim, max_clients=20)
    rounds = list(_rounds(40, dim, rounds=12, seed=5, max_cohort=6))
    for ids, mat, w in rounds[:8]:
        agg.aggregate_round(ids, mat, w)
    save_file(agg.state_dict(), str(tmp_path / "mifa.safetensors"))
    back = MIFA(dim, max_clients=20)
    back.load_state_dict(load_file(str(tmp_path / "mifa.safetensors")))
    assert torch.equal(back.current(), agg.current())
    assert back.stored_clients() == agg.stored_clients() and back.round == agg.round and back.ages() == agg.ages()
    for ids, mat, w in rounds[8:]:
        assert torch.equal(back.aggregate_round(ids, mat, w), agg.aggregate_round(ids, mat, w))
    assert back.evictions == agg.evictions
    with pytest.raises(ValueError, match="dim 9"):
        MIFA(10).load_state_dict(agg.state_dict())


def test_memory_is_bounded_and_stated():
    dim = 1000
    agg = MIFA(dim, max_clients=200)
    start = agg.nbytes
    assert start == 64 * (4 * dim + 24)  # starts with 64 slots
    for r in range(30):
        ids = list(range(10 * r, 10 * r + 10))
        agg.aggregate_round(ids, torch.ones(10, dim), [1.0] * 10)
    assert agg.num_stored == 200 and agg.evictions == 100
    assert agg.nbytes == MIFA.bytes_needed(dim, 200) == 200 * (4 * dim + 24)
    half = MIFA(dim, max_clients=200, dtype="float16")
    assert MIFA.bytes_needed(dim, 200, "float16") == 200 * (2 * dim + 24)
    g = torch.Generator().manual_seed(0)
    full = MIFA(dim, max_clients=200)
    for r in range(5):
        mat = torch.randn(10, dim, generator=g) * 0.01
        a = half.aggregate_round(list(range(10 * r, 10 * r + 10)), mat, [1.0] * 10)
        b = full.aggregate_round(list(range(10 * r, 10 * r + 10)), mat, [1.0] * 10)
        assert torch.allclose(a, b, rtol=0, atol=1e-5)  # float16 keeps ~11 bits of each 0.01-sized entry
    assert half.nbytes < 0.6 * full.nbytes
    with pytest.raises(ValueError, match="float16 range"):
        half.aggregate_round([0], torch.full((1, dim), 1e6), [1.0])


def test_max_age_drops_stale_updates():
    agg = MIFA(1, max_clients=10, max_age=2)
    agg.aggregate_round([0], torch.tensor([[10.0]]), [1])
    agg.aggregate_round([1], torch.tensor([[2.0]]), [1])
    assert agg.stored_clients() == [0, 1]
    out = agg.aggregate_round([2], torch.tensor([[4.0]]), [1])  # client 0's update is 2 rounds old now
    assert agg.stored_clients() == [1, 2] and torch.allclose(out, torch.tensor([3.0]))


def test_forget_drops_a_clients_stored_update():
    agg = MIFA(2, max_clients=4)
    agg.aggregate_round([0, 1, 2], torch.tensor([[1.0, 0], [0, 1.0], [100.0, 100.0]]), [1, 1, 1])
    assert agg.forget([2, 7]) == 1  # 7 was never stored
    assert agg.stored_clients() == [0, 1] and torch.allclose(agg.current(), torch.tensor([0.5, 0.5]))
    out = agg.aggregate_round([3], torch.tensor([[2.0, 2.0]]), [2])
    assert torch.allclose(out, torch.tensor([5.0, 5.0]) / 4)


def test_contract_errors():
    agg = MIFA(4, max_clients=5)
    with pytest.raises(TypeError, match="aggregate_round"):
        agg.aggregate(torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        agg.aggregate_round([0, 1], torch.zeros(2, 3), [1, 1])
    with pytest.raises(ValueError, match="twice"):
        agg.aggregate_round([3, 3], torch.zeros(2, 4), [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        agg.aggregate_round([0], torch.full((1, 4), float("nan")), [1])
    with pytest.raises(ValueError, match="no stored update"):
        agg.aggregate_round([], torch.zeros(0, 4), [])
    assert agg.name == "mifa" and agg.needs_individual_updates and agg.needs_client_ids
