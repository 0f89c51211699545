"""`ClientStateStore`: the per-client tensors a simulation keeps between rounds.

Error-feedback residuals, SCAFFOLD's c_i, codec streams and byte-budget counts, and (in a
second store) personal heads and models: state every simulated device would keep on
itself.  A population of a million clients cannot keep it in memory, so the store holds
at most ``max_bytes`` of states in memory (least recently used first out) and the rest in
a SQLite file, one row per client and round:

    state(client INTEGER, round INTEGER, data BLOB, sum INTEGER)
    -- data: the state as safetensors (NULL: none); sum: its XXH3-64 (signed), checked on every read

Memory for a round then grows with the cohort (its states are loaded while it trains),
never with the population; the disk holds one or two rows per client that has state.

**Checkpoints** (`checkpoint`, with a run store: the file lives in the run directory).  A
state put since the last checkpoint is *dirty*; `checkpoint(r)` writes every dirty state as
a row of round r (one SQLite transaction, synchronous), before the round's own transaction
commits in the run store.  A dirty state pushed out of memory between checkpoints is
written as a row of the round in progress (`begin_round`).  The state of client c as of
checkpoint R is therefore its latest row with round <= R, and `resume(R)` deletes the rows
of later rounds (written by rounds that never committed) and forgets the memory: nothing
is loaded until a client is asked for.  Rows a later checkpoint supersedes are pruned at
the next checkpoint, once the run store has committed the round that superseded them (a
crash in between must still find them).

Without a path (no run store) the file is a temporary one, created only when a dirty
state first has to leave memory, and removed with the store.

One writer: a run directory is trained by one process at a time (the run store's lock,
`ops.store`), and only simulated clients keep their state here (a gRPC server, the one
that a standby takes over from, has none: its devices keep their own).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

State = dict[str, torch.Tensor]

CLIENT_STATE_FILE = "client_states.sqlite"  # in a run directory: codec and SCAFFOLD state
PERSONAL_STATE_FILE = "personal_states.sqlite"  # personal heads and models
DEFAULT_MAX_BYTES = 256 << 20  # states kept in memory at most ([engine] client_state_memory_mb)

_SCHEMA = """CREATE TABLE IF NOT EXISTS state (
    client INTEGER NOT NULL, round INTEGER NOT NULL, data BLOB, sum INTEGER, PRIMARY KEY (client, round)) WITHOUT ROWID"""


def _sum(data: bytes | None) -> int | None:
    if data is None:
        return None
    import xxhash

    return xxhash.xxh3_64_intdigest(data) - (1 << 63)  # SQLite integers are signed


ENTRY_BYTES, TENSOR_BYTES = 512, 256  # what a client's entry and each of its tensors cost besides the data


def _nbytes(state: State | None) -> int:
    """Memory an entry takes, Python objects included (a byte-budget count or a codec seed is
    8 bytes of data in a few hundred of objects: a million of them must count)."""
    return ENTRY_BYTES + (sum(TENSOR_BYTES + t.numel() * t.element_size() for t in state.values()) if state else 0)


def _dump(state: State | None) -> bytes | None:
    if not state:
        return None
    from safetensors.torch import save

    return save({k: t.detach().to("cpu").contiguous() for k, t in state.items()})


def _load(data: bytes | None, digest: int | None, where: str) -> State | None:
    if data is None:
        return None
    if _sum(bytes(data)) != digest:
        raise ValueError(f"client state {where} does not match its checksum: the state file is corrupted")
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"client state {where} is not readable safetensors ({exc}); the state file is corrupted") from None


class ClientStateStore:
    """Per-client tensors keyed by client id; only clients that have state cost anything,
    and memory holds at most `max_bytes` of them (see the module docstring).  `path`: the
    SQLite file that holds the rest and the checkpoints (None: a temporary file, made when
    first needed)."""

    def __init__(self, path: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._mem: OrderedDict[int, State | None] = OrderedDict()  # None: known to have no state (a dirty removal)
        self._bytes = 0
        self._dirty: set[int] = set()
        self._path = Path(path) if path is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._db: sqlite3.Connection | None = None
        self._round = 1  # the round in progress (rounds count from 1): rows a dirty eviction writes carry it
        self._checkpointed: int | None = None  # the last round `checkpoint` wrote (its prune waits for the next)
        self._lock = threading.RLock()
        if self._path is not None and self._path.exists():
            self._open()

    # -- the file --------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self._path

    def attach(self, path: str | os.PathLike) -> None:
        """Keep the states in `path` from now on (a run store's file: `checkpoint` and `resume`
        work on it).  The states held so far stay, dirty, and go there at the next checkpoint
        or eviction; the states already pushed out to a file are copied, by SQLite, into the new
        one as rows of the round in progress (as if pushed out there): nothing is loaded."""
        with self._lock:
            held, tmp = (self._path if self._db is not None else None), self._tmp
            if self._db is not None:
                self._db.close()
            self._db, self._tmp, self._path = None, None, Path(path)
            if held is None and not self._path.exists():
                return self._shrink()
            db = self._open()
            if held is not None and held.resolve() != self._path.resolve():
                db.execute("ATTACH DATABASE ? AS held", (str(held),))
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("""INSERT OR REPLACE INTO state (client, round, data, sum)
                                  SELECT s.client, ?, s.data, s.sum FROM held.state s
                                  WHERE s.round = (SELECT MAX(t.round) FROM held.state t WHERE t.client = s.client)""",
                               (self._round,))
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    db.execute("DETACH DATABASE held")
            if tmp is not None:
                tmp.cleanup()
            self._shrink()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            if self._path is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fleetlearn-states-")
                self._path = Path(self._tmp.name) / "states.sqlite"
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # every transaction durable: evicted rows are part of the next checkpoint
                db.execute(_SCHEMA)
                db.execute("SELECT client, round, data, sum FROM state LIMIT 1").fetchall()
            except sqlite3.DatabaseError as exc:
                db.close()
                raise ValueError(f"client state file {self._path} is not a fleetlearn state file ({exc})") from None
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp, self._path = None, None

    def __getstate__(self):
        """Pickled (a Ray worker's copy of a device) as its states alone, in memory."""
        with self._lock:
            return {"max_bytes": self.max_bytes, "states": {c: self.get(c) for c in self.clients()}}

    def __setstate__(self, d):
        self.__init__(max_bytes=d["max_bytes"])
        for c, st in d["states"].items():
            self.put(c, st)

    def __del__(self):  # a temporary file goes with the store
        try:
            if self._tmp is not None:
                self.close()
        except Exception:
            pass

    def _read(self, client: int) -> State | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT round, data, sum FROM state WHERE client = ? ORDER BY round DESC LIMIT 1", (client,)).fetchone()
        return None if row is None else _load(row[1], row[2], f"of client {client} (round {row[0]}) in {self._path}")

    def _has(self, client: int) -> bool:
        if self._db is None:
            return False
        row = self._db.execute("SELECT data IS NOT NULL FROM state WHERE client = ? ORDER BY round DESC LIMIT 1", (client,)).fetchone()
        return bool(row and row[0])

    def _write(self, rows: list[tuple[int, int, bytes | None]]) -> None:
        """One transaction, on disk when this returns (eviction batches are large: a sync each is cheap)."""
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO state (client, round, data, sum) VALUES (?, ?, ?, ?)",
                           [(c, r, d, _sum(d)) for c, r, d in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- memory ----------------------------------------------------------------------------
    def _remember(self, client: int, state: State | None) -> None:
        if client in self._mem:
            self._bytes -= _nbytes(self._mem.pop(client))
        self._mem[client] = state
        self._bytes += _nbytes(state)

    def _shrink(self, keep: int | None = None) -> None:
        """Over `max_bytes`: push the least recently used states out until memory is within
        three quarters of it (so one write serves many puts; never `keep`, the client just
        touched); dirty ones are written first, in one transaction, as rows of the round in
        progress."""
        if self._bytes <= self.max_bytes:
            return
        target = self.max_bytes * 3 // 4
        out: list[tuple[int, int, bytes | None]] = []
        gone: list[int] = []
        freed = 0
        for client, state in self._mem.items():
            if self._bytes - freed <= target:
                break
            if client == keep:
                continue
            if client in self._dirty:
                out.append((client, self._round, _dump(state)))
            gone.append(client)
            freed += _nbytes(state)
        if out:
            self._write(out)
        for client in gone:
            self._dirty.discard(client)
            self._bytes -= _nbytes(self._mem.pop(client))

    # -- the mapping -----------------------------------------------------------------------
    def get(self, client: int) -> State | None:
        client = int(client)
        with self._lock:
            if client in self._mem:
                self._mem.move_to_end(client)
                return self._mem[client]
            state = self._read(client)
            if state is not None:
                self._remember(client, state)
                self._shrink(keep=client)
            return state

    def put(self, client: int, state: State | None) -> None:
        client = int(client)
        with self._lock:
            if not state:
                state = None
                if client not in self._mem and not self._has(client):
                    return  # nothing to remove, anywhere
            self._remember(client, state)
            self._dirty.add(client)
            self._shrink(keep=client)

    def __len__(self) -> int:
        """Clients that have state (in memory or in the file)."""
        return len(self.clients())

    def clients(self) -> list[int]:
        """Sorted ids of the clients that have state."""
        with self._lock:
            have = {c for c, s in self._mem.items() if s is not None}
            if self._db is not None:
                rows = self._db.execute(
                    "SELECT s.client, s.data IS NOT NULL FROM state s WHERE s.round = (SELECT MAX(round) FROM state t WHERE t.client = s.client)")
                have |= {int(c) for c, has in rows if has and int(c) not in self._mem}
            return sorted(have)

    def nbytes(self) -> int:
        """Bytes of state held in memory (at most about `max_bytes`)."""
        return self._bytes

    def take(self, clients: Sequence[int]) -> dict[int, State]:
        """The states of `clients` that have one (what a Ray worker needs for its chunk)."""
        return {int(c): s for c in clients if (s := self.get(int(c))) is not None}

    def merge(self, clients: Sequence[int], states: dict[int, State]) -> None:
        """Put back the states of `clients` after a remote chunk (a client without one is cleared)."""
        for c in clients:
            self.put(int(c), states.get(int(c)))

    # -- rounds and checkpoints ------------------------------------------------------------
    def begin_round(self, round: int) -> None:
        """The round in progress: a dirty state pushed out of memory is written as its row."""
        self._round = int(round)

    def checkpoint(self, round: int) -> None:
        """Write every state changed since the last checkpoint as a row of `round`, before the
        run store commits that round; first prune what the previous checkpoint superseded
        (the run store has committed it: the caller waited for that commit)."""
        round = int(round)
        with self._lock:
            if self._checkpointed is not None and self._db is not None:
                self._prune(self._checkpointed)
            rows = [(c, round, _dump(self._mem[c])) for c in sorted(self._dirty)]
            if rows:
                self._write(rows)
            self._dirty.clear()
            for c in [c for c, st in self._mem.items() if st is None]:  # removals are on disk now
                self._bytes -= _nbytes(self._mem.pop(c))
            self._checkpointed = round
            self._round = round + 1

    def _prune(self, upto: int) -> None:
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        db.execute("""DELETE FROM state WHERE round < (
                          SELECT MAX(t.round) FROM state t WHERE t.client = state.client AND t.round <= ?)""", (upto,))
        db.execute("DELETE FROM state WHERE data IS NULL AND round <= ?", (upto,))  # a removal nothing older needs
        db.execute("COMMIT")

    def resume(self, round: int) -> None:
        """Back to the state of checkpoint `round`: forget memory and the dirty states, delete
        the rows of later rounds (their rounds never committed)."""
        round = int(round)
        with self._lock:
            self._mem.clear()
            self._bytes = 0
            self._dirty.clear()
            self._round = round + 1
            self._checkpointed = None
            if self._path is not None and (self._db is not None or self._path.exists()):
                db = self._open()
                db.execute("DELETE FROM state WHERE round > ?", (round,))

    # -- flat tensors (old checkpoints' side files, tests) ----------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every client's state as flat tensors named ``client/<id>/<key>``."""
        return {f"client/{c}/{k}": t for c in self.clients() for k, t in (self.get(c) or {}).items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put the states `state_dict` wrote (clients it does not name keep theirs)."""
        state: dict[int, State] = {}
        for name, t in tensors.items():
            head, cid, key = (name.split("/", 2) + ["", ""])[:3]
            if head != "client" or not cid.isdigit() or not key:
                raise ValueError(f"client state tensor {name!r} is not named client/<id>/<key>")
            state.setdefault(int(cid), {})[key] = t
        for c, s in state.items():
            self.put(c, s)
