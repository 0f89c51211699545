"""Knowledge distillation on unlabeled data: FedDF on the server, and a small student for
the weakest devices.

FedDF (Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020, Algorithm 1): after averaging, the server treats the cohort's client
models ``x_k = x_t + delta_k`` as an ensemble teacher and, on unlabeled server data ``d``,
moves the averaged model toward the ensemble's averaged logits,

    x_{j} = x_{j-1} - eta * d/dx KL( sigma(sum_k w_k f(x_k, d) / T) || sigma(f(x_{j-1}, d) / T) ),

starting from ``x_0`` = the averaged model.  The paper uses Adam and stops early on a
validation signal; here the signal is label-free: a held-out slice of the unlabeled data
(``val_fraction``), and the parameters with the lowest held-out KL to the teacher are
returned (the averaged model itself if no step improves on it).  KL is scaled by ``T^2``
(Hinton, Vinyals & Dean 2015, Sec. 2) so the gradient size does not depend on ``T``.

The ensemble's logits are one ``torch.func.vmap`` over the stacked client vectors: no Python
loop over clients.  Averaging logits (rather than probabilities) is FedDF's choice (Sec. 3).

`distill_student` uses the same loop to compress a teacher (e.g. the global model) into a
smaller architecture for devices that cannot hold the teacher (Hinton et al. 2015).

Everything works on flat float32 vectors and a module used as a template through
``torch.func.functional_call``, as `TorchLearner` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..params import ParamSpec

__all__ = ["DistillResult", "FedDFStep", "StudentDistiller", "split_unlabeled", "distill", "distill_student", "ensemble_logits", "feddf", "kl_to_teacher", "logits"]

EVAL_CHUNK = 8192  # examples per forward pass outside training


@dataclass
class DistillResult:
    """The distilled parameters and what the distillation measured."""

    params: torch.Tensor  # flat float32 vector of the student (for FedDF: the new global model)
    kl_before: float  # held-out KL(teacher || student) at the start (all the data if no hold-out)
    kl_after: float  # the same for the returned params
    steps: int  # optimizer steps taken
    best_step: int  # the step whose params are returned (0 = the starting params)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL) checks

    def to_metrics(self, prefix: str = "distill") -> dict[str, float]:
        return {f"{prefix}_kl_before": self.kl_before, f"{prefix}_kl_after": self.kl_after,
                f"{prefix}_steps": float(self.steps), f"{prefix}_best_step": float(self.best_step)}


def _call(module: nn.Module, spec: ParamSpec, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return functional_call(module, spec.split(flat), (x,))


@torch.no_grad()
def logits(module: nn.Module, spec: ParamSpec, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` logits of one flat parameter vector on ``x``, in chunks."""
    module.eval()
    return torch.cat([_call(module, spec, params, xs) for xs in x.split(EVAL_CHUNK)]) if len(x) else torch.zeros(0)


@torch.no_grad()
def ensemble_logits(module: nn.Module, spec: ParamSpec, client_params: torch.Tensor, x: torch.Tensor, weights=None) -> torch.Tensor:
    """FedDF's teacher: ``sum_k w_k f(x_k, x) / sum_k w_k`` over the rows of ``client_params``
    ``(n, d)``, one `vmap` over the clients per chunk of ``x``.  ``weights`` default to uniform
    (the paper's 1/|S_t|); pass example counts for FedAvg-style weights."""
    if client_params.ndim != 2 or client_params.shape[1] != spec.dim:
        raise ValueError(f"ensemble_logits: client_params must be (n, {spec.dim}), got {tuple(client_params.shape)}")
    n = client_params.shape[0]
    if n == 0:
        raise ValueError("ensemble_logits: no client models")
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"ensemble_logits: weights must be {n} finite non-negative numbers with a positive sum")
    w = (w / w.sum()).to(torch.float32)
    module.eval()
    batched = vmap(lambda p, xs: _call(module, spec, p, xs), in_dims=(0, None))
    chunk = max(1, EVAL_CHUNK // max(1, n))  # bound the (n, chunk, C) temporary
    parts = [torch.einsum("n,nbc->bc", w, batched(client_params.to(torch.float32), xs)) for xs in x.split(chunk)]
    return torch.cat(parts)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over examples."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean", log_target=True) * (t * t)


@torch.no_grad()
def kl_to_teacher(module: nn.Module, spec: ParamSpec, params: torch.Tensor, x: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """The distillation objective of ``params`` on ``x`` (see `_kl`)."""
    if len(x) == 0:
        return math.nan
    return float(_kl(logits(module, spec, params, x), teacher_logits, temperature))


def distill(
    module: nn.Module,
    spec: ParamSpec,
    params: torch.Tensor,
    x: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    temperature: float = 1.0,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    check_every: int = 10,
    seed: int = 0,
) -> DistillResult:
    """Adam on ``T^2 KL(teacher || student)`` from ``params``, mini-batches of ``x`` drawn by a
    seeded generator (epochs of fresh permutations).  With ``val_fraction > 0`` a seeded
    slice of ``x`` is held out, its KL checked every ``check_every`` steps and the best
    params (possibly the starting ones) returned; with 0 the last params are returned."""
    if x.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"distill: {x.shape[0]} inputs but {teacher_logits.shape[0]} teacher rows")
    if steps < 0 or batch_size < 1 or check_every < 1:
        raise ValueError(f"distill: steps >= 0, batch_size >= 1 and check_every >= 1 needed (got {steps}, {batch_size}, {check_every})")
    if not (temperature > 0):
        raise ValueError(f"distill: temperature must be > 0, got {temperature}")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"distill: val_fraction must be in [0, 1), got {val_fraction}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("distill: no unlabeled data")
    gen = torch.Generator().manual_seed(seed)
    teacher_logits = teacher_logits.detach().to(torch.float32)
    order = torch.randperm(n, generator=gen)
    n_val = int(round(val_fraction * n)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    val, train = order[:n_val], order[n_val:]
    xv, tv = (x[val], teacher_logits[val]) if n_val else (x, teacher_logits)
    xt, tt = x[train], teacher_logits[train]

    p = params.detach().to(torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    best = p.detach().clone()
    kl0 = kl_to_teacher(module, spec, best, xv, tv, temperature)
    best_kl, best_step = kl0, 0
    history = [(0, kl0)]
    batches: list[torch.Tensor] = []
    for step in range(1, steps + 1):
        if not batches:
            batches = list(torch.randperm(len(train), generator=gen).split(batch_size))
        idx = batches.pop(0)
        module.train()
        loss = _kl(_call(module, spec, p, xt[idx]), tt[idx], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if n_val and (step % check_every == 0 or step == steps):
            kl = kl_to_teacher(module, spec, p.detach(), xv, tv, temperature)
            history.append((step, kl))
            if kl < best_kl:
                best_kl, best_step, best = kl, step, p.detach().clone()
    if not n_val:
        best = p.detach().clone()
        best_kl, best_step = kl_to_teacher(module, spec, best, xv, tv, temperature), steps
        history.append((steps, best_kl))
    return DistillResult(best, kl0, best_kl, steps, best_step, history)


def feddf(
    module: nn.Module,
    spec: ParamSpec,
    global_params: torch.Tensor,
    client_params: torch.Tensor,
    x_unlabeled: torch.Tensor,
    *,
    weights=None,
    steps: int = 200,
    lr: float = 1e-3,
    temperature: float = 1.0,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    check_every: int = 10,
    seed: int = 0,
) -> DistillResult:
    """FedDF server step (Lin et al. 2020, Alg. 1, lines 6-10): distil the ensemble of the
    cohort's models ``client_params`` ``(n, d)`` (= model sent + each client's delta) into
    ``global_params`` (the model after averaging and the server optimizer) on
    ``x_unlabeled``.  ``result.params`` is the new global model."""
    teacher = ensemble_logits(module, spec, client_params, x_unlabeled, weights)
    return distill(
        module, spec, global_params, x_unlabeled, teacher, steps=steps, lr=lr, temperature=temperature,
        batch_size=batch_size, val_fraction=val_fraction, check_every=check_every, seed=seed,
    )


def distill_student(
    teacher_params: torch.Tensor,
    teacher_module_fn: Callable[[], nn.Module],
    student_module_fn: Callable[[], nn.Module],
    x_unlabeled: torch.Tensor,
    steps: int = 1000,
    temperature: float = 2.0,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    student_params: torch.Tensor | None = None,
    val_fraction: float = 0.1,
    check_every: int = 50,
    seed: int = 0,
) -> DistillResult:
    """Distil a teacher (flat params of ``teacher_module_fn()``) into the architecture of
    ``student_module_fn()`` on unlabeled inputs; ``result.params`` is the student's flat
    vector.  The student starts from ``student_params`` (e.g. last round's student, so the
    distillation is incremental) or a fresh initialisation seeded by ``seed``."""
    t_module = teacher_module_fn()
    t_spec = ParamSpec.from_module(t_module)
    if teacher_params.shape != (t_spec.dim,):
        raise ValueError(f"distill_student: teacher params have shape {tuple(teacher_params.shape)}, the teacher module needs ({t_spec.dim},)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s_module = student_module_fn()
    s_spec = ParamSpec.from_module(s_module)
    if student_params is None:
        start = s_spec.flatten(dict(s_module.named_parameters()))
    else:
        if student_params.shape != (s_spec.dim,):
            raise ValueError(f"distill_student: student params have shape {tuple(student_params.shape)}, the student module needs ({s_spec.dim},)")
        start = student_params
    teacher = logits(t_module, t_spec, teacher_params.to(torch.float32), x_unlabeled)
    return distill(
        s_module, s_spec, start, x_unlabeled, teacher, steps=steps, lr=lr, temperature=temperature,
        batch_size=batch_size, val_fraction=val_fraction, check_every=check_every, seed=seed,
    )


# -- the engine's parts ------------------------------------------------------------------------


def split_unlabeled(central_x: torch.Tensor, central_y: torch.Tensor, fraction: float, seed: int):
    """A seeded ``fraction`` of the held-out central set becomes the server's unlabeled data
    (inputs only); the rest stays the central test set.  Returns ``(x_unlabeled, x_test, y_test)``;
    the two parts are disjoint, so distillation never sees an evaluation input."""
    n = int(central_y.numel())
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"distill.server_fraction must be in (0, 1), got {fraction}")
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise ValueError(f"distill.server_fraction = {fraction} of the {n} held-out examples leaves no unlabeled or no test data")
    order = torch.from_numpy(np.random.default_rng([seed, 0xD157]).permutation(n))
    server, test = order[:k], order[k:]
    return central_x[server], central_x[test], central_y[test]


def _round_seed(seed: int, round: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, round, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class FedDFStep:
    """FedDF as a server step after aggregation (Lin et al. 2020, Alg. 1, lines 6-10).

    The teacher is the cohort's ensemble: each accepted client's model ``x_t + delta_k`` (at
    its own width under HeteroFL: the sub-model ``x_t[index_r] + delta_k``; outputs are full at
    every width, so the logits average directly), weighted by its aggregation weight.  The
    model after the server optimizer is distilled towards it on the unlabeled server data;
    the held-out KL picks the step (the fused model itself if no step improves it).
    Records ``feddf_kl_before``, ``feddf_kl_after``, ``feddf_best_step`` in ``record.extra``."""

    name = "feddf"

    def __init__(self, module: nn.Module, spec: ParamSpec, x_unlabeled: torch.Tensor, *, steps: int, lr: float,
                 temperature: float, batch_size: int, val_fraction: float, seed: int, heterofl=None):
        self.module, self.spec, self.x = module, spec, x_unlabeled
        self.kw = dict(steps=steps, lr=lr, temperature=temperature, batch_size=batch_size, val_fraction=val_fraction)
        self.seed = seed
        self.heterofl = heterofl  # fleetlearn.learners.heterofl.HeteroFLLearner or None

    def teacher(self, base: torch.Tensor, client_ids, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.heterofl is None:
            return ensemble_logits(self.module, self.spec, base[None, :] + matrix, self.x, weights)
        plan = self.heterofl.plan
        widths = self.heterofl.widths_of(client_ids)
        total = None
        for w in np.unique(widths):
            rows = torch.from_numpy(np.flatnonzero(widths == w))
            idx, learner = plan.index[float(w)], plan.learners[float(w)]
            models = base[idx][None, :] + matrix[rows][:, idx]
            part = ensemble_logits(learner.module, learner.spec, models, self.x, weights[rows]) * float(weights[rows].sum())
            total = part if total is None else total + part
        return total / float(weights.sum())

    def apply(self, coordinator, record, got, matrix: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([c.weight for c in got.accepted], dtype=torch.float32)
        if float(weights.sum()) <= 0:
            return new_params
        teacher = self.teacher(coordinator.params, [c.client_id for c in got.accepted], matrix, weights)
        out = distill(self.module, self.spec, new_params, self.x, teacher, seed=_round_seed(self.seed, record.round, 0xFEDDF), **self.kw)
        record.extra.update(out.to_metrics("feddf"))
        return out.params


class StudentDistiller:
    """Round hook: distils the global model into a small on-device student (Hinton et al.
    2015) for the weakest devices, every ``every`` rounds and after the last, warm-starting
    from the previous student.  Records ``student_accuracy`` (central test set),
    ``student_agreement`` with the global model there, ``student_dim`` and ``student_kl``;
    the final student is saved as ``student.safetensors`` in the run directory."""

    def __init__(self, teacher_fn: Callable[[], nn.Module], student_fn: Callable[[], nn.Module], x_unlabeled: torch.Tensor,
                 central_x: torch.Tensor, central_y: torch.Tensor, *, steps: int, every: int, temperature: float, seed: int, rounds: int):
        self.teacher_fn, self.student_fn, self.x = teacher_fn, student_fn, x_unlabeled
        self.cx, self.cy = central_x, central_y
        self.steps, self.every, self.temperature, self.seed, self.rounds = steps, every, temperature, seed, rounds
        self.t_module = teacher_fn()
        self.t_spec = ParamSpec.from_module(self.t_module)
        self.s_module = student_fn()
        self.s_spec = ParamSpec.from_module(self.s_module)
        self.params: torch.Tensor | None = None

    def after_round(self, record, coordinator) -> None:
        if not (record.round % self.every == 0 or record.round == self.rounds):
            return
        out = distill_student(coordinator.params, self.teacher_fn, self.student_fn, self.x, steps=self.steps, temperature=self.temperature,
                              student_params=self.params, seed=_round_seed(self.seed, record.round, 0x57D))
        self.params = out.params
        s_pred = logits(self.s_module, self.s_spec, out.params, self.cx).argmax(-1)
        t_pred = logits(self.t_module, self.t_spec, coordinator.params, self.cx).argmax(-1)
        record.extra.update(
            student_accuracy=float((s_pred == self.cy).float().mean()) if self.cy.numel() else math.nan,
            student_agreement=float((s_pred == t_pred).float().mean()) if self.cy.numel() else math.nan,
            student_dim=self.s_spec.dim,
            student_kl=out.kl_after,
        )
        store = getattr(coordinator, "store", None)
        if store is not None and record.round == self.rounds:
            from safetensors.torch import save_file

            save_file({"params": out.params.contiguous()}, str(store.run_dir / "student.safetensors"))
