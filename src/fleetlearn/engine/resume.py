"""Resume: everything a round depends on, put back from the run store.

A checkpoint holds the model and server-optimizer state; `side_state` adds, as named
tensors in a side file the checkpoint names with its sha256: ``client/<id>/<key>``
(codec residuals, SCAFFOLD c_i), ``personal/<id>/<key>`` (personal heads and models),
``aggregator/<key>`` (the aggregation pipeline's state: MIFA's memory, DnC's
reputation, the central-DP stage's public centre) and ``schedule/<which>/<key>``.
`resume` puts back the last committed round: model, lineage, side state, what the
selector and the hooks learned from the records, the virtual clock, and the privacy
ledger committed with that round (`committed_privacy` refuses to resume without it).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..records import RoundRecord


def side_state(c) -> dict[str, torch.Tensor]:
    """What a checkpoint needs besides the model and server state, as named tensors:
    ``client/<id>/<key>`` (codec residuals, SCAFFOLD c_i), ``personal/<id>/<key>``
    (personal heads and models), ``aggregator/<key>`` (e.g. MIFA's memory, DnC's client
    reputation) and ``schedule/<which>/<key>`` (e.g. reduce-on-plateau)."""
    out: dict[str, torch.Tensor] = {}
    if c.client_states is not None:
        out.update(c.client_states.state_dict())
    if c.personal_states is not None:
        out.update({"personal/" + k.split("/", 1)[1]: v for k, v in c.personal_states.state_dict().items()})
    out.update({f"aggregator/{k}": v for k, v in c.pipeline.state_dict().items()})
    for which, sched in c.schedules.items():
        out.update({f"schedule/{which}/{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in sched.state_dict().items()})
    return out

def load_side_state(c, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `side_state` saved (a part absent from the checkpoint starts empty)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"client": {}, "personal": {}, "aggregator": {}, "schedule": {}}
    for name, t in tensors.items():
        head, _, rest = name.partition("/")
        if head not in parts or not rest:
            raise ValueError(f"checkpoint side-state tensor {name!r} has no known part (client, personal, aggregator, schedule)")
        parts[head][rest] = t
    if c.client_states is not None:
        c.client_states.load_state_dict({f"client/{k}": v for k, v in parts["client"].items()})
    if c.personal_states is not None:
        c.personal_states.load_state_dict({f"client/{k}": v for k, v in parts["personal"].items()})
    c.pipeline.load_state_dict(parts["aggregator"])
    for which, sched in c.schedules.items():
        state = {k.split("/", 1)[1]: float(v) for k, v in parts["schedule"].items() if k.split("/", 1)[0] == which}
        if state:
            sched.load_state_dict(state)

def resume(c) -> int:
    """Continue a stored run from its last committed round: model, server-optimizer
    state, version lineage, per-client and parts' state (`side_state`), what the
    selector learned, virtual clock and privacy ledger.  Returns that round."""
    if c.store is None:
        raise ValueError("resume needs a run store")
    records = c.store.records()
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
    c._versions = {version: (c.params, c.server_state)}
    load_side_state(c, c.store.load_client_states(version))
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
