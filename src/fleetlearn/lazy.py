"""A module imported on its first attribute access.

Heavy optional dependencies (dp-accounting pulls in scipy: about 3 s of imports) are bound at
module level as ``lazy_module("name")`` so that a process which never uses them (a client, a
``fleetlearn token`` command, a run without DP) never pays for the import, while the code that
does use them reads as if they were imported normally.  A missing package still fails loudly:
on first use, with Python's own ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any

_LOCK = threading.Lock()


class LazyModule:
    """Stands for module ``name``; the first attribute read imports it (once, thread-safe)."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        module = self._module
        if module is None:
            with _LOCK:
                if self._module is None:
                    self._module = importlib.import_module(self._name)
                module = self._module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> Any:
    """``name`` as a :class:`LazyModule` (typed ``Any`` so attribute use type-checks as usual)."""
    return LazyModule(name)
