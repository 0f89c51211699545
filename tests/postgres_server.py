"""A throwaway PostgreSQL server on 127.0.0.1 for the store tests.

Uses Debian's `postgresql` binaries (`.ci/run` installs the package when it is
missing): `initdb` a cluster in a temporary directory with trust authentication
on loopback only, `pg_ctl start` it on a free port, yield its SQLAlchemy URL,
and stop it (`-m immediate`) afterwards.  PostgreSQL refuses to run as root, so
under root the cluster belongs to the `postgres` system user (`runuser`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def unavailable_reason() -> str | None:
    """Why no server can be started here (None: it can)."""
    if _bindir() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _uid("postgres") is None):
        return "running as root without a 'postgres' user to own the cluster (PostgreSQL refuses root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is missing: pip install 'fleetlearn[postgres]'"
    return None


def _uid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(user: str = "fleetlearn") -> Iterator[str]:
    """Start a server; yields ``postgresql://USER@127.0.0.1:PORT/postgres``."""
    bindir = _bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="fleetlearn-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        uid = _uid("postgres")
        for p in (root, sock):
            os.chown(p, uid, -1)
        prefix = ["runuser", "-u", "postgres", "--"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    port = _free_port()

    def run(*cmd: str) -> None:
        p = subprocess.run(prefix + list(cmd), capture_output=True, text=True, env=env, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "--no-sync", "-E", "UTF8")
        opts = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c full_page_writes=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
        try:
            yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, env=env, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, prefix: str = "t") -> str:
    """A new, empty database on the server at `url` (a test's own tables); returns its URL."""
    import uuid

    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        eng.dispose()
    return url.rsplit("/", 1)[0] + "/" + name
