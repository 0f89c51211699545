"""The server's step: accepted updates -> weights -> the aggregation pipeline (one call)
-> privacy accounting -> server optimizer and server steps -> the new model version.

`aggregate(c, record, got, scale)` is what `Coordinator.aggregate` runs, for a synchronous
round and for each FedBuff step.  It reads the coordinator's parts and writes the round's
outcome back: the model and server state, the version lineage, and the raw material the
hooks read (`last_updates`, `last_weights`, `last_aggregate`, `prev_params`).  Each stage's
measurements land in `record.extra` under the stage's own keys; the cohort's statistics
(update norms, local losses, personalization) go into the record's fields.  A refusal
(weighting, a stage, non-finite parameters) fails the round with the model unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..aggregation.pipeline import Batch
from ..learners.scaffold import SERVER_KEY as SCAFFOLD_C
from ..records import ClientRecord, RoundRecord
from .intake import Collected, stacked


def aggregate(c, record: RoundRecord, got: Collected, scale: np.ndarray | None = None) -> None:
    """Aggregate the accepted updates and step the server optimizer (see the module doc).

    `scale` multiplies each update's weight without renormalising (FedBuff's staleness
    weights: a stale update moves the model less)."""
    # Rows in client-id order, not arrival order: float sums then do not depend on which
    # reply came first, so a network run reproduces (and a resumed run matches) exactly.
    order = sorted(range(len(got.accepted)), key=lambda i: got.accepted[i].client_id)
    if order != list(range(len(order))):
        got.take(order)
        if scale is not None:
            scale = np.asarray(scale)[order]
    # The record lists its clients in the same order, so the accepted ones in
    # record.clients are the rows of `last_updates` (monitors rely on it).
    record.clients.sort(key=lambda x: x.client_id)
    matrix = stacked(got.vecs)  # the intake's batch matrix itself when every row is there, in order
    try:
        weights = cohort_weights(c.weighting, got, matrix, c._previous_aggregate)
    except ValueError as exc:
        record.status, record.reason = "failed", f"weighting: {exc}; model unchanged"
        return
    scaled = weights if scale is None else weights * scale
    for rec, w in zip(got.accepted, scaled / scaled.sum()):
        rec.weight = float(w)
    batch = Batch(matrix, scaled, [x.client_id for x in got.accepted], got.payloads, record.round,
                  dropped=sum(x.status != "accepted" for x in record.clients))  # after SecAgg's key exchange
    try:
        res = c.pipeline.next(batch)  # the one call: the run's composed aggregation stages
    except ValueError as exc:  # e.g. a cohort too small for the rule's precondition
        record.status, record.reason = "failed", f"{c.pipeline.label}: {exc}; model unchanged"
        return
    record.extra.update(res.measurements)
    if res.link_bytes:
        link_bytes(record, res.link_bytes)
    pseudo_gradient = res.aggregate
    if res.kept is not None:
        matrix, scaled, weights = lose_rows(record, got, res, matrix, scaled, weights)
    priv = c.privacy
    if priv is not None and priv.accountant is not None:
        # Privacy spent on this aggregate stays spent, whatever happens to the round next.
        kind, q = c.round_sampling
        record.extra.update(priv.record_round(q, kind).to_metrics())
    if scale is not None:
        pseudo_gradient = pseudo_gradient * float(scaled.sum() / weights.sum())
    new_params, new_state = c.server_optimizer.step(c.params, pseudo_gradient, c.server_state)
    for part in c.server_steps:  # e.g. FedDF: distil the cohort's models into new_params
        new_params = part.apply(c, record, got, matrix, new_params)
    if not bool(torch.isfinite(new_params).all()):
        record.status, record.reason = "failed", "the aggregate produced non-finite parameters; model unchanged"
        return
    if c.scaffold:
        new_state = {**new_state, SCAFFOLD_C: scaffold_control(c, matrix, got)}
    c.prev_params = c.params
    c.last_updates, c.last_aggregate = matrix, pseudo_gradient
    c._previous_aggregate = pseudo_gradient
    c.last_weights = torch.from_numpy(scaled / scaled.sum()).to(torch.float32)
    c.params, c.server_state = new_params, new_state
    record.parent_version = c.version
    c.max_version += 1
    c.version = record.version = c.max_version
    cohort_statistics(record, got.accepted)


def link_bytes(record: RoundRecord, moved: dict[int, tuple[int, int]]) -> None:
    """Bytes an aggregation stage moved over the network per client (secure aggregation's
    messages) join the clients' and the round's uplink / downlink bytes."""
    for rec in record.clients:
        up, down = moved.get(rec.client_id, (0, 0))
        rec.uplink_bytes += up
        rec.downlink_bytes += down
    record.uplink_bytes += sum(up for up, _ in moved.values())
    record.downlink_bytes += sum(down for _, down in moved.values())


def cohort_weights(weighting, got: Collected, matrix: torch.Tensor, previous_aggregate: torch.Tensor | None) -> np.ndarray:
    """The weighting part's weights for the accepted updates."""
    from ..aggregation.weighting import CohortInfo

    info = CohortInfo(
        num_examples=np.asarray(got.claims, dtype=np.float64),
        loss_before=np.array([x.loss_before for x in got.accepted]),
        loss_after=np.array([x.loss_after for x in got.accepted]),
        updates=matrix,
        previous_aggregate=previous_aggregate,
        label_counts=label_counts(got.accepted),
    )
    return np.asarray(weighting(info), dtype=np.float64)


def lose_rows(record: RoundRecord, got: Collected, res, matrix: torch.Tensor, scaled: np.ndarray, weights: np.ndarray):
    """Rows a stage could not use (a regional aggregator that failed): their clients are
    recorded as dropped with the stage's reason, and the rest keep their share.
    Returns the matrix and weights of the rows that reached the aggregate."""
    for i, (rec, kept) in enumerate(zip(got.accepted, res.kept)):
        if not kept:
            rec.status, rec.reason, rec.weight = "dropped", res.lost_reason(i) if res.lost_reason else "update lost", 0.0
    keep = np.flatnonzero(res.kept)
    got.take(keep)
    lost = len(res.kept) - len(keep)
    record.accepted -= lost
    record.dropped += lost
    scaled, weights = scaled[keep], weights[keep]
    for rec, w in zip(got.accepted, scaled / scaled.sum()):
        rec.weight = float(w)
    return matrix[torch.from_numpy(keep)], scaled, weights


def scaffold_control(c, matrix: torch.Tensor, got: Collected) -> torch.Tensor:
    """SCAFFOLD option II on the server: c + (|S|/N) mean_i delta_c_i, with each delta_c_i
    recovered from the accepted (decoded) delta and its reported steps."""
    from ..learners.scaffold import control_deltas, server_control_step

    control = c.server_state[SCAFFOLD_C]
    steps = [x.steps for x in got.accepted]
    dc = control_deltas(matrix, steps, c.client_lr, c.config.client.momentum, control)
    return server_control_step(control, dc, c.transport.population)


def cohort_statistics(record: RoundRecord, accepted: Sequence[ClientRecord]) -> None:
    """The accepted clients' update norms, local losses and accuracies, and
    personalization's means, into the record's fields."""
    norms = np.array([x.update_norm for x in accepted])
    record.update_norm_mean = float(norms.mean())
    record.update_norm_max = float(norms.max())
    record.train_loss_before = _nanmean(np.array([x.loss_before for x in accepted]))
    record.train_loss_after = _nanmean(np.array([x.loss_after for x in accepted]))
    record.local_accuracy = _nanmean(np.array([x.accuracy for x in accepted]))
    personal = np.array([x.personal_accuracy for x in accepted])
    if not np.isnan(personal).all():
        glob = np.array([x.global_accuracy for x in accepted])
        record.personal_accuracy, record.personal_global_accuracy = _nanmean(personal), _nanmean(glob)
        record.personal_gain = record.personal_accuracy - record.personal_global_accuracy


def label_counts(accepted: Sequence[ClientRecord]) -> np.ndarray | None:
    """The accepted clients' label histograms as (n, C), or None unless every one sent one."""
    counts = [x.label_counts for x in accepted]
    if not counts or any(h is None for h in counts) or len({len(h) for h in counts}) != 1:
        return None
    return np.asarray(counts, dtype=np.float64)


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan
