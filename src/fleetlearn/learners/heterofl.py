"""HeteroFL: width-reduced sub-models for clients with less memory.

Diao, Ding & Tarokh, "HeteroFL: Computation and Communication Efficient Federated Learning
for Heterogeneous Clients", ICLR 2021.

A client of width ``r`` in (0, 1] trains the sub-model that keeps, in every hidden layer
``l``, the first ``k_l = ceil(r * h_l)`` units (Sec. 3, "static" allocation: the sub-model's
parameters are the upper-left block ``W_l[:k_l, :k_{l-1}]`` of every weight, eq. (1)); input
and output dimensions stay full.  Sub-models of smaller widths are nested inside those of
larger widths, so the server sends each client ``global[index_r]`` and receives a delta of
the sub-model's size.

Aggregation of overlapping parameters (Sec. 3, eq. (2)): each coordinate of the global model
is the weighted average over exactly the clients whose sub-model contains it,

    Delta[j] = sum_i w_i m_ij delta_ij / sum_i w_i m_ij,     m_ij = 1 if client i covers j,

and 0 where no client of the round covers ``j`` (those parameters stay unchanged).  With
every client at width 1 this is weighted FedAvg (McMahan et al., AISTATS 2017).

What this module does *not* do (HeteroFL's optional extras, not needed for MLPs): the
"scaler" that divides a sub-model's activations by ``r`` during training, static batch
norm, and the "masking trick" for label-skewed data.  A sub-model here computes exactly
the full model restricted to its units, which the tests check.

The slicing works on any `ParamSpec` that is a chain of Linear layers (a 2-D ``weight``
``(out, in)`` optionally followed by a 1-D ``bias`` ``(out,)``), which is what
`fleetlearn.learners.models.mlp` builds.  Everything is index tensors into the flat vector,
so slicing is one gather and aggregation is ``index_add_`` (no ``(n, d)`` boolean masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..aggregation.mean import check_weights, coverage_mean, mean
from ..params import ParamSpec
from .base import ClientData, FitConfig, FitResult
from .models import mlp
from .torch_learner import TorchLearner

__all__ = [
    "HeteroFLAggregator",
    "HeteroFLLearner",
    "HeteroFLPlan",
    "HeteroFLRecorder",
    "heterofl_parts",
    "LinearLayer",
    "coverage_mask",
    "embed",
    "heterofl_aggregate",
    "heterofl_client_learner",
    "kept_units",
    "linear_layers",
    "mlp_width_factory",
    "sub_spec",
    "width_slices",
]


# -- the layer chain of a spec ---------------------------------------------------------


@dataclass(frozen=True)
class LinearLayer:
    """One Linear layer of a spec: positions of its tensors in the spec and its shape."""

    weight: int  # position of the (out, in) weight in spec.names
    bias: int | None  # position of the (out,) bias, or None
    out_features: int
    in_features: int


def linear_layers(spec: ParamSpec) -> list[LinearLayer]:
    """The spec as a chain of Linear layers, or ValueError naming the tensor that is not."""
    layers: list[LinearLayer] = []
    i = 0
    while i < len(spec.shapes):
        shape = spec.shapes[i]
        if len(shape) != 2:
            raise ValueError(
                f"HeteroFL width slicing needs a chain of Linear layers (2-D weight, optional 1-D bias); "
                f"tensor {spec.names[i]!r} has shape {shape}"
            )
        out_f, in_f = shape
        bias = None
        if i + 1 < len(spec.shapes) and spec.shapes[i + 1] == (out_f,):
            bias = i + 1
        if layers and layers[-1].out_features != in_f:
            raise ValueError(
                f"HeteroFL width slicing: {spec.names[i]!r} takes {in_f} inputs but the layer before "
                f"has {layers[-1].out_features} outputs; the spec is not a chain of Linear layers"
            )
        layers.append(LinearLayer(i, bias, out_f, in_f))
        i += 2 if bias is not None else 1
    if not layers:
        raise ValueError("HeteroFL width slicing: the spec has no tensors")
    return layers


def _check_width(width: float) -> float:
    w = float(width)
    if not (0.0 < w <= 1.0) or math.isnan(w):
        raise ValueError(f"HeteroFL width must be in (0, 1], got {width}")
    return w


def kept_units(hidden: int, width: float) -> int:
    """``ceil(width * hidden)``, at least 1 (HeteroFL's ``int(np.ceil(rate * size))``).

    The product is rounded to 9 decimals first so that e.g. 0.3 * 10 keeps 3 units, not 4."""
    return max(1, math.ceil(round(_check_width(width) * hidden, 9)))


def _kept(layers: list[LinearLayer], width: float) -> list[tuple[int, int]]:
    """(out kept, in kept) per layer: hidden units shrink, input and output stay full."""
    hidden = [kept_units(l.out_features, width) for l in layers[:-1]]
    outs = hidden + [layers[-1].out_features]
    ins = [layers[0].in_features] + hidden
    return list(zip(outs, ins))


# -- slicing, embedding, coverage ------------------------------------------------------------


def width_slices(spec: ParamSpec, width: float) -> torch.Tensor:
    """Indices into the flat global vector of the width-``width`` sub-model, in the sub-model's
    own flat order (so ``global[index]`` *is* the sub-model's parameter vector).

    For each layer the kept block is ``W[:k_out, :k_in]`` (row-major, as torch flattens it)
    and ``b[:k_out]``: rows of ``W_l`` and ``b_l`` for the kept units of hidden layer ``l``,
    columns of ``W_{l+1}`` for the same units."""
    layers = linear_layers(spec)
    offsets = spec.offsets
    parts: list[torch.Tensor] = []
    for layer, (k_out, k_in) in zip(layers, _kept(layers, width)):
        rows = torch.arange(k_out, dtype=torch.int64)
        cols = torch.arange(k_in, dtype=torch.int64)
        parts.append(offsets[layer.weight] + (rows[:, None] * layer.in_features + cols[None, :]).reshape(-1))
        if layer.bias is not None:
            parts.append(offsets[layer.bias] + rows)
    return torch.cat(parts)


def sub_spec(spec: ParamSpec, width: float) -> ParamSpec:
    """The ParamSpec of the width-``width`` sub-model (same names, reduced shapes)."""
    layers = linear_layers(spec)
    shapes = list(spec.shapes)
    for layer, (k_out, k_in) in zip(layers, _kept(layers, width)):
        shapes[layer.weight] = (k_out, k_in)
        if layer.bias is not None:
            shapes[layer.bias] = (k_out,)
    return ParamSpec(spec.names, tuple(shapes))


def embed(sub: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """A sub-model vector ``(d_r,)`` (or batch ``(n, d_r)``) placed into zeros of size ``dim``."""
    if sub.shape[-1] != index.numel():
        raise ValueError(f"embed: sub-vector has {sub.shape[-1]} entries, the index {index.numel()}")
    out = sub.new_zeros(tuple(sub.shape[:-1]) + (dim,))
    out[..., index] = sub
    return out


# HeteroFL's aggregate (Diao et al. 2021, eq. (2)) is the coverage mean: each coordinate averaged
# over the clients whose sub-model covers it.  The name is kept for HeteroFL's callers.
heterofl_aggregate = coverage_mean


def coverage_mask(index: torch.Tensor, dim: int) -> torch.Tensor:
    """``(dim,)`` bool: which global coordinates the sub-model with this index contains."""
    m = torch.zeros(dim, dtype=torch.bool)
    m[index] = True
    return m


# -- a plan: widths, their learners, assignment, batched training ----------------------------


def mlp_width_factory(num_features: int, num_classes: int, hidden: Sequence[int]) -> Callable[[float], nn.Module]:
    """``width -> mlp(F, C, [ceil(width * h) for h in hidden])``: the sub-model constructor
    matching `width_slices` of ``mlp(F, C, hidden)``."""
    hidden = list(hidden)
    return lambda width: mlp(num_features, num_classes, [kept_units(h, width) for h in hidden])


class HeteroFLPlan:
    """The widths of a HeteroFL run, one `TorchLearner` per width and the slicing between them.

    - ``widths``: the model rates, e.g. ``(1.0, 0.5, 0.25)``, kept in descending order.  The
      global model is the width-1 model; include 1.0 so that its outer units are trained.
    - ``make_module_for_width(width) -> nn.Module``: builds a sub-model; its ParamSpec must
      equal ``sub_spec(spec, width)`` (checked).  `for_mlp` builds one for `models.mlp`.
    - ``full_width_memory_mb``: memory a device needs to train the full model.  A width-``r``
      sub-model is charged ``full_width_memory_mb * d_r / d`` (parameters, gradients and
      optimizer state all scale with the parameter count; MLP activations scale with the
      hidden width too, so this slightly over-charges small widths).  `width_for_memory`
      gives a device the largest width that fits, and the smallest width if none does.

    Each width's cohort trains as one batched computation (`TorchLearner.fit_cohort`).
    """

    name = "heterofl"
    key = "model.widths"  # the config key that lists the sub-models (messages)

    def __init__(
        self,
        spec: ParamSpec,
        widths: Sequence[float] = (1.0, 0.5, 0.25),
        make_module_for_width: Callable[[float], nn.Module] | None = None,
        *,
        full_width_memory_mb: float | None = None,
        vectorize: bool = True,
    ):
        if not widths:
            raise ValueError("HeteroFL needs at least one width")
        ws = sorted({_check_width(w) for w in widths}, reverse=True)
        if len(ws) != len(list(widths)):
            raise ValueError(f"HeteroFL widths must be distinct, got {list(widths)}")
        if make_module_for_width is None:
            raise ValueError("HeteroFLPlan needs make_module_for_width (see HeteroFLPlan.for_mlp)")
        if full_width_memory_mb is not None and not full_width_memory_mb > 0:
            raise ValueError(f"full_width_memory_mb must be > 0, got {full_width_memory_mb}")
        self.spec = spec
        self.widths: tuple[float, ...] = tuple(ws)
        self.full_width_memory_mb = full_width_memory_mb
        self.index = {w: self.slice_index(w) for w in self.widths}
        self.specs = {w: self.slice_spec(w) for w in self.widths}
        self.learners: dict[float, TorchLearner] = {}
        for w in self.widths:
            learner = self.make_learner(lambda w=w: make_module_for_width(w), vectorize)
            if learner.spec != self.specs[w]:
                raise ValueError(
                    f"make_module_for_width({w}) builds a model with shapes {learner.spec.shapes}, "
                    f"but width slicing of the global model gives {self.specs[w].shapes}"
                )
            self.learners[w] = learner

    # What a sub-model is (a subclass slices otherwise: fleetlearn.learners.hf.LoraRankPlan, by LoRA rank).
    def slice_index(self, width: float) -> torch.Tensor:
        return width_slices(self.spec, width)

    def slice_spec(self, width: float) -> ParamSpec:
        return sub_spec(self.spec, width)

    def make_learner(self, make: Callable[[], nn.Module], vectorize: bool) -> TorchLearner:
        return TorchLearner(make, vectorize=vectorize)

    def describe(self, width: float) -> str:
        """A sub-model in messages: "model width 0.5" (LoRA: "LoRA rank 4")."""
        return f"model width {float(width):g}"

    def values(self) -> list:
        """The sub-models as the config lists them (``key``): the widths (LoRA: the ranks)."""
        return list(self.widths)

    @classmethod
    def for_mlp(cls, num_features: int, num_classes: int, hidden: Sequence[int], widths: Sequence[float] = (1.0, 0.5, 0.25), **kwargs) -> "HeteroFLPlan":
        spec = ParamSpec.from_module(mlp(num_features, num_classes, list(hidden)))
        return cls(spec, widths, mlp_width_factory(num_features, num_classes, hidden), **kwargs)

    # -- sizes and assignment ---------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.spec.dim

    def sub_dim(self, width: float) -> int:
        return int(self.index[self._known(width)].numel())

    def relative_size(self, width: float) -> float:
        """``d_r / d``: the share of the global model's parameters (and of its bytes on the wire)."""
        return self.sub_dim(width) / self.dim

    def memory_required_mb(self, width: float) -> float:
        if self.full_width_memory_mb is None:
            raise ValueError("HeteroFLPlan: memory-based assignment needs full_width_memory_mb")
        return self.full_width_memory_mb * self.relative_size(width)

    def width_for_memory(self, memory_mb) -> np.ndarray:
        """Per device: the largest width whose `memory_required_mb` fits in ``memory_mb``
        (the smallest width where none fits).  Vectorised over an array of devices."""
        mem = np.asarray(memory_mb, dtype=np.float64)
        need = np.array([self.memory_required_mb(w) for w in self.widths])  # descending
        fits = mem[..., None] >= need  # (..., widths)
        first = np.where(fits.any(-1), fits.argmax(-1), len(self.widths) - 1)
        return np.asarray(self.widths)[first]

    def width_for_tier(self, tier) -> np.ndarray:
        """Tier 0 = the largest width, 1 the next, ...; tiers past the last get the smallest."""
        t = np.clip(np.asarray(tier, dtype=np.int64), 0, len(self.widths) - 1)
        return np.asarray(self.widths)[t]

    def round_robin(self, num_clients: int) -> np.ndarray:
        """Client c gets ``widths[c % len(widths)]`` (HeteroFL's fixed, equal proportions)."""
        return self.widths_by_rule("round_robin", np.arange(num_clients))

    def widths_by_rule(self, rule: str, clients, memory_mb=None) -> np.ndarray:
        """``model.width_rule`` for these client ids: "round_robin" (client c gets
        ``widths[c % len(widths)]``) or "memory" (`width_for_memory` of ``memory_mb``, one
        value per client).  The simulation assigns its whole population with it, the gRPC
        server each client as it registers (`HeteroFLLearner.assign`)."""
        clients = np.asarray(clients, dtype=np.int64)
        if rule == "round_robin":
            return self.width_for_tier(clients % len(self.widths))
        if rule == "memory":
            if memory_mb is None:
                raise ValueError("model.width_rule = 'memory' needs device memory (devices.memory_mb)")
            return self.width_for_memory(np.broadcast_to(np.asarray(memory_mb, dtype=np.float64), clients.shape))
        raise ValueError(f"unknown width rule {rule!r}; allowed: 'memory', 'round_robin'")

    def _known(self, width: float) -> float:
        w = float(width)
        if w not in self.index:
            raise ValueError(f"width {width} is not one of this plan's widths {list(self.widths)}")
        return w

    # -- parameters ---------------------------------------------------------------------
    def init_params(self, seed: int) -> torch.Tensor:
        """The global (width-1 shaped) model, initialised like the full model."""
        full = self.learners.get(1.0)
        if full is not None:
            return full.init_params(seed)
        raise ValueError("HeteroFLPlan.init_params needs width 1.0 among the widths; initialise the global model yourself")

    def slice(self, params: torch.Tensor, width: float) -> torch.Tensor:
        """The width-``width`` sub-model's flat vector: ``params[index]``."""
        return params[..., self.index[self._known(width)]]

    def embed(self, sub: torch.Tensor, width: float) -> torch.Tensor:
        return embed(sub, self.index[self._known(width)], self.dim)

    # -- training, aggregation, evaluation -----------------------------------------------
    def _groups(self, widths: Sequence[float]) -> dict[float, list[int]]:
        groups: dict[float, list[int]] = {}
        for i, w in enumerate(widths):
            groups.setdefault(self._known(w), []).append(i)
        return groups

    def fit_cohort(
        self, params: torch.Tensor, cohort: list[ClientData], widths: Sequence[float], hp: FitConfig, seeds: list[int],
        step_limits: list[int | None] | None = None,
    ) -> list[FitResult]:
        """Train every client at its width from the sliced global model; one batched
        `fit_cohort` per width.  Results are in cohort order; ``delta`` is the sub-model's."""
        if len(widths) != len(cohort) or len(seeds) != len(cohort):
            raise ValueError(f"fit_cohort: {len(cohort)} clients, {len(widths)} widths, {len(seeds)} seeds")
        limits = step_limits if step_limits is not None else [None] * len(cohort)
        out: list[FitResult | None] = [None] * len(cohort)
        for w, members in self._groups(widths).items():
            res = self.learners[w].fit_cohort(
                self.slice(params, w), [cohort[i] for i in members], hp, [seeds[i] for i in members],
                step_limits=[limits[i] for i in members],
            )
            for i, r in zip(members, res):
                out[i] = r
        return out  # type: ignore[return-value]

    def aggregate(self, widths: Sequence[float], sub_deltas: Sequence[torch.Tensor], weights) -> torch.Tensor:
        """`coverage_mean` of sub-model deltas, summed per width group: one ``(n_r, d_r)``
        matrix-vector product and one ``index_add_`` per width."""
        n = len(sub_deltas)
        if len(widths) != n:
            raise ValueError(f"aggregate: {n} deltas but {len(widths)} widths")
        if n == 0:
            raise ValueError("coverage_mean: cannot aggregate an empty cohort (n = 0)")
        w = check_weights(weights, n)
        groups = self._groups(widths)
        for wid, members in groups.items():
            for i in members:
                if sub_deltas[i].numel() != self.sub_dim(wid):
                    raise ValueError(f"aggregate: delta {i} has {sub_deltas[i].numel()} entries, width {wid} needs {self.sub_dim(wid)}")
        if list(groups) == [1.0] and self.sub_dim(1.0) == self.dim:
            return mean(torch.stack([d.to(torch.float32) for d in sub_deltas]), weights)
        num = torch.zeros(self.dim, dtype=torch.float64)
        den = torch.zeros(self.dim, dtype=torch.float64)
        for wid, members in groups.items():
            idx = self.index[wid]
            wg = w[members]
            mat = torch.stack([sub_deltas[i] for i in members]).to(torch.float64)
            num.index_add_(0, idx, wg @ mat)
            den.index_add_(0, idx, wg.sum().expand(idx.numel()))
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0).to(torch.float32)

    def per_example(self, params: torch.Tensor, width: float, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and correctness of the global model evaluated at ``width``."""
        w = self._known(width)
        return self.learners[w].per_example(self.slice(params, w), x, y)

    def accuracy(self, params: torch.Tensor, width: float, x: torch.Tensor, y: torch.Tensor) -> float:
        if y.numel() == 0:
            return math.nan
        return float(self.per_example(params, width, x, y)[1].mean())

    def client_accuracy(self, params: torch.Tensor, clients: list[ClientData], widths: Sequence[float]) -> np.ndarray:
        """Each client's local-test accuracy of the global model at the client's own width
        (HeteroFL evaluates every client with the sub-model it would run)."""
        out = np.full(len(clients), np.nan)
        for w, members in self._groups(widths).items():
            xs = [clients[i].x_test for i in members]
            ys = [clients[i].y_test for i in members]
            if not any(y.numel() for y in ys):
                continue
            _, correct = self.per_example(params, w, torch.cat(xs), torch.cat(ys))
            sizes = [int(y.numel()) for y in ys]
            for i, c, s in zip(members, correct.split(sizes), sizes):
                out[i] = float(c.mean()) if s else math.nan
        return out

    def ensemble_logits(self, params: torch.Tensor, widths: Sequence[float], sub_deltas: Sequence[torch.Tensor], x: torch.Tensor, weights=None) -> torch.Tensor:
        """FedDF's teacher for a heterogeneous cohort: the weighted mean of the client models'
        logits, each client model being ``slice(params, width) + delta`` at its own width
        (output dimensions are full at every width, so logits average directly)."""
        from .distill import ensemble_logits

        n = len(sub_deltas)
        w = check_weights(torch.ones(n) if weights is None else weights, n)
        total = None
        for wid, members in self._groups(widths).items():
            learner = self.learners[wid]
            models = self.slice(params, wid)[None, :] + torch.stack([sub_deltas[i] for i in members]).to(torch.float32)
            wg = w[members]
            part = ensemble_logits(learner.module, learner.spec, models, x, wg) * float(wg.sum())
            total = part if total is None else total + part
        return total / float(w.sum())


    def aggregate_embedded(self, widths: Sequence[float], matrix: torch.Tensor, weights) -> torch.Tensor:
        """`aggregate` for deltas already embedded in the global vector: ``matrix`` ``(n, d)``
        with row i the width-``widths[i]`` delta (entries off its sub-model are ignored).  One
        ``(n_r, d_r)`` gather, matrix-vector product and ``index_add_`` per width group."""
        n = matrix.shape[0]
        if len(widths) != n:
            raise ValueError(f"aggregate: {n} deltas but {len(widths)} widths")
        if n == 0:
            raise ValueError("coverage_mean: cannot aggregate an empty cohort (n = 0)")
        if matrix.shape[1] != self.dim:
            raise ValueError(f"aggregate: deltas have {matrix.shape[1]} columns, the global model {self.dim}")
        w = check_weights(weights, n)
        groups = self._groups(widths)
        if list(groups) == [1.0] and self.sub_dim(1.0) == self.dim:
            return mean(matrix.to(torch.float32), weights)
        num = torch.zeros(self.dim, dtype=torch.float64)
        den = torch.zeros(self.dim, dtype=torch.float64)
        for wid, members in groups.items():
            idx = self.index[wid]
            rows = torch.as_tensor(members, dtype=torch.int64)
            wg = w[rows]
            num.index_add_(0, idx, wg @ matrix[rows][:, idx].to(torch.float64))
            den.index_add_(0, idx, wg.sum().expand(idx.numel()))
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0).to(torch.float32)


# -- the engine's parts: learner wrapper, aggregator, round hook -------------------------------


class HeteroFLLearner:
    """A `Learner` wrapper that trains each client at its width (HeteroFL in the engine).

    The Coordinator sees the global (width-1) model: ``spec``, ``init_params`` and
    ``per_example`` are the full model's.  The transport passes the cohort's client ids to
    `fit_cohort` (``needs_client_ids``); each client trains ``params[index_r]`` and returns a
    delta of the sub-model's size, which its uplink encodes, so upload bytes are the
    sub-model's.  `downlink_nbytes` gives each client's real download size (the sub-model
    encoded with the downlink chain) and `relative_cost` its compute relative to the full
    model (parameters ~ FLOPs for an MLP).  The server decodes a client's payload with
    `sub_dim_of` and places it with `embed_of`.  ``client_widths`` holds one width per device
    of the population: a static device property, like the fleet's arrays.
    """

    name = "heterofl"
    needs_client_ids = True

    def __init__(self, plan: HeteroFLPlan, client_widths, width_rule: str = "round_robin"):
        if 1.0 not in plan.widths:
            raise ValueError(f"HeteroFLLearner needs width 1.0 among the widths {list(plan.widths)}")
        ws = np.asarray(client_widths, dtype=np.float64).reshape(-1)
        unknown = sorted(set(ws.tolist()) - set(plan.widths))
        if unknown:
            raise ValueError(f"client widths {unknown} are not among the plan's widths {list(plan.widths)}")
        if width_rule not in ("memory", "round_robin"):
            raise ValueError(f"unknown width rule {width_rule!r}; allowed: 'memory', 'round_robin'")
        self.plan = plan
        self.spec = plan.spec
        self.client_widths = ws
        self.width_rule = width_rule
        full = plan.learners[1.0]
        self.module, self.make_module = full.module, full.make_module
        self._rel = {w: plan.relative_size(w) for w in plan.widths}
        self._down_cache: tuple[object, dict[float, int]] | None = None

    def __getstate__(self) -> dict:
        # The full model's module is the plan's (a LoRA plan pickles as its recipe, without the
        # frozen base): not pickled twice, taken from the plan again when unpickled.
        state = dict(self.__dict__)
        state.pop("module", None), state.pop("make_module", None)
        state["_down_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        full = self.plan.learners[1.0]
        self.module, self.make_module = full.module, full.make_module

    # -- who is at which width ---------------------------------------------------------
    def widths_of(self, clients) -> np.ndarray:
        return self.client_widths[np.asarray(clients, dtype=np.int64)]

    @property
    def model_widths(self) -> tuple[float, ...]:
        """The widths this model trains at (what a gRPC client announces it can train)."""
        return self.plan.widths

    def at_width(self, width: float) -> TorchLearner:
        """The learner of the width-``width`` sub-model alone: what a device that received
        only that sub-model trains (``fleetlearn client``; its delta is the sub-model's)."""
        return self.plan.learners[self.plan._known(width)]

    def width_for_device(self, client: int, memory_mb: float) -> float:
        """The width of a device joining the run (gRPC registration) by the run's width rule
        (`HeteroFLPlan.widths_by_rule`) from the memory it declares.  ValueError naming the
        numbers when, under the "memory" rule, the device declares no memory or too little
        for the smallest width (the simulation gives such a device the smallest width; a
        real one would not fit it)."""
        client = int(client)
        if client < 0:
            raise ValueError(f"client id {client} is negative")
        plan = self.plan
        if self.width_rule == "memory":
            smallest = plan.widths[-1]
            need = plan.memory_required_mb(smallest)
            if not memory_mb > 0:
                raise ValueError(f"the run assigns its sub-models ({plan.key}) by device memory (model.width_rule = 'memory') and the "
                                 "client declared none: declare it (fleetlearn client --memory-mb N)")
            if memory_mb < need:
                raise ValueError(
                    f"client declares {memory_mb:g} MiB of memory; the smallest sub-model of the run, {plan.describe(smallest)} of "
                    f"{plan.key} = {plan.values()}, needs {need:.4g} MiB (model.full_width_memory_mb = "
                    f"{plan.full_width_memory_mb:g} x its {plan.relative_size(smallest):.3g} share of the parameters)")
        return float(plan.widths_by_rule(self.width_rule, [client], memory_mb)[0])

    def set_width(self, client: int, width: float) -> None:
        """Record a device's width where the decoder, the aggregator and the recorder read it."""
        client, width = int(client), self.plan._known(width)
        ws = self.client_widths
        if client >= ws.size:  # a new array, swapped in whole: readers on other threads see old or new
            grown = np.ones(client + 1, dtype=np.float64)
            grown[: ws.size] = ws
            grown[client] = width
            self.client_widths = grown
        else:
            ws[client] = width

    def sub_payload(self, payload: bytes, width: float, chain) -> bytes:
        """A broadcast payload (the global model encoded with the downlink ``chain``) as the
        width-``width`` sub-model's payload: decoded, sliced (`HeteroFLPlan.slice`) and
        encoded again with the chain, so only the sub-model's bytes travel.  With a lossless
        downlink it is exactly the encoding of ``slice(params, width)`` (`downlink_nbytes`)."""
        full = chain.decode(payload, dim=self.plan.dim)
        return chain.encode(self.plan.slice(full, width))[0]

    def relative_cost(self, clients) -> np.ndarray:
        """Compute and bytes of each client's sub-model relative to the full model (``d_r / d``)."""
        ws = self.widths_of(clients)
        return np.array([self._rel[float(w)] for w in ws.reshape(-1)]).reshape(ws.shape)

    def sub_dim(self, width: float) -> int:
        return self.plan.sub_dim(width)

    def sub_dim_of(self, client: int) -> int:
        return self.plan.sub_dim(float(self.client_widths[int(client)]))

    def embed_of(self, client: int, vec: torch.Tensor) -> torch.Tensor:
        return self.plan.embed(vec, float(self.client_widths[int(client)]))

    def downlink_nbytes(self, clients, params: torch.Tensor, chain, key) -> np.ndarray:
        """Bytes each client downloads: its sub-model encoded with the downlink chain,
        encoded once per width and model version (``key``)."""
        if self._down_cache is None or self._down_cache[0] != key:
            self._down_cache = (key, {})
        cache = self._down_cache[1]
        ws = self.widths_of(clients)
        for w in set(ws.tolist()):
            if w not in cache:
                cache[w] = len(chain.encode(self.plan.slice(params, w))[0])
        return np.array([cache[float(w)] for w in ws], dtype=np.int64)

    # -- the Learner protocol, on the global model ----------------------------------------
    def init_params(self, seed: int) -> torch.Tensor:
        return self.plan.init_params(seed)

    def per_example(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.plan.per_example(params, 1.0, x, y)

    def fit(self, params, data, hp, seed, correction=None, max_steps=None) -> FitResult:
        """A client of unknown width trains the full model."""
        return self.plan.learners[1.0].fit(params, data, hp, seed, correction=correction, max_steps=max_steps)

    def fit_cohort(self, params, cohort, hp, seeds, corrections=None, step_limits=None, clients=None) -> list[FitResult]:
        if corrections is not None:
            raise ValueError("HeteroFL sub-models do not take full-size gradient corrections (SCAFFOLD)")
        widths = [1.0] * len(cohort) if clients is None else [float(w) for w in self.widths_of(clients)]
        return self.plan.fit_cohort(params, cohort, widths, hp, seeds, step_limits=step_limits)

    def per_example_of_clients(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, owners) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and correctness, each row evaluated at the width of the client
        that owns it (``owners``: a client id per row): one forward pass per width."""
        row_w = self.widths_of(owners)
        loss, correct = torch.zeros(len(y)), torch.zeros(len(y))
        for w in np.unique(row_w):
            rows = torch.from_numpy(np.flatnonzero(row_w == w))
            l, c = self.plan.per_example(params, float(w), x[rows], y[rows])
            loss[rows], correct[rows] = l, c
        return loss, correct


class HeteroFLAggregator:
    """HeteroFL's server aggregation (Diao et al. 2021, eq. (2)) as an aggregator part: the
    per-coordinate weighted mean over the clients whose sub-model covers the coordinate,
    0 where none does.  Rows arrive embedded in the global vector (zeros off the sub-model);
    the widths come from the client ids."""

    name = "heterofl"
    needs_client_ids = True

    def __init__(self, learner: HeteroFLLearner):
        self.learner = learner

    def aggregate_round(self, client_ids: Sequence[int], updates: torch.Tensor, weights) -> torch.Tensor:
        widths = [float(w) for w in self.learner.widths_of(list(client_ids))]
        return self.learner.plan.aggregate_embedded(widths, updates, weights)

    def aggregate(self, updates: torch.Tensor, weights) -> torch.Tensor:
        raise ValueError("the HeteroFL aggregator needs the clients' ids (their widths): use aggregate_round")


class HeteroFLRecorder:
    """Round hook: each client's width into its `ClientRecord`, and on evaluated rounds the
    central accuracy of the global model at every width (``record.extra["width_accuracy"]``)
    and the accepted clients per width (``record.extra["accepted_by_width"]``)."""

    def __init__(self, learner: HeteroFLLearner, central_x: torch.Tensor, central_y: torch.Tensor):
        self.learner, self.x, self.y = learner, central_x, central_y

    def after_round(self, record, coordinator) -> None:
        if record.clients:
            ws = self.learner.widths_of([c.client_id for c in record.clients])
            for c, w in zip(record.clients, ws):
                c.width = float(w)
            acc = [c.width for c in record.clients if c.status == "accepted"]
            record.extra["accepted_by_width"] = {str(w): acc.count(w) for w in self.learner.plan.widths}
        if not math.isnan(record.accuracy) and self.y.numel():
            params = coordinator.params
            record.extra["width_accuracy"] = {str(w): self.learner.plan.accuracy(params, w, self.x, self.y) for w in self.learner.plan.widths}


def heterofl_parts(model_cfg, num_features: int, num_classes: int, memory_mb, num_clients: int, vectorize: bool = True) -> HeteroFLLearner:
    """The `HeteroFLLearner` of a `[model]` section: an MLP plan with ``model.widths`` and each
    device's width by ``model.width_rule`` (from the fleet's ``memory_mb`` for "memory")."""
    plan = HeteroFLPlan.for_mlp(num_features, num_classes, model_cfg.hidden, model_cfg.widths,
                                full_width_memory_mb=model_cfg.full_width_memory_mb, vectorize=vectorize)
    widths = plan.widths_by_rule(model_cfg.width_rule, np.arange(num_clients), memory_mb)
    return HeteroFLLearner(plan, widths, model_cfg.width_rule)


def heterofl_client_learner(model_cfg, num_features: int, num_classes: int) -> HeteroFLLearner:
    """The `HeteroFLLearner` a device (``fleetlearn client``) holds: the run's plan, no
    population; the server names the width in each task and the device trains `at_width`."""
    plan = HeteroFLPlan.for_mlp(num_features, num_classes, model_cfg.hidden, model_cfg.widths,
                                full_width_memory_mb=model_cfg.full_width_memory_mb, vectorize=False)
    return HeteroFLLearner(plan, [], model_cfg.width_rule)
