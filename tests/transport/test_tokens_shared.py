"""Client tokens shared through the run store's database (issue 18, item 1): `--state
postgresql://...` puts the token table in PostgreSQL, so a leader, its standby and `fleetlearn
token` on any host use one table; a change by one process is seen by the others on their next
check.  Also the SQLite file's behaviour through the same code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from postgres_server import fresh_database

from fleetlearn.transport.grpc.auth import TokenError, TokenStore


@pytest.fixture
def db(postgres_url):
    return fresh_database(postgres_url, "tok")


def test_two_handles_on_one_database_see_each_others_changes(db):
    a, b = TokenStore.open(db), TokenStore.open(db)
    try:
        tok = a.add("site-1")
        assert b.check(tok).status == "ok" and b.check(tok).client_id == a.client_id("site-1")  # added elsewhere: seen now
        assert a.revoke("site-1")
        assert b.check(tok).status == "revoked"  # the next check after another process's revoke refuses it
        new = b.add("site-1")  # re-activated with a new token, same client id
        assert a.check(new).status == "ok" and a.check(tok).status == "unknown"
        assert [t.name for t in a.list()] == ["site-1"]
    finally:
        a.close()
        b.close()


def test_a_failed_batch_writes_nothing_and_nothing_in_clear_is_stored(db):
    with TokenStore.open(db) as s:
        tok = s.add("site-1")
        with pytest.raises(TokenError, match="already has an active token"):
            s.add_many(["site-2", "site-1"])  # the second name fails: the first is not kept either
        assert [t.name for t in s.list()] == ["site-1"]
    eng = sa.create_engine(db)
    with eng.connect() as c:
        stored = " ".join(str(v) for row in c.exec_driver_sql("select * from tokens").all() for v in row)
    eng.dispose()
    assert tok not in stored  # hashed at rest


def test_the_token_command_writes_to_the_database(db):
    p = subprocess.run([sys.executable, "-m", "fleetlearn", "token", "add", "site-7", "--state", db], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with TokenStore.open(db) as s:
        assert s.verify(p.stdout.strip()) == "site-7"


def test_a_bad_url_and_an_unreachable_database_are_refused_naming_them(tmp_path):
    with pytest.raises(TokenError, match="not a database URL"):
        TokenStore.open("://no-scheme")
    with pytest.raises(TokenError, match=r"cannot open the token store postgresql://fleet:\*\*\*@127.0.0.1:1/x: .*refused") as err:
        TokenStore.open("postgresql://fleet:secret@127.0.0.1:1/x")
    assert "secret" not in str(err.value)


def test_the_sqlite_file_counts_changes_across_handles(tmp_path):
    a, b = TokenStore.open(tmp_path), TokenStore.open(tmp_path)
    try:
        tok = a.add("x")
        assert b.verify(tok) == "x"
        a.revoke("x")
        assert b.verify(tok) is None
        assert (tmp_path / "tokens.db").stat().st_mode & 0o077 == 0  # owner only
    finally:
        a.close()
        b.close()
