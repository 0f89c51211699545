"""Per-client tokens, stored hashed: in a small SQLite file in the server's state folder
(``--state DIR``: ``DIR/tokens.db``), or in a database given by URL (``--state
postgresql://...``: the run store's database, so that a leader and its standby, and
`fleetlearn token` anywhere, share one token table).

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

The server and the ``fleetlearn token`` command may use the same store at the same
time: every change also bumps a counter (``token_epoch``) in its transaction, and each
check reads that counter first and reloads the hash index when it moved, so a revocation
takes effect on the next call, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

TOKEN_DB = "tokens.db"
_HASH_PREFIX = b"fleetlearn-token-v1:"
MAX_NAME_CHARS = 200


def _tables():
    import sqlalchemy as sa

    md = sa.MetaData()
    tokens = sa.Table(
        "tokens", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("token_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("revoked_at", sa.Text),
        sqlite_autoincrement=True,  # ids are never reused (as the first tokens.db files had them)
    )
    epoch = sa.Table("token_epoch", md, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                     sa.Column("n", sa.BigInteger, nullable=False))
    return md, tokens, epoch


def _is_url(where: str | Path) -> bool:
    return isinstance(where, str) and "://" in where


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

    def __init__(self, where: str | Path):
        """`where`: the SQLite file, or a database URL (``postgresql://...``, ``sqlite:///...``)."""
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url

        self._sa = sa
        self._md, self._tokens, self._epoch = _tables()
        if _is_url(where):
            try:
                url = make_url(str(where))
            except sa.exc.ArgumentError:
                raise TokenError(f"token store {where!r} is not a database URL (e.g. postgresql://user@host:5432/db)") from None
            self.path = None
            self.where = url.render_as_string(hide_password=True)
            engine_url, fresh = url, False
        else:
            self.path = Path(where)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self.where = str(self.path)
            engine_url = f"sqlite:///{self.path.resolve()}"
        self._lock = threading.Lock()
        try:
            self._engine = sa.create_engine(engine_url, future=True, pool_pre_ping=self.path is None,
                                            connect_args={"check_same_thread": False, "timeout": 30.0} if self.path else {})
            if self.path is not None:
                with self._engine.connect() as c:
                    c.exec_driver_sql("PRAGMA journal_mode=WAL")
                if fresh:
                    os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them
            self._md.create_all(self._engine)
            with self._engine.begin() as c:
                if c.execute(sa.select(self._epoch.c.n).where(self._epoch.c.id == 1)).first() is None:
                    c.execute(self._epoch.insert().values(id=1, n=0))
        except sa.exc.IntegrityError:  # another process created the counter a moment ago
            pass
        except ImportError as exc:
            raise TokenError(f"token store {self.where}: its database driver is not installed: {exc}") from None
        except sa.exc.SQLAlchemyError as exc:
            raise TokenError(f"cannot open the token store {self.where}: {str(exc.orig if getattr(exc, 'orig', None) else exc).strip()}") from None
        self._by_hash: dict[str, TokenInfo] = {}
        self._seen_epoch = -1
        self._refresh(force=True)

    @classmethod
    def open(cls, state: str | Path) -> "TokenStore":
        """The token store of a server state folder (``<state>/tokens.db``), or of the database
        at `state` when it is a URL (``postgresql://...``: the run store's database)."""
        return cls(state) if _is_url(state) else cls(Path(state) / TOKEN_DB)

    def close(self) -> None:
        with self._lock:
            self._engine.dispose()

    def __enter__(self) -> "TokenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cache -------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        """Reload the hash index when the change counter moved (a commit by this or another
        process) or when `force`d."""
        sa, t = self._sa, self._tokens
        with self._engine.connect() as conn:  # one read transaction: the counter and the rows agree
            epoch = conn.execute(sa.select(self._epoch.c.n).where(self._epoch.c.id == 1)).scalar()
            if epoch == self._seen_epoch and not force:
                return
            rows = conn.execute(sa.select(t.c.id, t.c.name, t.c.token_sha256, t.c.created_at, t.c.revoked_at)).all()
        self._by_hash = {h: TokenInfo(i, n, c, r, h) for i, n, h, c, r in rows}
        self._seen_epoch = epoch

    def _bump(self, conn) -> None:  # noqa: ANN001
        conn.execute(self._epoch.update().where(self._epoch.c.id == 1).values(n=self._epoch.c.n + 1))

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
        sa, t = self._sa, self._tokens
        with self._lock:
            with self._engine.begin() as conn:  # one transaction
                self._bump(conn)  # first: takes the write lock (SQLite) / the counter's row lock (PostgreSQL)
                for name in names:
                    row = conn.execute(sa.select(t.c.revoked_at).where(t.c.name == name)).first()
                    token = new_token()
                    digest = hash_token(token)
                    if row is None:
                        conn.execute(t.insert().values(name=name, token_sha256=digest, created_at=_now()))
                    elif row[0] is None and not rotate:
                        raise TokenError(f"client {name!r} already has an active token; revoke it first or rotate it")
                    else:
                        conn.execute(t.update().where(t.c.name == name).values(token_sha256=digest, created_at=_now(), revoked_at=None))
                    out[name] = token
            self._refresh(force=True)
        return out

    def revoke(self, name: str) -> bool:
        """Revoke `name`'s token; False if it had no active token."""
        t = self._tokens
        with self._lock:
            with self._engine.begin() as conn:
                self._bump(conn)
                n = conn.execute(t.update().where(t.c.name == name, t.c.revoked_at.is_(None)).values(revoked_at=_now())).rowcount
            self._refresh(force=True)
            return n > 0

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
        t = self._tokens
        with self._lock, self._engine.connect() as conn:
            row = conn.execute(self._sa.select(t.c.id).where(t.c.name == name)).first()
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



# -- the `fleetlearn token` commands (light: no torch, no server) --------------------------
def token_add(state_dir: str | Path, name: str, rotate: bool = False) -> str:
    """`fleetlearn token add NAME [--state DIR] [--rotate]`: print the returned token once."""
    with TokenStore.open(state_dir) as store:
        return store.add(name, rotate=rotate)


def token_revoke(state_dir: str | Path, name: str) -> bool:
    """`fleetlearn token revoke NAME`: False if NAME had no active token."""
    with TokenStore.open(state_dir) as store:
        return store.revoke(name)


def token_list(state_dir: str | Path) -> list[TokenInfo]:
    """`fleetlearn token list`: names, client ids, created / revoked (never tokens: they are not stored)."""
    with TokenStore.open(state_dir) as store:
        return store.list()
