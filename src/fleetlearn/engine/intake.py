"""A round's intake: replies in arrival order -> accepted, decoded, validated updates.

`collect` takes replies from the transport until the cohort is filled, everyone has
answered or the deadline passes; `Intake.accept` decodes one update with the run's
`UpdateDecoder` and runs the validators; `Intake.filter_relative_norms` refuses
updates far beyond the cohort's median norm.  The decoder is the one place where the
shape of an uplink payload is a feature's business:

- `UpdateDecoder`: the uplink chain at the model's dimension (the default);
- `SketchDecoder`: count-sketch payloads are only checked here (they are summed in
  sketch space by the pipeline's `SketchSpaceStage`), so they have no norm;
- `SubModelDecoder`: HeteroFL clients send their own sub-model, embedded here into
  the global vector (the learner says each client's size and where it sits);
- `ClusterDecoder`: clustered FL clients send one tagged block of the stacked models,
  and the tag is the client's cluster for this round.

The factory picks the decoder from the run's parts; the Coordinator never asks.

Diverters (`Intake.diverters`) take some clients' updates for themselves after the full
path (decode and validation) and keep them out of aggregation: probe clients' updates go
to their check (monitoring/probe_clients.py).  A diverter has a `status` (what the client's
record says), `open_round(task)`, `claims(client_id)` and `take(update, vec, reason, rec)`
(`vec` None and `reason` set when the decoder or a validator refused the update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..compression import wire
from ..messages import Dropout, Task, Update
from ..params import PayloadError, empty_rows
from ..records import ClientRecord
from ..validation import ValidationContext
from ..validation.validators import FiniteValidator


@dataclass
class Collected:
    """What a round gathered from its replies."""

    vecs: list[torch.Tensor] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    accepted: list[ClientRecord] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)  # kept for sketch-space aggregation
    diverted: int = 0  # updates a diverter took (probe clients): checked, never aggregated
    end_s: float = 0.0  # when the server stopped waiting (seconds after dispatch)

    def take(self, rows: Sequence[int]) -> None:
        """Keep only these accepted updates, in this order (the four per-update lists together)."""
        self.vecs = [self.vecs[i] for i in rows]
        self.payloads = [self.payloads[i] for i in rows]
        self.claims = [self.claims[i] for i in rows]
        self.accepted = [self.accepted[i] for i in rows]


# -- decoders -------------------------------------------------------------------------------------
class UpdateDecoder:
    """An uplink payload -> the (d,) update, with the run's uplink chain."""

    measures_norm = True  # the decoded vector is the update (its norm is recorded)
    # Whether `decode_into` checks a dense float32 row for NaN / inf itself; the Intake turns
    # it off when its finite validator judges the cohort's rows at once (one pass, not one per update).
    check_finite = True

    def __init__(self, uplink, dim: int):
        self.uplink, self.dim = uplink, int(dim)

    def decode(self, update: Update) -> torch.Tensor:
        return self.uplink.decode(update.payload, dim=self.dim)

    def decode_into(self, update: Update, out: torch.Tensor) -> torch.Tensor:
        """`decode` into `out`, a (dim,) float32 row of the batch's matrix; returns the vector
        (`out`, or a vector of its own when the decoded one is not a float32 (dim,) vector:
        the shape validator then says so).  The run's chain reads a dense payload straight
        into the row."""
        return self.uplink.decode(update.payload, dim=self.dim, out=out, check_finite=self.check_finite)

    def decode_many(self, msgs: Sequence[Update], matrix: torch.Tensor, slots: Sequence[int]) -> tuple[list, list]:
        """`decode_into` of each update into its row of `matrix` (`slots`): (vectors, reasons),
        a vector None with the refusal's reason for a payload that cannot be decoded.  A dense
        float32 payload of the model's dimension in this build's format, whose checksum holds,
        is copied into its row here with no per-update pipeline (when the finite validator
        judges the rows: `check_finite` off); every other payload goes through `decode_into`,
        so the outcome is the same."""
        vecs: list[torch.Tensor | None] = []
        reasons: list[str | None] = []
        dim = self.dim
        fast = not self.check_finite and type(self).decode_into is UpdateDecoder.decode_into
        head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.SUPPORT_DENSE, wire.VALUE_F32, dim) if fast else b""
        size = wire.OVERHEAD + 4 * dim
        body = wire.HEADER.size
        rows = matrix.numpy() if fast else None
        views = matrix.unbind(0) if fast else ()  # every row's tensor at once, not one indexing call each
        check = wire.CHECKSUMS[wire.VERSION][1]
        for msg, slot in zip(msgs, slots):
            p = msg.payload
            if (fast and type(p) is bytes and len(p) == size and p.startswith(head)
                    and check(memoryview(p)[: size - 4]) == int.from_bytes(p[size - 4 :], "little")):
                rows[slot] = np.frombuffer(p, dtype="<f4", count=dim, offset=body)
                vecs.append(views[slot])
                reasons.append(None)
                continue
            vec, reason = None, None
            try:
                vec = self.decode_into(msg, matrix[slot])
            except PayloadError as exc:
                reason = f"payload: {exc}"
            except Exception as exc:  # a corrupted payload must never stop the round
                reason = f"payload: cannot decode ({type(exc).__name__}: {exc})"
            vecs.append(vec)
            reasons.append(reason)
        return vecs, reasons

    def decode_copied(self, update: Update, out: torch.Tensor) -> torch.Tensor:
        """`decode_into` for a decoder whose `decode` builds its own vector: copied into the row."""
        vec = self.decode(update)
        if isinstance(vec, torch.Tensor) and vec.dtype == out.dtype and tuple(vec.shape) == tuple(out.shape):
            return out.copy_(vec)
        return vec

    def on_accept(self, update: Update, rec: ClientRecord) -> None:
        """Called once the update passed every validator."""

    def raw_uplink_bytes(self, records) -> int:
        """What the uploads of these rounds would have cost as float32 (the compression ratio's
        numerator): one model per update that arrived."""
        return sum(r.accepted + r.rejected + r.late for r in records) * 4 * self.dim


class SketchDecoder(UpdateDecoder):
    measures_norm = False

    def decode_into(self, update: Update, out: torch.Tensor) -> torch.Tensor:
        self.decode(update)
        return out.zero_()

    def decode(self, update: Update) -> torch.Tensor:
        # Checked now (a sketch of another shape is refused here, alone), summed in sketch space later.
        self.uplink.summand(update.payload, self.dim)
        return torch.zeros(self.dim)


class MaskedDecoder(UpdateDecoder):
    """Secure aggregation over a network: the update stays on the device (its payload is
    empty) and reaches the server only inside the masked sum of the SecAgg stages; the
    row here is a zero placeholder (weights come from the clients' public claims)."""

    measures_norm = False

    def decode_into(self, update: Update, out: torch.Tensor) -> torch.Tensor:
        self.decode(update)
        return out.zero_()

    def decode(self, update: Update) -> torch.Tensor:
        if update.payload:
            raise ValueError(f"under secure aggregation an update carries no payload; got {len(update.payload)} bytes")
        return torch.zeros(self.dim)


class SubModelDecoder(UpdateDecoder):
    """HeteroFL: `submodels.sub_dim_of(client)` entries, embedded by `submodels.embed_of`."""

    def __init__(self, uplink, dim: int, submodels):
        super().__init__(uplink, dim)
        self.submodels = submodels

    def decode(self, update: Update) -> torch.Tensor:
        sub = self.uplink.decode(update.payload, dim=self.submodels.sub_dim_of(update.client_id))
        return self.submodels.embed_of(update.client_id, sub)

    decode_into = UpdateDecoder.decode_copied

    def raw_uplink_bytes(self, records) -> int:
        """Each client's own sub-model, so the ratio is the codec's alone."""
        return sum(4 * self.submodels.sub_dim_of(c.client_id) for r in records for c in r.clients if c.uplink_bytes > 0)


class ClusterDecoder(UpdateDecoder):
    """Clustered FL: one tagged block of the k stacked models; the tag is the client's cluster."""

    def __init__(self, uplink, dim: int, clustering):
        super().__init__(uplink, dim)
        self.clustering = clustering

    def decode(self, update: Update) -> torch.Tensor:
        return self.clustering.decode(update.payload, self.uplink)

    decode_into = UpdateDecoder.decode_copied

    def on_accept(self, update: Update, rec: ClientRecord) -> None:
        rec.cluster = self.clustering.accepted(update.client_id, update.payload)

    def raw_uplink_bytes(self, records) -> int:
        """One block of the k stacked models per update."""
        return sum(r.accepted + r.rejected + r.late for r in records) * 4 * self.clustering.d


# -- one update -----------------------------------------------------------------------------------
def client_record(u: Update, elapsed: float) -> ClientRecord:
    """The record of a reply as it arrived (status "accepted" until intake says otherwise)."""
    m = u.metrics
    return ClientRecord(
        label_counts=list(m.label_counts) if m.label_counts is not None else None,
        oversampled=int(m.oversampled or 0),
        client_id=u.client_id,
        status="accepted",
        num_examples=u.num_examples if isinstance(u.num_examples, int) else 0,
        uplink_bytes=u.uplink_bytes,
        downlink_bytes=u.downlink_bytes,
        arrival_s=elapsed,
        loss_before=m.loss_before,
        loss_after=m.loss_after,
        accuracy=m.accuracy,
        steps=m.steps,
        codec=u.codec,
        personal_accuracy=m.personal_accuracy,
        global_accuracy=m.global_accuracy,
    )


class Intake:
    """Decode and validate updates; refuse the relative-norm outliers of a cohort."""

    def __init__(self, decoder: UpdateDecoder, validators: Sequence, norm_filter=None, diverters: Sequence = ()):
        self.decoder = decoder
        self.validators = list(validators)
        if any(isinstance(v, FiniteValidator) for v in self.validators):
            decoder.check_finite = False  # the finite validator's `check_rows` sees every row
        self.norm_filter = norm_filter
        self.diverters = list(diverters)  # parts that take some clients' updates (see the module doc)

    def open_round(self, task: Task) -> None:
        """The round's task, for the diverters (what they check an update against)."""
        for d in self.diverters:
            d.open_round(task)

    def diverted(self, rec: ClientRecord) -> bool:
        """Whether a diverter took this reply."""
        return any(rec.status == d.status for d in self.diverters)

    def accept(self, msg: Update, rec: ClientRecord, ctx: ValidationContext) -> torch.Tensor | None:
        """Decode and validate one update; on refusal mark `rec` rejected with the reason."""
        return self.accept_many([msg], [rec], ctx)[0]

    def accept_many(self, msgs: Sequence[Update], recs: Sequence[ClientRecord], ctx: ValidationContext,
                    need: int | None = None) -> list[torch.Tensor | None]:
        """Decode and validate a batch of updates, in order, with the outcome of taking them
        one at a time (a refused update's record is marked rejected with the reason).

        The payloads are decoded into the rows of one (k, d) matrix, in client-id order, and
        every validator that offers `check_rows` judges all rows at once; then each update,
        in order, gets the first refusal of the validators in order (`check` for those without
        `check_rows`, and for those that read `ctx.seen`), the diverters and the decoder's
        `on_accept`.  `need`: stop once that many updates were accepted or diverted (the
        round's cohort is filled); the updates after it are not looked at, and the list
        returned is shorter.  Accepted updates' vectors are rows of the matrix: in client-id
        order, an all-accepted batch is the matrix itself (`stacked` then copies nothing)."""
        k = len(msgs)
        if k == 0:
            return []
        dim = self.decoder.dim
        ids = [m.client_id if isinstance(m.client_id, int) else 0 for m in msgs]
        slots = np.empty(k, dtype=np.int64)
        slots[np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")] = np.arange(k)
        matrix = empty_rows(k, dim)
        vecs, reasons = self.decoder.decode_many(msgs, matrix, slots.tolist())
        base, row_bytes = matrix.data_ptr(), matrix.stride(0) * matrix.element_size()
        in_row = [v is not None and v.data_ptr() == base + s * row_bytes for v, s in zip(vecs, slots.tolist())]
        rows_order = [msgs[i] for i in np.argsort(slots, kind="stable")]  # the updates by row
        # Each row's norm, measured once: the clients' records, and a hint the validators may
        # read (`ValidationContext.row_norms`: the finite check needs no pass of its own).
        row_norms = torch.linalg.vector_norm(matrix, dim=1)
        ctx.row_norms = row_norms
        try:
            batched = {id(v): v.check_rows(rows_order, matrix, ctx) for v in self.validators if hasattr(v, "check_rows")}
        finally:
            ctx.row_norms = None
        norms = row_norms.tolist() if self.decoder.measures_norm else None
        out: list[torch.Tensor | None] = []
        taken = 0
        for i, (msg, rec) in enumerate(zip(msgs, recs)):
            if need is not None and taken >= need:
                break
            vec, reason, slot = vecs[i], reasons[i], int(slots[i])
            if reason is None:
                for v in self.validators:
                    pre = batched.get(id(v))
                    reason = pre[slot] if pre is not None and in_row[i] else v.check(msg, vec, ctx)
                    if reason:
                        reason = f"{v.name}: {reason}"
                        break
            diverter = next((d for d in self.diverters if d.claims(msg.client_id)), None) if self.diverters else None
            if diverter is not None:  # after the full path, never into aggregation
                if reason is None:
                    ctx.seen.add(msg.client_id)
                diverter.take(msg, vec if reason is None else None, reason, rec)
                rec.status = diverter.status
                out.append(None)
                taken += 1
                continue
            if reason is not None:
                rec.status, rec.reason = "rejected", reason
                out.append(None)
                continue
            ctx.seen.add(msg.client_id)
            self.decoder.on_accept(msg, rec)
            if norms is None:
                rec.update_norm = math.nan
            else:
                rec.update_norm = norms[slot] if in_row[i] else float(torch.linalg.vector_norm(vec))
            out.append(vec)
            taken += 1
        return out

    def filter_relative_norms(self, got: Collected) -> None:
        """Refuse updates whose norm is beyond `max_norm_ratio` x the cohort's median."""
        if self.norm_filter is None or not got.vecs:
            return
        norms = np.array([c.update_norm for c in got.accepted])
        reasons = self.norm_filter.reasons(norms)
        keep = [i for i, why in enumerate(reasons) if why is None]
        for i, why in enumerate(reasons):
            if why is not None:
                got.accepted[i].status, got.accepted[i].reason = "rejected", f"norm_ratio: {why}"
        got.take(keep)


def collect(transport, intake: Intake, task: Task, cohort: list[int], target: int, dim: int) -> Collected:
    """Take replies in arrival order until `target` updates are accepted, everyone
    has answered, or the deadline passes.  The round ends at that moment.

    Replies that may count are handed to the intake in batches (`Intake.accept_many`): as
    many as could fill the cohort, so a reply is never read past the one that fills it, and
    one at a time from a realtime transport (gRPC: its replies come over the network, and
    each is decoded as it arrives).  The outcome is that of taking them one by one."""
    got = Collected()
    ctx = ValidationContext(round=task.round, version=task.version, dim=dim)
    deadline = task.deadline_s
    filled_at: float | None = None
    last_event = 0.0
    stops = len(cohort) > target  # the cohort can be filled before everyone answered
    pending: list[tuple[Update, ClientRecord, float]] = []  # candidates in arrival order

    def settle() -> None:
        nonlocal filled_at, last_event
        need = target - len(got.accepted) - got.diverted if stops else None
        msgs, recs = [m for m, _, _ in pending], [r for _, r, _ in pending]
        vecs = intake.accept_many(msgs, recs, ctx, need)
        for (msg, rec, t), vec in zip(pending, vecs):
            last_event = max(last_event, t)
            if vec is not None:
                got.vecs.append(vec)
                got.payloads.append(msg.payload)
                got.claims.append(int(msg.num_examples))
                got.accepted.append(rec)
            elif intake.diverted(rec):
                got.diverted += 1  # a probe's update counts towards filling the round (the selector's target has it)
            else:
                continue
            if stops and len(got.accepted) + got.diverted == target:
                filled_at = t
        for _, rec, _ in pending[len(vecs):]:  # after the one that filled the cohort
            rec.status, rec.reason = "late", f"not needed: the cohort of {target} was filled at {filled_at:.3f}s"
        pending.clear()

    intake.open_round(task)
    for reply in transport.dispatch(task, cohort):
        msg, t = reply.message, reply.elapsed_s
        if isinstance(msg, Dropout):
            got.clients.append(ClientRecord(msg.client_id, "dropped", msg.reason, downlink_bytes=msg.downlink_bytes, arrival_s=math.nan))
            if deadline is None or t <= deadline:
                last_event = max(last_event, t)
            continue
        rec = client_record(msg, t)
        got.clients.append(rec)
        if filled_at is not None:
            rec.status, rec.reason = "late", f"not needed: the cohort of {target} was filled at {filled_at:.3f}s"
            continue
        if deadline is not None and t > deadline:
            rec.status, rec.reason = "late", f"arrived {t:.3f}s after dispatch, deadline {deadline:.3f}s"
            continue
        pending.append((msg, rec, t))
        if transport.realtime or (stops and len(pending) >= target - len(got.accepted) - got.diverted):
            settle()
            if filled_at is not None and transport.realtime:
                break  # in wall-clock time, waiting longer only costs time
    if pending:
        settle()
    # The server stops waiting when the cohort is filled, when everyone answered,
    # or at the deadline if someone is still missing.
    missing = any(c.status == "late" and not c.reason.startswith("not needed") for c in got.clients) or any(
        c.status == "dropped" for c in got.clients
    )
    if filled_at is not None:
        got.end_s = filled_at
    elif deadline is not None and missing:
        got.end_s = deadline
    else:
        got.end_s = last_event
    return got


def stacked(vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (n, d) matrix of these updates: the intake's batch matrix itself when they are its
    consecutive rows in order (the common case: a simulated cohort, all accepted), else a copy."""
    first = vecs[0]
    base = first._base
    if base is not None and base.dim() == 2 and base.is_contiguous() and first.dim() == 1 and len(vecs) <= base.shape[0]:
        row = base.stride(0) * base.element_size()
        start = first.data_ptr() - base.data_ptr()
        if start % row == 0 and all(v._base is base and v.data_ptr() == first.data_ptr() + i * row for i, v in enumerate(vecs)):
            lo = start // row
            return base[lo : lo + len(vecs)]
    return torch.stack(list(vecs))


# -- the round's tally ----------------------------------------------------------------------------
def round_deadline(srv, completions: Sequence[np.ndarray]) -> float | None:
    """This round's deadline: `server.deadline_s`, or with the adaptive policy a quantile of
    recent rounds' completion times (`completions`, one array per round) times a margin."""
    if srv.deadline_policy == "adaptive" and completions:
        recent = np.concatenate(completions[-srv.deadline_window:])
        if recent.size:
            return float(np.quantile(recent, srv.deadline_quantile) * srv.deadline_margin)
    return srv.deadline_s


def tally(record, got: Collected, transport) -> np.ndarray:
    """What a synchronous round's replies came to, into its record: the clients, counts by
    status, bytes, the wait, completion percentiles and the transport's notes.  Returns the
    arrival times of the replies that came (the adaptive deadline's history)."""
    record.clients = got.clients
    record.accepted = len(got.accepted)
    record.dropped = sum(c.status == "dropped" for c in got.clients)
    record.rejected = sum(c.status == "rejected" for c in got.clients)
    record.late = sum(c.status == "late" for c in got.clients)
    record.uplink_bytes = sum(c.uplink_bytes for c in got.clients)
    record.downlink_bytes = sum(c.downlink_bytes for c in got.clients)
    record.sim_seconds = got.end_s
    record.train_wall_seconds = float(transport.train_wall_seconds)
    if transport.last_malicious:
        record.extra["malicious"] = [int(c) for c in transport.last_malicious]  # simulated attackers in this cohort
    refusals = transport.take_refusals()
    if refusals is not None:
        record.extra["refusals"] = refusals  # refused messages by reason (network transports)
    arrivals = np.array([c.arrival_s for c in got.clients if c.status in ("accepted", "rejected", "late") and not math.isnan(c.arrival_s)])
    if arrivals.size:
        p50, p90, p99 = np.percentile(arrivals, [50, 90, 99])
        record.completion_p50_s, record.completion_p90_s, record.completion_p99_s = float(p50), float(p90), float(p99)
    return arrivals
