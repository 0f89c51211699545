"""Sparsifiers: keep k of d coordinates, send their indices and (value-coded) values.

Indices travel sorted, as the first index plus the gaps minus one (so adjacent
indices cost a zero), in the narrowest of 1, 2 or 4 bytes that holds the largest
gap, then zstd-compressed when that is smaller (a flag in the section header
says which).  The values of the kept coordinates, in index order, then go
through the chain's value codec (float32 unless the chain says otherwise).

Section header ``<IIBBI``: k, first index, gap width (1, 2, 4), index coding
(0 raw, 1 zstd), index bytes.  Index bytes are at most 4 (k - 1): that is the
upper bound ``estimate_bytes`` uses.

Block top-k (``topk:F,block=B``, support id 4) sends the block size (``<I``) and
then the same section over *block numbers* (one index per kept block, out of
ceil(d / B)); the decoder expands block b to entries bB .. bB + B - 1 (fewer for
a partial last block), and the values follow for every expanded entry.

``subset`` draws its blocks independently of the values, so it names them by a seed
instead of listing them (support id 6, ``<IIQ``: block size, blocks kept, seed): the kept
blocks are the first k distinct values of `wire.counter_hash` modulo ceil(d / B)
(`seeded_blocks`), 16 bytes whatever k, where a list costs about half a byte to a byte per
block (a fifth of a 100x budget).  Its own id also tells the server that the payload is a
random part of the update, averaged by coverage.  Support id 5 (the block list of the
first ``subset`` build) is still read.
"""

from __future__ import annotations

import copy

import math
import struct

import numpy as np
import torch
import zstandard

from ..params import PayloadError
from . import wire
from .base import CHUNK, Stage, format_amount, parse_amount, parse_int, resolve_amount
from .wire import Reader

SPARSE_HEAD = struct.Struct("<IIBBI")
BLOCK_HEAD = struct.Struct("<I")
SEEDED_HEAD = struct.Struct("<IIQ")  # subset: block size, blocks kept, seed
KEEP_HEAD = struct.Struct("<IIQI")  # subset with keep: block size, random blocks kept, seed, last blocks always kept
_RAW, _ZSTD = 0, 1
_ZSTD_LEVEL = 3
_WIDTH_DTYPE = {1: "<u1", 2: "<u2", 4: "<u4"}


# -- selection -------------------------------------------------------------------------
def _above(xn: np.ndarray, t: float) -> np.ndarray:
    """Sorted indices i with |x_i| >= t, chunk by chunk."""
    d = xn.shape[0]
    a = np.empty(min(d, CHUNK), dtype=xn.dtype)
    m = np.empty(min(d, CHUNK), dtype=bool)
    parts = []
    for s in range(0, d, CHUNK):
        e = min(d, s + CHUNK)
        np.abs(xn[s:e], out=a[: e - s])
        np.greater_equal(a[: e - s], t, out=m[: e - s])
        nz = np.flatnonzero(m[: e - s])
        if nz.size:
            parts.append(nz + s)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def topk_indices(x: torch.Tensor, k: int) -> np.ndarray:
    """Sorted int64 indices of k entries of largest |x| (ties broken by lower index).

    Exact, but faster than ``torch.topk`` on large vectors: a threshold estimated
    from a strided sample of |x| finds a candidate set slightly larger than k in
    one pass, and the exact k-th largest magnitude is then found among the
    candidates only.  If the estimate was too high (fewer than k candidates) it
    retries with a lower threshold, and finally takes every entry as a candidate.
    """
    d = x.numel()
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    xn = x.numpy()
    cand = None
    if d > 4 * CHUNK:
        stride = max(1, d // 65536)
        sample = np.abs(xn[::stride])
        m = sample.shape[0]
        p = k / d
        for attempt in range(3):
            r = int(p * m * 1.25 * 4**attempt + 4.0 * math.sqrt(p * m) + 8)
            if r >= m:
                break
            t = float(np.partition(sample, m - r)[m - r])
            c = _above(xn, t)
            if c.size >= k:
                cand = c
                break
    if cand is None:  # small vector, or a sample that misled us: every entry is a candidate
        cand = np.arange(d, dtype=np.int64)
        vals = np.abs(xn)
    elif cand.size == k:
        return cand
    else:
        vals = np.abs(xn[cand])
    kth = np.partition(vals, cand.size - k)[cand.size - k]  # the k-th largest magnitude
    keep = vals > kth
    need = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(vals == kth)[:need]] = True
    return cand[keep]


def randk_indices(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices of a uniformly random k-subset of range(d).

    Draws i.i.d. uniform indices until at least k are distinct, then removes a
    uniform random subset of the surplus.  Conditional on its size, the set of
    distinct draws is a uniform subset (by symmetry), so the result is a uniform
    k-subset; the cost is O(k log k) (O(d) with a mask when k is a large fraction
    of d) instead of the O(d) of a full permutation.
    """
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if 2 * k > d:  # pick the coordinates to leave out instead
        keep = np.ones(d, dtype=bool)
        keep[randk_indices(d, d - k, rng)] = False
        return np.flatnonzero(keep)
    use_mask = 64 * k >= d
    mask = np.zeros(d, dtype=bool) if use_mask else None
    sel = np.empty(0, dtype=np.int64)
    have = 0
    while have < k:
        # Draws whose expected number of new distinct values is a little over what is missing.
        target = min(d - 1, have + (k - have) + 3.0 * math.sqrt(k - have) + 8)
        m = max(1, int(math.ceil(-d * (math.log1p(-target / d) - math.log1p(-have / d)))))
        draws = rng.integers(0, d, size=m, dtype=np.int64)
        if use_mask:
            mask[draws] = True
            have = int(np.count_nonzero(mask))
        else:
            s = np.sort(np.concatenate([sel, draws]))
            sel = s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s
            have = sel.size
    if use_mask:
        sel = np.flatnonzero(mask)
    if sel.size > k:
        drop = rng.choice(sel.size, sel.size - k, replace=False)
        keep = np.ones(sel.size, dtype=bool)
        keep[drop] = False
        sel = sel[keep]
    return sel


# -- index coding ------------------------------------------------------------------------
def write_indices(idx: np.ndarray) -> list:
    k = int(idx.shape[0])
    if k == 0:
        return [SPARSE_HEAD.pack(0, 0, 1, _RAW, 0)]
    gaps = np.diff(idx) - 1  # >= 0 for strictly increasing indices
    top = int(gaps.max()) if gaps.size else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    raw = gaps.astype(_WIDTH_DTYPE[width])
    body: bytes | memoryview = memoryview(raw).cast("B")
    coding = _RAW
    if raw.nbytes >= 64:
        z = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
        if len(z) < raw.nbytes:
            body, coding = z, _ZSTD
    return [SPARSE_HEAD.pack(k, int(idx[0]), width, coding, len(body)), body]


def read_indices(r: Reader, dim: int) -> np.ndarray:
    k, first, width, coding, nbytes = r.unpack(SPARSE_HEAD, "sparse header")
    if k > dim:
        raise PayloadError(f"sparse section keeps k={k} entries of a vector of dim {dim}")
    if width not in _WIDTH_DTYPE:
        raise PayloadError(f"sparse section announces index width {width}; allowed 1, 2, 4")
    body = r.take(nbytes, "index bytes")
    if k == 0:
        if nbytes or first:
            raise PayloadError("sparse section with k=0 carries index data")
        return np.empty(0, dtype=np.int64)
    want = (k - 1) * width
    if coding == _RAW:
        if nbytes != want:
            raise PayloadError(f"raw index block of {nbytes} bytes; k={k} gaps of width {width} need {want}")
        raw = body
    elif coding == _ZSTD:
        raw = wire.zstd_exact(
            body, want, "zstd index block",
            lambda size: f"zstd index block announces {size} bytes; k={k} gaps of width {width} need {want}",
        )
    else:
        raise PayloadError(f"unknown index coding {coding}; allowed 0 (raw), 1 (zstd)")
    idx = np.empty(k, dtype=np.int64)
    idx[0] = first
    idx[1:] = np.frombuffer(raw, dtype=_WIDTH_DTYPE[width])
    idx[1:] += 1
    np.cumsum(idx, out=idx)
    if idx[-1] >= dim:
        raise PayloadError(f"sparse index {int(idx[-1])} is out of range for dim {dim}")
    return idx


def _first_distinct(seed: int, k: int, m: int) -> np.ndarray:
    """The first k distinct values of the stream ``counter_hash(seed, t, 1) mod m``, t = 0, 1, ...
    (k <= m), sorted by value.  One sort of packed keys ``value << bits | t``: the first key of
    each value holds its first t, and the k smallest of those pick the values."""
    draws = k + k * k // m + 16  # about what k distinct take while k <= m / 2 (k (1 + k / m) > -m ln(1 - k / m))
    while True:
        cands = wire.counter_hash(seed, 0, draws)
        cands %= np.uint64(m)
        bits = int(draws - 1).bit_length()
        if (m - 1).bit_length() + bits <= 63:
            key = cands.view(np.int64)  # < m < 2^63: the same numbers
            key <<= bits
            key |= np.arange(draws, dtype=np.int64)
            key.sort()
            value = key >> bits
            first = np.empty(draws, dtype=bool)
            first[0] = True
            np.not_equal(value[1:], value[:-1], out=first[1:])
            if np.count_nonzero(first) >= k:
                value, t = value[first], key[first] & ((1 << bits) - 1)
                return value if value.size == k else value[t <= np.partition(t, k - 1)[k - 1]]
        else:  # a claimed dimension too large to pack beside the counter
            uniq, at = np.unique(cands, return_index=True)
            if uniq.size >= k:
                return np.sort(uniq[np.argsort(at, kind="stable")[:k]]).astype(np.int64)
        draws *= 2


def seeded_blocks(seed: int, k: int, m: int) -> np.ndarray:
    """Sorted int64 numbers of k of m blocks named by `seed`: the first k distinct values of
    ``wire.counter_hash(seed, t, 1) mod m`` for t = 0, 1, 2, ... (a uniform k-subset: by
    symmetry, as in `randk_indices`); when 2 k > m, every block but the first m - k distinct
    values.  The decoder regenerates it from (seed, k, m) alone, in time and memory that grow
    with min(k, m - k), not with m: a payload's claimed dimension cannot make it work."""
    if k >= m:
        return np.arange(m, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if 2 * k > m:
        keep = np.ones(m, dtype=bool)
        keep[_first_distinct(seed, m - k, m)] = False
        return np.flatnonzero(keep).astype(np.int64)
    return _first_distinct(seed, k, m)


def block_entries(blocks: np.ndarray, block: int, dim: int) -> np.ndarray:
    """Sorted block numbers -> the sorted entry indices they cover (a partial last block is cut at dim)."""
    idx = (blocks[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
    return idx[idx < dim] if idx.size and idx[-1] >= dim else idx


def write_block_indices(idx: np.ndarray, block: int) -> list:
    """The support section of block top-k for entry indices made of whole blocks (see the module docstring)."""
    return [BLOCK_HEAD.pack(block)] + write_indices(idx[::block] // block)


def subset_blocks(seed: int, k: int, m: int, tail: int = 0) -> np.ndarray:
    """Sorted block numbers of a subset payload: the last `tail` of the m blocks, and k drawn
    by `seeded_blocks` from the m - tail before them."""
    tail = min(max(tail, 0), m)
    drawn = seeded_blocks(seed, k, m - tail)
    return np.concatenate([drawn, np.arange(m - tail, m, dtype=np.int64)]) if tail else drawn


def read_support(r: Reader, support: int, dim: int) -> np.ndarray:
    """The sorted entry indices of a sparse payload's support section (topk, randk, topk blocks or subset)."""
    blocks, block = read_support_blocks(r, support, dim)
    return blocks if block == 1 else block_entries(blocks, block, dim)


def read_support_blocks(r: Reader, support: int, dim: int) -> tuple[np.ndarray, int]:
    """A sparse payload's support section as (sorted block numbers, block size): the entries
    are those blocks of `block` entries, the last one cut at `dim` (topk and randk: blocks of 1)."""
    if support in (wire.SUPPORT_SUBSET_SEEDED, wire.SUPPORT_SUBSET_KEEP):
        return read_subset_section(r, dim, keep=support == wire.SUPPORT_SUBSET_KEEP)
    if support in wire.BLOCK_SUPPORTS:
        (block,) = r.unpack(BLOCK_HEAD, "block size")
        if not 1 <= block <= Sparsifier.MAX_BLOCK:
            raise PayloadError(f"block section announces block size {block}; allowed 1 to {Sparsifier.MAX_BLOCK}")
        return read_indices(r, -(-dim // block)), block
    return read_indices(r, dim), 1


def read_subset_section(r: Reader, dim: int, keep: bool) -> tuple[np.ndarray, int]:
    """A seeded subset section (`SEEDED_HEAD`, or `KEEP_HEAD` with the last blocks always kept):
    (sorted block numbers, block size)."""
    block, k, seed, *more = r.unpack(KEEP_HEAD if keep else SEEDED_HEAD, "subset section")
    tail = more[0] if keep else 0
    if not 1 <= block <= Sparsifier.MAX_BLOCK:
        raise PayloadError(f"subset section announces block size {block}; allowed 1 to {Sparsifier.MAX_BLOCK}")
    m = -(-dim // block)
    if tail > m or k > m - tail:
        kept = f"the last {tail} and {k} random blocks" if keep else f"{k} blocks"
        raise PayloadError(f"subset section keeps {kept} of {block} entries; a vector of dim {dim} has {m}")
    return subset_blocks(seed, k, m, tail), block


# -- stages --------------------------------------------------------------------------------
class Sparsifier(Stage):
    role = "sparsifier"
    wire_id: int
    block: int = 1  # entries kept together (the ``block=B`` option of topk and subset)
    # True: the kept entries are drawn independently of the values, and the server averages each
    # coordinate over the clients that sent it (`subset`; aggregation.pipeline.CoverageStage).
    coverage: bool = False
    block_section: bool = False  # the support section is a block size and block numbers (wire.BLOCK_SUPPORTS)
    MAX_BLOCK = 1 << 16

    def __init__(self, amount: float | int):
        self.amount = amount

    def k(self, dim: int) -> int:
        """Entries kept (with blocks: at most that many; a kept partial last block has fewer)."""
        if self.block == 1:
            return resolve_amount(self.amount, dim)
        return min(dim, self.blocks(dim) * self.block)

    def blocks(self, dim: int) -> int:
        """Number of blocks kept for a vector of `dim` entries."""
        if dim == 0:
            return 0
        return min(-(-dim // self.block), max(1, int(round(resolve_amount(self.amount, dim) / self.block))))

    def with_count(self, k: int) -> "Sparsifier":
        """The same sparsifier keeping `k` entries (a count): what a byte budget tries."""
        other = copy.copy(self)
        other.amount = int(k)
        return other

    def scale(self, dim: int, k: int) -> float:
        return 1.0

    def select(self, x: torch.Tensor, rng: np.random.Generator | None) -> np.ndarray:
        """Sorted int64 indices of the entries to keep."""
        return self.pick(x, rng)[0]

    def pick(self, x: torch.Tensor, rng: np.random.Generator | None) -> tuple[np.ndarray, list]:
        """(the entries to keep, the support section that names them).  A sparsifier implements
        `select` (its indices are listed) or `pick` (it names them otherwise: `Subset`'s seed)."""
        if type(self).select is Sparsifier.select:
            raise NotImplementedError(f"{type(self).__name__} implements neither select nor pick")
        idx = self.select(x, rng)
        return idx, self.write_support(idx)

    def write_support(self, idx: np.ndarray) -> list:
        """The support section that lists the entry indices `select` returned."""
        return write_block_indices(idx, self.block) if self.block_section else write_indices(idx)

    def support_bytes(self, dim: int) -> int:
        """Upper bound of the support section's bytes for a vector of `dim` entries."""
        return (BLOCK_HEAD.size if self.block_section else 0) + SPARSE_HEAD.size + 4 * max(self.blocks(dim) - 1, 0)

    def args(self):
        return [format_amount(self.amount)] + ([f"block={self.block}"] if self.block != 1 else [])

    @classmethod
    def _amount_and_block(cls, positional, options) -> tuple[float | int, int]:
        """``NAME:F[,block=B]``: the amount and the block size (1 when not given)."""
        options = dict(options)
        block = options.pop("block", None)
        amount, _ = cls._amount(positional, options, option_help="block=B (keep whole blocks of B consecutive entries)")
        return amount, 1 if block is None else parse_int(cls.name, "block", block, 1, cls.MAX_BLOCK)

    @classmethod
    def _amount(cls, positional, options, flags=(), option_help=""):
        help_ = f"'{cls.name}:F' with a fraction 0 < F <= 1 written with a decimal point, or '{cls.name}:K' with an integer count K >= 1"
        if options:
            raise ValueError(f"codec {cls.name!r}: unknown option {next(iter(options))!r}; allowed: {help_}" + (f", flags {', '.join(flags)}" if flags else "")
                             + (f", option {option_help}" if option_help else ""))
        amounts = [p for p in positional if p not in flags]
        if len(amounts) != 1:
            raise ValueError(f"codec {cls.name!r} needs exactly one amount, got {amounts or 'none'}; write {help_}" + (f"; flags: {', '.join(flags)}" if flags else ""))
        return parse_amount(cls.name, "the amount", amounts[0]), {f for f in positional if f in flags}


def topk_block_indices(x: torch.Tensor, blocks: int, block: int) -> np.ndarray:
    """Sorted int64 indices of the `blocks` blocks of `block` consecutive entries with the
    largest L2 norm (ties broken by lower block index).  The last block is partial when
    `block` does not divide d; a chosen partial block contributes its entries only."""
    d = x.numel()
    nb = -(-d // block)
    if blocks >= nb:
        return np.arange(d, dtype=np.int64)
    if blocks <= 0:
        return np.empty(0, dtype=np.int64)
    full = d // block
    # float64: float32 squares underflow below 1e-19 and overflow above 1e19
    norms = torch.empty(nb, dtype=torch.float64)
    torch.linalg.vector_norm(x[: full * block].view(full, block), dim=1, dtype=torch.float64, out=norms[:full])
    if nb > full:
        norms[full] = torch.linalg.vector_norm(x[full * block:], dtype=torch.float64)
    return block_entries(topk_indices(norms, blocks), block, d)


class TopK(Sparsifier):
    """Top-k sparsification: keep the k entries of largest magnitude, exactly.

    Aji & Heafield 2017 (sparse communication), Stich et al. 2018 (top-k with
    memory, i.e. error feedback).  ``topk:0.01`` keeps round(0.01 d) entries (at
    least 1), ``topk:100`` keeps 100.  Kept entries are decoded as the value codec
    decodes them (exact with float32); every other entry decodes to 0.

    ``topk:F,block=B`` (block top-k) keeps whole blocks of B consecutive
    coordinates instead: the round(k / B) blocks (at least 1) of largest L2 norm,
    so about k entries.  Only the block numbers travel (support id 4), so an
    entry costs its value bits plus 1/B of an index, and the same bytes carry
    several times more coordinates.  Whether that pays depends on the model:
    where neighbouring coordinates move together (a dense layer's weights for
    neighbouring inputs), on Fashion-MNIST ``topk:0.16,block=16 | q2 | zstd`` ends
    closer to float32 FedAvg than flat ``topk:0.04 | q2 | zstd`` at about the same
    payload size (BENCHMARKS.md, "Block top-k").
    """

    name = "topk"
    lossy = True

    def __init__(self, amount: float | int, block: int = 1):
        super().__init__(amount)
        self.block = block
        self.block_section = block != 1
        self.wire_id = wire.SUPPORT_TOPK if block == 1 else wire.SUPPORT_TOPK_BLOCKS

    @classmethod
    def from_args(cls, positional, options):
        return cls(*cls._amount_and_block(positional, options))

    def select(self, x, rng):
        if self.block == 1:
            return topk_indices(x, self.k(x.numel()))
        return topk_block_indices(x, self.blocks(x.numel()), self.block)


class RandK(Sparsifier):
    """Random-k sparsification: keep a uniformly random k-subset of the coordinates.

    Stich et al. 2018 (rand-k with memory); Wangni et al. 2018.  By default the
    kept values are sent as they are (meant to be used with error feedback,
    ``ef | randk:0.01``); with the ``unbiased`` flag they are scaled by d/k so
    that E[decode(encode(x))] = x.  The indices are sent (not a seed), so decoding
    never depends on a random number generator's algorithm.
    """

    name = "randk"
    lossy = True
    stochastic = True
    wire_id = wire.SUPPORT_RANDK

    def __init__(self, amount: float | int, unbiased: bool = False):
        super().__init__(amount)
        self.unbiased = unbiased

    def args(self):
        return super().args() + (["unbiased"] if self.unbiased else [])

    @classmethod
    def from_args(cls, positional, options):
        amount, flags = cls._amount(positional, options, flags=("unbiased",))
        return cls(amount, "unbiased" in flags)

    def scale(self, dim, k):
        return dim / k if (self.unbiased and k) else 1.0

    def select(self, x, rng):
        return randk_indices(x.numel(), self.k(x.numel()), rng)


class Subset(Sparsifier):
    """``subset:F[,block=B][,keep=N]``: each client sends a random fraction F of its update's blocks of
    B consecutive entries (single entries without ``block``), drawn independently of the
    values from a seed it takes from its own random stream, and sends the seed (the kept
    blocks are `seeded_blocks`' for it: 16 bytes, where listing the blocks took about a fifth
    of a 100x budget) and the blocks' values as they are.

    The server averages each coordinate over the clients that sent it (`coverage_mean`, as
    HeteroFL averages sub-models; aggregation.pipeline.CoverageStage): with n clients a
    coordinate is estimated from about n F of them, so the aggregate keeps the cohort's step
    size (a plain mean of sparse vectors would shrink it by F) and nothing is left behind on
    the client: no error feedback (refused: it would send the same mass twice).  Pair it with
    an unbiased value codec (``q2:dither``, or ``q2:stochastic`` with more variance): a
    deterministic 2-bit rounding is biased, and averaging over a few clients does not remove
    that (BENCHMARKS.md, target_ratio).  With ``budget:N`` the client keeps as many random
    blocks as fit in N bytes (for one seed a smaller count keeps a subset of the blocks).

    ``keep=N``: the update's last N entries (whole blocks: the last ceil(N / B)) are always
    sent, and the random blocks are drawn from the rest (support id 7, `KEEP_HEAD`).  Meant
    for a model's output layer, last in the flat vector of the built-in models: under label
    skew its update differs most between clients, and averaging it over a few of them is
    the noisiest part of the aggregate (`compression.ratio.head_size`; BENCHMARKS.md,
    "The output layer always sent").  Those coordinates are averaged over every client.

    Against error feedback and block top-k (``ef | topk:F,block=B``): a client keeps no
    residual between rounds (so it also serves clients that take part once, or cannot keep
    state), and a coordinate is estimated from about n F clients instead of the cohort.  At
    100x on the benchmark jobs, with ``q2:dither``, over twelve seeds it ends within a few
    tenths of float32 on digits (-0.14 pp, block top-k -1.28) and on Fashion-MNIST with
    ``keep`` for the output layer (-0.29 pp, block top-k -0.95; -0.81 without keep)
    (BENCHMARKS.md, "The server's side of a `target_ratio` uplink", "The output layer
    always sent"); ``[compression] target_ratio``
    picks it where the run averages with the plain mean (compression.ratio).
    """

    name = "subset"
    lossy = True
    stochastic = True
    coverage = True
    wire_id = wire.SUPPORT_SUBSET_SEEDED

    MAX_KEEP = wire.MAX_DIM

    def __init__(self, amount: float | int, block: int = 1, keep: int = 0):
        super().__init__(amount)
        self.block = block
        self.keep = int(keep)
        if self.keep:
            self.wire_id = wire.SUPPORT_SUBSET_KEEP

    @classmethod
    def from_args(cls, positional, options):
        options = dict(options)
        keep = parse_int(cls.name, "keep", options.pop("keep"), 0, cls.MAX_KEEP) if "keep" in options else 0
        return cls(*cls._amount_and_block(positional, options), keep=keep)

    def args(self):
        return super().args() + ([f"keep={self.keep}"] if self.keep else [])

    def pick(self, x, rng):
        if rng is None:
            raise ValueError("codec 'subset' draws its blocks from a random generator; none was given")
        d = x.numel()
        kept = self.k(d) if self.block == 1 else self.blocks(d)
        seed = int(rng.bit_generator.random_raw())
        tail = min(-(-min(self.keep, d) // self.block), kept)  # 0 without keep
        idx = block_entries(subset_blocks(seed, kept - tail, -(-d // self.block), tail), self.block, d)
        section = KEEP_HEAD.pack(self.block, kept - tail, seed, tail) if self.keep else SEEDED_HEAD.pack(self.block, kept, seed)
        return idx, [section]

    def support_bytes(self, dim: int) -> int:
        return KEEP_HEAD.size if self.keep else SEEDED_HEAD.size
