"""Fixtures shared by every test folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from postgres_server import postgres_server, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 for the session (skips, saying why, where none can run)."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"\nPostgreSQL tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    with postgres_server() as url:
        yield url
