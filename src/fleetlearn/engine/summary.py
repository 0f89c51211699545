"""The run's summary from its records and parts."""

from __future__ import annotations

import math

from ..records import RunSummary


def summarize(c, wall_seconds: float) -> RunSummary:
    recs = c.records
    accs = [r.accuracy for r in recs if not math.isnan(r.accuracy)]
    up = sum(r.uplink_bytes for r in recs)
    raw = c.intake.decoder.raw_uplink_bytes(recs)  # uncompressed float32, as the decoder's payloads are shaped
    s = RunSummary(
        run_id=c.store.run_id if c.store else "",
        run_dir=str(c.store.run_dir) if c.store else "",
        rounds=len(recs),
        final_accuracy=accs[-1] if accs else math.nan,
        best_accuracy=max(accs) if accs else math.nan,
        final_loss=next((r.loss for r in reversed(recs) if not math.isnan(r.loss)), math.nan),
        uplink_bytes=up,
        downlink_bytes=sum(r.downlink_bytes for r in recs),
        compression_ratio=(raw / up) if up else math.nan,
        uplink_chain=c.uplink.spec,
        sim_seconds=c.clock.now,
        wall_seconds=wall_seconds,
        failed_rounds=sum(r.status == "failed" for r in recs),
        stopped_reason=c.stopped_reason or "",
        records=list(recs),
    )
    f1s = [r.extra["f1"] for r in recs if not math.isnan(r.accuracy) and "f1" in r.extra]
    if f1s:
        s.final_f1 = f1s[-1]
    personal = recs[-1].extra.get("personalization") if recs else None
    if personal:
        s.personal_accuracy, s.personal_global_accuracy = personal["personal_accuracy"], personal["global_accuracy"]
        s.personal_gain = personal["gain"]
    else:  # the server cannot evaluate on clients' data (gRPC): what the last such round's clients reported
        last = next((r for r in reversed(recs) if not math.isnan(r.personal_accuracy)), None)
        if last is not None:
            s.personal_accuracy, s.personal_global_accuracy, s.personal_gain = last.personal_accuracy, last.personal_global_accuracy, last.personal_gain
    if c.privacy is not None and c.privacy.accountant is not None:
        p = c.privacy.summary()
        s.dp_epsilon, s.dp_delta, s.dp_accounting, s.dp_sampling = p["dp_epsilon"], p["dp_delta"], p["dp_accounting"], p["dp_sampling"]
    if c.store is not None:
        c.store.flush()  # the rounds' background commits are done (and any failure raised) before the summary
        c.store.finish(s.to_json_dict())
    return s
