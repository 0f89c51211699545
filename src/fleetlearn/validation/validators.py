"""Validators: ``check(update, vec, context) -> None`` or a refusal reason.

Run in order before aggregation; the first refusal wins, is recorded with the
client, the round and the reason, and the update never touches the model.

A validator whose verdict depends only on the update and its decoded vector (not on
``ctx.seen``, nor on any state) may also give ``check_rows(updates, rows, ctx) ->
[None | reason]``: the verdicts of `check` for a batch of updates whose vectors are the
rows of the (k, d) matrix ``rows``, computed as matrix operations.  The intake uses it
for a batch of replies (a simulated cohort: engine/intake.py) and still applies the
validators in order, first refusal winning, so the outcome is `check`'s exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch

from ..messages import Update
from ..parts import register_part, table


@dataclass
class ValidationContext:
    round: int
    version: int  # the model version of this round's task
    dim: int
    seen: set[int] = field(default_factory=set)  # clients already accepted this round
    # During a batch's `check_rows`: the float32 L2 norm of each row of its matrix, when the
    # intake measured them (None otherwise); a hint a validator may use instead of a pass of its own.
    row_norms: torch.Tensor | None = None


class RoundValidator:
    """The update answers this round's task: same round, same base model version.

    ``check_version=False`` leaves the version to a `StalenessValidator`, for runs
    that accept updates computed from a slightly older model."""

    name = "round"

    def __init__(self, check_version: bool = True):
        self.check_version = check_version

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if update.round != ctx.round:
            return f"wrong round: update for round {update.round}, current round is {ctx.round}"
        if self.check_version and update.base_version != ctx.version:
            return f"stale: computed from model version {update.base_version}, current version is {ctx.version}"
        return None


class DuplicateValidator:
    """One update per client per round, and none for a round that has not started:
    a replayed or forged update is refused."""

    name = "duplicate"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if _is_int(update.round) and update.round > ctx.round:
            return f"replay: update for round {update.round}, which is in the future (current round is {ctx.round})"
        if update.client_id in ctx.seen:
            return f"duplicate: client {update.client_id} already sent an update in round {ctx.round}"
        return None


class ShapeValidator:
    """The decoded delta is a float32 vector of the model's dimension."""

    name = "shape"

    def check_rows(self, updates: Sequence[Update], rows: torch.Tensor, ctx: ValidationContext) -> list[str | None]:
        if rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[1] == ctx.dim:
            return [None] * rows.shape[0]
        return [self.check(u, rows[i], ctx) for i, u in enumerate(updates)]

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if vec is None:
            return "no decoded vector"
        if vec.dtype != torch.float32 or tuple(vec.shape) != (ctx.dim,):
            return f"wrong shape: got {vec.dtype} {tuple(vec.shape)}, expected float32 ({ctx.dim},)"
        return None


class FiniteValidator:
    """No NaN or infinity anywhere in the delta."""

    name = "finite"

    def check_rows(self, updates: Sequence[Update], rows: torch.Tensor, ctx: ValidationContext) -> list[str | None]:
        # A row's sum (or its norm, when the intake measured it) is NaN or inf when the row holds
        # one (it may also overflow for finite values: such rows get `check`'s exact verdict, as
        # flagged rows do).
        hint = ctx.row_norms
        if hint is not None and tuple(hint.shape) == (rows.shape[0],):
            ok = torch.isfinite(hint).tolist()
        else:
            ok = torch.isfinite(rows.sum(dim=1)).tolist() if rows.numel() else [True] * rows.shape[0]
        return [None if good else self.check(u, rows[i], ctx) for i, (u, good) in enumerate(zip(updates, ok))]

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if vec is not None and not bool(torch.isfinite(vec).all()):
            bad = ~torch.isfinite(vec)
            first = int(torch.nonzero(bad.reshape(-1))[0])
            return f"non-finite: {int(bad.sum())} NaN/inf values (first at index {first})"
        return None


class ExampleCountValidator:
    """A claimed example count must be a positive integer."""

    name = "examples"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        n = update.num_examples
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return f"bad example count: {update.num_examples!r}"
        return None


class ExampleCountCapValidator:
    """Refuse an update whose claimed example count is above a hard cap.

    The engine also caps the weight it believes (``server.max_examples``); this
    refuses the claim outright, for deployments where an implausible count is a
    sign of a broken or malicious client."""

    name = "examples_cap"

    def __init__(self, max_examples: int):
        if not _is_int(max_examples) or max_examples < 1:
            raise ValueError(f"examples_cap: max_examples must be an integer >= 1, got {max_examples!r}")
        self.max_examples = int(max_examples)

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        n = update.num_examples
        if not _is_int(n):
            return f"bad example count: {n!r}"
        if n > self.max_examples:
            return f"claims {n} examples, above the cap of {self.max_examples}"
        return None


class NormBoundValidator:
    """Refuse an update whose L2 norm is above an absolute bound (or is not finite).

    The norm is computed in float64, so a float32 delta of 1e30s is measured, not
    overflowed.  The relative bound (k x the cohort's median norm) needs the whole
    cohort: see `RelativeNormFilter` / `filter_by_relative_norm`."""

    name = "norm"

    def __init__(self, max_norm: float):
        if not _is_real(max_norm) or not math.isfinite(max_norm) or max_norm <= 0:
            raise ValueError(f"norm: max_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def check_rows(self, updates: Sequence[Update], rows: torch.Tensor, ctx: ValidationContext) -> list[str | None]:
        norms = row_norms(rows).tolist()
        return [None if n <= self.max_norm else self.check(u, rows[i], ctx) for i, (u, n) in enumerate(zip(updates, norms))]

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if vec is None:
            return "no decoded vector"
        norm = update_norm(vec)
        if not math.isfinite(norm):
            return f"norm is {norm} (NaN or inf values), bound is {self.max_norm:g}"
        if norm > self.max_norm:
            return f"norm {norm:.4g} exceeds bound {self.max_norm:g}"
        return None


class StalenessValidator:
    """Accept an update computed from a model at most ``max_staleness`` versions old.

    staleness = current version - the update's base version.  A base version newer
    than the current one cannot be honest and is refused.  Pair it with
    ``RoundValidator(check_version=False)`` (`build_validators` does)."""

    name = "staleness"

    def __init__(self, max_staleness: int):
        if not _is_int(max_staleness) or max_staleness < 0:
            raise ValueError(f"staleness: max_staleness must be an integer >= 0, got {max_staleness!r}")
        self.max_staleness = int(max_staleness)

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        base = update.base_version
        if not _is_int(base):
            return f"bad base version: {base!r}"
        staleness = ctx.version - base
        if staleness < 0:
            return f"base version {base} is newer than the current version {ctx.version}"
        if staleness > self.max_staleness:
            return (
                f"staleness {staleness} exceeds bound {self.max_staleness} "
                f"(computed from version {base}, current version is {ctx.version})"
            )
        return None


# -- cohort-level: the relative norm bound ---------------------------------------------


def update_norm(vec) -> float:
    """L2 norm of a delta in float64 (inf/nan when it has non-finite values)."""
    v = torch.as_tensor(vec)
    if not v.is_floating_point():
        v = v.to(torch.float64)
    return float(torch.linalg.vector_norm(v, dtype=torch.float64))


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a (k, d) matrix in float64, as `update_norm` of each row."""
    r = torch.as_tensor(rows)
    if not r.is_floating_point():
        r = r.to(torch.float64)
    return torch.linalg.vector_norm(r, dim=1, dtype=torch.float64)


class RelativeNormFilter:
    """Keep the updates whose norm is at most ``factor`` x the cohort's median norm.

    A bound relative to the cohort needs every norm first, so it is not a
    per-update validator: the engine applies it to the accepted updates' norms
    once the cohort is collected, before aggregation.  The median (of the finite
    norms; np.median, so the mean of the two middle ones for an even count)
    cannot be inflated by fewer than half of the clients.  Non-finite norms are
    always refused."""

    name = "relative_norm"

    def __init__(self, factor: float):
        if not _is_real(factor) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"relative_norm: factor must be a finite number > 0, got {factor!r}")
        self.factor = float(factor)

    def _bound(self, norms: np.ndarray) -> float:
        finite = norms[np.isfinite(norms)]
        return self.factor * float(np.median(finite)) if finite.size else math.nan

    def mask(self, norms) -> np.ndarray:
        """True for the updates to keep."""
        a = np.asarray(norms, dtype=np.float64).reshape(-1)
        bound = self._bound(a)
        with np.errstate(invalid="ignore"):
            return np.isfinite(a) & (a <= bound)

    def reasons(self, norms) -> list[str | None]:
        """None for a kept update, else why it is refused."""
        a = np.asarray(norms, dtype=np.float64).reshape(-1)
        bound = self._bound(a)
        median = bound / self.factor if math.isfinite(bound) else math.nan
        keep = self.mask(a)
        out: list[str | None] = []
        for norm, k in zip(a.tolist(), keep.tolist()):
            if k:
                out.append(None)
            elif not math.isfinite(norm):
                out.append(f"norm is {norm} (NaN or inf values)")
            else:
                out.append(f"norm {norm:.4g} exceeds bound {bound:.4g} ({self.factor:g} x the cohort's median norm {median:.4g})")
        return out


def filter_by_relative_norm(norms, factor: float) -> np.ndarray:
    """Boolean mask over the cohort: True where norm <= factor x median(norms)."""
    return RelativeNormFilter(factor).mask(norms)


# -- assembly ------------------------------------------------------------------------------

# Registered in fleetlearn.parts ("validator" kind); `VALIDATORS` is a live view (name -> class).
# `parameter`: the build_validators keyword (and [server] bound) a validator needs.
for _cls, _param in (
    (RoundValidator, None),
    (DuplicateValidator, None),
    (StalenessValidator, "max_staleness"),
    (ExampleCountValidator, None),
    (ExampleCountCapValidator, "max_examples"),
    (ShapeValidator, None),
    (FiniteValidator, None),
    (NormBoundValidator, "max_norm"),
):
    register_part("validator", _cls.name, _cls, **({"parameter": _param} if _param else {}))
VALIDATORS = table("validator")
DEFAULT_VALIDATORS = ("round", "duplicate", "examples", "shape", "finite")
# validator name -> the build_validators keyword it needs
_PARAMETERS = {"staleness": "max_staleness", "examples_cap": "max_examples", "norm": "max_norm"}  # = their `parameter` info


def default_validators() -> list:
    return [RoundValidator(), DuplicateValidator(), ExampleCountValidator(), ShapeValidator(), FiniteValidator()]


def build_validators(
    names: Sequence[str] | None = None,
    *,
    max_norm: float | None = None,
    max_staleness: int | None = None,
    max_examples: int | None = None,
) -> list:
    """The validator list for a run, from configuration.

    ``names=None``: the defaults (round, duplicate, examples, shape, finite) plus
    every optional validator whose parameter is given: ``staleness`` for
    ``max_staleness``, ``examples_cap`` for ``max_examples``, ``norm`` for
    ``max_norm``.  Otherwise exactly ``names``, in that order (cheap checks first
    is the caller's choice).  A parameter given without its validator, a
    validator without its parameter, and unknown or repeated names are errors.
    When ``staleness`` is used, ``round`` stops checking the base version."""
    params = {"max_norm": max_norm, "max_staleness": max_staleness, "max_examples": max_examples}
    if names is None:
        chosen = list(DEFAULT_VALIDATORS)
        if max_staleness is not None:
            chosen.insert(chosen.index("round") + 1, "staleness")
        if max_examples is not None:
            chosen.insert(chosen.index("examples") + 1, "examples_cap")
        if max_norm is not None:
            chosen.append("norm")
    else:
        if isinstance(names, str):
            raise ValueError(f"validators must be a list of names, got the string {names!r}")
        chosen = list(names)
        for name in chosen:
            if name not in VALIDATORS:
                raise ValueError(f"unknown validator {name!r}; allowed: {', '.join(sorted(VALIDATORS))}")
        repeated = sorted({n for n in chosen if chosen.count(n) > 1})
        if repeated:
            raise ValueError(f"validators listed more than once: {', '.join(repeated)}")
    for name, key in _PARAMETERS.items():
        if name in chosen and params[key] is None:
            raise ValueError(f"validator {name!r} needs {key}")
        if name not in chosen and params[key] is not None:
            raise ValueError(f"{key} = {params[key]!r} is set but the {name!r} validator is not in {chosen}")
    out = []
    for name in chosen:
        if name == "round":
            out.append(RoundValidator(check_version="staleness" not in chosen))
        elif name in _PARAMETERS:
            key = _PARAMETERS[name]
            out.append(VALIDATORS[name](**{key: params[key]}))
        else:
            out.append(VALIDATORS[name]())
    return out


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
