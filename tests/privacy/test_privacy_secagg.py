"""Secure aggregation: exact sums under dropouts, what the server sees, failures."""

import dataclasses

import numpy as np
import pytest
import torch

from fleetlearn.privacy import (
    MaskedInput,
    Quantizer,
    SecAggClient,
    SecAggDropoutError,
    SecAggError,
    SecAggServer,
    SecAggTamperError,
    SecureAggregation,
    UnmaskRequest,
    UnmaskShares,
    run_secagg,
    secure_sum,
)
from fleetlearn.privacy.secagg import derive_neighborhood

N, D, BITS = 20, 1000, 32


@pytest.fixture(scope="module")
def quantized():
    rng = np.random.default_rng(0)
    q = Quantizer(clip_range=1.0, max_clients=N, modulus_bits=BITS)
    return q, q.quantize(rng.normal(0, 0.3, (N, D)), rng)


def _plain_sum(x, keep):
    return Quantizer.field_sum(x[sorted(keep)], BITS)


@pytest.mark.parametrize("dropouts", [(), (7,), tuple(range(0, N, 3))[:6]], ids=["none", "one", "30pct"])
def test_unmasked_sum_equals_plain_sum_exactly(quantized, dropouts):
    q, x = quantized
    assert len(dropouts) in (0, 1, int(0.3 * N))
    t = run_secagg(x, dropouts=dropouts, seed=1)
    keep = set(range(N)) - set(dropouts)
    assert t.sum.dtype == np.uint64
    assert np.array_equal(t.sum, _plain_sum(x, keep))  # integer equality in Z_{2^32}
    assert set(t.survivors) == keep and set(t.dropped) == set(dropouts)
    # and it dequantizes to the float sum up to rounding
    assert np.abs(q.dequantize(t.sum, len(keep)) - q.dequantize(_plain_sum(x, keep))).max() == 0


def test_secure_sum_with_os_randomness_and_late_dropouts(quantized):
    _, x = quantized
    # unseeded (the secure default); clients 2 and 11 drop after masking: their inputs still count
    s = secure_sum(x, dropouts=(4, 5), late_dropouts=(2, 11))
    assert np.array_equal(s, _plain_sum(x, set(range(N)) - {4, 5}))


@pytest.mark.parametrize("bits", [16, 40, 62])
def test_other_moduli(bits):
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, size=(6, 300), dtype=np.uint64)
    assert np.array_equal(secure_sum(x, dropouts=(1,), seed=0, modulus_bits=bits), Quantizer.field_sum(x[[0, 2, 3, 4, 5]], bits))


def test_secagg_plus_neighbour_graph(quantized):
    _, x = quantized
    t = run_secagg(x, dropouts=(0, 9, 13), seed=2, neighbors=8)
    assert np.array_equal(t.sum, _plain_sum(x, set(range(N)) - {0, 9, 13}))
    graph = t.server.directory.neighbors
    assert all(len(v) == 8 for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    assert t.server.directory.threshold == 5
    # sparse graph: far fewer pairwise ciphertexts than all pairs
    assert sum(len(m.encrypted_shares) for m in t.server.inbox if hasattr(m, "encrypted_shares")) == N * 8


def test_server_never_sees_an_unmasked_update(quantized):
    _, x = quantized
    dropouts = (3, 8, 15)
    t = run_secagg(x, dropouts=dropouts, seed=3)
    inbox = t.server.inbox
    masked = [m for m in inbox if isinstance(m, MaskedInput)]
    assert {m.client_id for m in masked} == set(range(N)) - set(dropouts)
    for m in masked:
        plain = x[m.client_id]
        assert np.mean(m.masked == plain) < 0.01  # not the input, not even coordinate-wise
        # the plain quantized updates are tiny signed numbers (near 0 or near 2^32);
        # masked ones are uniform on [0, 2^32): mean ~ 1/2, each quarter ~ 1/4 of the mass
        u = m.masked.astype(np.float64) / 2**BITS
        assert abs(u.mean() - 0.5) < 0.05
        assert np.allclose(np.histogram(u, bins=4, range=(0, 1))[0] / D, 0.25, atol=0.06)
    # no proper subset of masked inputs sums to the subset's plain sum
    ids = [m.client_id for m in masked]
    ys = np.stack([m.masked for m in masked])
    for k in (1, 2, len(ids) - 1):
        part = Quantizer.field_sum(ys[:k], BITS)
        assert np.mean(part == _plain_sum(x, ids[:k])) < 0.01
    # only those two kinds of arrays reach the server: no message carries a vector besides MaskedInput
    for m in inbox:
        if not isinstance(m, MaskedInput):
            assert not any(isinstance(v, np.ndarray) for v in dataclasses.asdict(m).values())
    # for no client did the server get both its self-mask share and its mask-key share
    unmask = [m for m in inbox if isinstance(m, UnmaskShares)]
    self_revealed = {u for m in unmask for u in m.self_mask_shares}
    key_revealed = {u for m in unmask for u in m.mask_key_shares}
    assert self_revealed == set(ids) and key_revealed == set(dropouts)
    assert not self_revealed & key_revealed


def test_too_many_dropouts_fail_the_round_clearly(quantized):
    _, x = quantized
    with pytest.raises(SecAggDropoutError, match=r"only 9 of 20 clients sent masked inputs, fewer than the threshold t = 10"):
        run_secagg(x, dropouts=range(11), seed=4)
    with pytest.raises(SecAggDropoutError, match="threshold"):
        run_secagg(x, dropouts=range(3), threshold=18, seed=4)
    with pytest.raises(SecAggDropoutError, match="at least 3 clients"):
        run_secagg(x[:2], seed=4)


def _flow(x, seed=5, neighbors=None, consistency=False):
    rng = np.random.default_rng(seed)
    server = SecAggServer(dim=x.shape[1], modulus_bits=BITS, neighbors=neighbors, rng=rng)
    clients = [SecAggClient(i, rng, consistency=consistency) for i in range(len(x))]
    server.advertise([c.advertise_keys() for c in clients])
    forwarded = server.collect_shares([c.share_keys(server.directory_for(c.client_id)) for c in clients])
    return server, clients, forwarded


def test_tampered_share_is_detected(quantized):
    _, x = quantized
    x = x[:6]
    server, clients, forwarded = _flow(x)
    box = forwarded[2]
    blob = bytearray(box.encrypted_shares[4])
    blob[20] ^= 0x01  # one flipped bit in the relayed ciphertext
    bad = dataclasses.replace(box, encrypted_shares={**box.encrypted_shares, 4: bytes(blob)})
    with pytest.raises(SecAggTamperError, match="from client 4 to client 2 failed AES-GCM authentication"):
        clients[2].masked_input(bad, x[2])
    # a ciphertext re-labelled as coming from another sender fails too (sender ids are authenticated)
    swapped = dataclasses.replace(box, encrypted_shares={**box.encrypted_shares, 4: box.encrypted_shares[5], 5: box.encrypted_shares[4]})
    with pytest.raises(SecAggTamperError, match="failed AES-GCM authentication"):
        clients[2].masked_input(swapped, x[2])
    # the untouched message still works
    assert clients[2].masked_input(box, x[2]).client_id == 2


@pytest.mark.parametrize("kind", ["self_mask_shares", "mask_key_shares"])
def test_wrong_share_at_unmasking_is_detected(quantized, kind):
    _, x = quantized
    x = x[:6]
    server, clients, forwarded = _flow(x, seed=6)
    request = server.collect_masked([clients[i].masked_input(forwarded[i], x[i]) for i in range(6) if i != 1])
    answers = [clients[i].unmask(request) for i in range(6) if i != 1]
    first = answers[0]
    shares = getattr(first, kind)
    u = next(iter(shares))
    blob = bytearray(shares[u])
    blob[-1] ^= 0x01
    answers[0] = dataclasses.replace(first, **{kind: {**shares, u: bytes(blob)}})
    # checked against the owner's commitment (SHA-256 of b_u, or the advertised s_pk)
    with pytest.raises(SecAggError, match=rf"client {u}\b.*(wrong share|inconsistent)"):
        server.unmask(answers)


def test_client_refuses_to_reveal_both_secrets(quantized):
    _, x = quantized
    x = x[:6]
    server, clients, forwarded = _flow(x, seed=7)
    request = server.collect_masked([clients[i].masked_input(forwarded[i], x[i]) for i in range(6)])
    with pytest.raises(SecAggError, match="both survived and dropped"):
        clients[0].unmask(UnmaskRequest(survivors=request.survivors, dropped=(3,)))
    clients[0].unmask(request)  # reveals b-shares of everyone
    # a later request claiming client 3 dropped would reveal its mask key too
    with pytest.raises(SecAggError, match="already revealed"):
        clients[0].unmask(UnmaskRequest(survivors=(0, 1, 2, 4, 5), dropped=(3,)))


def test_protocol_order_and_input_checks(quantized):
    _, x = quantized
    server, clients, forwarded = _flow(x[:5], seed=8)
    with pytest.raises(SecAggError, match="addressed to client 1"):
        clients[0].masked_input(forwarded[1], x[0])
    with pytest.raises(SecAggError, match="expects 1000"):
        clients[0].masked_input(forwarded[0], x[0][:10])
    with pytest.raises(ValueError, match=">= 2\\^32"):
        clients[0].masked_input(forwarded[0], np.full(D, 2**33, dtype=np.uint64))
    with pytest.raises(SecAggError, match="has not sent its masked input"):
        clients[1].unmask(UnmaskRequest((0, 1, 2), ()))
    clients[0].masked_input(forwarded[0], x[0])
    with pytest.raises(SecAggError, match="refusing to mask again"):
        clients[0].masked_input(forwarded[0], x[1])


# -- SecAgg+: each client gets only its neighbourhood (Bell et al. 2020) ---------------------------
K = 6  # SecAgg+ degree in these tests: threshold k // 2 + 1 = 4


@pytest.mark.parametrize("consistency", [False, True], ids=["plain", "consistency"])
def test_secagg_plus_with_30pct_dropouts_and_consistency_sums_exactly(quantized, consistency):
    _, x = quantized
    k = 8
    # The graph comes from the session, the server's first random draw: the same seed, the same graph.
    graph = run_secagg(x, seed=12, neighbors=k).server.directory.neighbors
    t = k // 2 + 1
    gone: list[int] = []  # 30% of the clients, each client keeping t live share holders (SecAgg+'s regime)
    for c in range(N):
        if len(gone) < int(0.3 * N) and all(sum(v not in {*gone, c} for v in graph[u]) >= t for u in graph):
            gone.append(c)
    assert len(gone) == int(0.3 * N)
    early, late = gone[:4], gone[4:]  # four drop before masking, two after
    run = run_secagg(x, dropouts=early, late_dropouts=late, seed=12, neighbors=k, consistency=consistency)
    assert run.server.directory.neighbors == graph
    assert np.array_equal(run.sum, _plain_sum(x, set(range(N)) - set(early)))
    assert run.server.directory.threshold == t  # t counts share holders: the k neighbours, not n


def test_secagg_plus_client_receives_only_its_neighbours_keys_and_views(quantized):
    _, x = quantized
    server, clients, forwarded = _flow(x, seed=13, neighbors=K, consistency=True)
    d = server.directory
    request = server.collect_masked([clients[i].masked_input(forwarded[i], x[i]) for i in range(N) if i != 7])
    server.collect_signatures([clients[u].consistency_check(server.request_for(u)) for u in request.survivors])
    for c in range(N):
        near = {c, *d.neighbors[c]}
        assert len(d.neighbors[c]) == K
        mine = server.directory_for(c)
        assert set(mine.keys) == set(mine.signing_keys) == set(mine.points) == near  # its own and its k neighbours' keys
        far_keys = {k for u in set(range(N)) - near for k in (*d.keys[u], d.signing_keys[u])}
        assert not far_keys & {k for u in mine.keys for k in (*mine.keys[u], mine.signing_keys[u])}
        # every party derives the same neighbours from the slice's public numbers (share points, |U1|, k, session)
        assert derive_neighborhood(mine, c)[0] == d.neighbors[c]
        assert set(forwarded[c].encrypted_shares) <= near and set(forwarded[c].participants) <= near
        if c != 7:
            view = server.request_for(c)
            assert set(view.survivors) | set(view.dropped) <= near and set(server.signatures_for(c)) <= set(d.neighbors[c])
    # what a client receives does not grow with n: the same slice size at 3x the clients
    big, *_ = _flow(np.zeros((3 * N, 4), dtype=np.uint64), seed=13, neighbors=K, consistency=True)
    assert {big.directory_for(c).nbytes for c in range(3 * N)} == {server.directory_for(c).nbytes for c in range(N)}
    # all pairs: the slice is the whole directory
    full, *_ = _flow(x[:6], seed=13)
    assert full.directory_for(3) is full.directory


def test_secagg_plus_client_refuses_a_directory_that_hides_or_moves_a_neighbour(quantized):
    _, x = quantized
    rng = np.random.default_rng(14)
    server = SecAggServer(dim=D, modulus_bits=BITS, neighbors=K, rng=rng)
    clients = [SecAggClient(i, rng) for i in range(N)]
    server.advertise([c.advertise_keys() for c in clients])
    mine = server.directory_for(0)
    gone = mine.neighbors[0][0]
    hidden = dataclasses.replace(mine, keys={c: k for c, k in mine.keys.items() if c != gone},
                                 points={c: p for c, p in mine.points.items() if c != gone}, neighbors={})
    with pytest.raises(SecAggError, match=rf"lacks client 0's neighbour at share point {mine.points[gone]}"):
        clients[0].share_keys(hidden)
    # a neighbour list the graph does not give (a server choosing who holds client 0's shares)
    other = next(c for c in range(1, N) if c not in mine.neighbors[0])
    with pytest.raises(SecAggError, match="names neighbours .* the graph gives"):
        clients[0].share_keys(dataclasses.replace(server.directory, neighbors={0: (*mine.neighbors[0][1:], other)}))
    assert set(clients[0].share_keys(mine).encrypted_shares) == set(mine.neighbors[0])


def test_secagg_plus_forged_or_inconsistent_neighbour_signature_is_refused(quantized):
    _, x = quantized
    server, clients, forwarded = _flow(x, seed=15, neighbors=K, consistency=True)
    d = server.directory
    request = server.collect_masked([clients[i].masked_input(forwarded[i], x[i]) for i in range(N)])
    sigs = {u: clients[u].consistency_check(server.request_for(u)) for u in request.survivors}
    v, u = 0, d.neighbors[0][0]
    # the server refuses a forged signature as it arrives, naming signer and recipient
    forged = dict(sigs[u].neighbor_signatures)
    forged[v] = bytes([forged[v][0] ^ 1]) + forged[v][1:]
    with pytest.raises(SecAggError, match=rf"consistency signature of client {u} to client {v} does not verify"):
        server.check_signature(dataclasses.replace(sigs[u], neighbor_signatures=forged))
    server.collect_signatures(list(sigs.values()))
    relayed = server.signatures_for(v)
    assert set(relayed) == set(d.neighbors[v])
    # ... and so does the client, if a server relays one
    with pytest.raises(SecAggTamperError, match=rf"consistency signature of client {u} to client {v} does not verify"):
        clients[v].unmask(server.request_for(v), {**relayed, u: forged[v]})
    stranger = next(c for c in range(N) if c != v and c not in d.neighbors[v])
    with pytest.raises(SecAggError, match=rf"from client {stranger}, which is not one of its surviving neighbours"):
        clients[v].unmask(server.request_for(v), {**relayed, stranger: sigs[stranger].neighbor_signatures[d.neighbors[stranger][0]]})
    assert set(clients[v].unmask(server.request_for(v), relayed).self_mask_shares) == set(d.neighbors[v])


def test_secagg_plus_client_detects_a_server_telling_neighbours_different_survivors(quantized):
    """The server tells v that u dropped (to get u's mask key share from v) while telling w,
    a neighbour of both, that u survived (to get w's self-mask share of u): w's signature to v
    covers their common neighbourhood, u included, so it does not verify against v's view."""
    _, x = quantized
    server, clients, forwarded = _flow(x, seed=16, neighbors=K, consistency=True)
    d = server.directory
    request = server.collect_masked([clients[i].masked_input(forwarded[i], x[i]) for i in range(N)])
    v = 0
    u = d.neighbors[v][0]
    w = next(c for c in d.neighbors[v] if c in d.neighbors[u])
    honest = server.request_for(v)
    lie = UnmaskRequest(tuple(c for c in honest.survivors if c != u), tuple(sorted((*honest.dropped, u))))
    clients[v].consistency_check(lie)
    from_w = clients[w].consistency_check(server.request_for(w)).neighbor_signatures[v]
    with pytest.raises(SecAggTamperError, match=rf"client {w} to client {v} does not verify: the server showed them different survivor sets"):
        clients[v].unmask(lie, {w: from_w})
    assert not clients[v]._revealed  # nothing was revealed


def test_secure_aggregation_part_weighted_mean_with_dropouts():
    torch.manual_seed(9)
    u = torch.randn(10, 400) * 0.2
    w = torch.rand(10) + 0.5
    sa = SecureAggregation(clip_range=1.0, max_clients=12, seed=0)
    got = sa.aggregate(u, w, dropped=2)
    want = (w / w.sum()) @ u
    assert got.dtype == torch.float32 and got.shape == (400,)
    assert torch.allclose(got, want, atol=1e-6)
    assert len(sa.last.dropped) == 2 and len(sa.last.survivors) == 10
    assert sa.needs_individual_updates is False
    with pytest.raises(ValueError, match="headroom"):
        sa.sum(torch.zeros(13, 4))


def test_grpc_server_runs_secure_aggregation_with_the_clients_and_refuses_what_needs_individual_updates(tmp_path):
    """Over gRPC the clients mask their own rows (transport/grpc/secagg.py): `fleetlearn server`
    asks every client for the "secagg" feature, and refuses parts that would need an
    individual update on the server."""
    import pytest

    from fleetlearn.config import ConfigError, load_config
    from fleetlearn.learners import TorchLearner, logistic
    from fleetlearn.transport.grpc.commands import server_transport

    spec = TorchLearner(lambda: logistic(4, 3), vectorize=False).spec
    t = server_transport(load_config({"privacy": {"secure_aggregation": True}}), spec, "127.0.0.1:0", state_dir=tmp_path)
    try:
        assert t.requirements.secagg and "secagg" in t.requirements.features and t.secure_aggregation() is t
    finally:
        t.close(grace_s=0.1)
    bounded = load_config({"privacy": {"secure_aggregation": True, "mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0},
                           "server": {"aggregator": "norm_bounded_mean", "norm_bound": 1.0}})
    with pytest.raises(ConfigError, match="secure_aggregation = true over gRPC: server.aggregator = 'norm_bounded_mean' under central DP"):
        server_transport(bounded, spec, "127.0.0.1:0", state_dir=tmp_path)
    normed = load_config({"privacy": {"secure_aggregation": True}, "server": {"max_update_norm": 5.0}})
    with pytest.raises(ConfigError, match="update-norm checks"):
        server_transport(normed, spec, "127.0.0.1:0", state_dir=tmp_path)


def test_a_sketch_uplink_with_secure_aggregation_sums_the_tables_securely():
    """The sketch sum must not replace the secure sum (the run would claim SecAgg without it):
    the secure sum runs inside sketch space, on the clients' tables."""
    from fleetlearn.config import load_config
    from fleetlearn.engine import build_coordinator

    cfg = {"data": {"dataset": "digits", "clients": 10}, "server": {"cohort": 4, "rounds": 1}, "model": {"hidden": [16]},
           "compression": {"uplink": "sketch:50"}, "privacy": {"secure_aggregation": True}}
    c = build_coordinator(load_config(cfg), store=False)
    assert c.pipeline.name == "sketch_space(secure_sum)"
    assert c.run_round().status == "ok"
    assert c.privacy.secure.last is not None and c.privacy.secure.last.sum.shape == (c.pipeline.width,)
    cfg["privacy"] = {"secure_aggregation": False}
    assert build_coordinator(load_config(cfg), store=False).pipeline.name == "sketch_space(mean)"
