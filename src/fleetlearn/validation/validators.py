"""Validators: ``check(update, vec, context) -> None`` or a refusal reason.

Run in order before aggregation; the first refusal wins, is recorded with the
client, the round and the reason, and the update never touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..messages import Update


@dataclass
class ValidationContext:
    round: int
    version: int  # the model version of this round's task
    dim: int
    seen: set[int] = field(default_factory=set)  # clients already accepted this round


class RoundValidator:
    """The update answers this round's task: same round, same base model version."""

    name = "round"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if update.round != ctx.round:
            return f"wrong round: update for round {update.round}, current round is {ctx.round}"
        if update.base_version != ctx.version:
            return f"stale: computed from model version {update.base_version}, current version is {ctx.version}"
        return None


class DuplicateValidator:
    """One update per client per round (a replay is refused)."""

    name = "duplicate"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if update.client_id in ctx.seen:
            return f"duplicate: client {update.client_id} already sent an update in round {ctx.round}"
        return None


class ShapeValidator:
    """The decoded delta is a float32 vector of the model's dimension."""

    name = "shape"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if vec is None:
            return "no decoded vector"
        if vec.dtype != torch.float32 or tuple(vec.shape) != (ctx.dim,):
            return f"wrong shape: got {vec.dtype} {tuple(vec.shape)}, expected float32 ({ctx.dim},)"
        return None


class FiniteValidator:
    """No NaN or infinity anywhere in the delta."""

    name = "finite"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if vec is not None and not bool(torch.isfinite(vec).all()):
            bad = int((~torch.isfinite(vec)).sum())
            return f"non-finite: {bad} NaN/inf values"
        return None


class ExampleCountValidator:
    """A claimed example count must be a positive integer."""

    name = "examples"

    def check(self, update: Update, vec: torch.Tensor | None, ctx: ValidationContext) -> str | None:
        if not isinstance(update.num_examples, int) or update.num_examples < 1:
            return f"bad example count: {update.num_examples!r}"
        return None


def default_validators() -> list:
    return [RoundValidator(), DuplicateValidator(), ExampleCountValidator(), ShapeValidator(), FiniteValidator()]
