"""A pretrained Hugging Face encoder with LoRA adapters and a classification head.

``[model] name = "hf:<directory or package>"`` (see `fleetlearn.pretrained`) loads a BERT-family
encoder (BERT, MiniLM, ...) from local files, freezes it, puts LoRA adapters (Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) on the Linear layers named by
``model.lora_targets`` and a linear head on the mean-pooled last hidden states (the pooling
of sentence-transformers' MiniLM).  The learner's `ParamSpec` -- the flat vector everything
outside the learner sees: codecs, aggregation, DP, guardrail, the wire -- is the adapters and
the head only; the frozen base is loaded once per process (`load_encoder`, cached) and is
shared, never copied, by every module built from it, so it never leaves the device.

``model.lora_rank = 0`` trains the head alone on the frozen encoder (a linear probe).

Why a small LoRA of our own rather than ``peft``: (1) the batched device path trains a cohort
with ``torch.func.vmap`` over stacked rows of the flat vector, so the adapters must be plain
parameters swapped in by ``functional_call``, with no per-call Python state; (2) heterogeneous
ranks need one scaling for every rank (``lora_alpha / max rank``), so that a rank-``r`` adapter
*is* the first ``r`` components of the full one (peft scales each adapter by ``alpha / r``);
(3) several modules of different ranks share one frozen base in a process, which peft's
in-place injection does not give.  `LoRALinear` is ``W x + scaling * B (A x)``, with peft's
initialisation (A Kaiming-uniform, B zero, so training starts at the pretrained model); tests
check it against the merged weight ``W + scaling * B A``.

Input rows are token ids as float32 (the system's ``(N, F)`` inputs; ``F`` = the sequence
length), padded with the tokenizer's pad id, which is masked out of attention and pooling.
The attention mask is passed as a 4-D additive mask: transformers' own 2-D mask handling
branches on the mask's values, which ``vmap`` cannot batch.  Dropout is off (the batched
path needs deterministic forward passes; LoRA fine-tuning of small data barely uses it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..params import ParamSpec
from ..pretrained import INSTALL_HINT, WEIGHTS_FILE, load_tokenizer, offline, pad_token_id, resolve
from .heterofl import HeteroFLLearner, HeteroFLPlan
from .torch_learner import TorchLearner, resolve_device

__all__ = [
    "LoRALinear", "TextClassifier", "LoraLearner", "Encoder", "load_encoder", "lora_classifier_factory",
    "rank_slices", "rank_spec", "LoraRankPlan", "lora_rank_parts", "lora_rank_plan", "lora_rank_client_learner", "lora_learner",
    "LoraRecipe", "encoder_loads", "trainable_spec", "full_model_params", "resolve_device",
]

# Clients trained as one vmapped computation at most (a transformer's activations are large).
HF_MAX_GROUP = 16


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x A^T) B^T``: a frozen Linear with a rank-``rank`` adapter."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base = base
        self.scaling = float(scaling)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.lora_A.T) @ self.lora_B.T) * self.scaling


def _share_frozen(module: nn.Module, memo: dict) -> None:
    for t in (*module.parameters(), *module.buffers()):
        if not t.requires_grad:
            memo.setdefault(id(t), t)


class TextClassifier(nn.Module):
    """Token ids (N, L) as floats -> logits (N, num_classes): encoder, masked mean pooling, head.
    A deep copy shares the frozen tensors (the base) and copies the trainable ones."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int, pad_id: int, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)
        self.pad_id, self.vocab_size = int(pad_id), int(vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs where the head is (the learner's device); logits come back where x was.
        ids = x.to(self.head.weight.device).long()
        ids = torch.where((ids >= 0) & (ids < self.vocab_size), ids, torch.full_like(ids, self.pad_id))
        keep = ids != self.pad_id
        zero = torch.zeros((), dtype=torch.float32, device=ids.device)
        neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=ids.device)
        mask = torch.where(keep, zero, neg)[:, None, None, :]
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        k = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * k).sum(1) / k.sum(1).clamp(min=1.0)
        return self.head(pooled).to(x.device)

    def __deepcopy__(self, memo):
        _share_frozen(self, memo)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def trainable_spec(module: nn.Module) -> ParamSpec:
    items = [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad]
    return ParamSpec(tuple(n for n, _ in items), tuple(s for _, s in items))


class LoraLearner(TorchLearner):
    """`TorchLearner` whose flat vector is the module's trainable parameters only (adapters and
    head); the frozen base stays inside the module and is shared by every copy of it."""

    name = "lora"
    # A transformer's activations are large: bounded forward passes when evaluating
    # (256 sequences; a cohort: 16 clients x 16 rows).
    eval_chunk = 256
    eval_columns = 16

    def __init__(self, make_module: Callable[[], nn.Module], vectorize: bool = True, max_group: int = HF_MAX_GROUP):
        super().__init__(make_module, vectorize=vectorize, max_group=max_group)
        self.spec = trainable_spec(self._module)
        self.device = self._module.head.weight.device if hasattr(self._module, "head") else torch.device("cpu")
        self.recipe: LoraRecipe | None = None

    @classmethod
    def from_recipe(cls, recipe: "LoraRecipe", vectorize: bool = True, max_group: int = HF_MAX_GROUP) -> "LoraLearner":
        learner = cls(recipe.factory(), vectorize=vectorize, max_group=max_group)
        learner.recipe = recipe
        return learner

    def __reduce__(self):
        # Pickled (to a Ray worker) as its recipe, never with the frozen base: the receiving
        # process loads the base from its own files, once (`load_encoder`), and builds the
        # learner once per recipe (`_learner_of`).
        if self.recipe is None:
            return super().__reduce__()
        return _learner_of, (self.recipe, self.vectorize, self.max_group)

    def init_params(self, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make_module()
        return self.spec.flatten(dict(module.named_parameters())).cpu()

    def _logits_of(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # TorchLearner's training and evaluation hand over tensors already on the learner's device
        # (engine.device, where the frozen encoder is); a caller with CPU vectors gets them moved.
        return super()._logits_of({k: v.to(self.device) for k, v in params.items()}, x)


# -- the frozen encoder, once per process --------------------------------------------------------


class Encoder:
    """A loaded, frozen encoder: the module (every tensor ``requires_grad = False``), its
    hidden size, vocabulary size, pad id, longest sequence and parameter count."""

    def __init__(self, name: str, module: nn.Module, hidden: int, vocab_size: int, pad_id: int, max_positions: int):
        self.name, self.module, self.hidden = name, module, hidden
        self.vocab_size, self.pad_id, self.max_positions = vocab_size, pad_id, max_positions
        self.num_params = sum(p.numel() for p in module.parameters())

    def linear_names(self) -> list[str]:
        return [n for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]


def load_encoder(name: str, device: str = "cpu") -> Encoder:
    """The frozen encoder of ``"hf:..."`` on ``device`` (cached: loaded once per process and device)."""
    return _load_encoder(name, str(torch.device(device)))


# How many times this process read an encoder from its files, by name: `load_encoder` caches, so
# once per process (a Ray worker, a `fleetlearn client`); tests read it through the worker.
_ENCODER_LOADS: Counter = Counter()


def encoder_loads() -> dict[str, int]:
    """Encoders this process has read from their files, by ``"hf:..."`` name (each once)."""
    return dict(_ENCODER_LOADS)


@lru_cache(maxsize=4)
def _load_encoder(name: str, device: str) -> Encoder:
    if device != "cpu":
        enc = _load_encoder(name, "cpu")
        moved = copy.deepcopy(enc.module).to(device)
        return Encoder(name, moved, enc.hidden, enc.vocab_size, enc.pad_id, enc.max_positions)
    offline()
    _ENCODER_LOADS[name] += 1
    try:
        from safetensors.torch import load as load_safetensors
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ConfigError(f"model.name = {name!r}: transformers and safetensors are not installed ({INSTALL_HINT})") from None
    files = resolve(name)
    cfg = dict(files.config())
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(f"model.name = {name!r}: config.json in {files.where} has no 'model_type'")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if key in cfg:
            cfg[key] = 0.0
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):
            model = AutoModel.from_config(config, attn_implementation="eager")
    except Exception as exc:
        raise ConfigError(f"model.name = {name!r}: transformers cannot build a {model_type!r} model from config.json in {files.where} ({exc})") from None
    try:
        weights = load_safetensors(files.read(WEIGHTS_FILE))
    except Exception as exc:
        raise ConfigError(f"model.name = {name!r}: cannot read {WEIGHTS_FILE} in {files.where} ({exc})") from None
    prefix = getattr(model, "base_model_prefix", "") + "."
    weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
    own = model.state_dict()
    needed = [k for k in own if not k.startswith("pooler.") and not k.endswith("position_ids") and not k.endswith("token_type_ids")]
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ConfigError(f"model.name = {name!r}: {WEIGHTS_FILE} in {files.where} lacks {len(missing)} of the model's "
                          f"{len(needed)} tensors (first: {missing[:3]}); is it the weights of this config.json?")
    bad = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"model.name = {name!r}: {WEIGHTS_FILE} in {files.where}: tensor {bad[0]!r} has shape "
                          f"{tuple(weights[bad[0]].shape)}, config.json gives {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items() if k in own}, strict=False)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pad = cfg.get("pad_token_id")
    if not isinstance(pad, int):
        pad = pad_token_id(load_tokenizer(name, 8))
    return Encoder(name, model, int(config.hidden_size), int(config.vocab_size), int(pad), int(getattr(config, "max_position_embeddings", 512)))


def _targets(encoder: Encoder, targets: Sequence[str]) -> list[str]:
    """The qualified names of the Linear modules the adapters go on; ConfigError for a target
    that matches none."""
    linears = encoder.linear_names()
    out: list[str] = []
    for t in targets:
        hits = [n for n in linears if n == t or n.endswith("." + t)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"model.lora_targets: {t!r} names no Linear module of {encoder.name!r}; "
                              f"its Linear modules end in: {', '.join(leaves)}")
        out += [h for h in hits if h not in out]
    return out


def _inject(module: nn.Module, names: list[str], rank: int, scaling: float) -> None:
    for qual in names:
        parent_name, _, leaf = qual.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, scaling))


def check_lora(encoder: Encoder, targets: Sequence[str], rank: int, what: str | None = None) -> list[str]:
    """The target modules; ConfigError for an unknown target or a rank larger than a layer
    (``what`` names the rank in the message; default ``model.lora_rank = <rank>``)."""
    names = _targets(encoder, targets) if rank > 0 else []
    for qual in names:
        lin = encoder.module.get_submodule(qual)
        most = min(lin.in_features, lin.out_features)
        if rank > most:
            raise ConfigError(f"{what or f'model.lora_rank = {rank}'} exceeds the layer {qual!r} ({lin.out_features} x {lin.in_features}) "
                              f"of {encoder.name!r}: a rank is at most min(in, out) = {most}")
    return names


def lora_classifier_factory(name: str, num_features: int, num_classes: int, rank: int, alpha: float,
                            targets: Sequence[str], max_rank: int | None = None, device: str = "cpu") -> Callable[[], TextClassifier]:
    """``() -> TextClassifier``: the frozen encoder of ``name`` (shared) with fresh rank-``rank``
    adapters on ``targets`` (scaling ``alpha / max_rank``; ``max_rank`` defaults to ``rank``)
    and a fresh head.  Every check runs here, before any training."""
    enc = load_encoder(name, str(device))
    if num_features > enc.max_positions:
        raise ConfigError(f"data.text_seq_len = {num_features} exceeds the {enc.max_positions} positions of {name!r}")
    names = check_lora(enc, targets, rank)
    scaling = alpha / float(max_rank or rank or 1)

    def make() -> TextClassifier:
        memo: dict = {}
        _share_frozen(enc.module, memo)
        module = copy.deepcopy(enc.module, memo)  # the structure, the frozen tensors shared
        if rank > 0:
            _inject(module, names, rank, scaling)
        clf = TextClassifier(module, enc.hidden, num_classes, enc.pad_id, enc.vocab_size)
        dev = torch.device(device)
        for sub in clf.modules():  # the new adapters and head to the device; the frozen base is there already
            for key, p in list(sub._parameters.items()):  # (Module.to would copy the shared base)
                if p is not None and p.requires_grad and p.device != dev:
                    sub._parameters[key] = nn.Parameter(p.detach().to(dev))
        return clf

    return make


def lora_learner(model_cfg, num_features: int, num_classes: int, vectorize: bool = True, device: str = "cpu") -> LoraLearner:
    """The `LoraLearner` of a `[model]` section with ``name = "hf:..."`` (one rank): what the
    server's factory and `fleetlearn client` both build, so their model digests agree."""
    return LoraLearner.from_recipe(LoraRecipe.of(model_cfg, num_features, num_classes, device), vectorize=vectorize)


@dataclass(frozen=True)
class LoraRecipe:
    """What builds a LoRA learner, as plain values: what travels to another process (a Ray
    worker) instead of the module, whose frozen base that process loads from its own files."""

    name: str
    num_features: int
    num_classes: int
    rank: int
    alpha: float
    targets: tuple[str, ...]
    max_rank: int | None = None  # the scaling's rank (alpha / max_rank): the run's largest
    device: str = "cpu"

    @classmethod
    def of(cls, model_cfg, num_features: int, num_classes: int, device: str = "cpu", rank: int | None = None,
           max_rank: int | None = None) -> "LoraRecipe":
        m = model_cfg
        return cls(m.name, int(num_features), int(num_classes), int(m.lora_rank if rank is None else rank), float(m.lora_alpha),
                   tuple(m.lora_targets), max_rank, str(resolve_device(device)))

    def at_rank(self, rank: int) -> "LoraRecipe":
        return dataclasses.replace(self, rank=int(rank))

    def factory(self) -> Callable[[], TextClassifier]:
        return lora_classifier_factory(self.name, self.num_features, self.num_classes, self.rank, self.alpha, self.targets,
                                       max_rank=self.max_rank, device=self.device)


@lru_cache(maxsize=16)
def _learner_of(recipe: LoraRecipe, vectorize: bool, max_group: int) -> LoraLearner:
    """The learner of a recipe, built once per process (unpickling it again, as a Ray worker
    does for every task, returns the same learner)."""
    return LoraLearner.from_recipe(recipe, vectorize=vectorize, max_group=max_group)


def full_model_params(name: str, num_classes: int) -> int:
    """Parameters of full fine-tuning (the whole encoder and the head): the bytes LoRA saves."""
    enc = load_encoder(name)
    return enc.num_params + (enc.hidden + 1) * num_classes


# -- heterogeneous ranks: HeteroFL's machinery with rank slices -----------------------------------


def rank_slices(spec: ParamSpec, rank: int) -> torch.Tensor:
    """Indices into the flat full-rank vector of the rank-``rank`` adapters (and the whole head),
    in the rank-``rank`` model's own flat order: rows ``:rank`` of every ``lora_A`` (R, in),
    columns ``:rank`` of every ``lora_B`` (out, R) -- zero-padding's sub-vector."""
    parts = []
    for name, shape, off in zip(spec.names, spec.shapes, spec.offsets):
        size = int(np.prod(shape)) if shape else 1
        if name.endswith("lora_A"):
            parts.append(off + torch.arange(min(rank, shape[0]) * shape[1], dtype=torch.int64))
        elif name.endswith("lora_B"):
            rows = torch.arange(shape[0], dtype=torch.int64)[:, None] * shape[1]
            parts.append(off + (rows + torch.arange(min(rank, shape[1]), dtype=torch.int64)[None, :]).reshape(-1))
        else:
            parts.append(off + torch.arange(size, dtype=torch.int64))
    return torch.cat(parts)


def rank_spec(spec: ParamSpec, rank: int) -> ParamSpec:
    shapes = []
    for name, shape in zip(spec.names, spec.shapes):
        if name.endswith("lora_A"):
            shape = (rank, shape[1])
        elif name.endswith("lora_B"):
            shape = (shape[0], rank)
        shapes.append(tuple(shape))
    return ParamSpec(spec.names, tuple(shapes))


class LoraRankPlan(HeteroFLPlan):
    """HeteroFL's plan (nested sub-models, per-coordinate mean over covering clients, memory
    rule) where a sub-model is the first ``r`` rank components of every adapter: width =
    ``r / max rank``.  A rank-``r`` client trains and sends ``rank_slices(spec, r)`` only, and
    the server averages each adapter coordinate over the clients whose rank covers it
    (zero-padding, as HetLoRA, Cho et al. 2024, with HeteroFL's normalisation)."""

    key = "model.lora_ranks"

    def __init__(self, spec: ParamSpec, ranks: Sequence[int], make_module_for_rank: Callable[[int], nn.Module],
                 *, full_width_memory_mb: float | None = None, vectorize: bool = True):
        ranks = sorted({int(r) for r in ranks}, reverse=True)
        if not ranks or ranks[-1] < 1:
            raise ValueError(f"LoRA ranks must be >= 1, got {ranks}")
        self.max_rank = ranks[0]
        self.rank_of = {r / self.max_rank: r for r in ranks}
        self._make_rank = make_module_for_rank
        self.recipe: tuple | None = None  # (LoraRecipe at the largest rank, ranks, memory, vectorize): `lora_rank_plan`'s
        super().__init__(spec, list(self.rank_of), lambda w: make_module_for_rank(self.rank_of[w]),
                         full_width_memory_mb=full_width_memory_mb, vectorize=vectorize)

    def slice_index(self, width: float) -> torch.Tensor:
        return rank_slices(self.spec, self.rank_of[width])

    def slice_spec(self, width: float) -> ParamSpec:
        return rank_spec(self.spec, self.rank_of[width])

    def make_learner(self, make: Callable[[], nn.Module], vectorize: bool) -> TorchLearner:
        return LoraLearner(make, vectorize=vectorize)

    def describe(self, width: float) -> str:
        return f"LoRA rank {self.rank_of[float(width)]} (model width {float(width):g})"

    def values(self) -> list:
        return [self.rank_of[w] for w in self.widths]

    def __reduce__(self):
        # As its recipe (see `LoraLearner.__reduce__`): the frozen base never travels.
        if self.recipe is None:
            return super().__reduce__()
        return _rank_plan_of, self.recipe


def lora_rank_plan(model_cfg, num_features: int, num_classes: int, vectorize: bool = True, device: str = "cpu") -> LoraRankPlan:
    """The `LoraRankPlan` of a `[model]` section with ``model.lora_ranks``: one learner per
    rank, all on the one frozen base of this process, scaling ``lora_alpha / max rank``."""
    ranks = tuple(sorted({int(r) for r in model_cfg.lora_ranks}, reverse=True))
    recipe = LoraRecipe.of(model_cfg, num_features, num_classes, device, rank=ranks[0], max_rank=ranks[0])
    return _rank_plan_of(recipe, ranks, model_cfg.full_width_memory_mb, bool(vectorize))


@lru_cache(maxsize=8)
def _rank_plan_of(recipe: LoraRecipe, ranks: tuple[int, ...], full_width_memory_mb: float | None, vectorize: bool) -> LoraRankPlan:
    """Built once per process and recipe (a Ray worker unpickles the plan for every task)."""
    check_lora(load_encoder(recipe.name), recipe.targets, recipe.rank, f"model.lora_ranks = {list(ranks)}: rank {recipe.rank}")
    full = LoraLearner.from_recipe(recipe, vectorize=vectorize)
    plan = LoraRankPlan(full.spec, ranks, lambda r: recipe.at_rank(r).factory()(),
                        full_width_memory_mb=full_width_memory_mb, vectorize=vectorize)
    plan.recipe = (recipe, ranks, full_width_memory_mb, vectorize)
    return plan


def lora_rank_parts(model_cfg, num_features: int, num_classes: int, memory_mb, num_clients: int, vectorize: bool = True,
                    device: str = "cpu") -> HeteroFLLearner:
    """The heterogeneous-rank learner of a `[model]` section: ``model.lora_ranks``, each device's
    rank by ``model.width_rule`` ("memory": the largest rank whose share ``r / max rank`` of
    ``model.full_width_memory_mb`` fits in the device's memory; "round_robin"), the rule the
    simulation applies to its population and a gRPC server to each client as it registers."""
    plan = lora_rank_plan(model_cfg, num_features, num_classes, vectorize, device)
    widths = plan.widths_by_rule(model_cfg.width_rule, np.arange(num_clients), memory_mb)
    return HeteroFLLearner(plan, widths, model_cfg.width_rule)


def lora_rank_client_learner(model_cfg, num_features: int, num_classes: int, device: str = "cpu") -> HeteroFLLearner:
    """What a device (``fleetlearn client``) of a heterogeneous-rank run holds: the run's plan
    (one learner per rank on the one frozen base this process loads), no population; the
    server names the rank (as a width, ``r / max rank``) in each task and the device trains
    `at_width`, sending that rank's adapters only."""
    return HeteroFLLearner(lora_rank_plan(model_cfg, num_features, num_classes, vectorize=False, device=device), [], model_cfg.width_rule)
