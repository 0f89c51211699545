"""`load_federated`: a dataset, a central test set and a client population, stored compactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fleetlearn.data.datasets import Dataset, load_dataset
from fleetlearn.data.errors import DataError
from fleetlearn.data.heterogeneity import heterogeneity_stats
from fleetlearn.data.partition import PARTITIONERS, Partition, feature_shift, group, natural, permute_labels, split_segments

if TYPE_CHECKING:
    from fleetlearn.config import DataConfig

# Independent random streams derived from the run seed, so that e.g. changing feature_shift
# does not change which client holds which example.
_PARTITION_STREAM, _FEATURE_STREAM, _PLANTED_STREAM = 1, 2, 3


@dataclass
class FederatedData:
    """A client population as index ranges into shared arrays: memory O(examples + clients).

    Client c's local train examples are `x[train_order[train_offsets[c]:train_offsets[c+1]]]`,
    its local test examples likewise with `test_order`/`test_offsets`.  `x` holds every
    example some client owns (after any per-client feature transform); the central test set
    `central_x`/`central_y` is never part of a client's training data.
    """

    x: torch.Tensor  # (N, F) float32
    y: torch.Tensor  # (N,) int64
    num_features: int
    num_classes: int
    train_order: np.ndarray  # int64 indices into x
    train_offsets: np.ndarray  # int64, (clients + 1,)
    test_order: np.ndarray
    test_offsets: np.ndarray
    central_x: torch.Tensor
    central_y: torch.Tensor
    stats: dict  # heterogeneity statistics, JSON-serialisable
    name: str

    @property
    def num_clients(self) -> int:
        return len(self.train_offsets) - 1

    def train_indices(self, c: int) -> np.ndarray:
        return self.train_order[self.train_offsets[c] : self.train_offsets[c + 1]]

    def test_indices(self, c: int) -> np.ndarray:
        return self.test_order[self.test_offsets[c] : self.test_offsets[c + 1]]

    def train_sizes(self) -> np.ndarray:
        return np.diff(self.train_offsets)

    def test_sizes(self) -> np.ndarray:
        return np.diff(self.test_offsets)


def load_federated(cfg: "DataConfig", seed: int) -> FederatedData:
    """Load `cfg.dataset`, set the central test set apart, partition the rest among clients and
    split each client's examples into local train and test.  Deterministic in `seed`.

    Central test set: the dataset's own (fashion_mnist: t10k); with partition "natural", the
    union of the devices' local test splits (FedProx evaluates Synthetic so; LEAF likewise);
    otherwise a stratified `cfg.test_fraction` of the data, held out before partitioning.
    Local split: `cfg.local_test_fraction` of each client (synthetic devices: FedProx's 10%),
    rounded so the train part is floor((1 - fraction) * n) but never below `cfg.min_examples`.
    """
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    dataset = load_dataset(cfg, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PARTITION_STREAM,)))
    if cfg.partition == "natural":
        x, y, central_x, central_y, train, test = _natural_population(dataset, cfg, rng)
    else:
        x, y, central_x, central_y = _client_pool(dataset, cfg.test_fraction, rng)
        try:
            clients = PARTITIONERS[cfg.partition](y, cfg.num_clients, rng, cfg)
        except DataError as exc:
            raise DataError(f"{dataset.name}: {exc}") from None
        train, test = local_split(clients, cfg.local_test_fraction, cfg.min_examples)
        if cfg.partition == "feature":
            # In place: x is this call's own array, and the central set is a separate one.
            feature_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_FEATURE_STREAM,)))
            feature_shift(x, [train, test], cfg.feature_shift, feature_rng)
        if cfg.partition == "label_permutation":
            y = np.array(y, dtype=np.int64)  # relabelled per client: a copy, the central set keeps its labels
            planted_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLANTED_STREAM,)))
            perms = permute_labels(y, [train, test], cfg.groups, dataset.num_classes, planted_rng)

    (train_order, train_offsets), (test_order, test_offsets) = train, test
    stats = heterogeneity_stats(y[train_order], train_offsets, dataset.num_classes)
    stats.update(
        partition=cfg.partition,
        clients=len(train_offsets) - 1,
        classes=dataset.num_classes,
        train_examples=len(train_order),
        test_examples=len(test_order),
        central_examples=len(central_y),
    )
    if cfg.partition == "label_permutation":
        stats.update(groups=cfg.groups, label_permutations=perms.tolist())  # client c is in group c % groups
    return FederatedData(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        num_features=int(x.shape[1]),
        num_classes=dataset.num_classes,
        train_order=train_order,
        train_offsets=train_offsets,
        test_order=test_order,
        test_offsets=test_offsets,
        central_x=torch.from_numpy(np.ascontiguousarray(central_x, dtype=np.float32)),
        central_y=torch.from_numpy(np.ascontiguousarray(central_y, dtype=np.int64)),
        stats=stats,
        name=dataset.name,
    )


def hold_out(labels: np.ndarray, num_classes: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) positions: a random, class-stratified `fraction` of each class is held."""
    by_class, offsets = group(labels, num_classes, rng)
    held_sizes = np.floor(fraction * np.diff(offsets) + 0.5).astype(np.int64)
    (held, _), (kept, _) = split_segments(by_class, offsets, held_sizes)
    return np.sort(kept), np.sort(held)


def local_split(clients: Partition, test_fraction: float, min_train: int) -> tuple[Partition, Partition]:
    """Each client's examples -> (local train, local test); train keeps >= min_train if it can."""
    order, offsets = clients
    sizes = np.diff(offsets)
    train_sizes = np.floor((1.0 - test_fraction) * sizes + 1e-9).astype(np.int64)
    train_sizes = np.maximum(train_sizes, np.minimum(sizes, min_train))
    return split_segments(order, offsets, train_sizes)  # segments are already shuffled


def _client_pool(dataset: Dataset, test_fraction: float, rng: np.random.Generator):
    """(x, y) the clients share out, and the central test set."""
    if dataset.test_x is not None:
        return dataset.x, dataset.y, dataset.test_x, dataset.test_y
    kept, held = hold_out(dataset.y, dataset.num_classes, test_fraction, rng)
    return dataset.x[kept], dataset.y[kept], dataset.x[held], dataset.y[held]


def _natural_population(dataset: Dataset, cfg: "DataConfig", rng: np.random.Generator):
    if dataset.devices is None:
        raise DataError(
            f"data.partition = 'natural' needs a dataset with its own devices; {dataset.name!r} has none "
            "(use synthetic, or a custom dataset whose function returns a 'client' array)"
        )
    clients, device_ids = natural(dataset.devices, rng)
    num_devices = len(device_ids)
    if cfg.clients is not None and cfg.clients != num_devices:
        raise DataError(
            f"data.clients = {cfg.clients}, but {dataset.name!r} has {num_devices} natural devices and partition "
            "'natural' gives one client per device; leave data.clients unset or make them equal"
        )
    sizes = np.diff(clients[1])
    too_small = sizes < cfg.min_examples
    if too_small.any():
        raise DataError(
            f"partition 'natural': {int(too_small.sum())} of {num_devices} devices of {dataset.name!r} have fewer than "
            f"data.min_examples = {cfg.min_examples} examples (smallest: {int(sizes.min())}); lower data.min_examples"
        )
    fraction = dataset.device_test_fraction if dataset.device_test_fraction is not None else cfg.local_test_fraction
    train, test = local_split(clients, fraction, cfg.min_examples)
    if len(test[0]) == 0:
        raise DataError(
            "partition 'natural': the central test set is the union of the devices' local test splits, and they "
            f"are all empty (local test fraction {fraction}); set data.local_test_fraction > 0"
        )
    return dataset.x, dataset.y, dataset.x[test[0]], dataset.y[test[0]], train, test
