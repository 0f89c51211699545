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

from ..params import HEAP_BLOCK_MAX, ParamSpec, empty_rows
from ..toolchain import compiler
from .base import ClientData, FitConfig, FitResult, cohort_rows, cohort_sizes

log = logging.getLogger(__name__)

EVAL_CHUNK = 8192  # examples per forward pass when evaluating
# A cohort trains in eager groups as large as two bounds allow.  TENSOR_BYTES: one
# parameter's (clients, *shape) float32 tensor (and so each of its per-step temporaries)
# stays under glibc's largest heap block (params.HEAP_BLOCK_MAX, 32 MiB), the mmap threshold a
# run sets (engine/running.py, RetainedHeap): a larger temporary would be a fresh mmap, with its page
# faults, at every step (about 2.5x the group's arithmetic, measured before the run kept its
# heap).  GROUP_BYTES: a group's parameters all together, so a model of many tensors keeps its
# groups' memory bounded.  Fewer groups mean fewer batched calls, each with ~1 ms of Python
# and dispatch: 1,000 clients of the 64-128-10 MLP (largest tensor 32 KiB a client) train as
# one group instead of five of 218 (the 8 MiB budget before): 150 ms a round instead of 190
# (vs_flower.py's workload, one thread; benchmarks/round_parts.py, mode `groups`).
TENSOR_BYTES = HEAP_BLOCK_MAX
GROUP_BYTES = 64 << 20
# A compiled step (training_kernels = "compiled") makes a few passes over a group's
# parameters instead of many, and is fastest when they stay in the last-level cache:
# ~100 clients of the 64-128-10 MLP (33 us a client for 5 steps, against 50 us in groups
# of 218 and 57 us in groups of 436: benchmarks/overhead.py's workload, AMD EPYC, 32 MiB L3).
COMPILED_GROUP_BYTES = 4 << 20
MIN_GROUP = 32  # clients per group at least, however large the model
# `[engine] training_kernels`: "eager" runs the batched step as torch's eager operations;
# "compiled" compiles it with torch.compile (inductor; needs a C++ compiler on the CPU).
TRAINING_KERNELS = ("eager", "compiled")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``engine.device``: "cpu", "cuda", "cuda:N" (ConfigError without a GPU) or "auto" (CUDA when present)."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError(f"engine.device = {device!r}: no CUDA device is available here (torch {torch.__version__}); use 'auto' or 'cpu'")
    return torch.device(device)


# -- mini-batches ------------------------------------------------------------------------------
# Each client's epochs are permutations of its examples drawn from its own seed by a
# counter-based hash (splitmix64 of (seed, epoch, position), sorted), so a whole cohort's
# batches are a few array operations rather than a torch generator per client, and a
# client's batches never depend on who else is in the cohort or in which order clients run.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BATCH_CHUNK = 1 << 22  # (clients x epochs x examples) keys sorted at once


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _epochs(sizes: np.ndarray, hp: FitConfig) -> np.ndarray:
    """Epochs each client's schedule draws (local_steps repeats epochs until that many batches)."""
    if hp.local_steps is None:
        return np.where(sizes > 0, hp.local_epochs, 0)
    per_epoch = np.maximum(1, -(-sizes // hp.batch_size))
    return np.where(sizes > 0, -(-hp.local_steps // per_epoch), 0)


def _permutations(sizes: np.ndarray, epochs: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """(n, max epochs, max size) int64: row [c, e] starts with a permutation of range(sizes[c])."""
    n = len(sizes)
    width, depth = int(sizes.max(initial=0)), int(epochs.max(initial=0))
    out = np.zeros((n, depth, width), dtype=np.int64)
    if width == 0 or depth == 0:
        return out
    pos = np.arange(width, dtype=np.uint64)
    ep = np.arange(1, depth + 1, dtype=np.uint64)
    lo = 0
    with np.errstate(over="ignore"):
        while lo < n:  # chunks of clients keep the keys' memory bounded
            hi = min(n, lo + max(1, _BATCH_CHUNK // (width * depth)))
            base = _mix64(seeds[lo:hi, None] ^ (ep[None, :] * _GOLDEN))  # (chunk, depth)
            keys = _mix64(base[:, :, None] + pos[None, None, :] * _GOLDEN)
            pad = np.broadcast_to(pos[None, None, :] >= sizes[lo:hi, None, None].astype(np.uint64), keys.shape)
            keys[pad] = np.uint64(0xFFFFFFFFFFFFFFFF)
            out[lo:hi] = np.argsort(keys, axis=2, kind="stable")
            lo = hi
    return out


def batch_indices(sizes, hp: FitConfig, seeds, limits=None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A cohort's mini-batches, drawn as one array computation.

    Client c (``sizes[c]`` examples, seed ``seeds[c]``) trains, epoch after epoch, on a
    fresh permutation of its examples cut into batches of ``batch_size`` (the last one of
    an epoch may be short); with ``local_steps`` epochs repeat until that many batches;
    ``limits[c]`` (partial work) cuts its schedule short.  Returns ``index`` (n, steps, b)
    int64 local row indices and ``mask`` (n, steps, b) float32 (a batch is the prefix
    ``index[c, s, :k]`` with k = ``mask[c, s].sum()``; padding points at row 0), and
    ``epoch`` (n, steps) int64: the epoch each step belongs to (-1 after a client's last
    step).  ``b`` is the largest batch any client has, ``steps`` the longest schedule."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    n = len(sizes)
    seeds = np.asarray([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64).reshape(-1)
    bs = int(hp.batch_size)
    epochs = _epochs(sizes, hp)
    per_epoch = np.maximum(1, -(-sizes // bs))
    total = epochs * per_epoch
    if hp.local_steps is not None:
        total = np.minimum(total, hp.local_steps)
    if limits is not None:
        cut = np.array([t if m is None else min(t, max(0, int(m))) for t, m in zip(total.tolist(), limits)], dtype=np.int64)
        total = cut.reshape(-1) if n else total
    total = np.where(sizes > 0, total, 0)
    steps = max(1, int(total.max(initial=0)))
    b = max(1, int(min(bs, sizes.max(initial=1))))
    perms = _permutations(sizes, epochs, seeds)
    s = np.arange(steps)[None, :]  # (1, steps)
    ep = s // per_epoch[:, None]  # (n, steps)
    j = s % per_epoch[:, None]
    live = s < total[:, None]
    pos = j[:, :, None] * bs + np.arange(b)[None, None, :]  # (n, steps, b)
    valid = live[:, :, None] & (pos < sizes[:, None, None])
    if perms.size:
        e_idx = np.minimum(ep, perms.shape[1] - 1)[:, :, None]
        p_idx = np.minimum(pos, perms.shape[2] - 1)
        index = np.where(valid, perms[np.arange(n)[:, None, None], e_idx, p_idx], 0)
    else:
        index = np.zeros((n, steps, b), dtype=np.int64)
    epoch = np.where(live, ep, -1)
    return torch.from_numpy(np.ascontiguousarray(index)), torch.from_numpy(valid.astype(np.float32)), epoch


def batch_schedule(n: int, hp: FitConfig, seed: int, max_steps: int | None = None) -> list[torch.Tensor]:
    """One client's mini-batches (index tensors), in order: `batch_indices` for a cohort of one."""
    index, mask, _ = batch_indices([n], hp, [seed], [max_steps])
    ks = mask[0].sum(-1).to(torch.int64).tolist()
    return [index[0, s, :k] for s, k in enumerate(ks) if k > 0]


def training_losses(losses: torch.Tensor, mask: torch.Tensor, epoch: np.ndarray) -> tuple[list[float], list[float]]:
    """Each client's (loss before, loss after) local training, from the batch losses its
    training computed anyway (`losses` (n, steps), each at the parameters before that step):

    - before: the loss of the received model on the client's first mini-batch (the first
      step's forward pass; all its data when it fits in one batch);
    - after: the mean batch loss over the client's last epoch, weighted by batch size (the
      running training loss of the last epoch, as training loops report it; the last epoch
      is partial when `local_steps` or a deadline cut it).

    NaN for a client that took no step.  No extra forward pass over the client's data."""
    n = losses.shape[0]
    if losses.shape[1] == 0:
        return [math.nan] * n, [math.nan] * n
    sizes = mask.sum(-1).to(torch.float64)  # (n, steps) batch sizes
    last = epoch.max(axis=1, initial=-1)
    in_last = torch.from_numpy((epoch == last[:, None]) & (epoch >= 0))
    w = sizes * in_last
    lw = losses.to(torch.float64)
    after = (lw * w).sum(1) / w.sum(1)  # nan (0/0) without steps
    before = torch.where(sizes[:, 0] > 0, lw[:, 0], torch.full((n,), math.nan, dtype=torch.float64))
    return before.tolist(), after.tolist()


class TorchLearner:
    """Trains a copy of `module` per client with (momentum) SGD on a flat vector.

    `device` (``engine.device``) is where training and evaluation compute: the cohort's
    parameters, data and steps move there for a call and the results (deltas, losses,
    accuracies) come back to the CPU, where the rest of the system keeps its vectors.  The
    module itself stays where it was built: `functional_call` runs it on whatever tensors it
    is given, so a module with buffers (which would stay behind) is refused off the CPU."""

    kernels = "eager"  # `[engine] training_kernels` (set_training_kernels)
    _fresh_steps = False  # a compiled kernel was built and has not run yet

    eval_chunk = EVAL_CHUNK  # examples per forward pass when evaluating
    eval_columns = 256  # rows per client per batched forward pass when evaluating a cohort

    def __init__(self, make_module: Callable[[], torch.nn.Module], vectorize: bool = True, max_group: int = 1024,
                 device: str | torch.device = "cpu"):
        self.make_module = make_module
        self._module = make_module()
        self.device = torch.device(device)
        buffers = [name for name, _ in self._module.named_buffers()]
        if self.device.type != "cpu" and buffers:
            raise ValueError(f"the model has buffers ({', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''}), which stay on "
                             f"the CPU while its parameters train on {self.device}; leave engine.device = 'cpu'")
        self._owner = threading.get_ident()
        self._thread_modules: dict[int, torch.nn.Module] = {}
        self.spec = ParamSpec.from_module(self._module)
        self.vectorize = vectorize
        self.max_group = max_group
        self._vmap_failed = False
        self._steps: dict[tuple, Callable | None] = {}  # compiled batched steps by options (None: failed)

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
        state["_steps"] = {}  # compiled code stays in its process: a worker compiles its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_steps", {})  # a learner pickled by an earlier build
        self._owner = threading.get_ident()  # the unpickling thread (e.g. a Ray worker's) owns the main module

    # -- parameters ------------------------------------------------------------
    def init_params(self, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make_module()
        return self.spec.flatten(dict(module.named_parameters()))

    def _logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._logits_of(self.spec.split(flat), x)

    def _logits_of(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The module's output with these tensors as its parameters (views of a flat vector)."""
        return functional_call(self.module, params, (x,))

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.module.eval()
        dev = self.device
        params = params.to(dev)
        losses, correct = [], []
        for xs, ys in zip(x.split(self.eval_chunk), y.split(self.eval_chunk)):
            xs, ys = xs.to(dev), ys.to(dev)
            logits = self._logits(params, xs)
            losses.append(F.cross_entropy(logits, ys, reduction="none"))
            correct.append((logits.argmax(-1) == ys).float())
        if not losses:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(losses).cpu(), torch.cat(correct).cpu()

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
        dev = self.device
        start = params.detach().to(dev, torch.float32)
        center = start if anchor is None else anchor.detach().to(dev, torch.float32)
        if correction is not None:
            correction = correction.to(dev)
        x, y = data.x.to(dev), data.y.to(dev)
        p = start.clone()
        buf: torch.Tensor | None = None
        index, mask, epoch = batch_indices([data.num_examples], hp, [seed], [max_steps])
        index = index.to(dev)
        ks = mask[0].sum(-1).to(torch.int64).tolist()
        losses: list[torch.Tensor] = []
        self.module.train()
        for s, k in enumerate(ks):
            if k == 0:
                break  # the schedule is over (a cut one, or no data)
            idx = index[0, s, :k]
            p.requires_grad_(True)
            loss = F.cross_entropy(self._logits(p, x[idx]), y[idx])
            (g,) = torch.autograd.grad(loss, p)
            losses.append(loss.detach())
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
        p = p.detach()
        before, after = training_losses(torch.stack(losses)[None].cpu() if losses else torch.zeros(1, 0), mask[:, : len(losses)],
                                        epoch[:, : len(losses)])
        return FitResult(
            delta=(p - start).cpu(),
            num_examples=data.num_examples,
            loss_before=before[0],
            loss_after=after[0],
            accuracy=self._accuracy(p, data.x_test, data.y_test),
            steps=len(losses),
            samples=int(sum(ks)),
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
                group = self.group_size()
                for lo in range(0, n, group):
                    hi = lo + group
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

    def group_size(self) -> int:
        """Clients trained as one batched computation: `max_group`, less for a large model
        (`GROUP_BYTES` of parameters per group, `COMPILED_GROUP_BYTES` with compiled steps;
        at least `MIN_GROUP` clients)."""
        if self.kernels == "compiled":
            fits = COMPILED_GROUP_BYTES // (4 * max(1, self.spec.dim))
        else:
            largest = max(self.spec.sizes, default=1)
            fits = min(GROUP_BYTES // (4 * max(1, self.spec.dim)), (TENSOR_BYTES - 1) // (4 * max(1, largest)))
        return max(1, min(self.max_group, max(MIN_GROUP, fits)))

    def _masked_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Differentiated with respect to the per-tensor views, not the flat vector: the flat
        # gradient would be one more (n, d) tensor assembled from the pieces at every step.
        losses = F.cross_entropy(self._logits_of(params, x), y, reduction="none")
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    # -- the compiled batched step (`[engine] training_kernels = "compiled"`) ---------------
    def _step_key(self, hp: FitConfig, corrected: bool) -> tuple:
        return (bool(hp.prox_mu), corrected, bool(hp.weight_decay), bool(hp.momentum))

    def _compiled_step(self, hp: FitConfig, corrected: bool) -> Callable | None:
        """The compiled step for these options, built on first use (None: it failed before,
        or there is no compiler: the eager step runs)."""
        key = self._step_key(hp, corrected)
        if key not in self._steps:
            if compiler() is None:
                self._steps[key] = None
                log.warning("training_kernels = \"compiled\": no C++ compiler for torch.compile on this machine; "
                            "training runs eager steps")
            else:
                self._steps[key] = compiled_step(self._module, self.spec.names, *key)
                self._fresh_steps = True
        return self._steps[key]

    def _collect_compiler_garbage(self) -> None:
        """After a kernel's first call (its compilation): one full garbage collection now,
        in the round that paid for the compiler.  Compiling leaves ~10^4 cyclic objects and
        a heap of long-lived ones; left alone, the collector's next full pass comes a few
        rounds later and costs ~0.3 s there (measured: one round of 0.5 s among rounds of
        0.19 s at 1,000 clients)."""
        import gc

        self._fresh_steps = False
        gc.collect()

    def _step_failed(self, hp: FitConfig, corrected: bool, exc: Exception) -> None:
        """Record a compiled step that raised (compiling happens on a call): eager from now on."""
        self._steps[self._step_key(hp, corrected)] = None
        first = str(exc).strip().splitlines()
        log.warning("training_kernels = \"compiled\": compiling the batched training step failed (%s: %s); "
                    "training runs eager steps", type(exc).__name__, first[0] if first else "")

    def _fit_vectorized(
        self, params: torch.Tensor, cohort: list[ClientData], hp: FitConfig, seeds: list[int],
        corrections: torch.Tensor | None, limits: list[int | None], anchor: torch.Tensor | None = None,
    ) -> list[FitResult]:
        t0 = time.perf_counter()
        n = len(cohort)
        dev = self.device  # everything the steps touch moves there once (no-ops on the CPU)
        start = params.detach().to(dev, torch.float32)
        start = start.expand(n, -1) if start.dim() == 1 else start
        center = start if anchor is None else anchor.detach().to(dev, torch.float32)
        sizes = cohort_sizes(cohort)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        x_all = cohort_rows(cohort, "x").to(dev)
        y_all = cohort_rows(cohort, "y").to(dev)
        # (n, steps, b) rows of x_all (padding points at the client's first row, masked out).
        index_t, mask_t, epoch = batch_indices(sizes, hp, seeds, limits)
        index_t = index_t + torch.from_numpy(offsets[:-1])[:, None, None]
        index_t.clamp_(0, max(0, len(y_all) - 1))  # an empty client's padding (masked out anyway)
        index_t, mask_d = index_t.to(dev), mask_t.to(dev)
        steps = index_t.shape[1]
        active = (mask_d.sum(-1) > 0).to(start.dtype)  # (n, steps)
        names = self.spec.names
        # The cohort's parameters as one contiguous (n, *shape) tensor per parameter, updated in
        # place (contiguous rows are faster to differentiate and update than views of a flat
        # (n, d) matrix); the flat deltas are assembled once at the end.
        views = {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.spec.split(start).items()}
        centers = self.spec.split(center) if hp.prox_mu else None
        corr = self.spec.split(corrections.to(dev)) if corrections is not None else None
        bufs: dict[str, torch.Tensor] = {}
        losses = torch.zeros(n, steps, device=dev)
        step_fn = vmap(grad_and_value(self._masked_loss))
        compiled = self._compiled_step(hp, corr is not None) if self.kernels == "compiled" else None
        if compiled is not None:
            knobs = {k: torch.tensor(float(v), device=dev) for k, v in
                     (("lr", hp.lr), ("mu", hp.prox_mu), ("wd", hp.weight_decay), ("momentum", hp.momentum))}
            if hp.momentum:
                bufs = {k: torch.zeros_like(v) for k, v in views.items()}
        self.module.train()
        for s in range(steps if len(y_all) else 0):
            rows = index_t[:, s]
            if compiled is not None:
                try:
                    losses[:, s] = compiled(views, x_all[rows], y_all[rows], mask_d[:, s], active[:, s], knobs,
                                            centers or {}, corr or {}, bufs)
                    if self._fresh_steps:
                        self._collect_compiler_garbage()
                    continue
                except Exception as exc:  # noqa: BLE001 - a model or setting the compiler cannot take: eager steps
                    self._step_failed(hp, corr is not None, exc)
                    compiled = None
            g, losses[:, s] = step_fn(views, x_all[rows], y_all[rows], mask_d[:, s])
            act = active[:, s]
            for k in names:
                gk, pk = g[k], views[k]
                shape = (-1,) + (1,) * (pk.dim() - 1)
                if hp.prox_mu:
                    gk = gk + hp.prox_mu * (pk - centers[k])
                if corr is not None:
                    gk = gk + corr[k]
                if hp.weight_decay:
                    gk = gk + hp.weight_decay * pk
                if hp.momentum:
                    # torch.optim.SGD semantics: the buffer starts as the first gradient.
                    b = bufs.get(k)
                    bufs[k] = gk = gk.clone() if b is None else torch.where(act.view(shape).bool(), hp.momentum * b + gk, b)
                pk.addcmul_(act.view(shape), gk, value=-hp.lr)  # in place: no (n, d) temporary per step
        loss_before, loss_after = training_losses(losses.cpu(), mask_t, epoch)
        # The (n, d) deltas in the spec's order, written in one pass from the per-tensor matrices
        # (on the CPU: off it, each tensor's difference is copied back).
        deltas = empty_rows(n, self.spec.dim, start.dtype)
        for (k, out), begin in zip(self.spec.split(deltas).items(), self.spec.split(start).values()):
            if dev.type == "cpu":
                torch.sub(views[k], begin, out=out)
            else:
                out.copy_(views[k] - begin)
        xt_sizes = cohort_sizes(cohort, test=True).tolist()
        if any(xt_sizes):
            trained = torch.cat([v.reshape(n, -1) for v in views.values()], 1) if dev.type != "cpu" else start + deltas
            acc = self._cohort_accuracy(trained, cohort_rows(cohort, "x_test"), cohort_rows(cohort, "y_test"), xt_sizes)
        else:  # no client has a local test split: nothing to evaluate
            acc = [math.nan] * n
        elapsed = (time.perf_counter() - t0) / n
        samples = mask_t.sum((1, 2)).to(torch.int64).tolist()
        n_steps = (epoch >= 0).sum(1).tolist()
        size_list = sizes.tolist()
        rows_out = deltas.unbind(0)
        return [
            FitResult(
                delta=rows_out[c],
                num_examples=size_list[c],
                loss_before=loss_before[c],
                loss_after=loss_after[c],
                accuracy=acc[c],
                steps=int(n_steps[c]) if size_list[c] else 0,
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
        sizes = cohort_sizes(cohort, test=True).tolist()
        x = cohort_rows(cohort, "x_test")
        y = cohort_rows(cohort, "y_test")
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
        dev = self.device
        p, x, y = p.to(dev), x.to(dev), y.to(dev)
        logits_fn = vmap(self._logits)
        step = self.eval_columns
        for lo in range(0, width, step):
            cols = np.arange(lo, min(lo + step, width))
            valid = cols[None, :] < np.asarray(sizes)[:, None]
            rows = np.where(valid, offsets[:-1, None] + cols[None, :], 0)
            rows_t = torch.from_numpy(rows).to(dev)
            logits = logits_fn(p, x[rows_t])
            yb = y[rows_t]
            v = torch.from_numpy(valid.astype(np.float32)).to(dev)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none").reshape(yb.shape)
            loss_sum += (loss * v).sum(1).double().cpu().numpy()
            correct += ((logits.argmax(-1) == yb).float() * v).sum(1).double().cpu().numpy()
        return loss_sum, correct

    def _cohort_mean_loss(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[float]:
        loss_sum, _ = self._cohort_per_example(p, x, y, sizes)
        return [float(l / s) if s else math.nan for l, s in zip(loss_sum, sizes)]

    def _cohort_accuracy(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[float]:
        _, correct = self._cohort_per_example(p, x, y, sizes)
        return [float(c / s) if s else math.nan for c, s in zip(correct, sizes)]


def compiled_step(module: torch.nn.Module, names, prox: bool, corrected: bool, decay: bool, momentum: bool) -> Callable:
    """One SGD step of a cohort as a compiled function (`torch.compile`, shapes dynamic, so
    one kernel serves every group size and batch width): the batched gradient and the
    update of the (n, *shape) parameter tensors in place, fused by inductor into a few
    passes over them.  The options are fixed per kernel; the rates are 0-d tensors, so a
    learning-rate schedule does not recompile.  The module is a private copy (a functional
    call swaps parameters into its module; the eager path's module stays another thread's
    to use).  The arithmetic is the eager step's, rounded differently: agreement to float
    rounding, not bit for bit."""
    own = copy.deepcopy(module)
    names = list(names)

    def masked_loss(params, x, y, mask):
        losses = F.cross_entropy(functional_call(own, params, (x,)), y, reduction="none")
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    grads = vmap(grad_and_value(masked_loss))

    def step(views, x, y, mask, act, knobs, centers, corrections, bufs):
        g, losses = grads(views, x, y, mask)
        for k in names:
            gk, pk = g[k], views[k]
            a = act.view((-1,) + (1,) * (pk.dim() - 1))
            if prox:
                gk = gk + knobs["mu"] * (pk - centers[k])
            if corrected:
                gk = gk + corrections[k]
            if decay:
                gk = gk + knobs["wd"] * pk
            if momentum:  # torch.optim.SGD's buffer; an inactive step leaves it
                b = torch.where(a > 0, knobs["momentum"] * bufs[k] + gk, bufs[k])
                bufs[k].copy_(b)
                gk = b
            pk.sub_(a * gk * knobs["lr"])
        return losses

    return torch.compile(step, dynamic=True)


def set_training_kernels(learner, mode: str) -> None:
    """`[engine] training_kernels` for every TorchLearner inside `learner` (a wrapper's
    inner learners: HeteroFL's widths, a clustered or distilling learner's base)."""
    if mode not in TRAINING_KERNELS:
        raise ValueError(f"training_kernels: allowed: {', '.join(TRAINING_KERNELS)}; got {mode!r}")
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, TorchLearner):
            obj.kernels = mode
            return
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = list(obj)
        elif type(obj).__module__.startswith("fleetlearn.") and hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for v in items:
            visit(v, depth + 1)

    visit(learner, 0)
