"""One registry of parts: every pluggable piece of a run, by kind and name.

A part declares, in one call, its name, the object that builds it, its own pydantic
config (the keys a config may give it), and its capabilities (what it offers or needs:
``linear``, ``bounded_sensitivity``, ``sync_only``, ``uniform_sampling``, ...; see
`fleetlearn.compat`, which computes every compatibility refusal from them)::

    from fleetlearn.parts import PartConfig, register_part

    class EveryOtherConfig(PartConfig):
        offset: int = 0

    @register_part("selector", "every_other", config=EveryOtherConfig, capabilities={"uniform_sampling"})
    class EveryOther(Selector): ...

and a config then chooses it by name, with its own keys::

    [server]
    selector = { name = "every_other", offset = 1 }

Kinds and the config key that chooses each (`KINDS`): aggregator, codec, selector,
weighting, server_optimizer, validator, dataset, transport.  The built-ins of a kind
register when its package is imported; `get_part` and `names` import it first
(`BUILTIN_MODULES`), so asking the registry never depends on import order.

The older per-kind dicts (`AGGREGATORS`, `CODECS`, `SELECTORS`, `WEIGHTINGS`,
`SERVER_OPTIMIZERS`, `VALIDATORS`) are live views of this registry (`PartTable`):
assigning to one registers, popping unregisters.

This module imports nothing of fleetlearn but `errors`, so every room can register here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

__all__ = [
    "KINDS", "Part", "PartConfig", "PartTable", "Choice", "register_part", "unregister_part", "get_part", "find_part",
    "names", "table", "capabilities", "choose", "BuildContext", "build_part",
]

# kind -> the config key that chooses a part of that kind (named in every refusal).
KINDS: dict[str, str] = {
    "aggregator": "server.aggregator",
    "codec": "a compression chain element (compression.uplink / downlink)",
    "selector": "server.selector",
    "weighting": "server.weighting",
    "server_optimizer": "server.optimizer",
    "validator": "server.validators",
    "dataset": "data.dataset",
    "transport": "engine.backend",
}

# kind -> the module whose import registers the built-ins (imported by name on first use,
# so that the config layer reads the registry without importing torch-heavy rooms).
BUILTIN_MODULES: dict[str, str] = {
    "aggregator": "fleetlearn.aggregation",
    "codec": "fleetlearn.compression",
    "selector": "fleetlearn.selection",
    "weighting": "fleetlearn.aggregation",
    "server_optimizer": "fleetlearn.aggregation",
    "validator": "fleetlearn.validation",
    "dataset": "fleetlearn.data.datasets",
    "transport": "fleetlearn.transport",
}


class PartConfig(BaseModel):
    """Base of a part's own config: unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Part:
    """One registered part.

    obj: the class or function (what the older per-kind dicts hold).
    config: the part's own pydantic config (a `PartConfig`), or None if it takes no keys.
    capabilities: what it offers or needs (see `fleetlearn.compat`).
    build: ``build(ctx, options)`` -> the built part, where the construction needs more than
        ``obj(**options)`` (the population, the model size, a key of another section).
    legacy: old flat key -> the part's key (``{"oort_epsilon": "epsilon"}``), still read.
    info: anything else a kind reads (a dataset's default population, ...).
    """

    kind: str
    name: str
    obj: Any
    config: type[BaseModel] | None = None
    capabilities: frozenset[str] = frozenset()
    build: Callable[..., Any] | None = None
    legacy: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    listed: bool = True  # False: not shown in the per-kind dict view (mifa: built from the run's size)

    def options(self, given: Mapping[str, Any] | None = None) -> BaseModel | None:
        """The part's validated config (its defaults when `given` is empty)."""
        if self.config is None:
            if given:
                raise ValueError(f"{self.kind} {self.name!r} takes no keys; got {', '.join(sorted(given))}")
            return None
        return self.config.model_validate(dict(given or {}))


_PARTS: dict[str, dict[str, Part]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()


def _ensure(kind: str) -> dict[str, Part]:
    if kind not in _PARTS:
        raise ValueError(f"unknown part kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind not in _LOADED and kind in BUILTIN_MODULES:
        _LOADED.add(kind)
        importlib.import_module(BUILTIN_MODULES[kind])
    return _PARTS[kind]


def _declared(obj: Any) -> frozenset[str]:
    """Capabilities a part's class declares on itself (``capabilities = {...}``), plus the
    aggregator flags (`needs_individual_updates`, `needs_client_ids`, `contributions`)."""
    caps = set(getattr(obj, "capabilities", ()) or ())
    if isinstance(obj, type) or hasattr(obj, "aggregate"):
        if hasattr(obj, "needs_individual_updates"):
            caps.add("needs_individual_updates" if obj.needs_individual_updates else "linear")
        if getattr(obj, "needs_client_ids", False):
            caps.add("needs_client_ids")
    return frozenset(caps)


def register_part(
    kind: str,
    name: str,
    obj: Any = None,
    *,
    config: type[BaseModel] | None = None,
    capabilities: Any = (),
    build: Callable[..., Any] | None = None,
    legacy: Mapping[str, str] | None = None,
    replace: bool = False,
    listed: bool = True,
    **info: Any,
):
    """Register `obj` as the part `name` of `kind` (usable as a decorator when `obj` is
    omitted).  Refuses a name that is taken by another object (unless `replace`) or that
    is not a lowercase word.  Returns `obj`."""
    if obj is None:
        return lambda o: register_part(kind, name, o, config=config, capabilities=capabilities, build=build,
                                       legacy=legacy, replace=replace, listed=listed, **info)
    parts = _PARTS.get(kind)
    if parts is None:
        raise ValueError(f"unknown part kind {kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum() or name.lower() != name or name[0].isdigit():
        raise ValueError(f"{kind} name {name!r} must be a lowercase word (letters, digits, '_')")
    old = parts.get(name)
    if old is not None and old.obj is not obj and not replace:
        raise ValueError(f"{kind} name {name!r} is taken by {old.obj!r}")
    if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise ValueError(f"{kind} {name!r}: config must be a pydantic model class, got {config!r}")
    caps = frozenset(capabilities) | _declared(obj)
    parts[name] = Part(kind, name, obj, config, caps, build, dict(legacy or {}), dict(info), listed)
    return obj


def unregister_part(kind: str, name: str) -> Part | None:
    return _PARTS.get(kind, {}).pop(name, None)


def names(kind: str, *, listed_only: bool = False) -> list[str]:
    """The registered names of `kind`, in the order they registered (built-ins first)."""
    return [n for n, p in _ensure(kind).items() if p.listed or not listed_only]


def unknown(kind: str, name: Any, extra: str = "") -> ConfigError:
    """The refusal of a name that is not registered: the kind, the name and the allowed names."""
    how = f"fleetlearn.parts.register_part({kind!r}, ...)"
    return ConfigError(f"{KINDS.get(kind, kind)} = {name!r}: unknown {kind}; allowed: {', '.join(names(kind))}{extra} (or a {kind} registered with {how})")


def find_part(kind: str, name: str) -> Part | None:
    return _ensure(kind).get(name)


def get_part(kind: str, name: str) -> Part:
    """The part, or a ConfigError naming the kind, the bad name and the allowed names."""
    part = find_part(kind, name) if isinstance(name, str) else None
    if part is None:
        raise unknown(kind, name)
    return part


@dataclass(frozen=True)
class BuildContext:
    """What a part's `build` may read besides its own options: the run's config, the
    population, the model size, and the name it was chosen by."""

    config: Any = None
    population: int | None = None
    dim: int | None = None
    name: str = ""
    schedule: Any = None  # server optimizers: the server lr schedule their state carries


def build_part(kind: str, name: str, options: BaseModel | None = None, ctx: BuildContext | None = None) -> Any:
    """Build the part `name` of `kind`: its `build(ctx, options)`, else ``obj(**options)``."""
    from dataclasses import replace

    part = get_part(kind, name)
    ctx = replace(ctx or BuildContext(), name=name)
    if part.build is not None:
        return part.build(ctx, options)
    return part.obj(**(options.model_dump() if options is not None else {}))


def capabilities(kind: str, name: str) -> frozenset[str]:
    part = find_part(kind, name)
    return part.capabilities if part is not None else frozenset()


class PartTable(MutableMapping):
    """name -> obj of one kind: a live view of the registry (assigning registers, deleting unregisters)."""

    def __init__(self, kind: str):
        self.kind = kind

    def _parts(self) -> dict[str, Part]:
        return {n: p for n, p in _PARTS[self.kind].items() if p.listed}

    def __getitem__(self, name: str) -> Any:
        part = self._parts().get(name)
        if part is None:
            raise KeyError(name)
        return part.obj

    def __setitem__(self, name: str, obj: Any) -> None:
        register_part(self.kind, name, obj, replace=True)

    def __delitem__(self, name: str) -> None:
        if name not in self._parts():
            raise KeyError(name)
        unregister_part(self.kind, name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._parts()))

    def __len__(self) -> int:
        return len(self._parts())

    def __repr__(self) -> str:
        return f"PartTable({self.kind!r}: {', '.join(self._parts())})"


def table(kind: str) -> PartTable:
    if kind not in _PARTS:
        raise ValueError(f"unknown part kind {kind!r}; allowed: {', '.join(KINDS)}")
    return PartTable(kind)


class Choice(str):
    """A part's name as a config holds it (compares equal to the name) with the part's
    validated `options` (its own keys; None when it takes none)."""

    options: BaseModel | None

    def __new__(cls, name: str, options: BaseModel | None = None) -> "Choice":
        obj = super().__new__(cls, name)
        obj.options = options
        return obj

    def __reduce__(self):
        return (Choice, (str(self), self.options))

    def given(self) -> dict[str, Any]:
        """The options that differ from the part's defaults (what a config must write down)."""
        if self.options is None:
            return {}
        dumped = self.options.model_dump(mode="json")
        out = {}
        for key, f in type(self.options).model_fields.items():
            if f.is_required() or getattr(self.options, key) != f.get_default(call_default_factory=True):
                out[key] = dumped[key]
        return out

    def dump(self) -> Any:
        """The TOML form: the name alone, or ``{name = ..., <non-default keys>}``."""
        given = self.given()
        return {"name": str(self), **given} if given else str(self)


def choose(kind: str, value: Any, key: str | None = None, extra_names: tuple[str, ...] = ()) -> Choice:
    """A `Choice` from a config value: a name, or a table ``{name = ..., <the part's keys>}``.
    Raises ValueError naming the key and the allowed names or keys."""
    key = key or KINDS[kind]
    if isinstance(value, Choice):
        return value
    legacy: dict[str, str] = {}
    if isinstance(value, Mapping):
        given = dict(value)
        legacy = dict(given.pop("__legacy__", None) or {})
        if "name" not in given:
            raise ValueError(f"a table needs `name`, one of {', '.join(names(kind))}")
        name = given.pop("name")
    else:
        name, given = value, {}
    if not isinstance(name, str):
        raise ValueError(f"expected a {kind} name, one of {', '.join(names(kind))}")
    if name in extra_names:
        if given:
            raise ValueError(f"{kind} {name!r} takes no keys; got {', '.join(sorted(given))}")
        return Choice(name)
    part = find_part(kind, name)
    if part is None:
        allowed = ", ".join([*extra_names, *names(kind)])
        raise ValueError(f"unknown {kind} {name!r}; allowed: {allowed} (or a {kind} registered with fleetlearn.parts.register_part)")
    if part.config is None and given:
        raise ValueError(f"{kind} {name!r} takes no keys; got {', '.join(sorted(given))}")
    try:
        options = part.options(given)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            k = ".".join(str(p) for p in e["loc"])
            where = f"{key}.{k}" + (f" (read from the old key {key.rsplit('.', 1)[0]}.{legacy[k]})" if k in legacy else "")
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(part.config.model_fields) if part.config else "none"
                lines.append(f"{where}: unknown key for {kind} {name!r} (allowed: name, {allowed})")
            else:
                lines.append(f"{where} = {e.get('input')!r}: {e['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(lines)) from None
    return Choice(name, options)
