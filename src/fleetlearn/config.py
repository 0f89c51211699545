"""Typed run configuration: TOML <-> pydantic models.

One section per concern, unknown keys are errors, and every error names the key,
the bad value and what is allowed.  Other parts add sections in the same style.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from .errors import ConfigError, FleetlearnError
from .compat import check_config, has
from .compat import client_side_helper as _client_side_helper
from .parts import Choice, choose, find_part
from .parts import names as part_names

__all__ = ["ConfigError", "FleetlearnError", "RunConfig", "load_config"]


# Datasets are parts (fleetlearn.parts, kind "dataset"; built-ins in data/datasets.py): the
# allowed names, each one's default population (`default_clients`), default partition and
# whether it brings its own devices (capability `natural_devices`) come from the registry.
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "feature", "natural", "label_permutation", "label_share")


INT64_MAX = 2**63 - 1


class Section(BaseModel):
    """Every config section: unknown keys are errors, every float must be finite (a field
    that means something by inf or nan must say so with ``Field(allow_inf_nan=True)``),
    and every integer must fit 64 bits (the run store and torch hold them as int64)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # Built directly (RunConfig(...), ServerConfig(...)), validated (model_validate) or
    # assigned to (cfg.server.rounds = 0): a refusal is a ConfigError, never pydantic's
    # ValidationError, with the same message as from load_config.
    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, data, type(self))) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, {name: value}, type(self))) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, obj, cls)) from None

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, v: Any) -> Any:
        for x in v if isinstance(v, list) else (v,):
            if isinstance(x, int) and not isinstance(x, bool) and not -INT64_MAX <= x <= INT64_MAX:
                raise ValueError(f"integer out of range; allowed: at most {INT64_MAX} (64-bit) in magnitude")
        return v


def _is_import_path(value: str) -> bool:
    mod, _, fn = value.partition(":")
    return bool(mod) and bool(fn) and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier()


class DataConfig(Section):
    dataset: str = "digits"
    clients: int | None = Field(default=None, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "quantity", "feature", "natural", "label_permutation", "label_share"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)  # Dirichlet concentration (label skew)
    shards_per_client: int = Field(default=2, ge=1)  # classes per client for `shards`
    quantity: Literal["lognormal", "powerlaw"] = "lognormal"  # size law for `quantity`
    quantity_sigma: float = Field(default=1.0, gt=0)  # log-normal sigma, or Pareto tail index (P(w > t) = t^-sigma)
    feature_shift: float = Field(default=1.0, ge=0)  # strength of the per-client transform for `feature`
    # label_permutation (planted clusters): an IID split, client c in group c % groups, and each
    # group but group 0 sees the labels through its own random permutation.
    groups: int = Field(default=2, ge=1)
    min_examples: int = Field(default=2, ge=1)  # every client gets at least this many train examples
    # iid only: each client draws this many examples with replacement (populations larger than the data).
    examples_per_client: int | None = Field(default=None, ge=1)
    # Held-out central test set (unused where the data brings its own: fashion_mnist's
    # t10k, and the `natural` partition, whose central set is the union of the devices' test splits).
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    local_test_fraction: float = Field(default=0.2, ge=0, lt=1)  # each client's local test split
    path: str | None = None  # directory with the dataset's files (fashion_mnist; sotu: the corpus)
    synthetic_alpha: float = Field(default=0.0, ge=0)  # Synthetic(alpha, beta): model skew
    synthetic_beta: float = Field(default=0.0, ge=0)  # Synthetic(alpha, beta): feature skew
    synthetic_iid: bool = False
    synthetic_dim: int = Field(default=60, ge=1)
    synthetic_classes: int = Field(default=10, ge=2)
    # sotu (fleetlearn.data.text): next-character windows of `text_seq_len` characters taken every
    # `text_stride` characters from a stretch of `text_max_chars` characters per speaker
    # (0: all of it); `text_speakers` keeps the speakers with the most text (None: all 43).
    text_seq_len: int = Field(default=40, ge=1)
    text_stride: int = Field(default=4, ge=1)
    text_max_chars: int = Field(default=10_000, ge=0)
    text_speakers: int | None = Field(default=None, ge=1)
    # Text classification (spam_assassin): the "hf:..." model whose tokenizer.json turns text into
    # `text_seq_len` token ids (None: model.name when it is an "hf:" model).
    tokenizer: str | None = None
    # label_share (binary label skew, fleetlearn.data.spam): client c's share of class 1 (spam),
    # spread geometrically from label_share_min to label_share_max over the clients; every client
    # has the same number of examples (what does not fit the shares is left out).
    label_share_min: float = Field(default=0.01, gt=0, lt=1)
    label_share_max: float = Field(default=0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _natural_default(self) -> "DataConfig":
        # A dataset's default partition (sotu's clients are its speakers: "natural") unless set otherwise.
        part = find_part("dataset", self.dataset)
        default = part.info.get("default_partition") if part is not None else None
        if default and "partition" not in self.model_fields_set:
            self.__dict__["partition"] = default  # not setattr: that would re-run this validator
        if self.dataset == "sotu" and self.text_max_chars and self.text_max_chars <= self.text_seq_len:
            raise ValueError(f"data.text_max_chars = {self.text_max_chars} must exceed data.text_seq_len = {self.text_seq_len}")
        if self.label_share_min > self.label_share_max:
            raise ValueError(f"data.label_share_min = {self.label_share_min} exceeds data.label_share_max = {self.label_share_max}")
        if self.tokenizer is not None and not self.tokenizer.startswith("hf:"):
            raise ValueError(f"data.tokenizer = {self.tokenizer!r}: name a Hugging Face model 'hf:<directory or package>'")
        return self

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if _is_import_path(v) or find_part("dataset", v) is not None:
            return v
        raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(part_names('dataset'))} or an import path 'pkg.module:function' "
                         "(or a dataset registered with fleetlearn.parts.register_part('dataset', ...))")

    @property
    def num_clients(self) -> int:
        if self.clients is not None:
            return self.clients
        if self.dataset == "sotu" and self.text_speakers is not None:
            return self.text_speakers
        part = find_part("dataset", self.dataset)
        return int(part.info.get("default_clients", 100)) if part is not None else 100


BUILTIN_MODELS = ("mlp", "logistic", "char_gru", "char_lstm")


class ModelConfig(Section):
    # A built-in ("mlp", "logistic"; "char_gru", "char_lstm" for text: `hidden` is then the one
    # recurrent width, kwargs may set `embed`) or an import path "pkg.module:make_model" to a
    # function (num_features, num_classes, **kwargs) -> torch.nn.Module.
    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128])
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in BUILTIN_MODELS or _is_import_path(v) or (v.startswith("hf:") and len(v) > 3):
            return v
        raise ValueError(f"unknown model {v!r}; allowed: {', '.join(BUILTIN_MODELS)}, an import path 'pkg.module:function' "
                         "or a pretrained Hugging Face model 'hf:<directory or installed package>'")

    @model_validator(mode="after")
    def _recurrent_width(self) -> "ModelConfig":
        if self.name in ("char_gru", "char_lstm") and len(self.hidden) != 1:
            raise ValueError(f"model.hidden = {self.hidden}: {self.name} has one recurrent layer; give one width, e.g. [64]")
        # A setting the built-in would silently ignore is refused (compared with the default,
        # so a config written out by to_toml() and read back is still accepted).
        if self.name in ("mlp", "logistic") and self.kwargs:
            raise ValueError(
                f"model.kwargs = {self.kwargs}: model.name = {self.name!r} takes no kwargs (its layers are model.hidden); "
                "kwargs apply to char_gru / char_lstm (embed) and to import-path models"
            )
        if self.name == "logistic" and self.hidden != [128]:
            raise ValueError(f"model.hidden = {self.hidden}: model.name = 'logistic' has no hidden layers; leave model.hidden unset or use model.name = 'mlp'")
        if self.name.startswith("hf:") and (self.kwargs or self.hidden != [128]):
            key = "kwargs" if self.kwargs else "hidden"
            raise ValueError(f"model.{key} = {getattr(self, key)}: a pretrained model ({self.name!r}) takes its layers from its config.json; "
                             "its keys are lora_rank, lora_alpha, lora_targets and lora_ranks")
        lora_keys = sorted(k for k in ("lora_rank", "lora_alpha", "lora_targets", "lora_ranks") if k in self.model_fields_set and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True))
        if lora_keys and not self.name.startswith("hf:"):
            raise ValueError(f"model.{lora_keys[0]}: LoRA adapters apply to a pretrained model, model.name = 'hf:...', not {self.name!r}")
        if self.lora_ranks:
            if self.heterofl_widths:
                raise ValueError("model.lora_ranks and model.widths: give a pretrained model ranks, an MLP widths, not both")
            if "lora_rank" in self.model_fields_set and self.lora_rank != max(self.lora_ranks):
                raise ValueError(f"model.lora_rank = {self.lora_rank} with model.lora_ranks = {self.lora_ranks}: the global adapters have the largest rank; leave model.lora_rank unset")
            self.__dict__["lora_rank"] = max(self.lora_ranks)
        return self

    # HeteroFL (Diao et al., ICLR 2021): the widths clients train at (1.0 = the full model;
    # [1.0] alone is ordinary training), and the rule giving each device its width:
    # "memory" (the largest width whose share of `full_width_memory_mb` fits in the device's
    # `devices.memory_mb`) or "round_robin" (client c gets widths[c % len(widths)]).
    widths: list[float] = Field(default_factory=lambda: [1.0])
    width_rule: Literal["memory", "round_robin"] = "memory"
    full_width_memory_mb: float = Field(default=512.0, gt=0)  # memory a device needs to train the full model
    # LoRA on a pretrained model (name = "hf:...", fleetlearn.learners.hf): adapters of rank
    # `lora_rank` (0: the head alone, a linear probe on the frozen encoder) with scaling
    # lora_alpha / rank on the Linear modules named by `lora_targets`.  `lora_ranks`: several
    # ranks, each device's by `width_rule` as for HeteroFL's widths (width = rank / max rank).
    lora_rank: int = Field(default=8, ge=0, le=4096)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "value"])
    lora_ranks: list[int] = Field(default_factory=list)

    @field_validator("lora_ranks")
    @classmethod
    def _lora_ranks(cls, v: list[int]) -> list[int]:
        if any(r < 1 or r > 4096 for r in v) or len(set(v)) != len(v):
            raise ValueError(f"ranks must be distinct, from 1 to 4096; got {v}")
        return sorted(v, reverse=True)

    @field_validator("lora_targets")
    @classmethod
    def _lora_targets(cls, v: list[str]) -> list[str]:
        if not v or any(not t or not all(p.isidentifier() or p.isdigit() for p in t.split(".")) for t in v):
            raise ValueError(f"give module names such as 'query' or 'attention.self.value'; got {v}")
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden layer sizes must be >= 1, got {v}")
        return v

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not (0.0 < w <= 1.0)]
        if not v or bad:
            raise ValueError(f"every width must be in (0, 1] and at least one given; got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"widths must be distinct, got {v}")
        if 1.0 not in v:
            raise ValueError(f"widths must include 1.0 (the global model is the full-width model), got {v}")
        return sorted(v, reverse=True)

    @property
    def heterofl_widths(self) -> bool:
        return len(self.widths) > 1

    @property
    def heterofl(self) -> bool:
        """Sub-models of several sizes: HeteroFL widths, or LoRA ranks."""
        return len(self.widths) > 1 or len(self.lora_ranks) > 1


class ClientConfig(Section):
    # Defaults are the embedded default job's: tiny non-IID digits clients (~11
    # examples each) learn most from several small-batch momentum epochs.
    local_epochs: int = Field(default=10, ge=1)
    local_steps: int | None = Field(default=None, ge=1)  # if set, overrides local_epochs
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    # The local objective part: plain | prox (FedProx) | scaffold (SCAFFOLD, Karimireddy et al. 2020,
    # option II control variates; the server's c travels in every Task, each client keeps its c_i).
    objective: Literal["plain", "prox", "scaffold"] = "plain"
    prox_mu: float = Field(default=0.01, ge=0)  # FedProx's mu (objective = "prox")
    # Learning-rate schedule over rounds: constant | step | cosine | plateau (on the central loss).
    lr_schedule: Literal["constant", "step", "cosine", "plateau"] = "constant"
    lr_step_size: int = Field(default=10, ge=1)  # step: multiply by lr_gamma every lr_step_size rounds
    lr_gamma: float = Field(default=0.5, gt=0)
    lr_min: float = Field(default=0.0, ge=0)  # cosine / plateau floor
    lr_factor: float = Field(default=0.5, gt=0, lt=1)  # plateau: multiply when no improvement
    lr_patience: int = Field(default=3, ge=1)
    # Label-skew helper: duplicate examples of under-represented local classes (opt-in).
    oversample: bool = False
    oversample_noise_std: float = Field(default=0.0, ge=0)


class ServerConfig(Section):
    rounds: int = Field(default=20, ge=1)
    cohort: int = Field(default=30, ge=1)
    # Parts chosen by name, each with its own keys (fleetlearn.parts): a name, or a table
    # ``{name = "oort", epsilon = 0.3}`` ([server.selector] as a sub-table works too).  The
    # old flat keys (server.oort_epsilon, server.weighting_floor, server.server_beta1, ...) are
    # still read, with a note naming the new key (LEGACY_KEYS; docs/architecture.md section 6).
    # selector: any registered selector (random, poisson, oort, ...) or auto: poisson under
    # privacy.mode = 'central' (the sampling DP-FedAvg's accountant assumes), else random.
    selector: str = "auto"
    # The aggregator part: mean (FedAvg) or a robust rule (see fleetlearn.aggregation).
    # Any name in the aggregator registry (fleetlearn.aggregation.register_aggregator): mean,
    # median, trimmed_mean, krum, multi_krum, bulyan, geometric_median, norm_bounded_mean,
    # centered_clipping, dnc, mifa, and the rules a user registered.
    aggregator: str = "mean"
    @field_validator("aggregator")
    @classmethod
    def _registered_aggregator(cls, v: str) -> str:
        from .aggregation import aggregator_names

        names = aggregator_names()
        if v not in names:
            raise ValueError(f"unknown aggregator; allowed: {', '.join(names)} (or a rule registered with fleetlearn.aggregation.register_aggregator)")
        return v

    # mifa (Gu et al., NeurIPS 2021): average over the latest stored update of every client seen;
    # memory ~ mifa_max_clients x 4d bytes (None: the population).
    mifa_max_clients: int | None = Field(default=None, ge=1)
    trim_beta: float = Field(default=0.1, ge=0, lt=0.5)  # trimmed_mean: fraction cut per side
    byzantine_f: int | None = Field(default=None, ge=0)  # krum/bulyan: assumed attackers (None: n // 5, capped)
    krum_m: int | None = Field(default=None, ge=1)  # multi_krum: rows averaged (None: n - f)
    norm_bound: float | None = Field(default=None, gt=0)  # norm_bounded_mean (None: cohort median norm)
    cc_tau: float | None = Field(default=None, gt=0)  # centered_clipping radius (None: median norm)
    cc_iters: int = Field(default=3, ge=1)
    gm_eps: float = Field(default=1e-6, gt=0)  # geometric_median smoothing
    gm_max_iter: int = Field(default=100, ge=1)
    # dnc (Shejwalkar & Houmansadr, NDSS 2021): drop floor(dnc_c x byzantine_f) rows by their
    # projection on the top principal direction; rows clipped to norm_bound (None: median) first.
    dnc_c: float = Field(default=1.0, gt=0)
    dnc_clip: bool = True
    # dnc only: per-client flag history; clients flagged in more than reputation_threshold of
    # at least reputation_min_rounds appearances are dropped (see aggregation/reputation.py).
    reputation: bool = False
    reputation_min_rounds: int = Field(default=2, ge=1)
    reputation_threshold: float = Field(default=0.5, ge=0, lt=1)
    # Validation before aggregation (None: round, duplicate, examples, shape, finite, plus the
    # checks whose bound is set below).
    validators: list[str] | None = None  # names of registered validators (fleetlearn.parts, kind "validator")
    max_update_norm: float | None = Field(default=None, gt=0)  # refuse updates above this L2 norm
    max_norm_ratio: float | None = Field(default=None, gt=1)  # refuse updates above ratio x cohort median norm
    max_claimed_examples: int | None = Field(default=None, ge=1)  # refuse claims above this count
    # How accepted updates are weighted (aggregation/weighting.py): examples (capped claims) | uniform
    # | loss_improvement {floor} | distance {mode, temperature} | label_importance {target, method}
    # (from the label histogram each client sends in its update metrics).
    weighting: str = "examples"
    # Server optimizer (Reddi et al., ICLR 2021): sgd (FedAvg) | momentum {momentum} (FedAvgM)
    # | adam {beta1, beta2, tau} | yogi {beta1, beta2, tau} | adagrad {beta1, tau}.
    optimizer: str = "sgd"
    server_lr: float = Field(default=1.0, gt=0)  # adam/yogi/adagrad want about 1e-2 to 1e-1
    server_lr_schedule: Literal["constant", "step", "cosine", "plateau"] = "constant"
    server_lr_step_size: int = Field(default=10, ge=1)
    server_lr_gamma: float = Field(default=0.5, gt=0)
    server_lr_min: float = Field(default=0.0, ge=0)
    server_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    server_lr_patience: int = Field(default=3, ge=1)
    # A client cannot buy itself more weight: its claimed example count is capped at
    # `max_examples` (absolute) and at `max_examples_ratio` x the cohort's median claim.
    max_examples: int | None = Field(default=None, ge=1)
    max_examples_ratio: float | None = Field(default=None, ge=1)  # None: min(10, max(1, accepted - 1))
    # Deadlines and dropouts (Bonawitz et al., SysML 2019: over-select, aggregate whoever reports).
    deadline_s: float | None = Field(default=None, gt=0)  # simulated s (real s on the network); None waits for all
    deadline_policy: Literal["fixed", "adaptive"] = "fixed"
    # adaptive: the deadline of the next round is this quantile of the completion times
    # seen in the last `deadline_window` rounds, times `deadline_margin`.
    deadline_quantile: float = Field(default=0.8, gt=0, le=1)
    deadline_window: int = Field(default=3, ge=1)
    deadline_margin: float = Field(default=1.0, gt=0)
    over_selection: float = Field(default=1.0, ge=1)  # select ceil(cohort x factor), keep the first `cohort` replies
    min_replies: int = Field(default=1, ge=1)  # fewer accepted updates: the round fails, the model is unchanged
    partial_work: bool = False  # a client that cannot finish in time sends its update after fewer steps
    # A device that goes silent is noticed this long after (a missed heartbeat); without
    # a deadline the round waits that long for it.
    heartbeat_timeout_s: float = Field(default=10.0, ge=0)
    # Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022): `concurrency`
    # clients train at once, the server steps after every `buffer_size` updates; in async
    # mode `rounds` counts server steps.  Defaults for both: the cohort.
    mode: Literal["sync", "async"] = "sync"
    concurrency: int | None = Field(default=None, ge=1)
    buffer_size: int | None = Field(default=None, ge=1)
    staleness_weight: Literal["constant", "sqrt", "inverse"] = "sqrt"  # 1, 1/sqrt(1+s), 1/(1+s)
    # How the step follows staleness (fleetlearn.engine.fedbuff.StalenessStep): adaptive divides
    # each update's staleness_weight by the run's mean weight and the step by 1 + the run's mean
    # staleness (both measured over the updates aggregated so far), so a fleet's delay, not the
    # weight function's shape, sets the step; fixed uses the weights as they are (the step
    # shrinks by the buffer's mean weight).
    staleness_step: Literal["adaptive", "fixed"] = "adaptive"
    max_staleness: int | None = Field(default=None, ge=0)  # older updates are refused
    eval_every: int = Field(default=1, ge=1)
    # Gradual onboarding: at most this many clients never selected before join a round (None: no cap).
    max_newcomers: int | None = Field(default=None, ge=1)
    # Clustered FL (fleetlearn.clustering): none | ifca (Ghosh et al., NeurIPS 2020: `clusters`
    # models; each client trains the one with the lowest loss on its data) | cfl (Sattler et
    # al., TNNLS 2020: one model, a cluster is split in two by the cosine similarity of its
    # clients' updates when its mean update norm < cfl_eps1 and its max update norm > cfl_eps2
    # and the two halves are separated: mean within-half cosine similarity - mean cross-half
    # similarity >= cfl_min_gap; up to `clusters` models).
    clustering: Literal["none", "ifca", "cfl"] = "none"
    clusters: int = Field(default=2, ge=1, le=62)
    cfl_eps1: float = Field(default=0.7, gt=0)
    cfl_eps2: float = Field(default=2.0, gt=0)
    cfl_min_gap: float = Field(default=0.3, ge=-2, le=2)
    # Federated evaluation of the global model on clients' local test splits: at most
    # this many clients (a seeded sample; 0 = every client).
    eval_clients: int = Field(default=1000, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_flat_keys(cls, data: Any) -> Any:
        return read_legacy_keys(data, "server", CHOICES, {f: ServerConfig.model_fields[f].default for f in CHOICES})

    @field_validator("selector", "weighting", "optimizer", mode="plain")
    @classmethod
    def _choice(cls, v: Any, info: Any) -> Choice:
        return choose(CHOICES[info.field_name], v, f"server.{info.field_name}", CHOICE_EXTRA.get(info.field_name, ()))

    @field_serializer("selector", "weighting", "optimizer")
    def _dump_choice(self, v: Any) -> Any:
        return v.dump() if isinstance(v, Choice) else v

    @field_validator("validators")
    @classmethod
    def _registered_validators(cls, v: list[str] | None) -> list[str] | None:
        bad = [n for n in v or () if find_part("validator", n) is None]
        if bad:
            raise ValueError(f"unknown validator(s) {bad}; allowed: {', '.join(part_names('validator'))} "
                             "(or a validator registered with fleetlearn.parts.register_part('validator', ...))")
        return v

    def options(self, field: str) -> Any:
        """The chosen part's own settings (a pydantic model), e.g. ``options("selector").epsilon``."""
        return getattr(getattr(self, field), "options", None)


# [server] fields that choose a part (field -> registry kind), and names that are not parts.
CHOICES = {"selector": "selector", "weighting": "weighting", "optimizer": "server_optimizer"}
CHOICE_EXTRA = {"selector": ("auto",)}


def legacy_keys(kind: str) -> dict[str, tuple[str, list[str]]]:
    """Old flat key -> (the part's key, the parts that read it), from the registry."""
    out: dict[str, tuple[str, list[str]]] = {}
    for name in part_names(kind):
        for old, new in find_part(kind, name).legacy.items():
            out.setdefault(old, (new, []))[1].append(name)
    return out


class OldKeyNote(FutureWarning):
    """An old flat config key was read; the message names the new key."""


def read_legacy_keys(data: Any, section: str, choices: dict[str, str], defaults: dict[str, Any]) -> Any:
    """Move old flat keys (``oort_epsilon``) into the table of the part that reads them
    (``selector = {name = "oort", epsilon = ...}``).  A key of a part that is not chosen is
    dropped when it has its default value (configs written out by older versions list every
    key) and refused otherwise.  Non-default values read this way are noted (`OldKeyNote`)."""
    if not isinstance(data, dict):
        return data
    import warnings

    data = dict(data)
    for field, kind in choices.items():
        legacy = legacy_keys(kind)
        present = [k for k in legacy if k in data]
        if not present:
            continue
        chosen = data.get(field, defaults[field])
        if isinstance(chosen, Choice):
            chosen = chosen.dump()
        table = dict(chosen) if isinstance(chosen, dict) else {"name": chosen}
        moved = dict(table.pop("__legacy__", None) or {})
        name = table.get("name")
        for old in present:
            new, owners = legacy[old]
            value = data.pop(old)
            config = find_part(kind, owners[0]).config
            default = config.model_fields[new].default if config is not None and new in config.model_fields else None
            if name not in owners:
                if value == default:
                    continue
                raise ValueError(
                    f"{section}.{old} = {value!r}: read only by {section}.{field} = {' / '.join(map(repr, owners))}, "
                    f"not by {section}.{field} = {name!r}; remove it (its new form is {section}.{field} = {{name = {owners[0]!r}, {new} = ...}})"
                )
            if new in table:
                raise ValueError(f"{section}.{old} and {section}.{field}.{new} both given: keep {section}.{field}.{new} (the new form) only")
            table[new] = value
            moved[new] = old
            if value != default:
                warnings.warn(f"{section}.{old} is an old key, read as {section}.{field}.{new}; write "
                              f"{section}.{field} = {{name = {name!r}, {new} = {value!r}}} instead", OldKeyNote, stacklevel=2)
        table["__legacy__"] = moved
        data[field] = table
    return data


class DevicesConfig(Section):
    # uniform: every device alike; mixed_fleet: log-normal speeds and bandwidths;
    # flaky: mixed_fleet with diurnal availability and 30% mid-round dropout.
    profile: Literal["uniform", "mixed_fleet", "flaky"] = "uniform"
    # The `uniform` device (and the median device of `mixed_fleet`).
    compute_sps: float = Field(default=2000.0, gt=0)  # training samples per second
    uplink_mbps: float = Field(default=10.0, gt=0)
    downlink_mbps: float = Field(default=50.0, gt=0)
    latency_s: float = Field(default=0.05, ge=0)  # one-way, paid on download and on upload
    spread: float = Field(default=1.0, ge=0)  # log-normal sigma of `mixed_fleet` and `flaky`
    # Mid-round dropout: probability that a device abandons a task (flaky: 0.3 unless set).
    dropout: float | None = Field(default=None, ge=0, le=1)
    # Availability over time: always online, or a seeded per-device diurnal on/off pattern
    # with a period of `day_s` simulated seconds and on average `online_fraction` of it online.
    availability: Literal["always", "diurnal"] | None = None  # flaky: diurnal unless set
    day_s: float = Field(default=600.0, gt=0)
    online_fraction: float = Field(default=0.7, gt=0, le=1)
    # A fraction of devices made `slow_factor` times slower (compute and links) than their profile.
    slow_fraction: float = Field(default=0.0, ge=0, le=1)
    slow_factor: float = Field(default=10.0, ge=1)
    # Device memory (MB) for training: the `uniform` device's, and the median of `mixed_fleet`
    # and `flaky` (log-normal with sigma = `spread`).  HeteroFL's "memory" width rule reads it.
    memory_mb: float = Field(default=512.0, gt=0)


class CompressionConfig(Section):
    # Codec chains in one syntax everywhere, e.g. "topk:0.01 | q8"; "none" sends float32.
    uplink: str = "none"
    downlink: str = "none"
    # Adaptive compression: each client uses the least lossy rung of `ladder` (ordered
    # least to most lossy) that meets its time budget.  Recorded per client per round
    # (ClientRecord.codec).  adaptive_policy:
    #   pace: finish by (1 + pace_slack) x the earliest time the round could end (the
    #     cohort-th earliest finish with the last rung), capped by the deadline;
    #   upload_budget: upload within `upload_budget_s`, or else within the round's
    #     deadline minus the client's download and compute time.
    # Unset: upload_budget when upload_budget_s is set, else pace.
    adaptive: bool = False
    adaptive_policy: Literal["pace", "upload_budget"] | None = None
    # The default ladder is the one benchmarks/compression.py measured (BENCHMARKS.md).
    ladder: list[str] = Field(default_factory=lambda: ["none", "q8", "q4:stochastic", "q2:stochastic", "ef | topk:0.16,block=16 | q2 | zstd"])
    upload_budget_s: float | None = Field(default=None, gt=0)
    pace_slack: float = Field(default=0.05, ge=0, le=10)
    # A compression ratio to meet: the uplink chain is chosen for the run's model so that
    # every update is at most 4 d / target_ratio bytes (compression.ratio.chain_for_ratio:
    # subset | q2 | zstd | budget:N where the run averages with the plain mean, else ef |
    # block top-k | q2 | zstd | budget:N); leave uplink = "none".  Recorded per update
    # (ClientRecord.codec) and in the summary.
    target_ratio: float | None = Field(default=None, gt=1, le=1e6, allow_inf_nan=False)

    def uplink_for(self, dim: int, coverage: bool = True, head: int = 0) -> str:
        """The uplink chain in force for a model of `dim` parameters: `uplink`, or the chain
        `target_ratio` chooses (ValueError when the model cannot reach that ratio); `coverage`:
        whether the run can average by coverage (`RunConfig.uplink_chain` decides); `head`:
        the model's output-layer entries at the end of its vector (`compression.ratio.head_size`)."""
        if self.target_ratio is None:
            return self.uplink
        from .compression.ratio import chain_for_ratio

        return chain_for_ratio(self.target_ratio, int(dim), coverage=coverage, head=int(head))

    @field_validator("ladder")
    @classmethod
    def _distinct_rungs(cls, v: list[str]) -> list[str]:
        norm = [" | ".join(p.strip() for p in rung.split("|")) for rung in v]
        dup = sorted({r for r in norm if norm.count(r) > 1})
        if dup:
            raise ValueError(f"the ladder lists {dup} more than once; allowed: distinct chains, least to most lossy")
        return v

    @property
    def policy(self) -> str:
        """The adaptive policy in force (adaptive_policy, or its default)."""
        return self.adaptive_policy or ("upload_budget" if self.upload_budget_s is not None else "pace")


class PrivacyConfig(Section):
    """Differential privacy and secure aggregation (see fleetlearn.privacy).  The one schema
    of `[privacy]`: `fleetlearn.privacy.PrivacySettings` is this class."""

    mode: Literal["none", "central", "local"] = "none"  # central: DP-FedAvg; local: noise on each device
    noise_multiplier: float = Field(default=1.0, ge=0)  # z; with adaptive clipping, the combined z
    clip_norm: float = Field(default=1.0, gt=0)  # C (the initial C when adaptive)
    adaptive_clipping: bool = False  # Andrew et al. 2021 quantile clipping (central only)
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(default=0.2, gt=0)
    clip_count_stddev: float | None = Field(default=None, ge=0)  # None: expected cohort / 20
    accounting: Literal["pld", "rdp"] = "pld"
    delta: float = Field(default=1e-5, gt=0, lt=1)  # must be below 1 / population
    budget_epsilon: float | None = Field(default=None, gt=0)  # stop before a round would exceed it
    secure_aggregation: bool = False
    secagg_threshold: float | None = Field(default=None, gt=0)  # int >= 2 or a fraction; None: honest majority
    secagg_modulus_bits: int = Field(default=32, ge=8, le=62)
    secagg_clip_range: float = Field(default=1.0, gt=0)
    secagg_neighbors: int | None = Field(default=None, ge=2)  # SecAgg+ graph degree; None: all pairs
    secagg_rounding: Literal["stochastic", "deterministic"] = "stochastic"
    # Private telemetry (central mode): clients' reported loss, accuracy and update norm are
    # stored only as noised cohort means (Gaussian, this noise multiplier), counted in the budget.
    telemetry_noise_multiplier: float | None = Field(default=None, gt=0)
    telemetry_loss_bound: float = Field(default=10.0, gt=0)  # losses are clipped to [0, bound]

    @model_validator(mode="after")
    def _keys_in_force(self) -> "PrivacyConfig":
        # A key that changes nothing in this mode is refused rather than ignored (compared
        # with its default, so a config written out by to_toml() and read back still loads).
        unused = []
        if self.mode == "none":
            unused += [k for k in DP_KEYS if getattr(self, k) != PrivacyConfig.model_fields[k].default]
        if not self.secure_aggregation:
            unused += [k for k in SECAGG_KEYS if getattr(self, k) != PrivacyConfig.model_fields[k].default]
        if unused:
            shown = ", ".join(f"privacy.{k} = {getattr(self, k)!r}" for k in unused)
            raise ValueError(
                f"{shown}: not used with privacy.mode = {self.mode!r} / privacy.secure_aggregation = {self.secure_aggregation}; "
                "set privacy.mode = 'central' or 'local' for the DP keys, privacy.secure_aggregation = true for the secagg_* keys, or remove them"
            )
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"privacy.{key} = {getattr(self, key)!r}: {msg}")

        if self.adaptive_clipping and self.mode != "central":
            raise bad("adaptive_clipping", "adaptive clipping needs privacy.mode = 'central'")
        if self.telemetry_noise_multiplier is not None and self.mode != "central":
            raise bad("telemetry_noise_multiplier", "private telemetry is released by the server: it needs privacy.mode = 'central'")
        n = self.secagg_neighbors
        if n is not None and n % 2:
            raise bad("secagg_neighbors", "must be an even integer >= 2 (SecAgg+ graph degree) or unset for all pairs")
        if self.mode == "central" and self.secure_aggregation and self.secagg_clip_range < 1:
            raise bad("secagg_clip_range", "must be >= 1 with central DP (clients send D/C, coordinates in [-1, 1])")
        t = self.secagg_threshold
        if t is not None and t > 1 and not float(t).is_integer():
            raise bad("secagg_threshold", "allowed: an integer >= 2 (clients) or a fraction in (0, 1] of the share holders")
        if self.accounting == "pld":
            for key in ("noise_multiplier", "telemetry_noise_multiplier"):
                z = getattr(self, key)
                if z is not None and 0 < z < PLD_MIN_NOISE and (self.mode != "none" or key == "telemetry_noise_multiplier"):
                    raise ValueError(
                        f"privacy.{key} = {z}: with privacy.accounting = 'pld' the noise multiplier must be 0 or >= {PLD_MIN_NOISE} "
                        "(the privacy-loss grid grows as 1/z^2: z = 0.05 takes a minute per round, z = 0.01 more memory than a machine has); "
                        "use privacy.accounting = 'rdp' for smaller noise"
                    )
        return self


# The keys of [privacy] that only differential privacy / only secure aggregation read.
DP_KEYS = ("noise_multiplier", "clip_norm", "adaptive_clipping", "target_quantile", "clip_learning_rate", "clip_count_stddev",
           "accounting", "delta", "budget_epsilon", "telemetry_noise_multiplier", "telemetry_loss_bound")
SECAGG_KEYS = ("secagg_threshold", "secagg_modulus_bits", "secagg_clip_range", "secagg_neighbors", "secagg_rounding")
PLD_MIN_NOISE = 0.1


# -- [personalization] (fleetlearn.client.personalization) ------------------------------
class PersonalizationConfig(Section):
    """Personalized models next to the global one; global training is unchanged except
    that FedPer's head never leaves the client.  Personal and global accuracy on each
    client's local test split are recorded per client and summarised per round and run."""

    method: Literal["none", "finetune", "fedper", "ditto"] = "none"
    # finetune: each client fine-tunes the global model for `finetune_steps` SGD steps
    # (lr: `finetune_lr`, None = client.lr; client.batch_size and client.momentum).
    finetune_steps: int = Field(default=5, ge=1)
    finetune_lr: float | None = Field(default=None, gt=0)
    # fedper (Arivazhagan et al. 2019): the personal head = "last" (the tensors of the last
    # layer) or every tensor whose name starts with this prefix (e.g. "2." or "head.").
    head: str = "last"
    # ditto (Li et al., ICML 2021): a personal model trained with lambda/2 ||v - w||^2 around
    # the received global model, `ditto_epochs` local epochs per round (None = client.local_epochs).
    ditto_lambda: float = Field(default=0.1, ge=0)
    ditto_epochs: int | None = Field(default=None, ge=1)

    @field_validator("head")
    @classmethod
    def _head(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected 'last' or a parameter-name prefix such as '2.' or 'head.'")
        return v
# -- end [personalization] ----------------------------------------------------------------


# -- [attack] (fleetlearn.attacks) ------------------------------------------------------
# `kind` values: fleetlearn.attacks.ATTACK_KINDS (tests/attacks checks they are the same), here
# without torch so that the CLI's help needs none.
AttackKind = Literal["none", "sign_flip", "scaling", "gaussian", "label_flip", "alie", "same_value", "model_replacement"]

# The `[attack]` keys a red-team client takes, each as `fleetlearn client --attack-<key>`, and the
# kinds it applies to (start_round: every kind).
CLIENT_ATTACK_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "start_round": None,
    "scale": ("scaling",),
    "noise_std": ("gaussian",),
    "alie_z": ("alie",),
    "value": ("same_value",),
}


class AttackConfig(Section):
    """Attack simulation: a seeded fixed `fraction` of the population is malicious
    from `start_round` on (see fleetlearn.attacks; `kind` values: its ATTACK_KINDS)."""

    kind: AttackKind = "none"
    fraction: float = Field(default=0.2, ge=0, le=1)  # of the population; round(fraction x clients) attackers
    start_round: int = Field(default=1, ge=1)
    scale: float = Field(default=10.0, gt=0, allow_inf_nan=False)  # scaling: boost factor
    noise_std: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # gaussian: std of the noise sent instead
    alie_z: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # alie: None = Baruch et al.'s z_max(n, f)
    value: float = Field(default=100.0, allow_inf_nan=False)  # same_value: every coordinate
    collude: bool = True  # attackers share their honest updates' statistics (alie, sign_flip, scaling, model_replacement)
# -- end [attack] ------------------------------------------------------------------------


# The detectors' names: fleetlearn.monitoring.detectors.DETECTORS, in its order (tests/monitoring checks
# they are the same), here without the monitoring room so that config never imports it.
DETECTOR_NAMES = ("divergence", "oscillation", "stagnation", "outlier_updates", "participation_collapse", "drift")


OLD_PROBE_KEYS = {"probes": "probe_updates", "probe_rollback": "probe_updates_rollback"}  # [monitoring], renamed


class MonitoringConfig(Section):
    """Debug measurements, detectors, guardrails and the Prometheus endpoint (fleetlearn.monitoring).
    This is the one definition of the ``[monitoring]`` settings: `fleetlearn.monitoring.build_monitoring`
    takes it (or a dict it validates), and each detector's threshold defaults are its constructor's
    (tests/monitoring checks both)."""

    debug: bool = True  # per-round update statistics into the record
    detectors: list[str] = Field(default_factory=lambda: list(DETECTOR_NAMES))
    divergence_patience: int = Field(default=3, ge=1)
    divergence_min_rise: float = Field(default=0.0, ge=0)
    divergence_max_ratio: float | None = Field(default=3.0, gt=1)  # critical: loss above this x its best
    divergence_param_growth: float | None = Field(default=10.0, gt=1)
    divergence_warn_ratio: float = Field(default=2.0, ge=1)  # warning: a rise of patience rounds ending above this x the best loss
    oscillation_window: int = Field(default=8, ge=3)
    oscillation_amplitude: float = Field(default=0.02, ge=0)
    oscillation_min_flips: int = Field(default=4, ge=1)
    oscillation_min_gain: float = Field(default=0.005, ge=0)  # oscillation is a warning only if the best accuracy gained less
    stagnation_window: int = Field(default=10, ge=2)
    stagnation_eps: float = Field(default=0.005, ge=0)
    # outlier_updates (monitoring/detectors.py): a score (robust z against the cohort's pooled
    # spread and the client's own history) above outlier_threshold is an odd update (info);
    # a warning needs it in outlier_persistence of the client's last outlier_window rounds,
    # or one score above outlier_alarm_threshold.
    outlier_threshold: float = Field(default=4.5, gt=0)
    outlier_alarm_threshold: float = Field(default=10.0, gt=0)
    outlier_persistence: int = Field(default=2, ge=1)
    outlier_window: int = Field(default=3, ge=1, le=62)
    outlier_min_count: int = Field(default=3, ge=1)  # this many odd updates in one round is a warning (coordinated)
    outlier_min_clients: int = Field(default=10, ge=3)
    outlier_min_history: int = Field(default=2, ge=1)  # past observations before a client is scored against itself
    outlier_spread_rounds: int = Field(default=10, ge=1)  # rounds pooled for the cohort's spread
    outlier_ewma: float = Field(default=0.3, gt=0, le=1)  # weight of a new observation in a client's baseline
    outlier_max_clients: int = Field(default=100_000, ge=1)  # clients whose history is kept (least recently seen dropped)
    participation_min_fraction: float = Field(default=0.5, ge=0, le=1)
    participation_drop_fraction: float = Field(default=0.5, ge=0, le=1)
    participation_window: int = Field(default=5, ge=1)
    drift_threshold: float = Field(default=0.15, gt=0)
    drift_patience: int = Field(default=2, ge=1)
    drift_metric: Literal["accuracy", "fed_accuracy"] = "accuracy"
    # Guardrail: detectors whose alert rejects the round and restores the last good model
    # (empty: alerts only), and the optional responses.
    guardrail: list[str] = Field(default_factory=list)
    guardrail_lr_factor: float | None = Field(default=None, gt=0, lt=1)  # multiply the server lr
    guardrail_min_lr: float = Field(default=0.0, ge=0)
    guardrail_clip_factor: float | None = Field(default=None, gt=0, lt=1)  # tighten clipping
    guardrail_exclude_rounds: int = Field(default=0, ge=0)  # exclude flagged clients for N rounds
    guardrail_min_severity: Literal["info", "warning", "critical"] = "warning"  # act on alerts this severe or more
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)  # 0: a free port
    prometheus_host: str = "127.0.0.1"
    # Probe updates with a known answer through the live codec, aggregator and server
    # optimizer every round (0: off; else at least 2); a failed probe update rejects the
    # round (and, with probe_updates_rollback, rolls back).  Not the probe *clients* of
    # `[probes]`: devices whose known data lets the server check their real updates.
    probe_updates: int = Field(default=0, ge=0)
    probe_updates_rollback: bool = True

    @model_validator(mode="before")
    @classmethod
    def _old_probe_keys(cls, data: Any) -> Any:
        """``probes`` and ``probe_rollback`` (before 2026-12-07) are read as ``probe_updates``
        and ``probe_updates_rollback``: the old name was also `[probes]`'s, another concept."""
        if not isinstance(data, dict) or not any(k in data for k in OLD_PROBE_KEYS):
            return data
        import warnings

        data = dict(data)
        for old, new in OLD_PROBE_KEYS.items():
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"monitoring.{old} and monitoring.{new} both given: keep monitoring.{new} (the new name) only")
            value = data.pop(old)
            data[new] = value
            if value != cls.model_fields[new].default:
                warnings.warn(f"monitoring.{old} is an old key, read as monitoring.{new}; write monitoring.{new} = "
                              f"{value!r} instead", OldKeyNote, stacklevel=2)
        return data

    @field_validator("probe_updates")
    @classmethod
    def _probe_updates(cls, v: int) -> int:
        if v == 1:
            raise ValueError("allowed: 0 (off) or at least 2 probe updates")
        return v

    @field_validator("detectors", "guardrail")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DETECTOR_NAMES]
        if bad:
            raise ValueError(f"unknown detector(s) {bad}; allowed: {', '.join(DETECTOR_NAMES)}")
        return v

    @model_validator(mode="after")
    def _outlier_levels(self) -> "MonitoringConfig":
        if self.outlier_threshold > self.outlier_alarm_threshold:
            raise ValueError(f"monitoring.outlier_threshold = {self.outlier_threshold} must be <= monitoring.outlier_alarm_threshold = {self.outlier_alarm_threshold}")
        if self.outlier_persistence > self.outlier_window:
            raise ValueError(f"monitoring.outlier_persistence = {self.outlier_persistence} must be <= monitoring.outlier_window = {self.outlier_window}")
        missing = sorted(set(self.guardrail) - set(self.detectors))
        if missing:
            raise ValueError(f"monitoring.guardrail names detectors that are not in monitoring.detectors: {', '.join(missing)}")
        return self


class ProbesConfig(Section):
    """Probe clients (fleetlearn.monitoring.probe_clients): devices whose known synthetic data
    lets the server predict their update and check it after the wire, decoder and validators;
    their updates never enter the model.  `clients`: probe devices the simulation adds (over
    gRPC, probes are `fleetlearn client --probe` processes); `examples`: each probe's dataset
    per round; `tolerance`: the relative error allowed between the update that arrived and the
    one the server's copy of the device computed (float noise is about 1e-7)."""

    clients: int = Field(default=0, ge=0, le=64)
    examples: int = Field(default=32, ge=1, le=4096)
    tolerance: float = Field(default=0.05, gt=0, le=1)


def coverage_refusal(cfg: Any) -> str | None:
    """Why this run cannot average each coordinate over the clients that sent it (a ``subset``
    uplink: aggregation.pipeline.CoverageStage), naming the setting; None when it can."""
    srv, priv = cfg.server, cfg.privacy
    for on, why in (
        (srv.aggregator != "mean", f"server.aggregator = {srv.aggregator!r} needs whole updates; only 'mean' averages by coverage"),
        (priv.mode == "central", "privacy.mode = 'central' clips and noises a sum of whole updates"),
        (priv.secure_aggregation, "privacy.secure_aggregation = true shows the server only the sum"),
        (cfg.engine.regions > 1 or cfg.engine.region_aggregators, f"engine.regions = {cfg.engine.regions}: a region forwards one sum"),
        (cfg.model.heterofl, f"model.widths = {cfg.model.widths} averages sub-models by their own coverage"),
        (srv.clustering != "none", f"server.clustering = {srv.clustering!r} aggregates per cluster"),
        (cfg.client.objective == "scaffold", "client.objective = 'scaffold' updates its control variates from whole deltas"),
        (cfg.compression.adaptive, "compression.adaptive mixes chains within a round"),
        (cfg.distill.method != "none", f"distill.method = {cfg.distill.method!r} needs each client's whole model"),
    ):
        if on:
            return why
    return None


def probe_refusal(cfg: Any) -> str | None:
    """Why this run cannot check probe clients (the setting that prevents it), or None."""
    up = [e.strip().split(":", 1)[0] for e in str(cfg.compression.uplink).split("|")]
    for on, why in (
        (cfg.privacy.secure_aggregation, "privacy.secure_aggregation = true hides each update from the server"),
        ("sketch" in up, f"compression.uplink = {cfg.compression.uplink!r} is summed in sketch space, never decoded per client"),
        (cfg.compression.adaptive, "compression.adaptive = true picks each client's chain per round"),
        (cfg.server.mode == "async", "server.mode = 'async' has no rounds to put the probes in"),
        (cfg.model.heterofl, f"model.widths = {cfg.model.widths} trains sub-models"),
        (cfg.server.clustering != "none", f"server.clustering = {cfg.server.clustering!r} trains one of several models"),
        (cfg.personalization.method != "none", f"personalization.method = {cfg.personalization.method!r} keeps personal state on the device"),
        (cfg.model.name in ("char_gru", "char_lstm"), f"model.name = {cfg.model.name!r} reads tokens, not the probes' Gaussian features"),
    ):
        if on:
            return why
    return None


class DistillConfig(Section):
    # Server-side ensemble distillation after aggregation (FedDF, Lin et al., NeurIPS 2020):
    # "none" or "feddf".  The unlabeled server data is a seeded `server_fraction` of the held-out
    # central set, inputs only; the rest stays the central test set.
    method: Literal["none", "feddf"] = "none"
    server_fraction: float = Field(default=0.5, gt=0, lt=1)
    steps: int = Field(default=100, ge=0)  # Adam steps per round
    lr: float = Field(default=1e-3, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, ge=1)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)  # held-out unlabeled slice for early stopping
    # On-device student for the weakest devices: the global model distilled into an MLP with
    # these hidden sizes (empty: off) on the same unlabeled data, every `student_every` rounds.
    student_hidden: list[int] = Field(default_factory=list)
    student_steps: int = Field(default=300, ge=1)
    student_every: int = Field(default=10, ge=1)
    student_temperature: float = Field(default=2.0, gt=0)

    @field_validator("student_hidden")
    @classmethod
    def _student_hidden(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError(f"student layer sizes must be >= 1, got {v}")
        return v

    @property
    def enabled(self) -> bool:
        return self.method != "none" or bool(self.student_hidden)


MAX_THREADS = 512  # engine.threads: more aborts inside the OpenMP runtime long before it could help


AUTO_THREADS_MAX_DIM = 100_000  # engine.threads = "auto": one thread up to this many parameters


def run_threads(setting: int | str, dim: int) -> int:
    """The torch intra-op threads `engine.threads` gives a process training a model of `dim`
    parameters (0: leave torch's setting alone): a run (`engine.running`) and a client
    process (`fleetlearn client`) alike."""
    if setting == "auto":
        return 1 if dim <= AUTO_THREADS_MAX_DIM else 0
    return int(setting)


class EngineConfig(Section):
    # simulation: in-process; ray: the same simulation with local training on Ray workers
    # (needs the optional extra: pip install "fleetlearn[ray]").
    backend: str = "simulation"  # a registered transport (fleetlearn.parts, kind "transport")
    # Train the cohort as one batched (vmapped) computation when the model allows it.
    vectorize: bool = True
    # Where clients train and the model is evaluated (learners.TorchLearner; a pretrained
    # model's frozen encoder lives there too): "cpu", "cuda", "cuda:N" or "auto" (CUDA when
    # present). The global parameter vector, codecs and aggregation stay on the CPU.
    device: str = "cpu"
    # torch intra-op threads while a run executes (restored afterwards). "auto": one thread
    # for models up to 100,000 parameters, whose small kernels lose more to thread
    # synchronisation than they gain; torch's own default for larger models. 0: torch's default.
    threads: int | Literal["auto"] = "auto"
    # The coordinate-wise median and trimmed mean as one compiled loop (torch.compile; needs
    # a C++ compiler). "auto": for matrices of 2^24 elements and up, compiled on a background
    # thread while the numpy network answers; "compiled": always, compiled on first use;
    # "numpy": never. The results are the same, bit for bit (fleetlearn.aggregation.compiled).
    aggregation_kernels: Literal["auto", "compiled", "numpy"] = "auto"
    # A cohort's batched SGD step (vmap) as torch's eager operations, or compiled with
    # torch.compile (needs a C++ compiler): 1.5-2x faster training for large cohorts, for
    # seconds (tens, cold) of compiling in the first round: it pays in long runs. The results
    # agree with "eager" to float rounding, not bit for bit (fleetlearn.learners.torch_learner).
    training_kernels: Literal["eager", "compiled"] = "eager"
    # Per-client state the simulated clients keep between rounds (error-feedback residuals,
    # SCAFFOLD's c_i, codec streams, personal heads): at most this much in memory, least
    # recently used out first; the rest in a SQLite file (the run directory's
    # client_states.sqlite with a run store, else a temporary file), so memory grows with the
    # cohort, not the population (fleetlearn.client.state_store).
    client_state_memory_mb: float = Field(default=256.0, ge=0, le=1 << 20)
    # ray: None starts a local Ray; "auto" joins this machine's cluster; "ray://host:port" connects to one.
    address: str | None = None
    ray_workers: int | None = Field(default=None, ge=1)  # training actors (None: the cluster's CPUs)
    # Hierarchical aggregation (simulated, mean aggregator only): clients are grouped into
    # `regions` by id; each region forwards one pre-aggregated update to the root, which
    # needs `min_regions` of them; a region's aggregator fails with `region_failure` per round.
    regions: int = Field(default=1, ge=1)
    min_regions: int = Field(default=1, ge=1)
    region_failure: float = Field(default=0.0, ge=0, le=1)
    # The regions are real processes (`fleetlearn server` as the root): `fleetlearn aggregator`
    # serves one region's clients over gRPC and forwards one weighted sum per round; the root
    # combines the regions that reported (at least `min_regions`).  Clients belong to region
    # client id mod `regions`, as in the simulation.  region_failure is the simulation's only.
    region_aggregators: bool = False

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str) -> str:
        part = find_part("transport", v)
        if part is None or part.info.get("served_by"):  # the gRPC server: registered for its capabilities only
            allowed = [n for n in part_names("transport") if not find_part("transport", n).info.get("served_by")]
            served = f"; {v!r} is the transport of `{part.info['served_by']}`, not an engine backend" if part is not None else ""
            raise ValueError(f"unknown backend; allowed: {', '.join(allowed)} "
                             f"(or a transport registered with fleetlearn.parts.register_part('transport', ...)){served}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("cpu", "auto", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {v!r}")

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= MAX_THREADS:
            raise ValueError(f"expected 'auto', 0 (torch's default) or a number of threads from 1 to {MAX_THREADS}, got {v}")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or v.startswith("ray://") or (":" in v and "/" not in v):
            return v
        raise ValueError(f"expected 'auto', 'ray://host:port' or 'host:port', got {v!r}")

    @model_validator(mode="after")
    def _regions(self) -> "EngineConfig":
        if self.min_regions > self.regions:
            raise ValueError(f"engine.min_regions = {self.min_regions} exceeds engine.regions = {self.regions}")
        if self.region_aggregators and self.region_failure > 0:
            raise ValueError(f"engine.region_failure = {self.region_failure} simulates failing regions; with "
                             "engine.region_aggregators = true the regions are real processes that fail on their own: leave it at 0")
        return self


# -- [canary] (fleetlearn.engine.canary) ------------------------------------------------
CANARY_SECTIONS = ("client", "server", "compression", "privacy")  # what a candidate may change


class CanaryConfig(Section):
    """A candidate configuration trained beside production on a disjoint `fraction` of
    the population (and of the cohort) for `rounds` rounds from `start_round`, then
    promoted or rolled back by the rule: the candidate's central `metric`, averaged over
    the last `window` canary rounds, beats production's by at least `margin`.
    ``mode = "shadow"``: the same, but the candidate never ships."""

    set: list[str] = Field(default_factory=list)  # the candidate's overrides, "section.key=value"; empty: no canary
    mode: Literal["canary", "shadow"] = "canary"
    fraction: float = Field(default=0.2, gt=0, lt=1)
    start_round: int = Field(default=1, ge=1)
    rounds: int = Field(default=5, ge=1)
    metric: Literal["accuracy", "loss"] = "accuracy"
    margin: float = Field(default=0.0, ge=0)
    window: int = Field(default=3, ge=1)

    @field_validator("set")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for item in v:
            path, _ = parse_override(item)
            if len(path) != 2 or path[0] not in CANARY_SECTIONS:
                raise ValueError(f"{item!r}: a candidate overrides 'section.key=value' in {', '.join(CANARY_SECTIONS)}")
        return v
# -- end [canary] ------------------------------------------------------------------------


RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class StoreConfig(Section):
    root: str = "runs"  # run directories are created under this folder
    # The new run's id (its directory under root); default: a fresh timestamped one.  A fixed id
    # lets a leader and its standbys name the same run before it exists (`fleetlearn server --run-id`).
    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    url: str | None = None  # SQLAlchemy URL; default: sqlite file inside the run directory
    checkpoint_every: int = Field(default=1, ge=0)  # 0: only the final model
    # Commit each round on a background writer while the next round runs (round r is still
    # committed before round r + 1, and before the run returns); false: on the round's path.
    background_commit: bool = True


class RunConfig(Section):
    seed: int = Field(default=0, ge=0)
    name: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        n = self.data.num_clients
        if self.server.cohort > n:
            raise ValueError(f"server.cohort = {self.server.cohort} exceeds the number of clients (data.clients = {n})")
        if self.server.min_replies > self.server.cohort:
            raise ValueError(f"server.min_replies = {self.server.min_replies} exceeds server.cohort = {self.server.cohort}")
        check_config(self)  # the pair rules between parts, from their capabilities (fleetlearn.compat)
        if self.probes.clients and (why := probe_refusal(self)):
            raise ValueError(f"probes.clients = {self.probes.clients}: the server cannot predict a probe's update here: {why}")
        if self.server.mode == "async" and (self.privacy.mode != "none" or self.privacy.secure_aggregation):
            raise ValueError(
                f"privacy.mode = {self.privacy.mode!r} / privacy.secure_aggregation = {self.privacy.secure_aggregation} with server.mode = 'async': "
                "the accountant and secure aggregation work per synchronous round (a sampled cohort); buffered "
                "asynchronous aggregation has no sampling rate to account with yet"
            )
        if self.server.mode == "async":
            conc = self.server.concurrency or self.server.cohort
            if conc > n:
                raise ValueError(f"server.concurrency = {conc} exceeds the number of clients ({n})")
        if self.canary.set:
            if self.server.mode != "sync":
                raise ValueError("canary.set: a canary rollout runs synchronous rounds; server.mode must be 'sync'")
            if self.canary.window > self.canary.rounds:
                raise ValueError(f"canary.window = {self.canary.window} exceeds canary.rounds = {self.canary.rounds}")
            if self.privacy.mode == "central":
                raise ValueError(
                    "canary.set with privacy.mode = 'central': the candidate arm trains a second model on its clients and "
                    "releases it outside the run's privacy ledger, so the epsilon reported would not cover those clients; "
                    "run the candidate as its own run, or use privacy.mode = 'local'"
                )
        if self.engine.regions > n:
            raise ValueError(f"engine.regions = {self.engine.regions} exceeds the number of clients ({n}); allowed: 1 to {n}")
        _check_clustering(self)
        _check_aggregator(self)
        _check_secure_aggregation(self)
        if self.data.partition == "label_permutation" and self.data.groups > n:
            raise ValueError(f"data.groups = {self.data.groups} exceeds the number of clients (data.clients = {n})")
        missing = [d for d in self.monitoring.guardrail if d not in self.monitoring.detectors]
        if missing:
            raise ValueError(f"monitoring.guardrail names {missing}, which are not in monitoring.detectors")
        comp = self.compression
        if comp.adaptive:
            if comp.policy == "upload_budget" and comp.upload_budget_s is None and self.server.deadline_s is None and self.server.deadline_policy != "adaptive":
                raise ValueError("compression.adaptive_policy = 'upload_budget' needs a time budget: set compression.upload_budget_s or server.deadline_s")
            if self.server.mode == "async":
                raise ValueError("compression.adaptive chooses each client's rung per synchronous round; server.mode = 'async' "
                                 "(FedBuff) sends with compression.uplink: set adaptive = false and pick an uplink chain")
            if comp.policy == "pace" and comp.upload_budget_s is not None:
                raise ValueError(
                    f"compression.upload_budget_s = {comp.upload_budget_s} applies to adaptive_policy = 'upload_budget'; "
                    "the 'pace' policy takes its budget from the cohort (tune it with compression.pace_slack)"
                )
            if comp.uplink.strip() not in ("", "none"):
                raise ValueError(f"compression.adaptive chooses the uplink chain from compression.ladder; leave compression.uplink = 'none' (got {comp.uplink!r})")
            if not comp.ladder:
                raise ValueError("compression.ladder must list at least one chain")
        if comp.target_ratio is not None and (comp.adaptive or comp.uplink.strip() not in ("", "none")):
            what = "compression.adaptive = true" if comp.adaptive else f"compression.uplink = {comp.uplink!r}"
            raise ValueError(f"compression.target_ratio = {comp.target_ratio:g} chooses the uplink chain for the model; {what} "
                             "chooses it too: set one of them")
        if self.server.partial_work and self.server.deadline_s is None:
            raise ValueError("server.partial_work needs a deadline: set server.deadline_s")
        if self.data.examples_per_client is not None and self.data.partition != "iid":
            raise ValueError(f"data.examples_per_client needs data.partition = 'iid', not {self.data.partition!r}")
        self._heterofl_checks()
        if self.engine.device != "cpu" and self.model.heterofl_widths:
            raise ValueError(f"engine.device = {self.engine.device!r}: HeteroFL's sub-models (model.widths = {self.model.widths}) "
                             "train on the CPU so far (leave engine.device = 'cpu')")
        if self.data.tokenizer is None and self.model.name.startswith("hf:"):
            self.data.__dict__["tokenizer"] = self.model.name  # text is tokenised by the model's own tokenizer
        method = self.personalization.method
        if method != "none":
            if self.client.objective == "scaffold" or self.model.heterofl:
                raise ValueError(f"personalization.method = {method!r} cannot be combined with client.objective = 'scaffold' or HeteroFL model widths yet")
            if self.data.local_test_fraction == 0:
                raise ValueError(f"personalization.method = {method!r} measures accuracy on each client's local test split; set data.local_test_fraction > 0")
        return self

    def _heterofl_checks(self) -> None:
        m, srv = self.model, self.server
        if m.heterofl:
            sub = f"model.widths = {m.widths}" if m.heterofl_widths else f"model.lora_ranks = {m.lora_ranks}"
            if m.heterofl_widths and m.name != "mlp":
                raise ValueError(f"{sub}: HeteroFL width slicing needs model.name = 'mlp' (a chain of Linear layers), not {m.name!r}")
            if srv.aggregator != "mean":
                raise ValueError(f"{sub}: HeteroFL aggregates each coordinate over the clients that cover it (a weighted mean); server.aggregator = {srv.aggregator!r} is not supported with it")
            if self.client.objective == "scaffold":
                raise ValueError(f"{sub}: client.objective = 'scaffold' keeps full-size control variates; not supported with HeteroFL")
            if self.privacy.mode == "central" or self.privacy.secure_aggregation:
                raise ValueError(f"{sub}: central DP and secure aggregation aggregate outside the HeteroFL aggregator; not supported together")
            if "sketch" in self.compression.uplink:
                raise ValueError(f"{sub}: compression.uplink = {self.compression.uplink!r} sums in sketch space, which cannot align sub-models of different widths")
        if self.distill.method == "feddf":
            if srv.mode == "async":
                raise ValueError("distill.method = 'feddf' distils the cohort of a synchronous round; it cannot run with server.mode = 'async'")
            if self.privacy.mode == "central" or self.privacy.secure_aggregation:
                raise ValueError("distill.method = 'feddf' needs each client's model on the server; it cannot run with central DP or secure aggregation")
            if "sketch" in self.compression.uplink:
                raise ValueError(f"distill.method = 'feddf' needs each client's update; compression.uplink = {self.compression.uplink!r} only gives their sum")
        if self.distill.student_hidden and m.name != "mlp":
            raise ValueError(f"distill.student_hidden = {self.distill.student_hidden}: the student is an MLP distilled from model.name = 'mlp', not {m.name!r}")

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def uplink_chain(self, model) -> str:
        """The uplink chain in force for a model (its `ParamSpec`, or just its dimension):
        `compression.uplink`, or the one `compression.target_ratio` chooses for this run
        (``subset`` where the run can average by coverage, `coverage_refusal`, keeping the
        output layer when the spec shows one).  ValueError when the model cannot reach the ratio."""
        if isinstance(model, int):
            dim, head = model, 0
        else:
            from .compression.ratio import head_size

            dim, head = model.dim, head_size(model)
        return self.compression.uplink_for(dim, coverage=coverage_refusal(self) is None, head=head)

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def client_side_helper(config: RunConfig) -> str | None:
    """The first enabled option that needs the client device's extra messages (SCAFFOLD's
    control variates, oversampling, a weighting with capability `client_helpers` such as
    label_importance's histograms), as "key = value", or None.  Every backend carries
    them (one client device); FedBuff's asynchronous loop does not (fleetlearn.compat)."""
    return _client_side_helper(config)

def _check_clustering(cfg: "RunConfig") -> None:
    """Clustered FL runs on the synchronous simulation with a per-update aggregator."""
    srv = cfg.server
    if srv.clustering == "none":
        return
    what = f"server.clustering = {srv.clustering!r}"
    if srv.clustering == "cfl" and srv.cfl_eps1 >= srv.cfl_eps2:
        raise ValueError(f"server.cfl_eps1 = {srv.cfl_eps1} must be below server.cfl_eps2 = {srv.cfl_eps2}")
    if srv.clustering == "ifca" and srv.clusters < 2:
        raise ValueError(f"{what} needs server.clusters >= 2, got {srv.clusters}")
    if srv.mode == "async":
        raise ValueError(f"{what} runs synchronous rounds; it cannot run with server.mode = 'async'")
    for key, on in (
        ("model.widths (HeteroFL)", cfg.model.heterofl),
        ("client.objective = 'scaffold'", cfg.client.objective == "scaffold"),
        (f"personalization.method = {cfg.personalization.method!r}", cfg.personalization.method != "none"),
        (f"distill.method = {cfg.distill.method!r}", cfg.distill.method != "none"),
    ):
        if on:
            raise ValueError(f"{what} cannot be combined with {key} yet: each wraps the model its own way")
    if has("aggregator", srv.aggregator, "needs_client_ids"):  # mifa: its per-client memory is not per cluster
        raise ValueError(f"{what} cannot run with server.aggregator = {srv.aggregator!r} [capability 'needs_client_ids' of aggregator {srv.aggregator!r}]")
    if cfg.privacy.mode != "none" or cfg.privacy.secure_aggregation:
        raise ValueError(
            f"{what} cannot run with privacy.mode = {cfg.privacy.mode!r} / privacy.secure_aggregation = {cfg.privacy.secure_aggregation}: "
            "each cluster is aggregated apart and a client's cluster travels in clear in its uplink tag (not privatised)"
        )
    if cfg.engine.regions > 1:
        raise ValueError(f"{what} runs with engine.regions = 1 (each region would cluster apart)")


def aggregator_kwargs(cls: type, srv: "ServerConfig") -> dict[str, Any]:
    """The constructor keywords of aggregator class `cls` from `[server]` (its `config_keys`)."""
    keys = getattr(cls, "config_keys", {})
    return {arg: getattr(srv, key) for key, arg in keys.items() if getattr(srv, key) is not None}


# The aggregator is asked to aggregate a cohort of this many 1-coordinate rows (its own
# preconditions decide); larger cohorts are not probed (the probe would cost a round's n^2).
PROBE_MAX_ROWS = 4096


def _check_aggregator(cfg: "RunConfig") -> None:
    """A robust aggregator whose preconditions a full cohort violates would fail every round:
    build it and aggregate a full cohort of 1-coordinate updates, so the aggregator's own
    checks (krum: n > 2f + 2, multi_krum: m <= n, bulyan: n >= 4f + 3, dnc: n > 2f, ...)
    refuse the config."""
    srv = cfg.server
    part = find_part("aggregator", srv.aggregator)
    if srv.aggregator == "mean" or part is None or part.build is not None or cfg.model.heterofl:
        return  # a rule built from the run's size (mifa) is not probed from [server] keys
    n = (srv.buffer_size or srv.cohort) if srv.mode == "async" else srv.cohort
    import torch

    from .aggregation import AGGREGATORS

    cls = AGGREGATORS[srv.aggregator]
    kwargs = aggregator_kwargs(cls, srv)
    shown = ", ".join(f"server.{k} = {getattr(srv, k)!r}" for k in getattr(cls, "config_keys", {})
                      if getattr(srv, k) is not None and getattr(srv, k) != ServerConfig.model_fields[k].default)
    what = f"server.aggregator = {srv.aggregator!r}" + (f" with {shown}" if shown else "")
    try:
        agg = cls(**kwargs)
        if n > PROBE_MAX_ROWS:
            return
        rows = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
        if getattr(agg, "needs_client_ids", False):
            agg.aggregate_round(list(range(n)), rows)
        else:
            agg.aggregate(rows)
    except (ValueError, TypeError) as exc:
        size = f"server.buffer_size = {n}" if srv.mode == "async" and srv.buffer_size else f"server.cohort = {n}"
        raise ValueError(f"{what} cannot aggregate a full cohort of {size} updates, so every round would fail: {exc}") from None


def _check_secure_aggregation(cfg: "RunConfig") -> None:
    """Secure aggregation's threshold must fit the share holders a client has in a full
    cohort (the SecAgg server's own rule, on the neighbour graph it would build)."""
    p, n = cfg.privacy, cfg.server.cohort
    if not p.secure_aggregation:
        return
    if n < 3:
        raise ValueError(f"privacy.secure_aggregation = true needs server.cohort >= 3 (pairwise masks between at least 3 clients), got {n}")
    from .privacy.secagg import neighbor_graph

    try:
        graph = neighbor_graph(range(min(n, PROBE_MAX_ROWS)), p.secagg_neighbors, b"config")
    except ValueError as exc:
        raise ValueError(f"privacy.secagg_neighbors = {p.secagg_neighbors!r}: {exc}") from None
    holders = min(len(v) for v in graph.values())
    t = p.secagg_threshold
    if t is not None and t >= 2:
        if not float(t).is_integer():
            raise ValueError(f"privacy.secagg_threshold = {t}: allowed: an integer >= 2 (clients) or a fraction in (0, 1] of the share holders")
        if t > holders:
            raise ValueError(
                f"privacy.secagg_threshold = {t} exceeds the {holders} share holders each client has in a cohort of "
                f"server.cohort = {n}; allowed: 2 to {holders}, or a fraction in (0, 1]"
            )
    elif t is not None and t > 1:
        raise ValueError(f"privacy.secagg_threshold = {t}: allowed: an integer >= 2 (clients) or a fraction in (0, 1] of the share holders")


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def _format_error(err: ValidationError, data: Any, root: type[BaseModel] | None = None) -> str:
    root = root or RunConfig
    prefix = _section_name(root)
    lines = []
    for e in err.errors():
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):  # a section built inside this one: already formatted, with its path
            lines.append(str(inner).removeprefix("invalid config: "))
            continue
        loc = ".".join(str(p) for p in (*prefix, *e["loc"]))
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1], root)
            allowed = ", ".join(section.model_fields) if section else ""
            lines.append(f"{loc}: unknown key (allowed: {allowed})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "must be a finite number (inf and nan are not allowed)"
        if e["loc"] and not (isinstance(e.get("input"), dict) and f"{loc}." in msg):
            lines.append(f"{loc} = {e.get('input')!r}: {msg}")
        else:
            lines.append(msg)
    return "invalid config: " + "; ".join(lines)


def _section_name(cls: type[BaseModel]) -> tuple[str, ...]:
    """("server",) for ServerConfig: the key of a section class in RunConfig (() for RunConfig)."""
    for name, field in RunConfig.model_fields.items():
        if field.annotation is cls:
            return (name,)
    return ()


def _section_model(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: type[BaseModel] = root or RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as mixed_fleet is a string
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply (allowed: at most {MAX_NESTING} levels)") from None
    _check_nesting(value, f"--set {key}")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def import_paths(config: RunConfig) -> list[str]:
    """The "pkg.module:function" import paths a config names (its dataset and its model)."""
    return [v for v in (config.data.dataset, config.model.name) if _is_import_path(v)]


def add_config_dir_to_path(path: str | Path, config: RunConfig | None = None) -> None:
    """Import paths in a config ("my_model:make_model") resolve next to the config file.

    The folder is appended to `sys.path`, never put first: a folder next to a config
    (say a stray ``sklearn/``) cannot shadow an installed package.  Given the loaded
    `config`, nothing is added unless it names an import path."""
    import sys

    if config is not None and not import_paths(config):
        return
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)


MAX_NESTING = 32  # levels of tables / arrays in a config (its sections are 2 deep)


def _check_nesting(value: Any, where: str) -> None:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ConfigError(f"{where}: nested too deeply (allowed: at most {MAX_NESTING} levels of tables and arrays)")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)


def load_config(source: "RunConfig | dict[str, Any] | str | Path | None" = None, overrides: list[str] | None = None) -> RunConfig:
    """A `RunConfig` from a TOML path, a dict, or an existing config (None: the default).

    An existing `RunConfig` is validated again (``model_copy(update=...)`` and
    ``model_construct`` skip validation): returned as it is when valid and unchanged.
    Every refusal is a `ConfigError` naming the key, the value and what is allowed."""
    given = source if isinstance(source, RunConfig) else None
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, RunConfig):
        data = _plain(source)
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: malformed TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply (allowed: at most {MAX_NESTING} levels of tables and arrays)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    else:
        raise ConfigError(f"config: expected a RunConfig, a dict of sections, a TOML path or None, got {type(source).__name__}")
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a dict of sections, got {type(data).__name__}")
    _check_nesting(data, "config")
    if overrides:
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"overrides: expected a list of 'section.key=value' strings, got {overrides!r}")
        data = apply_overrides(data, overrides)
    try:
        cfg = RunConfig.model_validate(data)  # a refusal is a ConfigError (Section.model_validate)
    except RecursionError:
        raise ConfigError(f"config: nested too deeply (allowed: at most {MAX_NESTING} levels of tables and arrays)") from None
    if given is not None and _same(cfg, given):
        return given  # valid as it was: the caller's object
    return cfg


def candidate_config(config: RunConfig) -> RunConfig:
    """A canary's candidate: production's configuration with the ``canary.set``
    overrides (and no canary).  Here, not in engine/canary.py, so the gRPC server's
    check of a candidate (transport.grpc.commands.check_canary) needs no engine import."""
    data = config.to_dict()
    data = apply_overrides(data, list(config.canary.set))
    data["canary"] = {}
    try:
        return load_config(data)
    except ConfigError as exc:
        raise ConfigError(f"canary.set = {config.canary.set!r}: {exc}") from None


def _same(validated: RunConfig, given: RunConfig) -> bool:
    """Equal values of equal types (pydantic's == finds 1e6 equal to 1000000)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return json.dumps(validated.to_dict(), sort_keys=True) == json.dumps(given.model_dump(mode="json", warnings=False), sort_keys=True)
        except (TypeError, ValueError):
            return False


def _plain(config: RunConfig) -> dict[str, Any]:
    """A config's values as plain data, sections that `model_copy(update=...)` put in as
    dicts included (validation then judges them)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns when a field holds the wrong type
        return config.model_dump(mode="python", warnings=False)
