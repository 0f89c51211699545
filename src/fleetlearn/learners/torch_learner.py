"""A `Learner` for any `torch.nn.Module`.

The module is used as a template through `torch.func.functional_call`: the
parameters live in one flat float32 vector, so a local SGD step is a single
vector operation and a whole cohort can be trained as one batched computation
(`torch.func.vmap` over stacked parameter vectors, with per-client masks for
unequal data sizes).  Both paths draw the same mini-batches from the same
per-client seed, so they agree to float tolerance.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ..params import ParamSpec
from .base import ClientData, FitConfig, FitResult

log = logging.getLogger(__name__)

EVAL_CHUNK = 8192  # examples per forward pass when evaluating


def batch_schedule(n: int, hp: FitConfig, gen: torch.Generator, max_steps: int | None = None) -> list[torch.Tensor]:
    """The mini-batches (index tensors) a client trains on, in order.

    Each epoch is a fresh permutation cut into batches of `batch_size` (the last
    one may be short).  With `local_steps`, epochs repeat until that many batches.
    `max_steps` cuts the schedule short (partial work of a client out of time).
    """
    if n == 0:
        return []
    b = hp.batch_size
    out: list[torch.Tensor] = []
    epochs = hp.local_epochs if hp.local_steps is None else math.ceil(hp.local_steps / math.ceil(n / b))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        out.extend(perm.split(b))
    if hp.local_steps is not None:
        out = out[: hp.local_steps]
    if max_steps is not None:
        out = out[: max(0, max_steps)]
    return out


class TorchLearner:
    """Trains a copy of `module` per client with (momentum) SGD on a flat vector."""

    eval_chunk = EVAL_CHUNK  # examples per forward pass when evaluating
    eval_columns = 256  # rows per client per batched forward pass when evaluating a cohort

    def __init__(self, make_module: Callable[[], torch.nn.Module], vectorize: bool = True, max_group: int = 1024):
        self.make_module = make_module
        self._module = make_module()
        self._owner = threading.get_ident()
        self._thread_modules: dict[int, torch.nn.Module] = {}
        self.spec = ParamSpec.from_module(self._module)
        self.vectorize = vectorize
        self.max_group = max_group
        self._vmap_failed = False

    @property
    def module(self) -> torch.nn.Module:
        """The module functional calls run through, one per thread: `functional_call` swaps
        the parameters into it for the duration of a call, so two threads (several gRPC
        clients in one process, say) sharing a learner must not share its module."""
        tid = threading.get_ident()
        if tid == self._owner:
            return self._module
        m = self._thread_modules.get(tid)
        if m is None:
            m = self._thread_modules[tid] = copy.deepcopy(self._module)
        return m

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_thread_modules"], state["_owner"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._owner = threading.get_ident()  # the unpickling thread (e.g. a Ray worker's) owns the main module

    # -- parameters ------------------------------------------------------------
    def init_params(self, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make_module()
        return self.spec.flatten(dict(module.named_parameters()))

    def _logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.spec.split(flat), (x,))

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.module.eval()
        losses, correct = [], []
        for xs, ys in zip(x.split(self.eval_chunk), y.split(self.eval_chunk)):
            logits = self._logits(params, xs)
            losses.append(F.cross_entropy(logits, ys, reduction="none"))
            correct.append((logits.argmax(-1) == ys).float())
        if not losses:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(losses), torch.cat(correct)

    def _mean_loss(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        if y.numel() == 0:
            return math.nan
        return float(self.per_example(params, x, y)[0].mean())

    def _accuracy(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        if y.numel() == 0:
            return math.nan
        return float(self.per_example(params, x, y)[1].mean())

    # -- one client ------------------------------------------------------------
    def fit(
        self, params: torch.Tensor, data: ClientData, hp: FitConfig, seed: int,
        correction: torch.Tensor | None = None, max_steps: int | None = None, anchor: torch.Tensor | None = None,
    ) -> FitResult:
        t0 = time.perf_counter()
        start = params.detach().to(torch.float32)
        center = start if anchor is None else anchor.detach().to(torch.float32)
        loss_before = self._mean_loss(start, data.x, data.y)
        gen = torch.Generator().manual_seed(seed)
        p = start.clone()
        buf: torch.Tensor | None = None
        samples = 0
        batches = batch_schedule(data.num_examples, hp, gen, max_steps)
        self.module.train()
        for idx in batches:
            p.requires_grad_(True)
            loss = F.cross_entropy(self._logits(p, data.x[idx]), data.y[idx])
            (g,) = torch.autograd.grad(loss, p)
            p = p.detach()
            with torch.no_grad():
                if hp.prox_mu:
                    g = g + hp.prox_mu * (p - center)
                if correction is not None:
                    g = g + correction
                if hp.weight_decay:
                    g = g.add(p, alpha=hp.weight_decay)
                if hp.momentum:
                    buf = g.clone() if buf is None else buf.mul_(hp.momentum).add_(g)
                    g = buf
                p.sub_(g, alpha=hp.lr)
            samples += int(idx.numel())
        p = p.detach()
        return FitResult(
            delta=p - start,
            num_examples=data.num_examples,
            loss_before=loss_before,
            loss_after=self._mean_loss(p, data.x, data.y),
            accuracy=self._accuracy(p, data.x_test, data.y_test),
            steps=len(batches),
            samples=samples,
            compute_seconds=time.perf_counter() - t0,
        )

    # -- a cohort ----------------------------------------------------------------
    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None = None, step_limits: list[int | None] | None = None,
        anchor: torch.Tensor | None = None,
    ) -> list[FitResult]:
        """`params` is the common start point (d,) or one start point per client (n, d)
        (personalization: FedPer's personal heads, Ditto's personal models); `anchor`
        (d,) or (n, d) is the centre of the prox term (default: each client's start)."""
        if not cohort:
            return []
        n, d = len(cohort), self.spec.dim
        limits = step_limits if step_limits is not None else [None] * n
        if corrections is not None and tuple(corrections.shape) != (n, d):
            raise ValueError(f"corrections must be ({n}, {d}), got {tuple(corrections.shape)}")
        for what, t in (("params", params), ("anchor", anchor)):
            if t is not None and t.dim() == 2 and tuple(t.shape) != (n, d):
                raise ValueError(f"per-client {what} must be ({n}, {d}), got {tuple(t.shape)}")

        def rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
            return t[lo:hi] if t is not None and t.dim() == 2 else t

        if self.vectorize and not self._vmap_failed and n > 1:
            try:
                out: list[FitResult] = []
                for lo in range(0, n, self.max_group):
                    hi = lo + self.max_group
                    out.extend(self._fit_vectorized(
                        rows(params, lo, hi), cohort[lo:hi], hp, seeds[lo:hi], rows(corrections, lo, hi), limits[lo:hi], rows(anchor, lo, hi),
                    ))
                return out
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # a module vmap cannot batch
                self._vmap_failed = True
                log.warning("batched training does not apply to this model (%s); training clients one by one", exc)
        return [
            self.fit(
                params[i] if params.dim() == 2 else params, c, hp, s, corrections[i] if corrections is not None else None, limits[i],
                anchor=anchor[i] if anchor is not None and anchor.dim() == 2 else anchor,
            )
            for i, (c, s) in enumerate(zip(cohort, seeds))
        ]

    def _masked_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(self._logits(flat, x), y, reduction="none")
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def _fit_vectorized(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None, limits: list[int | None], anchor: torch.Tensor | None = None,
    ) -> list[FitResult]:
        t0 = time.perf_counter()
        n = len(cohort)
        b = hp.batch_size
        start = params.detach().to(torch.float32)
        start = start.expand(n, -1) if start.dim() == 1 else start
        center = start if anchor is None else anchor.detach().to(torch.float32)
        sizes = [c.num_examples for c in cohort]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        x_all = torch.cat([c.x for c in cohort])
        y_all = torch.cat([c.y for c in cohort])
        schedules = [batch_schedule(nc, hp, torch.Generator().manual_seed(s), m) for nc, s, m in zip(sizes, seeds, limits)]
        steps = max(1, max(len(s) for s in schedules))
        # The padded width is the largest batch any client has: a batch_size above every client's
        # example count (a full-batch setting) must not allocate (n, steps, batch_size) indices.
        b = max(1, max((idx.numel() for sched in schedules for idx in sched), default=1))
        # (n, steps, b) global row indices and masks; padding points at row 0, masked out.
        index = np.zeros((n, steps, b), dtype=np.int64)
        mask = np.zeros((n, steps, b), dtype=np.float32)
        for c, sched in enumerate(schedules):
            for s, idx in enumerate(sched):
                k = idx.numel()
                index[c, s, :k] = idx.numpy() + offsets[c]
                mask[c, s, :k] = 1.0
        index_t = torch.from_numpy(index)
        mask_t = torch.from_numpy(mask)
        active = mask_t.sum(-1) > 0  # (n, steps)

        loss_before = self._cohort_mean_loss(start, x_all, y_all, sizes)
        p = start.clone()
        buf: torch.Tensor | None = None
        step_fn = vmap(grad_and_value(self._masked_loss))
        self.module.train()
        for s in range(steps):
            xb = x_all[index_t[:, s]]
            yb = y_all[index_t[:, s]]
            g, _ = step_fn(p, xb, yb, mask_t[:, s])
            act = active[:, s].unsqueeze(1).to(p.dtype)
            if hp.prox_mu:
                g = g + hp.prox_mu * (p - center)
            if corrections is not None:
                g = g + corrections
            if hp.weight_decay:
                g = g + hp.weight_decay * p
            if hp.momentum:
                # torch.optim.SGD semantics: the buffer starts as the first gradient.
                buf = g.clone() if buf is None else torch.where(act.bool(), hp.momentum * buf + g, buf)
                g = buf
            p = p - hp.lr * act * g
        loss_after = self._cohort_mean_loss(p, x_all, y_all, sizes)
        xt_sizes = [int(c.y_test.shape[0]) for c in cohort]
        acc = self._cohort_accuracy(p, torch.cat([c.x_test for c in cohort]), torch.cat([c.y_test for c in cohort]), xt_sizes)
        elapsed = (time.perf_counter() - t0) / n
        deltas = p - start
        samples = mask.sum(axis=(1, 2)).astype(np.int64).tolist()
        return [
            FitResult(
                delta=deltas[c],
                num_examples=sizes[c],
                loss_before=loss_before[c],
                loss_after=loss_after[c],
                accuracy=acc[c],
                steps=len(schedules[c]),
                samples=samples[c],
                compute_seconds=elapsed,
            )
            for c in range(n)
        ]

    def cohort_test_accuracy(self, params: torch.Tensor, cohort: list[ClientData]) -> np.ndarray:
        """Accuracy of each client's model (params (n, d), or one (d,) model for all) on its
        own local test split, as one batched forward pass (nan for an empty split)."""
        if not cohort:
            return np.zeros(0)
        p = params.detach().to(torch.float32)
        p = p.expand(len(cohort), -1) if p.dim() == 1 else p
        sizes = [int(c.y_test.shape[0]) for c in cohort]
        x = torch.cat([c.x_test for c in cohort])
        y = torch.cat([c.y_test for c in cohort])
        try:
            return np.asarray(self._cohort_accuracy(p, x, y, sizes))
        except (RuntimeError, NotImplementedError, ValueError):  # a module vmap cannot batch
            return np.array([self._accuracy(p[i], c.x_test, c.y_test) for i, c in enumerate(cohort)])

    @torch.no_grad()
    def _cohort_per_example(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-client (sum of losses, number correct) of each client's own params on its own rows."""
        n = len(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        width = max(sizes) if sizes else 0
        loss_sum = np.zeros(n)
        correct = np.zeros(n)
        if width == 0:
            return loss_sum, correct
        self.module.eval()
        logits_fn = vmap(self._logits)
        step = self.eval_columns
        for lo in range(0, width, step):
            cols = np.arange(lo, min(lo + step, width))
            valid = cols[None, :] < np.asarray(sizes)[:, None]
            rows = np.where(valid, offsets[:-1, None] + cols[None, :], 0)
            rows_t = torch.from_numpy(rows)
            logits = logits_fn(p, x[rows_t])
            yb = y[rows_t]
            v = torch.from_numpy(valid.astype(np.float32))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none").reshape(yb.shape)
            loss_sum += (loss * v).sum(1).double().numpy()
            correct += ((logits.argmax(-1) == yb).float() * v).sum(1).double().numpy()
        return loss_sum, correct

    def _cohort_mean_loss(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[float]:
        loss_sum, _ = self._cohort_per_example(p, x, y, sizes)
        return [float(l / s) if s else math.nan for l, s in zip(loss_sum, sizes)]

    def _cohort_accuracy(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[float]:
        _, correct = self._cohort_per_example(p, x, y, sizes)
        return [float(c / s) if s else math.nan for c, s in zip(correct, sizes)]
