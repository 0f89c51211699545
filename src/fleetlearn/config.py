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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run.  The message names the key and what is allowed."""


BUILTIN_DATASETS = ("digits", "synthetic", "fashion_mnist")
# Population size when `data.clients` is not given: FedProx's Synthetic uses 30 devices.
DEFAULT_CLIENTS = {"digits": 100, "synthetic": 30, "fashion_mnist": 100}
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "feature", "natural")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _is_import_path(value: str) -> bool:
    mod, _, fn = value.partition(":")
    return bool(mod) and bool(fn) and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier()


class DataConfig(Section):
    dataset: str = "digits"
    clients: int | None = Field(default=None, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "quantity", "feature", "natural"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)  # Dirichlet concentration (label skew)
    shards_per_client: int = Field(default=2, ge=1)  # classes per client for `shards`
    quantity: Literal["lognormal", "powerlaw"] = "lognormal"  # size law for `quantity`
    quantity_sigma: float = Field(default=1.0, gt=0)  # log-normal sigma, or Pareto tail index (P(w > t) = t^-sigma)
    feature_shift: float = Field(default=1.0, ge=0)  # strength of the per-client transform for `feature`
    min_examples: int = Field(default=2, ge=1)  # every client gets at least this many train examples
    # iid only: each client draws this many examples with replacement (populations larger than the data).
    examples_per_client: int | None = Field(default=None, ge=1)
    # Held-out central test set (unused where the data brings its own: fashion_mnist's
    # t10k, and the `natural` partition, whose central set is the union of the devices' test splits).
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    local_test_fraction: float = Field(default=0.2, ge=0, lt=1)  # each client's local test split
    path: str | None = None  # directory with the dataset's files (fashion_mnist)
    synthetic_alpha: float = Field(default=0.0, ge=0)  # Synthetic(alpha, beta): model skew
    synthetic_beta: float = Field(default=0.0, ge=0)  # Synthetic(alpha, beta): feature skew
    synthetic_iid: bool = False
    synthetic_dim: int = Field(default=60, ge=1)
    synthetic_classes: int = Field(default=10, ge=2)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v in BUILTIN_DATASETS or _is_import_path(v):
            return v
        raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(BUILTIN_DATASETS)} or an import path 'pkg.module:function'")

    @property
    def num_clients(self) -> int:
        if self.clients is not None:
            return self.clients
        return DEFAULT_CLIENTS.get(self.dataset, 100)


class ModelConfig(Section):
    # A built-in ("mlp", "logistic") or an import path "pkg.module:make_model" to a
    # function (num_features, num_classes, **kwargs) -> torch.nn.Module.
    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128])
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in ("mlp", "logistic") or _is_import_path(v):
            return v
        raise ValueError(f"unknown model {v!r}; allowed: mlp, logistic or an import path 'pkg.module:function'")

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden layer sizes must be >= 1, got {v}")
        return v


class ClientConfig(Section):
    # Defaults are the embedded default job's: tiny non-IID digits clients (~11
    # examples each) learn most from several small-batch momentum epochs.
    local_epochs: int = Field(default=10, ge=1)
    local_steps: int | None = Field(default=None, ge=1)  # if set, overrides local_epochs
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    objective: Literal["plain", "prox", "scaffold"] = "plain"  # the local objective part
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
    selector: Literal["random", "oort"] = "random"
    oort_epsilon: float = Field(default=0.2, ge=0, le=1)  # fraction of each cohort that explores untried clients
    oort_alpha: float = Field(default=2.0, ge=0)  # strength of the penalty on clients slower than preferred
    # The aggregator part: mean (FedAvg) or a robust rule (see fleetlearn.aggregation).
    aggregator: Literal[
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "geometric_median", "norm_bounded_mean", "centered_clipping", "dnc", "mifa",
    ] = "mean"
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
    validators: list[str] | None = None
    max_update_norm: float | None = Field(default=None, gt=0)  # refuse updates above this L2 norm
    max_norm_ratio: float | None = Field(default=None, gt=1)  # refuse updates above ratio x cohort median norm
    max_claimed_examples: int | None = Field(default=None, ge=1)  # refuse claims above this count
    # How accepted updates are weighted: examples (capped claims) | uniform | loss_improvement | distance.
    weighting: Literal["examples", "uniform", "loss_improvement", "distance"] = "examples"
    weighting_floor: float = Field(default=0.1, ge=0, le=1)  # loss_improvement
    weighting_mode: Literal["exp", "cosine"] = "exp"  # distance
    weighting_temperature: float = Field(default=1.0, gt=0)  # distance
    # Server optimizer (Reddi et al., ICLR 2021): sgd (FedAvg) | momentum (FedAvgM) | adam | yogi | adagrad.
    optimizer: Literal["sgd", "momentum", "adam", "yogi", "adagrad"] = "sgd"
    server_lr: float = Field(default=1.0, gt=0)  # adam/yogi/adagrad want about 1e-2 to 1e-1
    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    server_beta1: float = Field(default=0.9, ge=0, lt=1)
    server_beta2: float = Field(default=0.99, ge=0, lt=1)
    server_tau: float = Field(default=1e-3, gt=0)
    server_lr_schedule: Literal["constant", "step", "cosine", "plateau"] = "constant"
    server_lr_step_size: int = Field(default=10, ge=1)
    server_lr_gamma: float = Field(default=0.5, gt=0)
    server_lr_min: float = Field(default=0.0, ge=0)
    server_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    server_lr_patience: int = Field(default=3, ge=1)
    # A client cannot buy itself more weight: its claimed example count is capped at
    # `max_examples` (absolute) and at `max_examples_ratio` x the cohort's median claim.
    max_examples: int | None = Field(default=None, ge=1)
    max_examples_ratio: float = Field(default=10.0, ge=1)
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
    max_staleness: int | None = Field(default=None, ge=0)  # older updates are refused
    eval_every: int = Field(default=1, ge=1)
    # Federated evaluation of the global model on clients' local test splits: at most
    # this many clients (a seeded sample; 0 = every client).
    eval_clients: int = Field(default=1000, ge=0)


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


class CompressionConfig(Section):
    # Codec chains in one syntax everywhere, e.g. "topk:0.01 | q8"; "none" sends float32.
    uplink: str = "none"
    downlink: str = "none"
    # Adaptive compression: each client uses the least lossy rung of `ladder` whose upload
    # fits its budget: `upload_budget_s`, or else the round's deadline minus its download
    # and compute time.  Recorded per client per round (ClientRecord.codec).
    adaptive: bool = False
    ladder: list[str] = Field(default_factory=lambda: ["none", "q8", "q4", "topk:0.1 | q8", "topk:0.01 | q8"])
    upload_budget_s: float | None = Field(default=None, gt=0)


class PrivacyConfig(Section):
    """Differential privacy and secure aggregation (see fleetlearn.privacy)."""

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


# -- [attack] (fleetlearn.attacks) ------------------------------------------------------
class AttackConfig(Section):
    """Attack simulation: a seeded fixed `fraction` of the population is malicious
    from `start_round` on (see fleetlearn.attacks; `kind` values: its ATTACK_KINDS)."""

    kind: Literal["none", "sign_flip", "scaling", "gaussian", "label_flip", "alie", "same_value", "model_replacement"] = "none"
    fraction: float = Field(default=0.2, ge=0, le=1)  # of the population; round(fraction x clients) attackers
    start_round: int = Field(default=1, ge=1)
    scale: float = Field(default=10.0, gt=0, allow_inf_nan=False)  # scaling: boost factor
    noise_std: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # gaussian: std of the noise sent instead
    alie_z: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # alie: None = Baruch et al.'s z_max(n, f)
    value: float = Field(default=100.0, allow_inf_nan=False)  # same_value: every coordinate
    collude: bool = True  # attackers share their honest updates' statistics (alie, sign_flip, scaling, model_replacement)
# -- end [attack] ------------------------------------------------------------------------


DETECTOR_NAMES = ("divergence", "oscillation", "stagnation", "outlier_updates", "participation_collapse", "drift")


class MonitoringConfig(Section):
    """Debug measurements, detectors, guardrails and the Prometheus endpoint (fleetlearn.monitoring)."""

    debug: bool = True  # per-round update statistics into the record
    detectors: list[str] = Field(default_factory=lambda: list(DETECTOR_NAMES))
    divergence_patience: int = Field(default=3, ge=1)
    divergence_min_rise: float = Field(default=0.0, ge=0)
    divergence_max_ratio: float | None = Field(default=1.5, gt=1)
    divergence_param_growth: float | None = Field(default=10.0, gt=1)
    oscillation_window: int = Field(default=8, ge=3)
    oscillation_amplitude: float = Field(default=0.02, ge=0)
    oscillation_min_flips: int = Field(default=4, ge=1)
    stagnation_window: int = Field(default=10, ge=2)
    stagnation_eps: float = Field(default=0.005, ge=0)
    outlier_threshold: float = Field(default=3.5, gt=0)
    outlier_min_clients: int = Field(default=10, ge=3)
    participation_min_fraction: float = Field(default=0.5, ge=0, le=1)
    participation_drop_fraction: float = Field(default=0.5, ge=0, le=1)
    participation_window: int = Field(default=5, ge=1)
    drift_threshold: float = Field(default=0.1, gt=0)
    drift_patience: int = Field(default=1, ge=1)
    drift_metric: Literal["accuracy", "fed_accuracy"] = "accuracy"
    # Guardrail: detectors whose alert rejects the round and restores the last good model
    # (empty: alerts only), and the optional responses.
    guardrail: list[str] = Field(default_factory=list)
    guardrail_lr_factor: float | None = Field(default=None, gt=0, lt=1)  # multiply the server lr
    guardrail_min_lr: float = Field(default=0.0, ge=0)
    guardrail_clip_factor: float | None = Field(default=None, gt=0, lt=1)  # tighten clipping
    guardrail_exclude_rounds: int = Field(default=0, ge=0)  # exclude flagged clients for N rounds
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)  # 0: a free port
    prometheus_host: str = "127.0.0.1"

    @field_validator("detectors", "guardrail")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DETECTOR_NAMES]
        if bad:
            raise ValueError(f"unknown detector(s) {bad}; allowed: {', '.join(DETECTOR_NAMES)}")
        return v


class EngineConfig(Section):
    # simulation: in-process; ray: the same simulation with local training on Ray workers
    # (needs the optional extra: pip install "fleetlearn[ray]").
    backend: Literal["simulation", "ray"] = "simulation"
    # Train the cohort as one batched (vmapped) computation when the model allows it.
    vectorize: bool = True
    # ray: None starts a local Ray; "auto" joins this machine's cluster; "ray://host:port" connects to one.
    address: str | None = None
    ray_workers: int | None = Field(default=None, ge=1)  # training actors (None: the cluster's CPUs)
    # Hierarchical aggregation (simulated, mean aggregator only): clients are grouped into
    # `regions` by id; each region forwards one pre-aggregated update to the root, which
    # needs `min_regions` of them; a region's aggregator fails with `region_failure` per round.
    regions: int = Field(default=1, ge=1)
    min_regions: int = Field(default=1, ge=1)
    region_failure: float = Field(default=0.0, ge=0, le=1)

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
        return self


class StoreConfig(Section):
    root: str = "runs"  # run directories are created under this folder
    url: str | None = None  # SQLAlchemy URL; default: sqlite file inside the run directory
    checkpoint_every: int = Field(default=1, ge=0)  # 0: only the final model


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
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        n = self.data.num_clients
        if self.server.cohort > n:
            raise ValueError(f"server.cohort = {self.server.cohort} exceeds the number of clients (data.clients = {n})")
        if self.server.min_replies > self.server.cohort:
            raise ValueError(f"server.min_replies = {self.server.min_replies} exceeds server.cohort = {self.server.cohort}")
        if self.server.reputation and self.server.aggregator != "dnc":
            raise ValueError(f"server.reputation = true needs the flags of server.aggregator = 'dnc'; got server.aggregator = {self.server.aggregator!r}")
        if self.server.mode == "async" and self.server.aggregator == "mifa":
            raise ValueError("server.aggregator = 'mifa' keeps one update per client for synchronous rounds; it cannot run with server.mode = 'async'")
        if self.server.mode == "async":
            conc = self.server.concurrency or self.server.cohort
            if conc > n:
                raise ValueError(f"server.concurrency = {conc} exceeds the number of clients ({n})")
        missing = [d for d in self.monitoring.guardrail if d not in self.monitoring.detectors]
        if missing:
            raise ValueError(f"monitoring.guardrail names {missing}, which are not in monitoring.detectors")
        comp = self.compression
        if comp.adaptive:
            if comp.upload_budget_s is None and self.server.deadline_s is None and self.server.deadline_policy != "adaptive":
                raise ValueError("compression.adaptive needs a time budget: set compression.upload_budget_s or server.deadline_s")
            if comp.uplink.strip() not in ("", "none"):
                raise ValueError(f"compression.adaptive chooses the uplink chain from compression.ladder; leave compression.uplink = 'none' (got {comp.uplink!r})")
            if not comp.ladder:
                raise ValueError("compression.ladder must list at least one chain")
        if self.server.partial_work and self.server.deadline_s is None:
            raise ValueError("server.partial_work needs a deadline: set server.deadline_s")
        if self.data.examples_per_client is not None and self.data.partition != "iid":
            raise ValueError(f"data.examples_per_client needs data.partition = 'iid', not {self.data.partition!r}")
        if self.data.partition == "natural" and self.data.dataset not in ("synthetic",) and ":" not in self.data.dataset:
            raise ValueError(f"data.partition = 'natural' needs a dataset with its own devices (synthetic or a custom one), not {self.data.dataset!r}")
        return self

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def _format_error(err: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else ""
            lines.append(f"{loc}: unknown key (allowed: {allowed})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["loc"]:
            lines.append(f"{loc} = {e.get('input')!r}: {msg}")
        else:
            lines.append(msg)
    return "invalid config: " + "; ".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
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


def add_config_dir_to_path(path: str | Path) -> None:
    """Import paths in a config ("my_model:make_model") resolve next to the config file."""
    import sys

    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_config(source: "RunConfig | dict[str, Any] | str | Path | None" = None, overrides: list[str] | None = None) -> RunConfig:
    """A `RunConfig` from a TOML path, a dict, or an existing config (None: the default)."""
    if isinstance(source, RunConfig) and not overrides:
        return source
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, RunConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: malformed TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, data)) from None
