"""Count sketch (Charikar et al. 2002) as used by FetchSGD (Rothchild et al. 2020).

A client sends the table S(x) (rows x cols float32): row r adds s_r(i) * x_i to
bucket h_r(i).  S is linear, S(a) + S(b) = S(a + b) and S(w a) = w S(a), so the
server sums (or averages) the clients' tables in sketch space with
`sum_sketches` and recovers the top-k heavy hitters of the *aggregate* once, with
`unsketch`: estimate_i = median_r s_r(i) * S[r, h_r(i)] (FetchSGD, Alg. 1,
"Unsketch"), keep the k largest estimates, zero the rest.  Decoding a single
sketch payload is the same unsketch of that one table.

Hashes: for row r, with 64-bit odd a_r and b_r drawn from the seed by splitmix64
(plain integer arithmetic: the same on every platform and library version),
u = ((a_r * i + b_r) mod 2^64) >> 32 is a strongly universal 32-bit hash of the
index (multiply-add-shift, Dietzfelbinger 1996); its top bit is the sign and the
other 31 bits pick the bucket (multiply-shift range reduction).  The hashes of
indices 0..d-1 are computed once per (rows, cols, seed) and cached: rows x d
int32 (200 MB for d = 10M, rows = 5), see `clear_sketch_cache`.

Payload: support section ``<HIQI`` rows, cols, seed, k; then rows*cols float32.

Written here rather than taken from FetchSGD's ``csvec``: that code is not a
maintained package, and this one is vectorised for one CPU core (see the benchmark).
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..params import PayloadError
from . import wire
from .base import CHUNK, Stage, format_amount, parse_amount, parse_int, resolve_amount
from .sparsify import topk_indices
from .values import read_values

SKETCH_HEAD = struct.Struct("<HIQI")
MAX_ROWS = 15
DEFAULT_ROWS = 5
DEFAULT_COLS_PER_K = 4
_MAX_CELLS = 2**31 - 1  # 2 * rows * cols must fit an int32 code

_cache: "OrderedDict[tuple[int, int, int], torch.Tensor]" = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_ENTRIES = 2


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _row_params(seed: int, r: int) -> tuple[int, int]:
    a = _splitmix64(seed * 2 * MAX_ROWS + 2 * r) | 1
    b = _splitmix64(seed * 2 * MAX_ROWS + 2 * r + 1)
    return a, b


def _build_codes(rows: int, cols: int, seed: int, dim: int) -> torch.Tensor:
    """int32 (rows, dim): code = 2 * (r * cols + bucket) + (1 if the sign is negative)."""
    codes = np.empty((rows, dim), dtype=np.int32)
    cols64 = np.uint64(cols)
    for r in range(rows):
        a, b = (np.uint64(v) for v in _row_params(seed, r))
        base = np.uint64(2 * r * cols)
        for s in range(0, dim, CHUNK):
            e = min(dim, s + CHUNK)
            h = np.arange(s, e, dtype=np.uint64)
            h *= a  # wraps mod 2^64, as intended
            h += b
            h >>= np.uint64(32)
            neg = h >> np.uint64(31)
            h &= np.uint64(0x7FFFFFFF)
            h *= cols64
            h >>= np.uint64(31)  # bucket in [0, cols)
            h <<= np.uint64(1)
            h += base
            h |= neg
            codes[r, s:e] = h
    return torch.from_numpy(codes)


def sketch_codes(rows: int, cols: int, seed: int, dim: int) -> torch.Tensor:
    """Cached hash codes (rows, dim); a cached table for a larger dim serves smaller ones."""
    key = (rows, cols, seed)
    with _cache_lock:
        t = _cache.get(key)
        if t is not None and t.shape[1] >= dim:
            _cache.move_to_end(key)
            return t[:, :dim]
        t = _build_codes(rows, cols, seed, dim)
        _cache[key] = t
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
        return t


def clear_sketch_cache() -> None:
    """Frees the cached hash codes (rows x dim int32 per sketch shape)."""
    with _cache_lock:
        _cache.clear()


def sketch_vector(x: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    """The count sketch table (rows, cols) of a float32 vector."""
    d = x.numel()
    codes = sketch_codes(rows, cols, seed, d)
    # Positive and negative contributions go to separate halves of each cell and are
    # subtracted at the end: the scatter needs no sign multiply and no sign array.
    acc = torch.zeros(rows * cols * 2, dtype=torch.float32)
    for s in range(0, d, CHUNK):
        e = min(d, s + CHUNK)
        xs = x[s:e]
        for r in range(rows):
            acc.index_add_(0, codes[r, s:e], xs)
    pn = acc.view(rows, cols, 2)
    return pn[:, :, 0] - pn[:, :, 1]


def _median3_(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """max(min(a, b), min(max(a, b), c)), in place (clobbers its arguments)."""
    t = torch.minimum(a, b)
    torch.maximum(a, b, out=a)
    torch.minimum(a, c, out=a)
    return torch.maximum(t, a, out=a)


def _median_(g: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise median of a few equal-length tensors (odd-even transposition sort; clobbers g)."""
    r = len(g)
    if r == 1:
        return g[0]
    if r == 3:
        return _median3_(*g)
    if r == 5:
        # median5 = med3(e, max(min(a,b), min(c,d)), min(max(a,b), max(c,d))): 9 min/max
        # instead of the 20 of a full sorting network (checked against sorting in the tests).
        a, b, c, d, e = g
        t = torch.minimum(a, b)
        torch.maximum(a, b, out=a)
        torch.minimum(c, d, out=b)
        torch.maximum(c, d, out=c)
        torch.maximum(t, b, out=t)
        torch.minimum(a, c, out=a)
        return _median3_(e, t, a)
    tmp = torch.empty_like(g[0])
    for p in range(r):
        for i in range(p % 2, r - 1, 2):
            torch.minimum(g[i], g[i + 1], out=tmp)
            torch.maximum(g[i], g[i + 1], out=g[i + 1])
            g[i], tmp = tmp, g[i]
    if r % 2:
        return g[r // 2]
    return g[r // 2 - 1].add_(g[r // 2]).mul_(0.5)


def estimate(table: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Count-sketch estimate of every coordinate: median over rows of s_r(i) S[r, h_r(i)]."""
    rows, cols = table.shape
    codes = sketch_codes(rows, cols, seed, dim)
    signed = torch.stack([table, -table], dim=2).reshape(-1).contiguous()
    out = torch.empty(dim, dtype=torch.float32)
    bufs = [torch.empty(min(dim, CHUNK)) for _ in range(rows)]
    for s in range(0, dim, CHUNK):
        e = min(dim, s + CHUNK)
        g = [torch.index_select(signed, 0, codes[r, s:e], out=bufs[r][: e - s]) for r in range(rows)]
        out[s:e] = _median_(g)
    return out


def unsketch(table: torch.Tensor, dim: int, k: int, seed: int) -> torch.Tensor:
    """Top-k heavy hitters of a sketch: the k largest estimates, every other entry 0."""
    est = estimate(table, dim, seed)
    if k >= dim:
        return est
    idx = torch.from_numpy(topk_indices(est, k))
    vals = est[idx]
    est.zero_()
    est[idx] = vals
    return est


class CountSketch(Stage):
    """Count-sketch compression (FetchSGD, Rothchild et al. 2020, Sec. 3).

    ``sketch:K[,cols=C][,rows=R][,seed=S]``: K heavy hitters recovered when
    decoding (a fraction with a decimal point or a count, as in topk); C columns
    (a count, or a fraction of d; default 4 K); R rows (1..15, default 5); S the
    hash seed every client and the server share (default 0).  Must be the last
    element of a chain: tables stay float32 so that they add up exactly as sketches.

    Bound: none per coordinate in the worst case; the count-sketch guarantee
    (Charikar et al. 2002, Thm. 1) is |estimate_i - x_i| <= 8 ||x_tail||_2 / sqrt(C)
    with probability >= 1 - exp(-Omega(R)), where x_tail is x without its C/8
    largest entries.  Linearity is exact up to float32 rounding.
    """

    name = "sketch"
    lossy = True
    role = "sketch"
    wire_id = wire.SUPPORT_SKETCH

    def __init__(self, k: float | int, cols: float | int | None = None, rows: int = DEFAULT_ROWS, seed: int = 0):
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"codec 'sketch': rows={rows} is not allowed; rows must be an integer in [1, {MAX_ROWS}]")
        self.k_amount, self.cols_amount, self.rows, self.seed = k, cols, rows, seed

    def args(self):
        a = [format_amount(self.k_amount)]
        if self.cols_amount is not None:
            a.append(f"cols={format_amount(self.cols_amount)}")
        if self.rows != DEFAULT_ROWS:
            a.append(f"rows={self.rows}")
        if self.seed:
            a.append(f"seed={self.seed}")
        return a

    @classmethod
    def from_args(cls, positional, options):
        help_ = "sketch:K[,cols=C][,rows=R][,seed=S] with K a fraction (0.01) or count (100) of heavy hitters"
        if len(positional) != 1:
            raise ValueError(f"codec 'sketch' needs exactly one heavy-hitter amount K, got {positional or 'none'}; write {help_}")
        k = parse_amount("sketch", "K (heavy hitters)", positional[0])
        opts = dict(options)
        cols = parse_amount("sketch", "cols", opts.pop("cols")) if "cols" in opts else None
        rows = parse_int("sketch", "rows", opts.pop("rows"), 1, MAX_ROWS) if "rows" in opts else DEFAULT_ROWS
        seed = parse_int("sketch", "seed", opts.pop("seed"), 0, 2**63 - 1) if "seed" in opts else 0
        if opts:
            raise ValueError(f"codec 'sketch': unknown option {next(iter(opts))!r}; allowed: cols, rows, seed ({help_})")
        return cls(k, cols, rows, seed)

    def shape(self, dim: int) -> tuple[int, int, int]:
        """(k, rows, cols) for a dimension."""
        k = resolve_amount(self.k_amount, dim)
        if self.cols_amount is None:
            cols = max(1, DEFAULT_COLS_PER_K * k)
        elif isinstance(self.cols_amount, int):
            cols = self.cols_amount  # a count of columns is not capped by the dimension
        else:
            cols = max(1, int(round(self.cols_amount * dim)))
        if 2 * self.rows * cols > _MAX_CELLS:
            raise ValueError(f"codec 'sketch': {self.rows} rows x {cols} cols is too large (2 * rows * cols must be < 2^31)")
        return k, self.rows, cols

    def nbytes(self, dim: int) -> int:
        _, rows, cols = self.shape(dim)
        return SKETCH_HEAD.size + 4 * rows * cols

    def write(self, x: torch.Tensor) -> list:
        k, rows, cols = self.shape(x.numel())
        table = sketch_vector(x, rows, cols, self.seed)
        lo, hi = torch.aminmax(table)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("the sketch table overflowed float32; the input is too large to sketch")
        return [SKETCH_HEAD.pack(rows, cols, self.seed, k), memoryview(table.contiguous().numpy()).cast("B")]

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        _, rows, cols = self.shape(x.numel())
        return sketch_vector(x.detach().to(torch.float32).contiguous(), rows, cols, self.seed)

    def unsketch(self, table: torch.Tensor, dim: int) -> torch.Tensor:
        k, _, _ = self.shape(dim)
        return unsketch(table, dim, k, self.seed)


# -- payload-level operations (server side) ----------------------------------------------
@dataclass(frozen=True)
class SketchPayload:
    dim: int
    rows: int
    cols: int
    seed: int
    k: int
    table: torch.Tensor  # (rows, cols) float32

    def decode(self) -> torch.Tensor:
        return unsketch(self.table, self.dim, self.k, self.seed)


def read_sketch_section(r, dim: int) -> tuple[int, int, int, int]:
    rows, cols, seed, k = r.unpack(SKETCH_HEAD, "sketch header")
    if not 1 <= rows <= MAX_ROWS:
        raise PayloadError(f"sketch announces {rows} rows; allowed 1..{MAX_ROWS}")
    if cols < 1 or 2 * rows * cols > _MAX_CELLS:
        raise PayloadError(f"sketch announces {rows} x {cols} cells; allowed 1 <= cols and 2 * rows * cols < 2^31")
    if k > dim:
        raise PayloadError(f"sketch asks for k={k} heavy hitters of a vector of dim {dim}")
    return rows, cols, seed, k


def read_sketch(payload: bytes, dim: int | None = None) -> SketchPayload:
    """Parses and checks a sketch payload without unsketching it."""
    h, r = wire.read_header(payload)
    if h.support != wire.SUPPORT_SKETCH:
        raise PayloadError(f"not a sketch payload (support {h.kind!r})")
    if dim is not None and h.dim != dim:
        raise PayloadError(f"payload is for dim {h.dim}, expected {dim}")
    if h.value != wire.VALUE_F32:
        raise PayloadError(f"sketch tables are float32; payload announces value codec {h.value}")
    rows, cols, seed, k = read_sketch_section(r, h.dim)
    table = read_values(wire.VALUE_F32, r, rows * cols).view(rows, cols)
    r.finish()
    return SketchPayload(h.dim, rows, cols, seed, k, table)


def encode_sketch(dim: int, table: torch.Tensor, k: int, seed: int) -> bytes:
    rows, cols = table.shape
    t = table.detach().to(torch.float32).contiguous()
    return wire.assemble(
        wire.SUPPORT_SKETCH, wire.VALUE_F32, dim, [SKETCH_HEAD.pack(rows, cols, seed, k), memoryview(t.numpy()).cast("B")]
    )


def sum_sketches(payloads: Sequence[bytes], weights: Sequence[float] | np.ndarray | torch.Tensor | None = None) -> bytes:
    """One sketch payload holding sum_i w_i S(x_i) = S(sum_i w_i x_i).

    Every payload must be a sketch with the same dim, rows, cols, seed and k (the
    same chain); otherwise `PayloadError` says which differs.  With weights that
    sum to 1 this is the sketch of the weighted mean, which the server then
    decodes once (`decode_payload` or `unsketch`), as FetchSGD aggregates.
    """
    if not payloads:
        raise ValueError("sum_sketches needs at least one payload")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(payloads),):
            raise ValueError(f"weights has shape {w.shape}, expected ({len(payloads)},)")
    first: SketchPayload | None = None
    total = None
    for i, payload in enumerate(payloads):  # streaming: one table in memory besides the sum
        p = read_sketch(payload)
        if first is None:
            first = p
            total = torch.zeros_like(p.table)
        for f in ("dim", "rows", "cols", "seed", "k"):
            if getattr(p, f) != getattr(first, f):
                raise PayloadError(f"sketch {i} has {f}={getattr(p, f)}, sketch 0 has {f}={getattr(first, f)}: they cannot be summed")
        if w is None:
            total += p.table
        else:
            total.add_(p.table, alpha=float(w[i]))
    return encode_sketch(first.dim, total, first.k, first.seed)
