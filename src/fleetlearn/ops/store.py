"""The run store: a run directory with a database (SQLite by default, any
SQLAlchemy URL such as PostgreSQL) and model checkpoints as safetensors.

Crash safety: a checkpoint file is written to a unique temporary name, fsynced
and renamed (and its folder fsynced) before the database row that names it is
committed; the round record, the checkpoint row and the run's progress are one
transaction.  A crash leaves either the whole round or none of it.  A file that a
committed row names is never overwritten: a checkpoint for a version that already
has one goes to a new name, and the old file is removed only after the new row
committed.  The side files (``config.toml``, ``summary.json``, ``param_spec.json``,
...) are written the same way (`atomic_write`), so a reader or a crash never sees
half of one.

One process at a time: a process that trains a run (a new run, ``--resume``)
holds an exclusive lock on ``RUN_DIR/.lock`` (``flock``) for as long as its store
is open, and a second one is refused with the holder's pid.  Readers (``show``,
``report``, ``models list``) take no lock and work on a read-only run directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..files import atomic_write, fsync_dir, tmp_path
from ..lazy import lazy_module
from ..records import RoundRecord

if TYPE_CHECKING:
    import torch

# torch comes with safetensors' torch API, on the first checkpoint: `fleetlearn runs` and `show` need neither
_safetensors = lazy_module("safetensors.torch")

DB_NAME = "run.db"
LOCK_NAME = ".lock"  # flock'ed by the process training the run; holds its pid
CLIENT_STATES = "client_states"  # checkpoint metadata: the client-state file saved with it
CLIENT_STATES_SHA = "client_states_sha256"
metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("name", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("status", String(20), nullable=False),  # running | finished | failed
    Column("config_toml", Text, nullable=False),
    Column("config_hash", String(32), nullable=False),
    Column("rounds_done", Integer, nullable=False, default=0),
    Column("summary", JSON),
)

rounds = Table(
    "rounds",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("accuracy", Float),
    Column("loss", Float),
    Column("uplink_bytes", Integer),
    Column("downlink_bytes", Integer),
    Column("sim_seconds", Float),
    Column("wall_seconds", Float),
    Column("record", JSON, nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("round", Integer, nullable=False),
    Column("path", String(500), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


# The privacy ledger after each round, written in that round's transaction: a crash can
# never leave a committed round whose privacy spend is missing (see `commit_round`).
privacy_ledger = Table(
    "privacy_ledger",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("state", JSON, nullable=False),
)


# Configuration changes a `--resume` accepted (`RunStore.record_resume_overrides`): one row
# per key, with the first round trained under the new value.
resume_overrides = Table(
    "resume_overrides",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False, index=True),
    Column("round", Integer, nullable=False),
    Column("key", String(200), nullable=False),
    Column("old", JSON),
    Column("new", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


# The leader lease (`RunStore.acquire_lease`): one row per run, naming the process that may
# commit its rounds.  `token` (the fencing token) grows by one on every acquisition;
# `expires_at` is seconds since the epoch on the database's own clock (never a host's), pushed
# on by the holder's heartbeat and by each of its commits.
leader_lease = Table(
    "leader_lease",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("token", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
)


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _json_dumps(obj: Any) -> str:
    """The JSON columns' serializer: orjson, with the json module's output for what orjson
    refuses (integers beyond 64 bits).  The background commit serializes each round's
    record while the next round runs, holding the GIL: with the json module a 1,000-client
    round took 160 ms instead of 150 (`benchmarks/round_parts.py`, mode `json`).  Records
    are made JSON-safe before (records._json_safe: NaN -> null, inf -> "inf"), so both give
    the same document."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTIONS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj)


class StoreError(RuntimeError):
    pass


# Parts that write rows of their own inside each round's transaction register themselves
# here: ``write(conn, run_id, record, config_hash)``.  The model registry does (ops/registry.py,
# imported with the `fleetlearn.ops` package, so its tables join `metadata` before any store
# opens); the store never imports it back.
ROUND_WRITERS: list = []


# -- files (fleetlearn.files: one crash-safe write for the store and the certificate tool) ----
_fsync_dir, _tmp_path = fsync_dir, tmp_path


def _take_lock(run_dir: Path, run_id: str):
    """The open, flock'ed ``RUN_DIR/.lock`` (it holds this process's pid); see `RunStore.lock`."""
    path = run_dir / LOCK_NAME
    try:
        fh = open(path, "a+b")
    except OSError as exc:
        raise StoreError(
            f"run directory {run_dir} is not writable ({exc.strerror}: {path}): a run can only be trained or "
            "resumed where it can write; show, models list and report --out DIR work on a read-only run"
        ) from None
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().decode("ascii", "replace").strip() or "unknown"
        fh.close()
        raise StoreError(
            f"run {run_id} is in use by another process (pid {holder}, which holds {path}); "
            "wait for it to end or stop it before resuming this run"
        ) from None
    except OSError as exc:
        fh.close()
        raise StoreError(f"cannot lock run {run_id} ({exc.strerror}: {path})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n".encode())
    fh.flush()
    return fh


# -- database errors ----------------------------------------------------------------------
def _where(engine: Engine) -> str:
    """The store as a user names it: the SQLite file, else the URL without its password."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database
    return url.render_as_string(hide_password=True)


def _db_message(where: str, exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    low = first.lower()
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        hint = " (the database file is damaged; restore it from a backup)"
    elif "readonly" in low or "read-only" in low or "unable to open database file" in low:
        hint = " (the run directory or its database is read-only; show, models list and report --out DIR work on a read-only run)"
    elif "locked" in low:
        hint = " (another process is writing to it)"
    else:
        hint = ""
    return f"run store {where}: {first}{hint}"


def _translate_db_errors(engine: Engine) -> None:
    """A database error (damaged file, read-only, unreachable) becomes a StoreError naming
    the store; an integrity error (a programming error) stays what it is."""

    @event.listens_for(engine, "handle_error")
    def _handle(ctx):  # noqa: ANN001
        exc = ctx.sqlalchemy_exception
        if isinstance(exc, IntegrityError) or not isinstance(exc, DBAPIError):
            return None
        return StoreError(_db_message(_where(ctx.engine) if ctx.engine is not None else "?", exc))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _finite(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else float(x)


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class BackgroundWriter:
    """Runs a store's writes one at a time, in order, on a thread of their own: the engine
    hands a round's commit over and trains the next round while it is written.

    `submit(job)` first waits for the previous job (so round r is committed before round
    r + 1's commit starts) and raises here, in the submitting thread, what that job raised;
    `wait()` waits without raising, `flush()` waits and raises.  Each job is one round's
    `commit_round` (one transaction: a crash leaves the whole round or none of it).  The
    thread is not a daemon: a commit under way when the main thread fails is finished."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def in_writer(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def wait(self) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def flush(self) -> None:
        self.wait()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        self.flush()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # raised in the submitting thread, at its next flush
                self._error = exc

        self._thread = threading.Thread(target=run, name="fleetlearn-commit", daemon=False)
        self._thread.start()


class RunStore:
    """One run: its directory, its database rows and its checkpoints.

    Writes may go through `submit` (the engine's round commits: `BackgroundWriter`); every
    use of the database from another thread first waits for the write under way (`engine`),
    so a reader never sees the store between two of a round's writes, and `flush` raises
    what a background write raised."""

    def __init__(self, run_dir: Path, run_id: str, engine: Engine):
        self.run_dir = run_dir
        self.run_id = run_id
        self._db = engine
        self.writer = BackgroundWriter()
        self._config_hash: str | None = None
        self._lock_fh = None
        self._lease: tuple[str, int] | None = None  # (holder, fencing token) while this handle leads
        self._lease_ttl = 0.0
        self._lease_lost = False  # it was held and lost: this handle's writes are refused

    @property
    def engine(self) -> Engine:
        """The database; waits for a background write under way (unless called from it)."""
        self.writer.wait()
        return self._db

    def submit(self, job: Callable[[], None], background: bool = True) -> None:
        """Run `job` (a round's writes) after the previous one: on the background writer, or
        here when `background` is False.  Raises what the previous background job raised."""
        if background:
            self.writer.submit(job)
        else:
            self.writer.flush()
            job()

    def flush(self) -> None:
        """Wait for the background writes and raise what one of them raised."""
        self.writer.flush()

    @property
    def config_hash(self) -> str:
        """The hash of the configuration training the production model; the registry
        records it per version (a promoted canary changes it)."""
        if self._config_hash is None:
            self._config_hash = str(self.info()["config_hash"])
        return self._config_hash

    @config_hash.setter
    def config_hash(self, value: str) -> None:
        self._config_hash = value

    # -- opening -----------------------------------------------------------------
    @staticmethod
    def _engine(run_dir: Path, url: str | None, existing: bool = False) -> Engine:
        """The store's engine, with any table this version adds created.  `existing`: the
        store must already hold a run (its ``runs`` table); an empty or foreign database is
        refused, not silently initialised."""
        url = url or f"sqlite:///{(run_dir / DB_NAME).resolve()}"
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

        try:
            shown = make_url(url).render_as_string(hide_password=True)
        except ArgumentError:
            raise StoreError(f"store URL {url!r} is not an SQLAlchemy URL (e.g. postgresql://user@host:5432/db)") from None
        try:
            engine = create_engine(url, future=True, json_serializer=_json_dumps)
            engine.missing_tables = set()  # type: ignore[attr-defined]
            if existing:
                where = _where(engine)
                present = set(inspect(engine).get_table_names())
                if "runs" not in present:
                    empty = engine.url.get_backend_name() == "sqlite" and Path(where).is_file() and Path(where).stat().st_size == 0
                    raise StoreError(
                        f"{where} is {'an empty file' if empty else 'a database without a runs table'}: the run's database "
                        f"was lost or replaced, so the run directory {run_dir} cannot be resumed or read (its checkpoints "
                        f"are kept in {run_dir / 'checkpoints'})"
                    )
                missing = {t for t in metadata.tables if t not in present}
                if missing:  # tables a newer version added: create them, or read without them
                    try:
                        metadata.create_all(engine)
                    except OperationalError:  # a read-only store: readers treat them as empty
                        engine.missing_tables = missing  # type: ignore[attr-defined]
            else:
                metadata.create_all(engine)
        except StoreError:
            raise
        except NoSuchModuleError as exc:
            raise StoreError(f"store URL {shown}: {exc}") from None
        except ImportError as exc:
            hint = " (pip install 'fleetlearn[postgres]')" if shown.startswith("postgresql") else ""
            raise StoreError(f"store URL {shown}: its database driver is not installed: {exc}{hint}") from None
        except SQLAlchemyError as exc:
            msg = _db_message(shown, exc).removeprefix(f"run store {shown}: ")
            raise StoreError(f"cannot open the run store at {shown}: {msg}") from None
        _translate_db_errors(engine)
        return engine

    # -- the leader lease ----------------------------------------------------------------
    def _db_now(self):  # noqa: ANN202
        """SQL for 'now' in seconds since the epoch on the database server's clock: every
        holder and standby compares expiry against the same clock, whatever their hosts say."""
        from sqlalchemy import literal_column

        if self.engine.url.get_backend_name() == "postgresql":
            return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)")  # SQLite

    @property
    def lease(self) -> tuple[str, int] | None:
        """(holder, fencing token) of the lease this handle holds, or None."""
        return None if self._lease_lost else self._lease

    def acquire_lease(self, holder: str, ttl: float, takeover_only: bool = False) -> int | None:
        """Take the run's leader lease for `holder` for `ttl` seconds if it is free (no row, or
        the holder's lease expired, or `holder` holds it already): one conditional write, so of
        two processes racing for it exactly one wins.  Every acquisition increments the fencing
        token; returns it (this handle then fences its commits with it), or None when another
        holder's lease is still live.  `takeover_only` (a standby): never the run's first lease,
        only one a leader held before (the process that created the run takes the first one
        a moment after creating it; a standby must not race it for it)."""
        if not holder or len(holder) > 200:
            raise StoreError(f"lease holder id must be 1-200 characters, got {len(holder or '')}")
        if not ttl > 0:
            raise StoreError(f"lease ttl must be > 0 seconds, got {ttl}")
        now = self._db_now()
        with self.engine.begin() as conn:
            got = conn.execute(
                update(leader_lease)
                .where(leader_lease.c.run_id == self.run_id, (leader_lease.c.expires_at < now) | (leader_lease.c.holder == holder))
                .values(holder=holder, token=leader_lease.c.token + 1, expires_at=now + float(ttl))
            ).rowcount
        if not got and not takeover_only:
            try:
                with self.engine.begin() as conn:
                    conn.execute(leader_lease.insert().values(run_id=self.run_id, holder=holder, token=1, expires_at=now + float(ttl)))
            except IntegrityError:  # the row exists (another holder's live lease, or a racer inserted first)
                return None
        with self.engine.connect() as conn:
            row = conn.execute(select(leader_lease.c.holder, leader_lease.c.token).where(leader_lease.c.run_id == self.run_id)).first()
        if row is None or row[0] != holder:  # taken over between our write and this read
            return None
        self._lease, self._lease_ttl, self._lease_lost = (holder, int(row[1])), float(ttl), False
        return int(row[1])

    def renew_lease(self) -> bool:
        """Push the held lease's expiry `ttl` seconds on (the heartbeat).  False, and this
        handle no longer holds it, when it was lost: taken over by another holder (a new
        token; a deposed leader never gets it back by renewing).  A lease that expired
        without being taken is renewed (see `_fence`)."""
        if self.lease is None:
            return False
        with self.engine.begin() as conn:
            ok = self._fence(conn)
        if not ok:
            self._lease_lost = True  # every later write of this handle is refused (`_check_fence`)
        return ok

    def release_lease(self) -> None:
        """Give the held lease up at once (a clean stop): a standby takes over without waiting
        for the expiry.  The token stays, so the next holder's is still larger."""
        lease, self._lease = self.lease, None
        if lease is not None:
            with self.engine.begin() as conn:
                conn.execute(
                    update(leader_lease)
                    .where(leader_lease.c.run_id == self.run_id, leader_lease.c.holder == lease[0], leader_lease.c.token == lease[1])
                    .values(expires_at=0.0)
                )

    def lease_row(self) -> dict[str, Any] | None:
        """The run's lease as stored (holder, token, expires_at, and `live`), or None."""
        if self._missing(leader_lease):
            return None
        now = self._db_now()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(leader_lease.c.holder, leader_lease.c.token, leader_lease.c.expires_at, (leader_lease.c.expires_at >= now).label("live"))
                .where(leader_lease.c.run_id == self.run_id)
            ).mappings().first()
        return None if row is None else {k: row[k] for k in ("holder", "token", "expires_at")} | {"live": bool(row["live"])}

    def _fence(self, conn) -> bool:  # noqa: ANN001
        """Inside a write transaction: True when this handle's lease is still current (same
        holder, same token), pushing its expiry on.  A conditional UPDATE: on PostgreSQL it
        holds the lease row's lock until the transaction ends, so a takeover either happened
        before (this fails) or waits for this commit and then finds the expiry pushed on; on
        SQLite the write lock serialises the same way.  An expired lease that nobody took is
        still this holder's (a heartbeat late under load, a pause): no other process can have
        written since, because writing needs the lease and taking it changes the token."""
        holder, token = self._lease  # type: ignore[misc]
        now = self._db_now()
        return bool(conn.execute(
            update(leader_lease)
            .where(leader_lease.c.run_id == self.run_id, leader_lease.c.holder == holder, leader_lease.c.token == token)
            .values(expires_at=now + self._lease_ttl)
        ).rowcount)

    def _check_fence(self, conn) -> None:  # noqa: ANN001
        """Refuse a write transaction of a deposed leader (StoreError; the caller's transaction
        rolls back, so nothing of it is written).  A handle that holds no lease writes only
        when no live lease names another holder (a run trained without a lease is unchanged)."""
        if self._lease is not None:
            if self._lease_lost or not self._fence(conn):
                holder, token = self._lease
                self._lease_lost = True  # once deposed, never a write again from this handle
                row = conn.execute(select(leader_lease.c.holder, leader_lease.c.token).where(leader_lease.c.run_id == self.run_id)).first()
                now_by = f"now held by {row[0]!r} with token {row[1]}" if row is not None and (row[0], row[1]) != (holder, token) else "expired"
                raise StoreError(
                    f"run {self.run_id}: this process ({holder!r}, fencing token {token}) lost the leader lease ({now_by}); "
                    "its write is refused and nothing of it was committed"
                )
        elif not self._missing(leader_lease):
            row = conn.execute(
                select(leader_lease.c.holder, leader_lease.c.token)
                .where(leader_lease.c.run_id == self.run_id, leader_lease.c.expires_at >= self._db_now())
            ).first()
            if row is not None:
                raise StoreError(
                    f"run {self.run_id} is led by {row[0]!r} (leader lease, fencing token {row[1]}); "
                    "this process does not hold the lease, so its write is refused"
                )

    def _missing(self, table: Table) -> bool:
        return table.name in getattr(self.engine, "missing_tables", ())

    # -- the lock ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on ``RUN_DIR/.lock`` until `close` (or the process ends):
        only one process trains a run at a time.  Refused, naming the holder's pid, when
        another process holds it; refused when the run directory is not writable."""
        if self._lock_fh is None:
            self._lock_fh = _take_lock(self.run_dir, self.run_id)

    def close(self) -> None:
        """Release the run's lock (if held) and the database connections."""
        self.writer.wait()  # a commit under way finishes first (its error, if any, stays for flush)
        fh, self._lock_fh = self._lock_fh, None
        if fh is not None:
            fh.close()  # closing the file releases the flock
        self._db.dispose()

    def check_writable(self) -> None:
        """Refuse, before any work, a store that cannot take a write (read-only file or
        folder, damaged database): a write transaction that changes nothing."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(rounds_done=runs.c.rounds_done))

    @classmethod
    def create(cls, root: str | Path, config_toml: str, config_hash: str, name: str | None = None, url: str | None = None, run_id: str | None = None) -> "RunStore":
        run_id = run_id or new_run_id()
        run_dir = Path(root) / run_id
        if run_dir.exists():
            raise StoreError(f"run directory already exists: {run_dir}")
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir()
        except FileExistsError:
            raise StoreError(f"run directory already exists: {run_dir}") from None
        except OSError as exc:
            raise StoreError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
        (run_dir / "checkpoints").mkdir()
        atomic_write(run_dir / "config.toml", config_toml)
        if url:
            # Never a password on disk: resume supplies it again (--store, PGPASSWORD or ~/.pgpass).
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                kept = make_url(url).set(password=None).render_as_string(hide_password=False)
            except ArgumentError:
                kept = url  # refused with a clear error just below
            atomic_write(run_dir / "store_url", kept)
        try:
            store = cls(run_dir, run_id, cls._engine(run_dir, url))
            store.lock()  # this process trains the run: a concurrent --resume of it is refused
        except StoreError:
            shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started leaves nothing behind
            raise
        with store.engine.begin() as conn:
            conn.execute(
                runs.insert().values(
                    run_id=run_id, name=name, created_at=_now(), status="running",
                    config_toml=config_toml, config_hash=config_hash, rounds_done=0,
                )
            )
        return store

    @classmethod
    def open(cls, run: str | Path, root: str | Path = "runs", url: str | None = None, lock: bool = False) -> "RunStore":
        """Open a run by directory path or by id under `root`.  Its database is the URL
        the run recorded in `store_url` (or `url` if given), else its SQLite file.  The
        database must hold the run's row (an emptied or replaced ``run.db`` is refused).
        `lock`: this process will train the run (``--resume``): take the run's lock (see
        `lock`), check that the store takes writes and remove what a crashed writer left
        (`sweep`)."""
        run_dir = Path(run)
        if not (run_dir / "config.toml").is_file():
            run_dir = Path(root) / str(run)
        if not (run_dir / "config.toml").is_file():
            raise StoreError(f"no run found at {run!r} (looked for {run_dir}/config.toml)")
        url_file = run_dir / "store_url"
        if url is None and url_file.is_file():
            url = url_file.read_text().strip()
        if url is None and not (run_dir / DB_NAME).is_file():
            raise StoreError(f"{run_dir} has no {DB_NAME}")
        # The lock first: a writer's database transaction never stands between a second
        # process and the refusal that names it.
        lock_fh = _take_lock(run_dir, run_dir.name) if lock else None
        try:
            store = cls(run_dir, run_dir.name, cls._engine(run_dir, url, existing=True))
        except BaseException:
            if lock_fh is not None:
                lock_fh.close()
            raise
        store._lock_fh = lock_fh
        try:
            with store.engine.connect() as conn:
                row = conn.execute(select(runs.c.run_id).where(runs.c.run_id == store.run_id)).first()
            if row is None:
                raise StoreError(
                    f"{_where(store.engine)} has no row for run {store.run_id}: the run's database lost its record, so "
                    f"the run directory {run_dir} cannot be resumed or read (its checkpoints are kept in {run_dir / 'checkpoints'})"
                )
            if lock:
                store.check_writable()
                store.sweep()  # what a crashed writer left: no other process writes now
        except BaseException:
            store.close()
            raise
        return store

    # -- writing -----------------------------------------------------------------
    def _write_checkpoint(self, version: int, params: torch.Tensor, state: dict[str, torch.Tensor] | None, meta: dict[str, str] | None) -> tuple[str, str]:
        """Write a checkpoint file and return (its path in the run directory, sha256).  It is
        a new file (see `_save_new`): a committed checkpoint's file is never replaced, also
        when a version is checkpointed again (the version a rollback restored)."""
        tensors = {"params": params.detach().to("cpu").contiguous()}
        for k, v in (state or {}).items():
            tensors[f"state/{k}"] = v.detach().to("cpu").contiguous()
        return self._save_new(f"checkpoints/v{version:06d}", tensors, {k: str(v) for k, v in (meta or {}).items()})

    def _save_new(self, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> tuple[str, str]:
        """Write tensors crash-safely to a file no one else has: ``STEM.safetensors`` if that
        name is free (taken exclusively, by a hard link from the fsynced temporary file), else
        ``STEM-<random>.safetensors``.  Returns (path relative to the run directory, sha256)."""
        rel = f"{stem}.safetensors"
        path = self.run_dir / rel
        tmp = _tmp_path(path)
        try:
            _safetensors.save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if the name exists: never over another file
                tmp.unlink()
            except OSError:
                rel = f"{stem}-{secrets.token_hex(4)}.safetensors"
                os.replace(tmp, self.run_dir / rel)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return rel, digest

    def _drop_file(self, rel: str | None) -> None:
        if rel:
            (self.run_dir / rel).unlink(missing_ok=True)

    def _put_checkpoint_row(self, conn, version: int, round: int, rel: str, digest: str) -> str | None:  # noqa: ANN001
        """Inside a write transaction: the checkpoint row of `version`; returns the file the
        row it replaces named (to remove once the transaction committed), if another."""
        old = conn.execute(select(checkpoints.c.path).where(checkpoints.c.run_id == self.run_id, checkpoints.c.version == version)).first()
        conn.execute(checkpoints.delete().where(checkpoints.c.run_id == self.run_id, checkpoints.c.version == version))
        conn.execute(checkpoints.insert().values(run_id=self.run_id, version=version, round=round, path=rel, sha256=digest, created_at=_now()))
        return old[0] if old is not None and old[0] != rel else None

    def commit_round(
        self, record: RoundRecord, params: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None,
        meta: dict[str, str] | None = None, privacy: dict[str, Any] | None = None,
    ) -> None:
        """Record a round (and, if `params` is given, its checkpoint; if `privacy` is given,
        the privacy ledger after it) atomically."""
        config_hash = self.config_hash  # read before the write transaction (and before any file is written)
        ckpt = self._write_checkpoint(record.version, params, state, meta) if params is not None else None
        row = record.to_dict(compact=True)  # the clients as columns, all-default ones left out (read back as defaults)
        replaced = None
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn)  # first: a deposed leader writes nothing
                conn.execute(
                    rounds.insert().values(
                        run_id=self.run_id, round=record.round, version=record.version, status=record.status,
                        accuracy=_finite(record.accuracy), loss=_finite(record.loss),
                        uplink_bytes=record.uplink_bytes, downlink_bytes=record.downlink_bytes,
                        sim_seconds=record.sim_seconds, wall_seconds=record.wall_seconds, record=row,
                    )
                )
                if ckpt is not None:
                    replaced = self._put_checkpoint_row(conn, record.version, record.round, *ckpt)
                if privacy is not None:  # only the latest is ever resumed from (the ledger is cumulative)
                    conn.execute(privacy_ledger.delete().where(privacy_ledger.c.run_id == self.run_id))
                    conn.execute(privacy_ledger.insert().values(run_id=self.run_id, round=record.round, state=json.loads(json.dumps(privacy))))
                conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(rounds_done=record.round))
                for write in ROUND_WRITERS:  # e.g. the model registry's version rows, in this same transaction
                    write(conn, self.run_id, record, config_hash)
        except BaseException:
            if ckpt is not None:
                self._drop_file(ckpt[0])  # this call's own new file, which no committed row names
            raise
        self._drop_file(replaced)  # the previous file of a version checkpointed again

    def save_checkpoint(self, version: int, round: int, params: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> None:
        rel, digest = self._write_checkpoint(version, params, state, None)
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn)
                replaced = self._put_checkpoint_row(conn, version, round, rel, digest)
        except BaseException:
            self._drop_file(rel)
            raise
        self._drop_file(replaced)

    def sweep(self) -> list[str]:
        """Remove what a crashed writer left in ``checkpoints/``: temporary files and model
        checkpoints no committed row names.  Only under the run's lock (`lock`) or its leader
        lease (`acquire_lease`): no other process commits then (a deposed leader's files are
        never named by a committed row).  Returns the removed paths (relative to the run directory)."""
        if self._lock_fh is None and self.lease is None:
            raise StoreError("sweep needs the run's lock or its leader lease")
        named = {r["path"] for r in self.checkpoint_rows()}
        gone = []
        folder = self.run_dir / "checkpoints"
        for f in sorted(folder.glob(".*.tmp")) + sorted(folder.glob("v*.safetensors")):
            rel = f"checkpoints/{f.name}"
            if rel not in named:
                f.unlink(missing_ok=True)
                gone.append(rel)
        return gone

    # -- per-client state (error-feedback residuals, SCAFFOLD c_i) -----------------------
    def write_client_states(self, round: int, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        """Write the clients' state tensors crash-safely (temporary name, fsync, rename) to
        ``checkpoints/clients-r<round>.safetensors``; returns the metadata that the round's
        model checkpoint carries to name it (path and sha256).  Written before the round's
        transaction commits, so a committed checkpoint never names a missing file; a new file
        (`_save_new`), so never the one an earlier committed checkpoint names."""
        rel, digest = self._save_new(f"checkpoints/clients-r{round:06d}", {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        return {CLIENT_STATES: rel, CLIENT_STATES_SHA: digest}

    def prune_client_states(self, keep: dict[str, str]) -> None:
        """Remove client-state files other than `keep` (only the latest is ever resumed from)."""
        for f in (self.run_dir / "checkpoints").glob("clients-r*.safetensors"):
            if f"checkpoints/{f.name}" != keep.get(CLIENT_STATES):
                f.unlink(missing_ok=True)

    def load_client_states(self, version: int | None = None) -> dict[str, torch.Tensor]:
        """The client states saved with a checkpoint (default: the latest), checked against the
        sha256 the checkpoint recorded; {} if that checkpoint saved none."""
        rows = self.checkpoint_rows()
        if version is not None:
            rows = [r for r in rows if r["version"] == version]
        if not rows:
            raise StoreError(f"run {self.run_id} has no checkpoint" + (f" for version {version}" if version is not None else ""))
        from safetensors import safe_open

        ckpt = self.run_dir / rows[-1]["path"]
        if not ckpt.is_file():
            raise StoreError(f"checkpoint v{rows[-1]['version']} of run {self.run_id} is missing: {ckpt} (the run store records it)")
        with safe_open(str(ckpt), framework="pt") as fh:
            meta = fh.metadata() or {}
        rel = meta.get(CLIENT_STATES)
        if not rel:
            return {}
        path = self.run_dir / rel
        if not path.is_file():
            raise StoreError(f"checkpoint v{rows[-1]['version']} names client states {path}, which is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get(CLIENT_STATES_SHA):
            raise StoreError(f"client states {path} do not match the sha256 their checkpoint recorded (corrupted)")
        return _safetensors.load_file(str(path))

    def finish(self, summary: dict[str, Any], status: str = "finished") -> None:
        with self.engine.begin() as conn:
            self._check_fence(conn)
            conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(status=status, summary=json.loads(json.dumps(summary, default=str))))
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON side file in the run directory (e.g. the data's heterogeneity statistics)."""
        self.write_text(name, json.dumps(obj, indent=1, default=str))

    def write_text(self, name: str, text: str) -> None:
        """A side file in the run directory (``param_spec.json``, ...), written atomically."""
        atomic_write(self.run_dir / name, text)

    def record_resume_overrides(self, changes: dict[str, tuple[Any, Any]], round: int, config_toml: str) -> None:
        """Record configuration changes a resume made (`changes`: key -> (old, new)), in
        effect from `round`: ``config.toml`` is replaced atomically by `config_toml`, the
        run's row keeps the same text, and each change gets a ``resume_overrides`` row.  The
        configuration hash stays the run's original (the allowed keys do not change what a
        round computes from the model it starts with)."""
        path = self.run_dir / "config.toml"
        before = path.read_text()
        atomic_write(path, config_toml)
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn)
                for key, (old, new) in changes.items():
                    conn.execute(resume_overrides.insert().values(
                        run_id=self.run_id, round=round, key=key, old=json.loads(json.dumps(old)), new=json.loads(json.dumps(new)), created_at=_now(),
                    ))
                conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(config_toml=config_toml))
        except BaseException:
            atomic_write(path, before)
            raise

    # -- reading -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.run_id == self.run_id)).mappings().first()
        if row is None:
            raise StoreError(f"run {self.run_id} has no row in its store")
        return dict(row)

    def records(self) -> list[RoundRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rounds.c.record).where(rounds.c.run_id == self.run_id).order_by(rounds.c.round)).all()
        return [RoundRecord.from_dict(r[0]) for r in rows]

    def resume_overrides(self) -> list[dict[str, Any]]:
        """The configuration changes resumes made, oldest first: round (the first trained with
        the new value), key, old, new, created_at."""
        if self._missing(resume_overrides):
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(resume_overrides).where(resume_overrides.c.run_id == self.run_id).order_by(resume_overrides.c.id)
            ).mappings().all()
        return [{k: r[k] for k in ("round", "key", "old", "new", "created_at")} for r in rows]

    def privacy_state(self, round: int) -> dict[str, Any] | None:
        """The privacy ledger committed with `round`, or None if that round has none."""
        if self._missing(privacy_ledger):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(privacy_ledger.c.state).where(privacy_ledger.c.run_id == self.run_id, privacy_ledger.c.round == round)
            ).first()
        return None if row is None else row[0]

    def checkpoint_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(checkpoints).where(checkpoints.c.run_id == self.run_id).order_by(checkpoints.c.version)).mappings().all()
        return [dict(r) for r in rows]

    def load_checkpoint(self, version: int | None = None) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        """(version, params, state) of a checkpoint (default: the latest), checked against its hash."""
        rows = self.checkpoint_rows()
        if version is not None:
            rows = [r for r in rows if r["version"] == version]
        if not rows:
            raise StoreError(f"run {self.run_id} has no checkpoint" + (f" for version {version}" if version is not None else ""))
        row = rows[-1]
        path = self.run_dir / row["path"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"checkpoint v{row['version']} of run {self.run_id} is missing: {path} (the run store records it; "
                "put the file back to resume from it or export it)"
            ) from None
        except OSError as exc:
            raise StoreError(f"checkpoint v{row['version']} of run {self.run_id}: cannot read {path}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise StoreError(f"checkpoint {path} does not match its recorded sha256 (corrupted)")
        tensors = _safetensors.load_file(str(path))
        state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
        return row["version"], tensors["params"], state


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run under `root`, newest first, with its status and headline numbers."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir(), reverse=True):
        if not (d / "config.toml").is_file():
            continue
        try:
            info = RunStore.open(d).info()
        except Exception as exc:  # a broken run directory is listed, not fatal
            out.append({"run_id": d.name, "status": f"unreadable ({exc})", "run_dir": str(d)})
            continue
        summary = info.get("summary") or {}
        out.append({
            "run_id": info["run_id"], "name": info.get("name"), "status": info["status"],
            "created_at": info["created_at"], "rounds_done": info["rounds_done"],
            "final_accuracy": summary.get("final_accuracy"), "run_dir": str(d),
        })
    return out

