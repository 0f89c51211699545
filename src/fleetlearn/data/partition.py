"""Partitioners: which client holds which example.

A partition is `(order, offsets)`: client c holds `order[offsets[c]:offsets[c+1]]`
(positions into the labels array), in random order within the client.  Storage is
O(examples + clients) and every step is vectorised numpy (loops run over classes or over
fixed-size blocks of clients, never over single clients), so 100,000 clients are cheap.

Every partitioner covers each example exactly once (but `label_share`, whose exact per-client
shares leave some out) and gives each client at least `cfg.min_examples` examples, or raises
`DataError` when the data are too few for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fleetlearn.data.errors import DataError

if TYPE_CHECKING:
    from fleetlearn.config import DataConfig

Partition = tuple[np.ndarray, np.ndarray]  # (order, offsets), both int64


# -- segment helpers -------------------------------------------------------------------------


def offsets_from_sizes(sizes: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """The segment (client) of each position of `order`."""
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def positions_in_segment(offsets: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at each segment."""
    return np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))


def group(ids: np.ndarray, num_groups: int, rng: np.random.Generator) -> Partition:
    """Positions grouped by `ids` (segment g holds the positions with id g), shuffled within each group."""
    shuffled = rng.permutation(len(ids))
    order = shuffled[np.argsort(ids[shuffled], kind="stable")]
    return order.astype(np.int64), offsets_from_sizes(np.bincount(ids, minlength=num_groups))


def split_segments(order: np.ndarray, offsets: np.ndarray, head_sizes: np.ndarray) -> tuple[Partition, Partition]:
    """Cut each segment into its first `head_sizes[c]` entries and the rest."""
    sizes = np.diff(offsets)
    in_head = positions_in_segment(offsets) < np.repeat(head_sizes, sizes)
    return (order[in_head], offsets_from_sizes(head_sizes)), (order[~in_head], offsets_from_sizes(sizes - head_sizes))


def require_enough(num_examples: int, num_clients: int, min_examples: int, partition: str) -> None:
    if num_examples < num_clients * min_examples:
        raise DataError(
            f"partition {partition!r}: {num_examples} examples cannot give {num_clients} clients at least "
            f"data.min_examples = {min_examples} each (needs {num_clients * min_examples}); "
            "lower data.clients or data.min_examples, or use more data"
        )


def top_up(owner: np.ndarray, num_clients: int, min_examples: int, rng: np.random.Generator) -> np.ndarray:
    """Give every client at least `min_examples` examples by moving examples to it.

    The moved examples are drawn uniformly from all clients' surplus (each client's examples
    beyond its own first `min_examples`), so donors, mostly the largest clients, keep at least
    `min_examples`; only the topped-up clients' label mix changes.  Needs N >= clients * min.
    """
    deficit = np.maximum(min_examples - np.bincount(owner, minlength=num_clients), 0)
    if not deficit.any():
        return owner
    order, offsets = group(owner, num_clients, rng)
    surplus = order[positions_in_segment(offsets) >= min_examples]
    moved = rng.choice(surplus, size=int(deficit.sum()), replace=False)
    owner = owner.copy()
    owner[moved] = np.repeat(np.arange(num_clients, dtype=np.int64), deficit)
    return owner


def apportion(total: int, log_weights: np.ndarray) -> np.ndarray:
    """Integers proportional to exp(log_weights) summing to `total` (largest remainder method)."""
    weights = np.exp(log_weights - log_weights.max())  # log space: heavy tails cannot overflow
    exact = total * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    remainder = total - int(sizes.sum())
    sizes[np.argsort(sizes - exact, kind="stable")[:remainder]] += 1
    return sizes


# -- partitioners ----------------------------------------------------------------------------


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """IID: shuffle, then equal parts (sizes differ by at most one); McMahan et al., AISTATS 2017.

    With ``cfg.examples_per_client`` set, each client instead draws that many examples
    from the pool with replacement, so a population may be far larger than the dataset
    (scale simulations: 100,000 clients of a few examples); memory stays one index per
    example held."""
    n = len(labels)
    k = getattr(cfg, "examples_per_client", None)
    if k is not None:
        if n == 0:
            raise DataError("iid with examples_per_client: the pool is empty")
        return rng.integers(0, n, size=num_clients * k, dtype=np.int64), np.arange(num_clients + 1, dtype=np.int64) * k
    require_enough(n, num_clients, cfg.min_examples, "iid")
    return rng.permutation(n).astype(np.int64), (np.arange(num_clients + 1, dtype=np.int64) * n) // num_clients


def dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Label skew: for each class, client shares p ~ Dir(alpha * 1_clients) and the class's
    examples are cut in those proportions (Yurochkin et al., ICML 2019; Hsu et al. 2019,
    arXiv:1909.06335; as in Li et al., NIID-Bench, ICDE 2022).  Small alpha: each class sits
    on few clients.  Clients left below min_examples are topped up (see `top_up`)."""
    n = len(labels)
    require_enough(n, num_clients, cfg.min_examples, "dirichlet")
    num_classes = int(labels.max()) + 1
    by_class, class_offsets = group(labels, num_classes, rng)
    owner = np.empty(n, dtype=np.int64)
    concentration = np.full(num_clients, cfg.alpha)
    for k in range(num_classes):
        members = by_class[class_offsets[k] : class_offsets[k + 1]]
        if len(members) == 0:
            continue
        shares = rng.dirichlet(concentration)
        if not np.isfinite(shares).all():  # every gamma draw underflowed (tiny alpha): one client takes the class
            shares = np.zeros(num_clients)
            shares[rng.integers(num_clients)] = 1.0
        cuts = np.minimum((np.cumsum(shares[:-1]) * len(members)).astype(np.int64), len(members))
        counts = np.diff(np.concatenate([[0], cuts, [len(members)]]))
        owner[members] = np.repeat(np.arange(num_clients, dtype=np.int64), counts)
    return group(top_up(owner, num_clients, cfg.min_examples, rng), num_clients, rng)


def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Pathological non-IID of McMahan et al., AISTATS 2017 (Sec. 3): sort by label, cut into
    clients * shards_per_client equal shards, give each client shards_per_client random shards.
    When class sizes are multiples of the shard size a client sees at most shards_per_client
    classes.  Clients left below min_examples (tiny data) are topped up (see `top_up`)."""
    n = len(labels)
    require_enough(n, num_clients, cfg.min_examples, "shards")
    num_shards = num_clients * cfg.shards_per_client
    by_label, _ = group(labels, int(labels.max()) + 1, rng)
    shard_of_position = (np.arange(n, dtype=np.int64) * num_shards) // n
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // cfg.shards_per_client
    owner = np.empty(n, dtype=np.int64)
    owner[by_label] = client_of_shard[shard_of_position]
    return group(top_up(owner, num_clients, cfg.min_examples, rng), num_clients, rng)


def quantity(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Quantity skew, labels IID: client sizes = min_examples + a share of the rest proportional
    to w_c, with w_c ~ LogNormal(0, quantity_sigma) (Li et al., FedProx, MLSys 2020 use
    log-normal sizes) or, for quantity = "powerlaw", Pareto w_c with tail index quantity_sigma,
    P(w > t) = t^-sigma (sizes follow a power law, as in LEAF, Caldas et al. 2018)."""
    n = len(labels)
    require_enough(n, num_clients, cfg.min_examples, "quantity")
    if cfg.quantity == "lognormal":
        log_weights = rng.normal(0.0, cfg.quantity_sigma, num_clients)
    else:  # Pareto(x_m = 1, sigma): log w = E / sigma with E ~ Exp(1)
        log_weights = rng.standard_exponential(num_clients) / cfg.quantity_sigma
    sizes = cfg.min_examples + apportion(n - num_clients * cfg.min_examples, log_weights)
    return rng.permutation(n).astype(np.int64), offsets_from_sizes(sizes)


def feature(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Feature skew (Kairouz et al. 2021, "Advances and Open Problems in FL", Sec. 3.1): an IID
    split of the examples; `feature_shift` then transforms each client's inputs."""
    n = len(labels)
    require_enough(n, num_clients, cfg.min_examples, "feature")
    return rng.permutation(n).astype(np.int64), (np.arange(num_clients + 1, dtype=np.int64) * n) // num_clients


def label_permutation(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Planted clusters (the "permuted labels" setting of IFCA, Ghosh et al., NeurIPS 2020,
    Sec. 6): an IID split; `permute_labels` then gives each group of clients its own labeling."""
    n = len(labels)
    require_enough(n, num_clients, cfg.min_examples, "label_permutation")
    return rng.permutation(n).astype(np.int64), (np.arange(num_clients + 1, dtype=np.int64) * n) // num_clients


def planted_groups(num_clients: int, groups: int) -> np.ndarray:
    """The planted group of each client of `label_permutation`: client c is in group c % groups."""
    return np.arange(num_clients, dtype=np.int64) % groups


def label_permutations(groups: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(groups, classes): group 0 keeps the labels, every other group a distinct random permutation."""
    perms = [np.arange(num_classes)]
    while len(perms) < groups:  # a loop over groups; a redraw only on a repeated permutation
        p = rng.permutation(num_classes)
        if not any(np.array_equal(p, q) for q in perms):
            perms.append(p)
    return np.stack(perms).astype(np.int64)


def permute_labels(y: np.ndarray, client_parts: list[Partition], groups: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Relabel each client's examples in place through its group's permutation; returns the
    (groups, classes) permutations.  The central test set keeps the original labels (group 0's)."""
    perms = label_permutations(groups, num_classes, rng)
    rows = np.concatenate([order for order, _ in client_parts])
    owner = np.concatenate([segment_ids(offsets) for _, offsets in client_parts])
    y[rows] = perms[owner % groups, y[rows]]
    return perms


def label_shares(num_clients: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """Each client's share of class 1: geometric steps from `low` to `high` (most clients hold
    little of it, a few hold much, as spam in real mailboxes), in a seeded random client order."""
    steps = np.geomspace(low, high, num_clients) if num_clients > 1 else np.array([np.sqrt(low * high)])
    return steps[rng.permutation(num_clients)]


def label_share(labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: "DataConfig") -> Partition:
    """Binary label skew: client c holds ``m`` examples of which ``round(s_c m)`` are class 1,
    ``s_c`` from `label_shares` (``data.label_share_min`` .. ``data.label_share_max``; the seed's
    spam example: 1% to 50% spam).  ``m`` is the largest equal size both classes can supply;
    examples that do not fit are left out (the one partitioner that does not cover every example).
    """
    require_enough(len(labels), num_clients, cfg.min_examples, "label_share")
    classes = np.unique(labels)
    if not set(classes.tolist()) <= {0, 1} or len(classes) < 2:
        raise DataError(f"partition 'label_share' needs binary labels 0 and 1, got classes {classes.tolist()}")
    shares = label_shares(num_clients, cfg.label_share_min, cfg.label_share_max, rng)
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    # m such that sum_c round(s_c m) <= |pos| and sum_c (m - round(s_c m)) <= |neg|
    m = int(min(len(pos) / shares.sum(), len(neg) / (1 - shares).sum()))
    while m > 0 and (np.round(shares * m).sum() > len(pos) or (m - np.round(shares * m)).sum() > len(neg)):
        m -= 1
    if m < cfg.min_examples:
        raise DataError(f"partition 'label_share': {len(pos)} examples of class 1 and {len(neg)} of class 0 give {num_clients} "
                        f"clients {m} examples each, fewer than data.min_examples = {cfg.min_examples}; use fewer clients")
    n_pos = np.round(shares * m).astype(np.int64)
    n_neg = m - n_pos
    pos, neg = rng.permutation(pos), rng.permutation(neg)
    owner_pos = np.repeat(np.arange(num_clients), n_pos)
    owner_neg = np.repeat(np.arange(num_clients), n_neg)
    rows = np.concatenate([pos[: len(owner_pos)], neg[: len(owner_neg)]])
    owner = np.concatenate([owner_pos, owner_neg])
    mixed = rng.permutation(len(rows))  # random order within each client
    rows, owner = rows[mixed], owner[mixed]
    by_owner = np.argsort(owner, kind="stable")
    return rows[by_owner].astype(np.int64), offsets_from_sizes(np.full(num_clients, m, dtype=np.int64))


def natural(devices: np.ndarray, rng: np.random.Generator) -> tuple[Partition, np.ndarray]:
    """The dataset's own devices (FedProx's Synthetic; LEAF-style data, Caldas et al. 2018).

    Returns the partition and the device id of each client (clients are the sorted unique ids)."""
    device_ids, client_of_example = np.unique(devices, return_inverse=True)
    return group(client_of_example.astype(np.int64), len(device_ids), rng), device_ids


PARTITIONERS: dict[str, Callable[[np.ndarray, int, np.random.Generator, "DataConfig"], Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity,
    "feature": feature,
    "label_permutation": label_permutation,
    "label_share": label_share,
}

# Per-client affine transforms are drawn for this many clients at a time: memory stays
# O(block * features) even for 100,000 clients.
_FEATURE_SHIFT_BLOCK = 4096
FEATURE_SHIFT_STD = 0.5


def feature_shift(x: np.ndarray, client_parts: list[Partition], strength: float, rng: np.random.Generator) -> None:
    """Transform each client's inputs in place: x' = x * (1 + s a_c) + s b_c, with per-client,
    per-feature a_c, b_c ~ N(0, 0.5^2) and s = strength (a random affine feature skew in the
    spirit of FedBN, Li et al., ICLR 2021).  `client_parts` are the (order, offsets) partitions
    of one population (e.g. local train and local test); a client's examples share its transform.
    """
    if strength == 0:
        return
    num_clients = len(client_parts[0][1]) - 1
    rows = np.concatenate([order for order, _ in client_parts])
    owner = np.concatenate([segment_ids(offsets) for _, offsets in client_parts])
    by_owner = np.argsort(owner, kind="stable")
    rows, owner = rows[by_owner], owner[by_owner]
    num_features = x.shape[1]
    for start in range(0, num_clients, _FEATURE_SHIFT_BLOCK):
        stop = min(start + _FEATURE_SHIFT_BLOCK, num_clients)
        scale = rng.normal(0.0, FEATURE_SHIFT_STD, (stop - start, num_features)).astype(x.dtype)
        shift = rng.normal(0.0, FEATURE_SHIFT_STD, (stop - start, num_features)).astype(x.dtype)
        lo, hi = np.searchsorted(owner, [start, stop])
        block_rows, local = rows[lo:hi], owner[lo:hi] - start
        x[block_rows] = x[block_rows] * (1 + strength * scale[local]) + strength * shift[local]
