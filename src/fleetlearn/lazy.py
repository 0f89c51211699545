"""A module imported on its first attribute access, and a package's names imported on first use.

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
from typing import Any, Callable

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


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``(__getattr__, __dir__)``: each of `names` is imported on first use
    from the module it maps to (relative to `package`), and any other public attribute is
    tried as a subpackage or submodule (``import fleetlearn; fleetlearn.parts...``).  The value
    is then stored in `namespace` (the package's ``globals()``), so later lookups are plain.
    Used where importing the package must not import torch (the CLI's light commands)."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif not name.startswith("_"):
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # once: later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *names])

    return __getattr__, __dir__
