"""Crash-safe file writes, shared by the run store and the certificate tool."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and call (two writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` crash-safely: a new temporary file in the same folder
    (O_EXCL: never an existing file, whatever its mode), fsynced, renamed over `path`, and
    the folder fsynced.  A reader sees the old file or the new one, never a truncated or
    half-written one.  `mode` (e.g. 0o600 for a private key) is set on the new file
    before anything is written, whatever the umask."""
    path = Path(path)
    tmp = tmp_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
