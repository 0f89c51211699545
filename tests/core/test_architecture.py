"""The import rules of the code's rooms (docs/architecture.md): no import circles anywhere,
`transport/` never imports `engine/`, and every room imports on its own.

Imports are read from the source (module level and inside functions alike: a deferred
import is still a dependency), so a circle hidden behind a function-level import fails
here too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "fleetlearn"


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        if f.name.endswith("_pb2.py") or f.name.endswith("_pb2_grpc.py"):
            continue
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets = [f"{name}.{a.name}" for a in node.names] + [name]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if not t.startswith("fleetlearn"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    edges[m].add(t)
                    break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    # A package's __init__ re-exporting its modules is not a circle of its own: edges into a
    # package from its own modules are the package importing itself, which Python allows.
    edges = import_graph()
    for m in edges:
        edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
    assert cycles(edges) == []


def test_the_detector_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_transport_does_not_import_the_engine():
    edges = import_graph()
    bad = sorted((m, t) for m, ts in edges.items() if m.startswith("fleetlearn.transport") for t in ts if t.startswith("fleetlearn.engine"))
    assert bad == []


ROOMS = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_on_its_own(room):
    out = subprocess.run([sys.executable, "-c", f"import fleetlearn.{room}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
