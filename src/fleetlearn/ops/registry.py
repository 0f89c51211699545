"""The model registry: every model version of a run, its lineage and its tags.

Two tables added beside the run store's (``metadata.create_all`` adds them to an
existing store, whose older rows stay readable):

- ``model_versions``: one row per version a run produced: the round, the parent
  version it was computed from, the hash of the configuration that trained it,
  its status (``committed`` or ``rolled_back``), the arm that trained it
  (``production``, ``canary`` or ``shadow``) and its metrics.  The store writes
  it in the same transaction as the round (`RunStore.commit_round`); a canary
  rollout registers its candidate's versions itself.
- ``model_tags``: tag history.  A tag is ``candidate``, ``canary``, ``production``
  or ``rolled_back``; removing one keeps its row (``removed_at``), so the
  previous production version is known and ``rollback`` can go back to it.
  ``production`` is held by at most one version at a time; ``rolled_back``
  takes ``production`` away.

A store written before the registry existed has no ``model_versions`` rows: its
versions are derived on read from the round records (lineage, metrics, the
run's config hash).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Column, DateTime, Float, Integer, String, Text, and_, select, update
from sqlalchemy.engine import Connection

from ..records import RoundRecord
from .store import ROUND_WRITERS, RunStore, StoreError, Table, _finite, _now, _safetensors, _tmp_path, _where, metadata

if TYPE_CHECKING:
    import torch

TAGS = ("candidate", "canary", "production", "rolled_back")
EXCLUSIVE_TAGS = ("production",)  # held by one version at a time
ARMS = ("production", "canary", "shadow")
PARAM_SPEC_FILE = "param_spec.json"  # names and shapes of the flat vector (written by the factory)

model_versions = Table(
    "model_versions",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("round", Integer, nullable=False),
    Column("parent_version", Integer, nullable=False),
    Column("config_hash", String(32), nullable=False),
    Column("status", String(20), nullable=False),  # committed | rolled_back
    Column("arm", String(20), nullable=False),  # production | canary | shadow
    Column("accuracy", Float),
    Column("loss", Float),
    Column("metrics", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

model_tags = Table(
    "model_tags",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("tag", String(20), nullable=False),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
)

_METRIC_KEYS = ("accuracy", "loss", "fed_accuracy", "train_loss_after", "local_accuracy", "accepted", "selected", "uplink_bytes")


@dataclass
class ModelVersion:
    version: int
    round: int
    parent_version: int
    config_hash: str
    status: str
    arm: str
    accuracy: float = math.nan
    loss: float = math.nan
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    has_checkpoint: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["accuracy"], d["loss"] = _finite(self.accuracy), _finite(self.loss)
        return d


def _metrics(record: RoundRecord) -> dict[str, Any]:
    return {k: (_finite(v) if isinstance(v, float) else v) for k in _METRIC_KEYS for v in [getattr(record, k)]}


def _num(x: Any) -> float | None:
    return _finite(float(x)) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def version_rows_of(record: RoundRecord, config_hash: str, arm: str = "production") -> list[dict[str, Any]]:
    """The ``model_versions`` rows a round record implies: its new version if it
    committed one, the version it rejected if it was rolled back."""
    if record.status == "ok" and record.parent_version >= 0:
        return [dict(version=record.version, round=record.round, parent_version=record.parent_version, config_hash=config_hash,
                     status="committed", arm=arm, accuracy=_finite(record.accuracy), loss=_finite(record.loss), metrics=_metrics(record))]
    rejected = record.extra.get("rejected_version")
    if record.status == "rolled_back" and isinstance(rejected, int):
        m = _metrics(record)
        m.update(accuracy=_num(record.extra.get("rejected_accuracy")), loss=_num(record.extra.get("rejected_loss")), restored_version=record.version)
        return [dict(version=rejected, round=record.round, parent_version=record.parent_version, config_hash=config_hash,
                     status="rolled_back", arm=arm, accuracy=m["accuracy"], loss=m["loss"], metrics=m)]
    return []


def register_round(conn: Connection, run_id: str, record: RoundRecord, config_hash: str, arm: str = "production") -> None:
    """Inside the store's round transaction: the round's version rows and, for a
    rolled-back round, the automatic ``rolled_back`` tag."""
    for row in version_rows_of(record, config_hash, arm):
        conn.execute(model_versions.delete().where(model_versions.c.run_id == run_id, model_versions.c.version == row["version"]))
        conn.execute(model_versions.insert().values(run_id=run_id, created_at=_now(), **row))
        if row["status"] == "rolled_back":
            _set_tag(conn, run_id, row["version"], "rolled_back", record.reason or "rolled back")


ROUND_WRITERS.append(register_round)  # the store calls it inside every round's transaction


def _active(conn: Connection, run_id: str, tag: str | None = None, version: int | None = None) -> list[dict[str, Any]]:
    q = select(model_tags).where(model_tags.c.run_id == run_id, model_tags.c.removed_at.is_(None))
    if tag is not None:
        q = q.where(model_tags.c.tag == tag)
    if version is not None:
        q = q.where(model_tags.c.version == version)
    return [dict(r) for r in conn.execute(q.order_by(model_tags.c.id)).mappings().all()]


def _remove(conn: Connection, run_id: str, tag: str, version: int | None = None) -> None:
    cond = [model_tags.c.run_id == run_id, model_tags.c.tag == tag, model_tags.c.removed_at.is_(None)]
    if version is not None:
        cond.append(model_tags.c.version == version)
    conn.execute(update(model_tags).where(and_(*cond)).values(removed_at=_now()))


def _set_tag(conn: Connection, run_id: str, version: int, tag: str, reason: str) -> None:
    if tag not in TAGS:
        raise StoreError(f"unknown tag {tag!r}; allowed: {', '.join(TAGS)}")
    if _active(conn, run_id, tag, version):
        return
    if tag in EXCLUSIVE_TAGS:
        _remove(conn, run_id, tag)
    if tag == "rolled_back":
        _remove(conn, run_id, "production", version)
    conn.execute(model_tags.insert().values(run_id=run_id, version=version, tag=tag, reason=reason, created_at=_now()))


class ModelRegistry:
    """The versions and tags of one run (see the module docstring)."""

    def __init__(self, store: RunStore):
        self.store = store
        self.run_id = store.run_id

    # -- reading --------------------------------------------------------------------
    def _legacy_read_only(self) -> bool:
        """A store written before the registry, opened read-only: its tables could not be
        added, so it has no registry rows (versions are derived, there are no tags)."""
        return self.store._missing(model_versions) or self.store._missing(model_tags)

    def _writable(self) -> None:
        if self._legacy_read_only():
            raise StoreError(f"run store {_where(self.store.engine)} is read-only and predates the model registry (its tables "
                             "could not be added): tagging a version needs write access to it")

    def versions(self) -> list[ModelVersion]:
        if self._legacy_read_only():
            rows, tags = [], []
        else:
            with self.store.engine.connect() as conn:
                rows = conn.execute(select(model_versions).where(model_versions.c.run_id == self.run_id).order_by(model_versions.c.version)).mappings().all()
                tags = _active(conn, self.run_id)
        by_version: dict[int, ModelVersion] = {}
        if not rows:
            by_version = self._derived()
        for r in rows:
            by_version[r["version"]] = ModelVersion(
                r["version"], r["round"], r["parent_version"], r["config_hash"], r["status"], r["arm"],
                math.nan if r["accuracy"] is None else r["accuracy"], math.nan if r["loss"] is None else r["loss"], dict(r["metrics"] or {}),
            )
        ckpts = {c["version"] for c in self.store.checkpoint_rows()}
        for v in by_version.values():
            v.has_checkpoint = v.version in ckpts
        for t in tags:
            if t["version"] in by_version:
                by_version[t["version"]].tags.append(t["tag"])
        return [by_version[k] for k in sorted(by_version)]

    def _derived(self) -> dict[int, ModelVersion]:
        """Versions of a store written before the registry: from its round records."""
        run_hash = self.store.config_hash
        out = {}
        for rec in self.store.records():
            for row in version_rows_of(rec, run_hash):
                out[row["version"]] = ModelVersion(
                    row["version"], row["round"], row["parent_version"], row["config_hash"], row["status"], row["arm"],
                    math.nan if row["accuracy"] is None else row["accuracy"], math.nan if row["loss"] is None else row["loss"], row["metrics"],
                )
        return out

    def get(self, version: int) -> ModelVersion:
        for v in self.versions():
            if v.version == version:
                return v
        raise StoreError(f"run {self.run_id} has no model version {version}")

    def lineage(self, version: int) -> list[int]:
        """`version` and its ancestors, newest first (0 is the initial model)."""
        parents = {v.version: v.parent_version for v in self.versions()}
        chain, v = [version], parents.get(version, -1)
        while v >= 0 and v not in chain:
            chain.append(v)
            v = parents.get(v, -1)
        return chain

    def tag_history(self) -> list[dict[str, Any]]:
        if self._legacy_read_only():
            return []
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(model_tags).where(model_tags.c.run_id == self.run_id).order_by(model_tags.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def production(self) -> int | None:
        if self._legacy_read_only():
            return None
        with self.store.engine.connect() as conn:
            rows = _active(conn, self.run_id, "production")
        return rows[-1]["version"] if rows else None

    # -- writing ----------------------------------------------------------------------
    def register(self, record: RoundRecord, config_hash: str, arm: str, params: torch.Tensor | None = None, state: dict | None = None) -> None:
        """Record a version trained outside the production round loop (a canary's or a
        shadow run's round), with its checkpoint when `params` is given."""
        if arm not in ARMS:
            raise StoreError(f"unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
        if params is not None and record.status == "ok":
            self.store.save_checkpoint(record.version, record.round, params, state)
        with self.store.engine.begin() as conn:
            register_round(conn, self.run_id, record, config_hash, arm)

    def tag(self, version: int, tag: str, reason: str = "") -> None:
        self._writable()
        self._known(version)
        if tag == "production" and self._has(version, "rolled_back"):
            raise StoreError(f"version {version} was rolled back; remove its rolled_back tag before promoting it")
        with self.store.engine.begin() as conn:
            _set_tag(conn, self.run_id, version, tag, reason)

    def untag(self, version: int, tag: str) -> None:
        self._writable()
        self._known(version)
        with self.store.engine.begin() as conn:
            if not _active(conn, self.run_id, tag, version):
                raise StoreError(f"version {version} has no {tag!r} tag")
            _remove(conn, self.run_id, tag, version)

    def promote(self, version: int, reason: str = "promoted") -> int | None:
        """Tag `version` production; returns the version that held it before (or None)."""
        before = self.production()
        self.tag(version, "production", reason)
        return before

    def rollback(self, to: int | None = None, reason: str = "rolled back") -> tuple[int, int]:
        """Take production away from the current version (tagged rolled_back) and give it
        to `to`, by default the version that held it before.  Returns (from, to)."""
        self._writable()
        current = self.production()
        if current is None:
            raise StoreError(f"run {self.run_id}: no version is tagged production, nothing to roll back")
        if to is None:
            rolled = {v.version for v in self.versions() if "rolled_back" in v.tags}
            earlier = [t["version"] for t in self.tag_history() if t["tag"] == "production" and t["version"] != current and t["version"] not in rolled]
            if not earlier:
                raise StoreError(f"run {self.run_id}: version {current} is the first production version; give the version to roll back to")
            to = earlier[-1]
        if to == current:
            raise StoreError(f"version {to} is already production")
        target = self.get(to)
        if "rolled_back" in target.tags:
            raise StoreError(f"version {to} was rolled back itself; choose another version")
        with self.store.engine.begin() as conn:
            _set_tag(conn, self.run_id, current, "rolled_back", reason)
            _set_tag(conn, self.run_id, to, "production", f"{reason} (from version {current})")
        return current, to

    def export(self, version: int | None, path: str | Path) -> Path:
        """Write `version` (default: production, else the latest checkpoint) as a
        safetensors file of named tensors (flat ``params`` when the run kept no
        parameter spec), with the version's lineage and metrics as metadata."""
        if version is None:
            version = self.production()
        if version is None:
            ckpts = self.store.checkpoint_rows()
            if not ckpts:
                raise StoreError(f"run {self.run_id} has no checkpoint to export")
            version = ckpts[-1]["version"]
        info = self.get(version) if any(v.version == version for v in self.versions()) else None
        _, params, _ = self.store.load_checkpoint(version)
        tensors = {"params": params}
        spec_file = self.store.run_dir / PARAM_SPEC_FILE
        spec_json = ""
        if spec_file.is_file():
            from ..params import ParamSpec

            spec = ParamSpec.from_json(spec_file.read_text())
            if spec.dim == params.numel():
                tensors = {k: v.contiguous().clone() for k, v in spec.split(params).items()}
                spec_json = spec.to_json()
        meta = {
            "format": "fleetlearn-model",
            "run_id": self.run_id,
            "version": str(version),
            "config_hash": info.config_hash if info else self.store.config_hash,
            "round": str(info.round) if info else "",
            "parent_version": str(info.parent_version) if info else "",
            "lineage": json.dumps(self.lineage(version)),
            "tags": json.dumps(info.tags if info else []),
            "metrics": json.dumps(info.to_dict()["metrics"] if info else {}, default=str),
            "param_spec": spec_json,
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(out)  # unique: two exports to one file never share a temporary
        try:
            _safetensors.save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    def _has(self, version: int, tag: str) -> bool:
        if self._legacy_read_only():
            return False
        with self.store.engine.connect() as conn:
            return bool(_active(conn, self.run_id, tag, version))

    def _known(self, version: int) -> None:
        row = None
        if not self._legacy_read_only():
            with self.store.engine.connect() as conn:  # one indexed lookup; the full scan only for older stores
                row = conn.execute(select(model_versions.c.version).where(model_versions.c.run_id == self.run_id, model_versions.c.version == version)).first()
        if row is None and not any(v.version == version for v in self.versions()):
            raise StoreError(f"run {self.run_id} has no model version {version}")
