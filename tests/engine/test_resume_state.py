"""A resumed run equals an uninterrupted one also when parts keep state across rounds:
Oort's statistics and the newcomer cap (relearned from the committed rounds), DnC's
client reputation and a reduce-on-plateau schedule (saved with the checkpoint), FedPer's
personal heads and error-feedback residuals (the clients' state files, `client.state_store`),
also when almost none of them fits in memory (written out between checkpoints)."""

from __future__ import annotations

import pytest
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.ops import RunStore

torch.set_num_threads(1)


def config(tmp_path, **sections):
    raw = {
        "seed": 3,
        "data": {"dataset": "digits", "clients": 24, "alpha": 0.3},
        "model": {"hidden": [16]},
        "client": {"local_steps": 3, "batch_size": 8},
        "server": {"rounds": 6, "cohort": 6},
        "monitoring": {"debug": False, "detectors": []},
        "store": {"root": str(tmp_path)},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_config(raw)


def whole_and_resumed(cfg, k: int = 3):
    whole = build_coordinator(cfg, store=True)
    whole.run()
    first = build_coordinator(cfg, store=True)
    for _ in range(k):
        first.run_round()
    run_dir = first.store.run_dir
    # The process dies after round k committed: close() waits for the background commit
    # under way (a real death stops that thread; this one would otherwise go on writing
    # and pruning while the resumed coordinator reads) and releases the run's lock.
    first.store.close()
    del first
    again = build_coordinator(cfg, store=RunStore.open(run_dir))
    assert again.resume() == k
    again.run()
    return whole, again


CASES = {
    "oort + newcomer cap": dict(server={"selector": "oort", "max_newcomers": 2}),
    "dnc reputation + plateau": dict(server={"aggregator": "dnc", "reputation": True, "byzantine_f": 1}, client={"lr_schedule": "plateau"}),
    "fedper heads": dict(personalization={"method": "fedper"}),
    # 4 KiB of memory: a residual or a head is pushed out to the file as soon as the next is put.
    "fedper heads spilled": dict(personalization={"method": "fedper"}, engine={"client_state_memory_mb": 0.004}),
    "ef residuals spilled": dict(compression={"uplink": "ef | topk:0.1 | q8"}, engine={"client_state_memory_mb": 0.004}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, case):
    whole, resumed = whole_and_resumed(config(tmp_path, **CASES[case]))
    assert torch.equal(resumed.params, whole.params)
    assert [sorted(c.client_id for c in r.clients) for r in resumed.records] == [sorted(c.client_id for c in r.clients) for r in whole.records]
    a, b = whole.side_state(), resumed.side_state()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for which in ("client_states", "personal_states"):
        x, y = getattr(whole, which).state_dict(), getattr(resumed, which).state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
        if ("fedper" in case and which == "personal_states") or ("ef" in case and which == "client_states"):
            assert x, f"{case}: no {which} to compare"
    if "spilled" in case:
        states = whole.personal_states if "fedper" in case else whole.client_states
        assert states.nbytes() <= 4 * 2**10 + 48 * 2**10 and len(states) >= 6  # one entry over the cap at most
    if case.startswith("dnc"):
        assert any(n.startswith("aggregator/") for n in a) and any(n.startswith("schedule/client/") for n in a)


def test_without_the_relearned_selector_state_the_resumed_run_would_differ(tmp_path):
    """Control: Oort without its relearned statistics selects differently after a resume."""
    cfg = config(tmp_path, server={"selector": "oort"})
    whole = build_coordinator(cfg, store=True)
    whole.run()
    first = build_coordinator(cfg, store=True)
    for _ in range(3):
        first.run_round()
    again = build_coordinator(cfg, store=RunStore.open(first.store.run_dir))
    again.selector.restore = lambda records: None  # forget what the committed rounds taught it
    again.resume()
    again.run()
    cohorts = lambda c: [sorted(x.client_id for x in r.clients) for r in c.records[3:]]
    assert cohorts(again) != cohorts(whole)


def test_a_side_state_tensor_of_an_unknown_part_is_refused(tmp_path):
    coord = build_coordinator(config(tmp_path), store=False)
    with pytest.raises(ValueError, match="'bogus/x' has no known part"):
        coord.load_side_state({"bogus/x": torch.zeros(1)})


def test_guardrail_responses_survive_a_resume(tmp_path):
    """Scaling attackers from round 3 trip the outlier guardrail: the round is rolled back,
    the flagged clients are excluded and the server lr is halved.  A run interrupted after
    that and resumed keeps all three and ends where the uninterrupted run ends."""
    cfg = config(
        tmp_path,
        data={"clients": 30},
        server={"rounds": 8, "cohort": 10},
        attack={"kind": "scaling", "fraction": 0.3, "start_round": 3, "scale": 10.0, "collude": False},
        monitoring={"detectors": ["outlier_updates"], "guardrail": ["outlier_updates"], "outlier_threshold": 5.0,
                    "guardrail_exclude_rounds": 100, "guardrail_lr_factor": 0.5},
    )
    whole, resumed = whole_and_resumed(cfg, k=5)
    fired = [r.round for r in whole.records if (r.extra.get("guardrail") or {}).get("fired")]
    assert fired and min(fired) <= 5  # the responses happened before the interruption
    assert whole.excluded_clients and resumed.excluded_clients == whole.excluded_clients
    lr = whole.server_optimizer.lr
    assert lr.value(resumed.server_state) == lr.value(whole.server_state) < 1.0
    assert lr.base(resumed.server_state) == lr.base(whole.server_state) < 1.0
    assert torch.equal(resumed.params, whole.params)


def test_a_checkpoint_from_before_the_lr_moved_into_the_server_state_resumes(tmp_path, monkeypatch):
    """Checkpoints written before the server learning rate was optimizer state have no
    ``lr*`` entries in the server state and keep the server schedule's memory in the side
    file as ``schedule/server/*``.  Such a run resumes to the uninterrupted run's model:
    here reduce-on-plateau halves the rate in round 4 only because the memory it had after
    round 3 (the best loss, seen in round 2) came back."""
    from fleetlearn.engine import resume as resume_module

    cfg = config(tmp_path, server={"optimizer": "momentum", "server_lr": 4.0, "server_lr_schedule": "plateau",
                                   "server_lr_patience": 1, "server_lr_factor": 0.5})
    whole = build_coordinator(cfg, store=True)
    whole.run()
    lr = whole.server_optimizer.lr
    assert lr.value(whole.server_state) < 4.0  # the schedule did reduce the rate

    first = build_coordinator(cfg, store=True)
    new_side_state, commit_round = resume_module.side_state, first.store.commit_round

    def old_side_state(c):  # the older writer: the server schedule's memory in the side file
        memory = {f"schedule/server/{k[len('lr/schedule/'):]}": v for k, v in c.server_state.items() if k.startswith("lr/schedule/")}
        return {**new_side_state(c), **memory}

    def old_commit_round(record, params, state, meta, **kw):  # ... and no lr entries in the server state
        return commit_round(record, params, None if state is None else {k: v for k, v in state.items() if not k.startswith("lr")}, meta, **kw)

    monkeypatch.setattr(resume_module, "side_state", old_side_state)
    first.store.commit_round = old_commit_round
    for _ in range(3):
        first.run_round()
    run_dir = first.store.run_dir
    monkeypatch.undo()
    _, _, stored = RunStore.open(run_dir).load_checkpoint()
    assert stored and not any(k.startswith("lr") for k in stored)
    again = build_coordinator(cfg, store=RunStore.open(run_dir))
    assert again.resume() == 3
    assert float(again.server_state["lr/schedule/last_round"]) == 3.0  # the memory came from the side file
    again.run()
    assert torch.equal(again.params, whole.params)
    assert lr.value(again.server_state) == lr.value(whole.server_state)
