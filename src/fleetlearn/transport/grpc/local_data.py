"""A client's own data and model, for `fleetlearn client`.

Two ways to get a client's local data:
- by run config: the dataset and partition of `[data]`, and this client's index
  in that partition (`load_federated` is deterministic in the run seed, so every
  client process computes the same partition and takes its own part);
- by import path ``pkg.module:function`` returning ``(x, y, x_test, y_test)``
  (arrays or tensors): data that lives only on the device.

The model is the run config's `[model]`, built exactly as the server builds it,
so the model digests match at registration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import RunConfig, load_config
from ...data import load_federated
from ...learners import ClientData, TorchLearner, import_object, model_factory, resolve_device
from ...learners.base import Learner


def run_config(config: RunConfig | dict | str | Path) -> RunConfig:
    """`config` as a RunConfig (a TOML path or a dict is loaded and validated; a RunConfig passes)."""
    return config if isinstance(config, RunConfig) else load_config(config)


def client_data_from_config(config: RunConfig | dict | str | Path, client_index: int) -> tuple[ClientData, int, int]:
    """Client `client_index`'s local train/test split of the run's partition,
    with the dataset's (num_features, num_classes)."""
    cfg = run_config(config)
    data = load_federated(cfg.data, cfg.seed)
    if not 0 <= client_index < data.num_clients:
        raise ValueError(f"client index {client_index} is out of range: the partition has {data.num_clients} clients (0..{data.num_clients - 1})")
    tr = torch.from_numpy(data.train_indices(client_index))
    te = torch.from_numpy(data.test_indices(client_index))
    return ClientData(data.x[tr], data.y[tr], data.x[te], data.y[te]), data.num_features, data.num_classes


def _tensor(a: Any, dtype: torch.dtype, what: str) -> torch.Tensor:
    try:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    except TypeError as exc:
        raise ValueError(f"{what}: cannot convert {type(a).__name__} to a tensor ({exc})") from None
    return t.to(dtype)


def client_data_from_import(path: str, **kwargs: Any) -> ClientData:
    """Call ``pkg.module:function(**kwargs)``; it returns ``(x, y, x_test, y_test)``."""
    fn = import_object(path)
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    out = fn(**kwargs)
    if not (isinstance(out, (tuple, list)) and len(out) == 4):
        raise ValueError(f"{path!r} must return (x, y, x_test, y_test), got {type(out).__name__}")
    x, y, xt, yt = (_tensor(a, d, f"{path} -> {n}") for a, d, n in zip(out, (torch.float32, torch.int64) * 2, ("x", "y", "x_test", "y_test")))
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{path!r}: x must be (n, features) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if xt.shape[0] != yt.shape[0] or (xt.numel() and xt.shape[1:] != x.shape[1:]):
        raise ValueError(f"{path!r}: x_test {tuple(xt.shape)} and y_test {tuple(yt.shape)} do not match x {tuple(x.shape)}")
    return ClientData(x, y, xt.reshape(-1, x.shape[1]), yt)


def learner_from_config(config: RunConfig | dict | str | Path, num_features: int, num_classes: int) -> Learner:
    """The run's model as a TorchLearner (one client: no batched cohort training); with
    several `model.widths` (HeteroFL) or `model.lora_ranks` the run's plan, which trains the
    width (the LoRA rank) each task names."""
    cfg = run_config(config)
    m = cfg.model
    if m.name.startswith("hf:"):  # a pretrained encoder, loaded from this device's own files; adapters + head on the wire
        from ...learners.hf import lora_learner, lora_rank_client_learner

        if m.heterofl:  # heterogeneous ranks: a learner per rank on the one base; the server names the rank per task
            return lora_rank_client_learner(m, num_features, num_classes, device=cfg.engine.device)
        return lora_learner(m, num_features, num_classes, vectorize=False, device=cfg.engine.device)
    if m.heterofl:
        from ...learners.heterofl import heterofl_client_learner

        return heterofl_client_learner(m, num_features, num_classes)
    return TorchLearner(model_factory(m.name, num_features, num_classes, m.hidden, m.kwargs), vectorize=False,
                        device=resolve_device(cfg.engine.device))


def client_from_config(
    config: RunConfig | dict | str | Path,
    *,
    client_index: int | None = None,
    data_fn: str | None = None,
    num_classes: int | None = None,
    with_classes: bool = False,
) -> tuple[Learner, ClientData] | tuple[Learner, ClientData, int]:
    """(learner, local data) for `fleetlearn client`: data by partition index or by import path.
    With clustered FL the learner is the run's k stacked models (`ClusteredLearner`).

    With `data_fn`, the number of classes comes from `num_classes`, else from the
    run's dataset when it is a built-in one, else from the labels seen locally
    (which a non-IID client may not cover: the server then refuses the model
    digest at registration, with both digests in the reason).  `with_classes`: return
    that number of classes third (a red-team client's label_flip needs it).
    """
    cfg = run_config(config)
    learner, data, classes = _learner_and_data(cfg, client_index, data_fn, num_classes)
    if cfg.server.clustering != "none":  # the run's model is k stacked models; the client picks one
        from ...learners.clustered import ClusteredLearner

        learner = ClusteredLearner.for_run(learner, cfg.server.clustering, cfg.server.clusters)
    return (learner, data, classes) if with_classes else (learner, data)


def _learner_and_data(cfg: RunConfig, client_index: int | None, data_fn: str | None, num_classes: int | None):
    if (client_index is None) == (data_fn is None):
        raise ValueError("give exactly one of client_index (a partition of the run's dataset) or data_fn ('pkg.module:function')")
    if data_fn is None:
        assert client_index is not None
        data, nf, nc = client_data_from_config(cfg, client_index)
        return learner_from_config(cfg, nf, nc), data, nc
    data = client_data_from_import(data_fn)
    if num_classes is None:
        builtin = {"digits": 10, "fashion_mnist": 10}
        if cfg.data.dataset in builtin:
            num_classes = builtin[cfg.data.dataset]
        elif cfg.data.dataset == "synthetic":
            num_classes = cfg.data.synthetic_classes
        else:
            num_classes = int(max(int(data.y.max()) if data.y.numel() else 0, int(data.y_test.max()) if data.y_test.numel() else 0)) + 1
    return learner_from_config(cfg, int(data.x.shape[1]), num_classes), data, num_classes


def probe_client_from_config(config: RunConfig | dict | str | Path):
    """(learner, data, uplink wrap) of a probe client (`fleetlearn client --probe`): the run's
    model, and each round's data drawn by `fleetlearn.client.probe.probe_data` from the task's
    seed, the round and this client's id (`data(task, client_id)`), with the run dataset's
    feature and class counts; the uplink wrap is the FLEETLEARN_PROBE_TAMPER test hook's."""
    from ...client.probe import probe_chain, probe_data, tamper_from_env
    from ...config import probe_refusal

    cfg = run_config(config)
    why = probe_refusal(cfg)
    if why:
        raise ValueError(f"--probe: the server cannot predict a probe's update in this run: {why}")
    tamper = tamper_from_env()
    fed = load_federated(cfg.data, cfg.seed)
    nf, nc, examples = fed.num_features, fed.num_classes, cfg.probes.examples

    def data(task, client_id: int) -> ClientData:
        return probe_data(task.spec.seed, task.round, client_id, nf, nc, examples, tamper)

    return learner_from_config(cfg, nf, nc), data, (lambda chain: probe_chain(chain, tamper))
