"""The `Learner` protocol: what a client runs, in simulation, on Ray or on a phone.

A learner turns (global params, local data, hyper-parameters) into a delta and the
client's own measurements.  It sees flat float32 vectors at its boundary; how it
maps them onto a model is its own business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, overload, runtime_checkable

import numpy as np
import torch

from ..params import ParamSpec
from ..task_spec import FitConfig  # noqa: F401  (re-exported: learners name it from here)


@dataclass(frozen=True)
class ClientData:
    """One client's local data: training examples and a local test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])


class CohortData(Sequence[ClientData]):
    """A cohort's data gathered at once (the simulation's): every client's training rows
    concatenated in cohort order (`x`, `y`), its local test rows likewise (`x_test`,
    `y_test`), and each client's row counts (`sizes`, `test_sizes`).

    It is the sequence of the clients' `ClientData`, each made (as views of the whole
    tensors) only when asked for; a learner that trains the cohort at once reads the whole
    tensors (`cohort_rows`, `cohort_sizes`) and no per-client view is ever made (~4,000 tensor
    views fewer a round at 1,000 clients; `benchmarks/round_parts.py`, mode `cohort-list`,
    puts them back)."""

    __slots__ = ("x", "y", "x_test", "y_test", "sizes", "test_sizes", "_starts", "_test_starts")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 sizes: np.ndarray, test_sizes: np.ndarray):
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.test_sizes = np.asarray(test_sizes, dtype=np.int64)
        if len(self.sizes) != len(self.test_sizes) or int(self.sizes.sum()) != len(y) or int(self.test_sizes.sum()) != len(y_test):
            raise ValueError(f"CohortData: {len(self.sizes)} training sizes summing to {int(self.sizes.sum())} for {len(y)} rows, "
                             f"{len(self.test_sizes)} test sizes summing to {int(self.test_sizes.sum())} for {len(y_test)} rows")
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self._test_starts = np.concatenate([[0], np.cumsum(self.test_sizes)]).tolist()

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, i: int) -> ClientData: ...
    @overload
    def __getitem__(self, i: slice) -> "CohortData": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(lo, hi, step)]
            hi = max(lo, hi)
            a, b = self._starts[lo], self._starts[hi]
            ta, tb = self._test_starts[lo], self._test_starts[hi]
            return CohortData(self.x[a:b], self.y[a:b], self.x_test[ta:tb], self.y_test[ta:tb], self.sizes[lo:hi], self.test_sizes[lo:hi])
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"client {i} of a cohort of {n}")
        a, b = self._starts[j], self._starts[j + 1]
        ta, tb = self._test_starts[j], self._test_starts[j + 1]
        return ClientData(self.x[a:b], self.y[a:b], self.x_test[ta:tb], self.y_test[ta:tb])


def cohort_rows(cohort: Sequence[ClientData], field: str) -> torch.Tensor:
    """Every client's `field` ("x", "y", "x_test" or "y_test") rows, concatenated in cohort
    order: a `CohortData`'s own tensor, else the clients' tensors joined."""
    if isinstance(cohort, CohortData):
        return getattr(cohort, field)
    return rows_of([getattr(c, field) for c in cohort])


def rows_of(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)`, without the copy when the parts are consecutive views of one
    contiguous tensor in order (a cohort's data gathered at once: the simulation's)."""
    if not parts:
        raise ValueError("no tensors to concatenate")
    whole = _consecutive_views(parts)
    if whole is not None:
        return whole
    full = [t for t in parts if t.numel()]  # an empty part adds nothing (and has no address)
    first = full[0] if full else parts[0]
    base = first._base
    if full and base is not None and base.is_contiguous() and first.is_contiguous() and first.dim() == base.dim() >= 1:
        row = (base.stride(0) if base.dim() > 1 else 1) * base.element_size()
        ptr, total = first.data_ptr(), 0
        for t in full:
            if t._base is not base or not t.is_contiguous() or t.data_ptr() != ptr + total * row or t.shape[1:] != base.shape[1:]:
                break
            total += t.shape[0]
        else:
            if all(t.shape[1:] == base.shape[1:] and t.dtype == base.dtype for t in parts):
                start = (ptr - base.data_ptr()) // row
                return base[start : start + total]
    return torch.cat(parts)


def _consecutive_views(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """`rows_of`'s common case in one lean pass: every part a view of one contiguous base, of
    its dtype and trailing shape, each starting where the one before ends (a cohort's data
    gathered at once and split); that base's rows, else None (`rows_of` then looks closer)."""
    first = parts[0]
    base = first._base
    if base is None or base.dim() < 1 or not base.is_contiguous():
        return None
    bshape, dtype = base.shape[1:], base.dtype
    row = (base.stride(0) if base.dim() > 1 else 1) * base.element_size()
    ptr = first.data_ptr()
    for t in parts:
        if t._base is not base or t.dtype != dtype or t.data_ptr() != ptr or t.shape[1:] != bshape:
            return None
        ptr += t.shape[0] * row
    start = (first.data_ptr() - base.data_ptr()) // row
    total = (ptr - first.data_ptr()) // row
    return base[start : start + total]


def cohort_sizes(cohort: Sequence[ClientData], test: bool = False) -> np.ndarray:
    """Each client's number of training (or, with `test`, local test) rows, as int64."""
    if isinstance(cohort, CohortData):
        return cohort.test_sizes if test else cohort.sizes
    return np.fromiter((int((c.y_test if test else c.y).shape[0]) for c in cohort), dtype=np.int64, count=len(cohort))


@dataclass
class FitResult:
    delta: torch.Tensor  # (d,) local params minus the params received
    num_examples: int
    # From the training pass (docs/architecture.md 4.2): the received model's loss on the first
    # mini-batch, and the size-weighted mean batch loss of the last epoch (nan: no step taken).
    loss_before: float
    loss_after: float
    accuracy: float  # local model on the local test split (nan if empty)
    steps: int
    samples: int  # examples processed, what the virtual clock charges compute for
    compute_seconds: float
    # Personalization (fleetlearn.client.personalization): the client's personal model and
    # the global model it received, each on its local test split (nan: not measured).
    personal_accuracy: float = math.nan
    global_accuracy: float = math.nan
    # Clustered FL (fleetlearn.learners.clustered): the block of the stacked models this
    # client trained (delta is zero elsewhere), and how many blocks there are.
    cluster: int | None = None
    clusters: int = 1


@runtime_checkable
class Learner(Protocol):
    spec: ParamSpec

    def init_params(self, seed: int) -> torch.Tensor:
        """A fresh flat parameter vector, deterministic in `seed`."""
        ...

    def fit(
        self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int,
        correction: torch.Tensor | None = None, max_steps: int | None = None,
    ) -> FitResult:
        """Train locally from `params`; deterministic in `seed`.  `correction` is a
        constant added to every gradient (SCAFFOLD's c - c_i); `max_steps` cuts
        training short (partial work)."""
        ...

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
        anchor: torch.Tensor | None = None,
    ) -> list[FitResult]:
        """Train every client of a cohort from `params`, the same (d,) vector or one (n, d)
        row per client (may be batched); `corrections` is an optional (n, d) matrix, one
        gradient correction per client; `step_limits` caps each client's steps; `anchor`
        is the centre of the prox term (default: each client's start point)."""
        ...

    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and correctness (float 0/1) of `params` on (x, y)."""
        ...


class SingleClientLearner:
    """Base for a learner that trains one client at a time: implement `fit` (and `spec`);
    `fit_cohort`, which the client device calls, trains the cohort client by client."""

    needs_client_ids = False

    def fit(self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int,
            correction: torch.Tensor | None = None, max_steps: int | None = None) -> FitResult:
        raise NotImplementedError

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
    ) -> list[FitResult]:
        limits = step_limits if step_limits is not None else [None] * len(cohort)
        return [
            self.fit(params, data, hp, seed, None if corrections is None else corrections[i], limits[i])
            for i, (data, seed) in enumerate(zip(cohort, seeds))
        ]
