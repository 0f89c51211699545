"""Resume: everything a round depends on, put back from the run store.

A checkpoint holds the model and server-optimizer state; `side_state` adds, as named
tensors in a side file the checkpoint names with its sha256: ``client/<id>/<key>``
(codec residuals, SCAFFOLD c_i), ``personal/<id>/<key>`` (personal heads and models),
``aggregator/<key>`` (the aggregation pipeline's state: MIFA's memory, DnC's
reputation, the central-DP stage's public centre) and ``schedule/client/<key>`` (the
server's schedule keeps its memory in the server state).  `commit` writes a round and,
on a checkpoint round, both files; `resume` puts back the last committed round: model, lineage, side state, what the
selector and the hooks learned from the records, the virtual clock, and the privacy
ledger committed with that round (`committed_privacy` refuses to resume without it).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from ..records import RoundRecord


def side_state(c) -> dict[str, torch.Tensor]:
    """What a checkpoint needs besides the model, the server state and the clients' states
    (those are in their own files: `client.state_store`), as named tensors:
    ``aggregator/<key>`` (e.g. MIFA's memory, DnC's client reputation) and
    ``schedule/client/<key>`` (e.g. reduce-on-plateau).  (Side files written before the
    state store also hold ``client/<id>/<key>`` and ``personal/<id>/<key>``: still read.)"""
    out: dict[str, torch.Tensor] = {}
    out.update({f"aggregator/{k}": v for k, v in c.pipeline.state_dict().items()})
    if c.client_schedule is not None:  # the server's schedule keeps its memory in the server state
        out.update({f"schedule/client/{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in c.client_schedule.state_dict().items()})
    return out


def commit(c, record: RoundRecord, last: bool) -> None:
    """Write the round to the store: on a checkpoint round (`store.checkpoint_every`, and the
    last) the side-state file first, then one transaction with the record, the checkpoint
    (model and server state, the learning rate's entries included) and the privacy ledger.

    With `store.background_commit` (the default) the transaction and the checkpoint file are
    written by the store's background writer while the next round runs: this call waits for
    the previous round's commit first (round r is committed before round r + 1's commit
    starts, and its error is raised here), writes the side-state file, and hands over what
    the transaction needs: the record (its rows are built on the writer), the model and
    server state (never written into: a step returns new tensors) and a copy of the ledger.
    `Coordinator.run` waits for the last commit before it returns."""
    r = record.round
    every = c.config.store.checkpoint_every
    save = bool((every and r % every == 0) or last)
    store = c.store
    store.flush()  # the previous round's commit: done (and its prune) before this round's files
    # Per-client state (EF residuals, SCAFFOLD c_i, personal heads/models): the states changed
    # since the last checkpoint, written (synchronously) to the state files before the
    # round's transaction; the stateful parts' state (aggregator memory, the client lr
    # schedule) in a side file, written (and fsynced) here and named in its metadata.
    for states in (c.client_states, c.personal_states):
        if states is not None:
            states.checkpoint(r) if save else states.begin_round(r + 1)
    side = side_state(c) if save else {}
    meta = store.write_client_states(r, side) if side else None
    # Spent privacy is committed in the round's own transaction, checkpoint or not.
    ledger = copy.deepcopy(c.privacy.state_dict()) if c.privacy is not None else None
    params, state = (c.params, dict(c.server_state)) if save else (None, None)

    def write() -> None:
        store.commit_round(record, params, state, meta, privacy=ledger)
        if meta is not None:
            store.prune_client_states(keep=meta)

    store.submit(write, background=c.config.store.background_commit)


def load_side_state(c, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `side_state` saved (a part absent from the checkpoint starts empty)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"client": {}, "personal": {}, "aggregator": {}, "schedule": {}}
    for name, t in tensors.items():
        head, _, rest = name.partition("/")
        if head not in parts or not rest:
            raise ValueError(f"checkpoint side-state tensor {name!r} has no known part (client, personal, aggregator, schedule)")
        parts[head][rest] = t
    if c.client_states is not None and parts["client"]:  # a side file from before the state store
        c.client_states.load_state_dict({f"client/{k}": v for k, v in parts["client"].items()})
    if c.personal_states is not None and parts["personal"]:
        c.personal_states.load_state_dict({f"client/{k}": v for k, v in parts["personal"].items()})
    c.pipeline.load_state_dict(parts["aggregator"])
    schedules = {"client": {}, "server": {}}
    for k, v in parts["schedule"].items():
        which, _, key = k.partition("/")
        schedules.setdefault(which, {})[key] = float(v)
    if schedules["client"] and c.client_schedule is not None:
        c.client_schedule.load_state_dict(schedules["client"])
    # Side files written before the server's schedule memory moved into the server state.
    c.server_state = c.server_optimizer.lr.filled(c.server_state, schedules["server"])


def resume(c) -> int:
    """Continue a stored run from its last committed round: model, server-optimizer
    state, version lineage, per-client and parts' state (`side_state`), what the
    selector learned, virtual clock and privacy ledger.  Returns that round."""
    if c.store is None:
        raise ValueError("resume needs a run store")
    records = c.store.records()
    for states in (c.client_states, c.personal_states):
        if states is not None:  # rows of rounds that never committed go (all of them if none did)
            states.resume(records[-1].round if records else 0)
    if not records:
        return 0
    last = records[-1]
    version, params, state = c.store.load_checkpoint()
    if version != last.version:
        raise ValueError(
            f"run {c.store.run_id}: the last checkpoint is version {version} but round {last.round} committed "
            f"version {last.version}; resume needs store.checkpoint_every = 1"
        )
    c.records = records
    c.round = last.round
    c.version = version
    c.max_version = max(max(r.version for r in records), version)
    c.params, c.server_state = params, dict(state)
    load_side_state(c, c.store.load_client_states(version))  # also fills an older state's lr entries
    c.versions.reset(version, c.params, c.server_state)
    c.selector.restore(records)  # selectors that learn from rounds (Oort, the newcomer cap) relearn them
    for hook in c.hooks:  # so do hooks whose responses outlive a round (the guardrail)
        relearn = getattr(hook, "restore", None)
        if relearn is not None:
            relearn(records, c)
    c.clock.now = last.sim_start_s + last.sim_seconds
    if c.privacy is not None:
        c.privacy.load_state_dict(committed_privacy(c.store, records))
    return last.round

def committed_privacy(store, records: list[RoundRecord]) -> dict[str, Any]:
    """The privacy state committed with the last round.  Run directories written before
    the ledger moved into the round's transaction kept it in ``privacy.json``, written
    after the commit: it is used only when it covers every committed round's spend.
    Without a ledger that covers them, resuming would restart (or under-count)
    accounting, so it is refused."""
    last = records[-1]
    state = store.privacy_state(last.round)
    if state is not None:
        return state
    spent = next((int(r.extra["dp_rounds"]) for r in reversed(records) if "dp_rounds" in r.extra), 0)
    legacy = store.run_dir / "privacy.json"
    if legacy.is_file():
        import json

        try:
            state = json.loads(legacy.read_text())
            ledger = sum(int(e[2]) for e in state["accountant"]["events"]) if "accountant" in state else 0
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"run {store.run_id}: {legacy} is unreadable ({exc}); cannot resume without the privacy ledger") from None
        if ledger >= spent:
            return state
        raise ValueError(
            f"run {store.run_id}: {legacy} records {ledger} private releases but the committed rounds spent "
            f"{spent}; resuming would under-report epsilon (the ledger was written after the commit and a crash came between)"
        )
    raise ValueError(
        f"run {store.run_id}: round {last.round} is committed but its privacy ledger is missing; resuming would "
        "restart privacy accounting and under-report epsilon. Refusing to resume"
    )
