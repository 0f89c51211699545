"""Per-client tokens, stored hashed in a small SQLite file in the server's state dir.

A token is 32 random bytes (``secrets.token_urlsafe(32)``, 256 bits), drawn again
when it would start with "-" (`new_token`): ``fleetlearn client --token -x...`` reads
such a token as an option, so one client in 64 could not start.  The store
keeps only ``sha256("fleetlearn-token-v1:" + token)``: with that much entropy a
fast hash is enough (nobody can enumerate the token space, so a slow KDF such as
scrypt would only cost CPU on every call of a 1000-client fleet and buy nothing).

Each name gets a stable integer id when it is first added; that id is the client
id the Coordinator sees, so a client keeps its id across server restarts and
token rotations.  Revoking keeps the row (and the hash) so a revoked token is
refused as *revoked*, not as unknown.

The server and the ``fleetlearn token`` command may use the same file at the same
time: the server notices another process's commits (SQLite's ``data_version``) and
reloads, so a revocation takes effect on the next call.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

TOKEN_DB = "tokens.db"
_HASH_PREFIX = b"fleetlearn-token-v1:"
MAX_NAME_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)
"""


class TokenError(ValueError):
    """A token operation that cannot be done (bad name, name already has a token, ...)."""


@dataclass(frozen=True)
class TokenCheck:
    """What a presented token is: ``ok`` (with its client), ``revoked`` or ``unknown``."""

    status: Literal["ok", "revoked", "unknown"]
    name: str | None = None
    client_id: int | None = None


@dataclass(frozen=True)
class TokenInfo:
    client_id: int
    name: str
    created_at: str
    revoked_at: str | None
    token_sha256: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_token(token: str) -> str:
    """The stored form of a token: hex sha256 of a domain prefix and the token."""
    return hashlib.sha256(_HASH_PREFIX + token.encode("utf-8")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TokenError("a client name must be a non-empty string")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise TokenError(f"client name has {len(name)} characters; at most {MAX_NAME_CHARS}")
    if any(ord(ch) < 32 for ch in name):
        raise TokenError(f"client name {name!r} contains control characters")
    return name


def new_token() -> str:
    """32 random bytes, URL-safe base64, never starting with "-" (command lines read that
    as an option).  Redrawing drops 1/64 of the space: under 0.03 bits of 256."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


class TokenStore:
    """Issue, verify and revoke per-client tokens (hashed at rest).

        store = TokenStore.open(state_dir)
        token = store.add("phone-17")        # give this to the client, once
        store.verify(token)                  # -> "phone-17"
        store.revoke("phone-17")
        store.verify(token)                  # -> None
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._lock = threading.Lock()
        # One connection shared by the server's threads, serialised by the lock.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        if fresh:
            os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(_SCHEMA)
        self._by_hash: dict[str, TokenInfo] = {}
        self._data_version = -1
        self._refresh(force=True)

    @classmethod
    def open(cls, state_dir: str | Path) -> "TokenStore":
        """The token store of a server state directory (``<state_dir>/tokens.db``)."""
        return cls(Path(state_dir) / TOKEN_DB)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "TokenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cache -------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        """Reload the hash index if another connection (e.g. another process) committed,
        or after this connection's own writes (`force`), which data_version does not count."""
        (version,) = self._conn.execute("PRAGMA data_version").fetchone()
        if version == self._data_version and not force:
            return
        rows = self._conn.execute("SELECT id, name, token_sha256, created_at, revoked_at FROM tokens").fetchall()
        self._by_hash = {h: TokenInfo(i, n, c, r, h) for i, n, h, c, r in rows}
        self._data_version = version

    # -- issuing -----------------------------------------------------------------
    def add(self, name: str, *, rotate: bool = False) -> str:
        """Issue a token for `name` and return it (the only time it exists in clear).

        A name that already holds an active token is an error unless ``rotate=True``;
        a revoked name is re-activated with a new token.  The client id stays the same.
        """
        return self.add_many([name], rotate=rotate)[name]

    def add_many(self, names: Iterable[str], *, rotate: bool = False) -> dict[str, str]:
        """`add` for many names in one transaction (provisioning a fleet)."""
        names = [_check_name(n) for n in names]
        if len(set(names)) != len(names):
            raise TokenError("duplicate names in one add_many call")
        out: dict[str, str] = {}
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for name in names:
                    row = self._conn.execute("SELECT revoked_at FROM tokens WHERE name = ?", (name,)).fetchone()
                    token = new_token()
                    digest = hash_token(token)
                    if row is None:
                        self._conn.execute(
                            "INSERT INTO tokens (name, token_sha256, created_at) VALUES (?, ?, ?)", (name, digest, _now())
                        )
                    elif row[0] is None and not rotate:
                        raise TokenError(f"client {name!r} already has an active token; revoke it first or rotate it")
                    else:
                        self._conn.execute(
                            "UPDATE tokens SET token_sha256 = ?, created_at = ?, revoked_at = NULL WHERE name = ?",
                            (digest, _now(), name),
                        )
                    out[name] = token
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._refresh(force=True)
        return out

    def revoke(self, name: str) -> bool:
        """Revoke `name`'s token; False if it had no active token."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (_now(), name)
            )
            self._refresh(force=True)
            return cur.rowcount > 0

    # -- checking ----------------------------------------------------------------
    def check(self, token: str | None) -> TokenCheck:
        """Classify a presented token.

        The lookup is by the token's sha256, so its timing depends on the hash,
        which an attacker cannot steer towards a stored one; the final comparison
        is `hmac.compare_digest` (constant time in the compared bytes).
        """
        if not token or not isinstance(token, str) or len(token) > 512:
            return TokenCheck("unknown")
        digest = hash_token(token)
        with self._lock:
            self._refresh()
            info = self._by_hash.get(digest)
        if info is None or not hmac.compare_digest(info.token_sha256, digest):
            return TokenCheck("unknown")
        if not info.active:
            return TokenCheck("revoked", info.name, info.client_id)
        return TokenCheck("ok", info.name, info.client_id)

    def verify(self, token: str | None) -> str | None:
        """The name `token` belongs to, or None if it is unknown or revoked."""
        c = self.check(token)
        return c.name if c.status == "ok" else None

    def client_id(self, name: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT id FROM tokens WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def list(self) -> list[TokenInfo]:
        """Every name ever added, active or revoked, by client id."""
        with self._lock:
            self._refresh()
            return sorted(self._by_hash.values(), key=lambda t: t.client_id)

    def active_ids(self) -> frozenset[int]:
        """Client ids whose token is currently valid."""
        with self._lock:
            self._refresh()
            return frozenset(t.client_id for t in self._by_hash.values() if t.active)

