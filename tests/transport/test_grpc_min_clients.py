"""Waiting for clients (`fleetlearn server --min-clients`) never uses up rounds (hardening 12)."""

import threading

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.transport.grpc import commands


def test_waiting_for_clients_does_not_use_up_rounds(tmp_path):
    cfg = load_config({"data": {"clients": 4}, "server": {"rounds": 2, "cohort": 2, "min_replies": 1}, "client": {"local_epochs": 1}})
    state = tmp_path / "state"
    holder = {}

    def make_transport(learner, runtime):
        holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", state, heartbeat_interval_s=1.0)
        return holder["t"]

    c = build_coordinator(cfg, store=False, transport_factory=make_transport)
    t = holder["t"]
    reports = {}
    try:
        toks = {i: commands.token_add(state, f"site-{i}") for i in range(2)}

        def client(i):
            reports[i] = commands.client(t.address, toks[i], cfg, client_index=i, give_up_after_s=30)

        first = threading.Thread(target=client, args=(0,), daemon=True)
        first.start()
        # One client of the two it waits for: the run stops without recording a round.
        c.wait_for_clients = (2, 1.5)
        s = c.run()
        assert s.rounds == 0 and c.round == 0 and s.failed_rounds == 0
        assert "waited 1.5 s for 2 connected clients before round 1, 1 connected" in s.stopped_reason
        # The second client arrives: every configured round is a real round.
        second = threading.Thread(target=client, args=(1,), daemon=True)
        second.start()
        c.stopped_reason = None
        c.wait_for_clients = (2, 20.0)
        s = c.run()
        t.finish()
        first.join(15)
        second.join(15)
    finally:
        t.close(grace_s=0.2)
    assert s.rounds == 2 and s.failed_rounds == 0 and not s.stopped_reason
    assert all(r.status == "ok" and r.accepted >= 1 for r in s.records)
    assert {i: r.stopped for i, r in reports.items()} == {0: "finished", 1: "finished"}
