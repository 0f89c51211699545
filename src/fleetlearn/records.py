"""`RoundRecord`: everything one round measured.  One record type, many readers
(the run store, the CLI, monitors, the exporter and reports)."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class ClientRecord:
    """One selected client's part in a round.  Slotted: a 1,000-client round keeps 1,000 of
    them for the run's lifetime, and a slotted record is one object for the garbage collector
    to visit instead of two (the instance and its __dict__), and a third of the memory."""

    client_id: int
    status: str  # "accepted" | "dropped" | "rejected" | "late" | "probe" (a probe client's update: checked, never aggregated)
    reason: str = ""
    num_examples: int = 0  # as claimed
    weight: float = 0.0  # aggregation weight after the cap, normalised over the accepted
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    arrival_s: float = math.nan  # simulated seconds after dispatch
    loss_before: float = math.nan
    loss_after: float = math.nan
    accuracy: float = math.nan  # local model on its local test split
    steps: int = 0
    update_norm: float = math.nan
    staleness: int = 0  # server versions between the model it trained on and the one it updates
    codec: str = ""  # the uplink chain this client used (adaptive compression picks it per client)
    width: float = 1.0  # HeteroFL: the width of the sub-model this client trained (1.0 = the full model)
    label_counts: list[int] | None = None  # its label histogram, when weighting = label_importance asked for it
    oversampled: int = 0  # examples it added by oversampling (client.oversample)

    # Personalization: the client's personal model / the global model it received, on its local test split.
    personal_accuracy: float = math.nan
    global_accuracy: float = math.nan

    cluster: int = -1  # clustered FL: the cluster (model block) the client trained; -1: not clustered

    def __post_init__(self) -> None:
        if not isinstance(self.label_counts, (list, tuple)):  # the store reads a JSON null back as nan
            self.label_counts = None


_CLIENT_FIELDS = fields(ClientRecord)


@dataclass
class RoundRecord:
    round: int
    version: int  # model version after this round (unchanged if the round failed)
    parent_version: int = -1  # the version this round's model was computed from (-1: no new model)
    status: str = "ok"  # "ok" | "failed" | "rolled_back"
    reason: str = ""
    selected: int = 0
    accepted: int = 0
    dropped: int = 0
    rejected: int = 0
    late: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    deadline_s: float = math.nan  # this round's deadline (nan: none)
    sim_start_s: float = 0.0  # virtual clock when the round was dispatched
    sim_seconds: float = 0.0  # simulated duration of the round
    wall_seconds: float = 0.0
    train_wall_seconds: float = 0.0  # wall time spent in local training (the rest is engine cost)
    # Central evaluation of the new global model on the held-out test set.
    accuracy: float = math.nan
    loss: float = math.nan
    # Federated evaluation of the new global model on clients' local test splits.
    fed_accuracy: float = math.nan  # mean over clients of per-client accuracy
    fed_accuracy_p10: float = math.nan
    # Client-reported, averaged over accepted clients.
    train_loss_before: float = math.nan
    train_loss_after: float = math.nan
    local_accuracy: float = math.nan  # local models on their own test splits
    # Personalization, averaged over accepted clients: personal model vs the global model
    # they received, both on the clients' local test splits, and the difference.
    personal_accuracy: float = math.nan
    personal_global_accuracy: float = math.nan
    personal_gain: float = math.nan
    update_norm_mean: float = math.nan
    update_norm_max: float = math.nan
    completion_p50_s: float = math.nan
    completion_p90_s: float = math.nan
    completion_p99_s: float = math.nan
    clusters: int = 0  # clustered FL: models (clusters) in use after the round; 0: not clustered
    clients: list[ClientRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # parts add their measurements here

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """JSON-safe.  `compact` (the run store's rows): the clients as columns,
        ``{"columns": {field: [value per client]}}``, less the fields every client holds at
        their default (`from_dict` gives them back; it also reads the older list of one dict
        per client).  A column is one list: at 1,000 clients it is built and JSON-coded in a
        fifth of the time of 1,000 dicts, and the row is smaller."""
        # Field by field rather than dataclasses.asdict, whose deep copies cost ~60 ms a
        # round at 1,000 clients; a client record's fields are plain values (its one list,
        # label_counts, holds ints), so each is made JSON-safe in one flat pass.
        d = {f.name: _json_safe(getattr(self, f.name)) for f in fields(self) if f.name != "clients"}
        d["clients"] = _client_columns(self.clients) if compact else [_client_row(c) for c in self.clients]
        return d
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundRecord":
        known = {f.name for f in fields(cls)}
        kw = {k: _from_json(v) for k, v in d.items() if k in known and k != "clients"}
        clients = d.get("clients") or []
        if isinstance(clients, dict):  # compact: columns
            cols = clients.get("columns") or {}
            names = [k for k in cols if k in _CLIENT_NAMES]
            kw["clients"] = [ClientRecord(**dict(zip(names, map(_from_json, row)))) for row in zip(*(cols[k] for k in names))]
        else:
            kw["clients"] = [ClientRecord(**{k: _from_json(v) for k, v in c.items()}) for c in clients]
        return cls(**kw)


def _json_safe(obj: Any) -> Any:
    """NaN and inf are not JSON: store them as None / strings and read them back."""
    t = type(obj)
    if t is float:
        return obj if obj - obj == 0.0 else _odd_float(obj)  # x - x is 0.0 exactly for finite x
    if t is str or t is int or t is bool or obj is None:
        return obj
    if isinstance(obj, float):
        return _json_safe(float(obj))
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):  # plain values inline: a record's lists hold thousands of floats
        return [v if (type(v) is float and v - v == 0.0) or type(v) in _PLAIN else _json_safe(v) for v in obj]
    return obj


def _odd_float(x: float) -> Any:
    if math.isnan(x):
        return None
    return "inf" if x > 0 else "-inf"


def _default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING




_CLIENT_NAMES = frozenset(f.name for f in _CLIENT_FIELDS)
_PLAIN = (int, str, bool, type(None))


def _all_default(col: list, dflt: Any) -> bool:
    if type(dflt) is float and dflt != dflt:  # a NaN default
        return all(type(v) is float and v != v for v in col)
    if dflt is None:
        return all(v is None for v in col)
    return all(type(v) is type(dflt) and v == dflt for v in col)


def _client_columns(clients: "list[ClientRecord]") -> dict[str, Any]:
    """The clients' records as JSON-safe columns, less the columns that hold only their default."""
    cols: dict[str, list] = {}
    for f in _CLIENT_FIELDS:
        name = f.name
        col = [getattr(c, name) for c in clients]
        dflt = _default_of(f)
        if dflt is not MISSING and _all_default(col, dflt):
            continue
        cols[name] = [v if type(v) in _PLAIN or (type(v) is float and v - v == 0.0) else _json_safe(v) for v in col]
    return {"columns": cols}


def _client_row(c: "ClientRecord") -> dict[str, Any]:
    """A client record as a JSON-safe dict (its fields, in order)."""
    row = {f.name: getattr(c, f.name) for f in _CLIENT_FIELDS}
    for k, v in row.items():
        if type(v) is float:
            if v - v != 0.0:
                row[k] = _odd_float(v)
        elif not (type(v) is int or type(v) is str or v is None):
            row[k] = _json_safe(v)
    return row


def _from_json(v: Any) -> Any:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return v


@dataclass
class RunSummary:
    """What `fleetlearn.run` returns and `fleetlearn run --json` prints (less the records)."""

    run_id: str
    run_dir: str
    rounds: int
    final_accuracy: float
    best_accuracy: float
    final_loss: float
    uplink_bytes: int
    downlink_bytes: int
    compression_ratio: float  # uncompressed float32 uplink bytes / bytes actually sent
    sim_seconds: float
    wall_seconds: float
    failed_rounds: int = 0
    stopped_reason: str = ""  # why the run ended before `server.rounds` (e.g. the privacy budget)
    # Personalization, evaluated after the last round on the federated-evaluation clients
    # (server.eval_clients): mean personal and global accuracy on their local test splits.
    # Over gRPC the server sees no client data: the means its last round's clients reported.
    personal_accuracy: float = math.nan
    personal_global_accuracy: float = math.nan
    personal_gain: float = math.nan
    # Differential privacy (privacy.mode != 'none'): (epsilon, delta) spent by the whole run,
    # the accounting method that gave it (pld | rdp) and the cohort sampling it composed
    # (poisson | fixed); NaN / "" without DP.
    dp_epsilon: float = math.nan
    dp_delta: float = math.nan
    dp_accounting: str = ""
    dp_sampling: str = ""
    # Binary tasks (spam detection): F1 of class 1 on the central test set at the last evaluation.
    final_f1: float = math.nan
    # The uplink chain the run used (compression.uplink, or the one compression.target_ratio
    # chose for the model); each update's own chain is its ClientRecord.codec.
    uplink_chain: str = ""
    records: list[RoundRecord] = field(default_factory=list)

    def seconds_to(self, accuracy: float) -> float:
        """Simulated seconds until the global accuracy first reaches `accuracy` (inf if it never does).

        Sums `RoundRecord.sim_seconds` up to and including that round; rounds with no
        evaluation (NaN accuracy) count their time but cannot reach the target.
        """
        t = 0.0
        for r in self.records:
            t += r.sim_seconds
            if not math.isnan(r.accuracy) and r.accuracy >= accuracy:
                return t
        return math.inf

    def to_json_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "records"}
        return _json_safe(d)
