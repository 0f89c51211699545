"""The run store: a run directory with a database (SQLite by default, any
SQLAlchemy URL such as PostgreSQL) and model checkpoints as safetensors.

Crash safety: a checkpoint file is written to a temporary name, fsynced and
renamed before the database row that names it is committed; the round record,
the checkpoint row and the run's progress are one transaction.  A crash leaves
either the whole round or none of it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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
    select,
    update,
)
from sqlalchemy.engine import Engine

from ..records import RoundRecord

DB_NAME = "run.db"
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


class StoreError(RuntimeError):
    pass


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _finite(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else float(x)


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class RunStore:
    """One run: its directory, its database rows and its checkpoints."""

    def __init__(self, run_dir: Path, run_id: str, engine: Engine):
        self.run_dir = run_dir
        self.run_id = run_id
        self.engine = engine
        self._config_hash: str | None = None

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
    def _engine(run_dir: Path, url: str | None) -> Engine:
        url = url or f"sqlite:///{(run_dir / DB_NAME).resolve()}"
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

        try:
            shown = make_url(url).render_as_string(hide_password=True)
        except ArgumentError:
            raise StoreError(f"store URL {url!r} is not an SQLAlchemy URL (e.g. postgresql://user@host:5432/db)") from None
        try:
            engine = create_engine(url, future=True)
            metadata.create_all(engine)
        except NoSuchModuleError as exc:
            raise StoreError(f"store URL {shown}: {exc}") from None
        except ImportError as exc:
            hint = " (pip install 'fleetlearn[postgres]')" if shown.startswith("postgresql") else ""
            raise StoreError(f"store URL {shown}: its database driver is not installed: {exc}{hint}") from None
        except SQLAlchemyError as exc:
            first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0]
            raise StoreError(f"cannot open the run store at {shown}: {first}") from None
        return engine

    @classmethod
    def create(cls, root: str | Path, config_toml: str, config_hash: str, name: str | None = None, url: str | None = None, run_id: str | None = None) -> "RunStore":
        run_id = run_id or new_run_id()
        run_dir = Path(root) / run_id
        if run_dir.exists():
            raise StoreError(f"run directory already exists: {run_dir}")
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.toml").write_text(config_toml)
        if url:
            # Never a password on disk: resume supplies it again (--store, PGPASSWORD or ~/.pgpass).
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                kept = make_url(url).set(password=None).render_as_string(hide_password=False)
            except ArgumentError:
                kept = url  # refused with a clear error just below
            (run_dir / "store_url").write_text(kept)
        try:
            store = cls(run_dir, run_id, cls._engine(run_dir, url))
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
    def open(cls, run: str | Path, root: str | Path = "runs", url: str | None = None) -> "RunStore":
        """Open a run by directory path or by id under `root`.  Its database is the URL
        the run recorded in `store_url` (or `url` if given), else its SQLite file."""
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
        return cls(run_dir, run_dir.name, cls._engine(run_dir, url))

    # -- writing -----------------------------------------------------------------
    def _write_checkpoint(self, version: int, params: torch.Tensor, state: dict[str, torch.Tensor] | None, meta: dict[str, str] | None) -> tuple[str, str]:
        tensors = {"params": params.detach().to("cpu").contiguous()}
        for k, v in (state or {}).items():
            tensors[f"state/{k}"] = v.detach().to("cpu").contiguous()
        rel = f"checkpoints/v{version:06d}.safetensors"
        path = self.run_dir / rel
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return rel, digest

    def commit_round(
        self, record: RoundRecord, params: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None,
        meta: dict[str, str] | None = None, privacy: dict[str, Any] | None = None,
    ) -> None:
        """Record a round (and, if `params` is given, its checkpoint; if `privacy` is given,
        the privacy ledger after it) atomically."""
        ckpt = self._write_checkpoint(record.version, params, state, meta) if params is not None else None
        row = record.to_dict()
        config_hash = self.config_hash  # read before the write transaction
        with self.engine.begin() as conn:
            conn.execute(
                rounds.insert().values(
                    run_id=self.run_id, round=record.round, version=record.version, status=record.status,
                    accuracy=_finite(record.accuracy), loss=_finite(record.loss),
                    uplink_bytes=record.uplink_bytes, downlink_bytes=record.downlink_bytes,
                    sim_seconds=record.sim_seconds, wall_seconds=record.wall_seconds, record=row,
                )
            )
            if ckpt is not None:
                conn.execute(checkpoints.delete().where(checkpoints.c.run_id == self.run_id, checkpoints.c.version == record.version))
                conn.execute(
                    checkpoints.insert().values(
                        run_id=self.run_id, version=record.version, round=record.round,
                        path=ckpt[0], sha256=ckpt[1], created_at=_now(),
                    )
                )
            if privacy is not None:  # only the latest is ever resumed from (the ledger is cumulative)
                conn.execute(privacy_ledger.delete().where(privacy_ledger.c.run_id == self.run_id))
                conn.execute(privacy_ledger.insert().values(run_id=self.run_id, round=record.round, state=json.loads(json.dumps(privacy))))
            conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(rounds_done=record.round))
            from .registry import register_round

            register_round(conn, self.run_id, record, config_hash)

    def save_checkpoint(self, version: int, round: int, params: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> None:
        rel, digest = self._write_checkpoint(version, params, state, None)
        with self.engine.begin() as conn:
            conn.execute(checkpoints.delete().where(checkpoints.c.run_id == self.run_id, checkpoints.c.version == version))
            conn.execute(checkpoints.insert().values(run_id=self.run_id, version=version, round=round, path=rel, sha256=digest, created_at=_now()))

    # -- per-client state (error-feedback residuals, SCAFFOLD c_i) -----------------------
    def write_client_states(self, round: int, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        """Write the clients' state tensors crash-safely (temporary name, fsync, rename) to
        ``checkpoints/clients-r<round>.safetensors``; returns the metadata that the round's
        model checkpoint carries to name it (path and sha256).  Written before the round's
        transaction commits, so a committed checkpoint never names a missing file."""
        rel = f"checkpoints/clients-r{round:06d}.safetensors"
        path = self.run_dir / rel
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
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

        with safe_open(str(self.run_dir / rows[-1]["path"]), framework="pt") as fh:
            meta = fh.metadata() or {}
        rel = meta.get(CLIENT_STATES)
        if not rel:
            return {}
        path = self.run_dir / rel
        if not path.is_file():
            raise StoreError(f"checkpoint v{rows[-1]['version']} names client states {path}, which is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get(CLIENT_STATES_SHA):
            raise StoreError(f"client states {path} do not match the sha256 their checkpoint recorded (corrupted)")
        return load_file(str(path))

    def finish(self, summary: dict[str, Any], status: str = "finished") -> None:
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.run_id == self.run_id).values(status=status, summary=json.loads(json.dumps(summary, default=str))))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON side file in the run directory (e.g. the data's heterogeneity statistics)."""
        (self.run_dir / name).write_text(json.dumps(obj, indent=1, default=str))

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

    def privacy_state(self, round: int) -> dict[str, Any] | None:
        """The privacy ledger committed with `round`, or None if that round has none."""
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
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise StoreError(f"checkpoint {path} does not match its recorded sha256 (corrupted)")
        tensors = load_file(str(path))
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


# The model registry's tables join `metadata`, so `create_all` adds them, also to older stores.
from . import registry as _registry  # noqa: E402,F401  (registry imports this module: it goes last)
