"""Byzantine-robust aggregators on ``(n, d)`` matrices.

Every function takes ``updates`` as an ``(n, d)`` numpy array or torch tensor (one
row per client) and returns the ``(d,)`` aggregate of the same kind: numpy in,
numpy out; torch in, torch out on the same device.  float64 input stays float64;
any other input is computed and returned as float32.

All of them are vectorised and run on whatever device the tensor is on, one
cache-sized column block at a time (`networks.blocks`), so temporaries stay
O(n x block) and the matrix is never copied whole or widened to float64.
Coordinate-wise rules (median, trimmed mean, Bulyan's second phase) run a pruned
comparator network on each block (`networks`: numpy ufuncs on the CPU, the blocks
shared among torch's threads; torch kernels on a GPU); the distance-based rules
(Krum, Bulyan, DnC) build one ``(n, n)`` Gram matrix from per-block products in the
data's dtype, summed in float64; Weiszfeld reads each block once per step.  The only
Python loops are over column blocks, over a network's comparators, and over
iterations (Weiszfeld, centered clipping, Bulyan's n - 2f selections on the small
``(n, n)`` matrix), never over clients' data or parameters.

Errors are ``ValueError`` with a message that names the function and what is
wrong: wrong shape, empty cohort, NaN/inf (with the row indices), bad
parameters, or a violated precondition such as
``krum needs n > 2f + 2: n = 5, f = 2``.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch

from . import compiled
from .networks import Kernels, blocks as _blocks, for_blocks, order_statistics
from .reputation import ClientReputation


# -- input checking ------------------------------------------------------------------


def _prepare(updates, fn: str, check: bool = True) -> tuple[torch.Tensor, bool]:
    """The updates as a float tensor (no copy when possible) and whether to return numpy.

    ``check = False`` leaves the NaN/inf check to the rule's first pass over the data
    (`_middle_mean`, `_centered_gram`, `_row_distances`, `_mix_and_distances` each
    check what they computed), which saves reading the matrix once more."""
    if isinstance(updates, torch.Tensor):
        t, to_numpy = updates, False
        if t.is_complex():
            raise ValueError(f"{fn}: updates must be real, got {t.dtype}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
    else:
        to_numpy = True
        try:
            a = np.asarray(updates)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{fn}: updates must be a numeric (n, d) array ({exc})") from None
        if a.dtype.kind in "iub" or (a.dtype.kind == "f" and a.dtype.itemsize < 4):
            a = a.astype(np.float32)
        elif a.dtype.kind == "f" and a.dtype.itemsize > 8:
            a = a.astype(np.float64)
        elif a.dtype.kind != "f":
            raise ValueError(f"{fn}: updates must be a real numeric (n, d) array, got dtype {a.dtype}")
        a = np.ascontiguousarray(a)
        with warnings.catch_warnings():  # read-only arrays are fine: nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    if t.ndim != 2:
        raise ValueError(f"{fn}: updates must be an (n, d) matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{fn}: cannot aggregate an empty cohort (n = 0)")
    if check:
        _check_finite_rows(t, fn)
    return t, to_numpy


def _check_finite_rows(t: torch.Tensor, fn: str, evidence: torch.Tensor | None = None) -> None:
    """ValueError naming the rows that hold NaN or inf.

    `evidence`: one number per row from a pass over the data that is finite for a finite
    row unless it overflowed (a squared norm, a Gram diagonal, a row sum); only rows
    whose evidence is not finite are read again, element by element.  Without it the
    evidence is the rows' sums, one reduction per block."""
    if evidence is None:
        evidence = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
        for s, e in _blocks(t):
            evidence += t[:, s:e].sum(1)
    suspect = torch.nonzero(~torch.isfinite(evidence)).flatten()
    if not len(suspect):
        return
    ok = torch.ones(len(suspect), dtype=torch.bool, device=t.device)
    for s, e in _blocks(t):
        ok &= torch.isfinite(t[suspect, s:e]).all(1)
    if not bool(ok.all()):
        rows = suspect[~ok].tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"{fn}: updates contain NaN or inf in {len(rows)} row(s): {shown}")


def _finish(out: torch.Tensor, to_numpy: bool):
    return out.cpu().numpy() if to_numpy else out


def _check_int(value, fn: str, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{fn}: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, fn: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def _normalised_weights(weights, n: int, device: torch.device, fn: str) -> torch.Tensor:
    """Weights as float64 on `device`, summing to one (uniform when None)."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = _as_real_vector(weights, fn, "weights").to(device)
    if tuple(w.shape) != (n,):
        raise ValueError(f"{fn}: weights must have shape ({n},), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{fn}: weights must be finite and non-negative")
    if not bool(w.sum() > 0):
        raise ValueError(f"{fn}: weights sum to zero")
    w = w / w.max()  # huge weights (1e300) would overflow the sum
    return w / w.sum()


def _as_real_vector(value, fn: str, what: str) -> torch.Tensor:
    """A numpy/torch/sequence of real numbers as a float64 tensor (device kept for tensors)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{fn}: {what} must be real, got {value.dtype}")
        return value.to(torch.float64)
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{fn}: {what} must be real numbers ({exc})") from None
    if a.dtype.kind not in "iubf":
        raise ValueError(f"{fn}: {what} must be real numbers, got dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


# -- shared kernels ----------------------------------------------------------------


def _block_scratch(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A buffer of one column block's shape, reused across blocks: fresh multi-megabyte
    temporaries per block cost the kernel's page faults, more than the arithmetic."""
    spans = _blocks(x)
    return torch.empty(x.shape[0] if rows is None else rows, spans[0][1] if spans else 0, dtype=x.dtype, device=x.device)


def _sq_distances_block(b: torch.Tensor, c: torch.Tensor | None, scratch: torch.Tensor) -> torch.Tensor:
    """``||b_i - c||^2`` for every row of a column block, as float64.

    The difference, its square and the block's row sums are taken in the data's dtype
    while the block is in cache (torch sums a block pairwise, so the relative error
    stays near log2(width) roundings); the blocks are summed in float64.  A float32
    square overflows beyond ~1.8e19 (an attacker may send that): such a block is redone
    in float64."""
    diff = scratch[:, : b.shape[1]]
    if c is None:
        torch.mul(b, b, out=diff)
    else:
        torch.sub(b, c, out=diff).square_()
    sq = diff.sum(1)
    if b.dtype != torch.float64 and not bool(torch.isfinite(sq).all()):
        wide = b.to(torch.float64) if c is None else b.to(torch.float64) - c.to(torch.float64)
        sq = wide.square().sum(1)
    return sq.to(torch.float64)


def _row_distances(x: torch.Tensor, center: torch.Tensor | None, fn: str) -> torch.Tensor:
    """||x_i - center|| for every row, float64, computed directly (no Gram trick).

    Weiszfeld and centered clipping weight rows by 1 / distance, and the rows that
    matter most are the ones nearest the center, exactly where ||x||^2 - 2 x.c + ||c||^2
    would cancel catastrophically."""
    n = x.shape[0]
    c = None if center is None else center.to(x.dtype)
    acc = torch.zeros(n, dtype=torch.float64, device=x.device)
    scratch = _block_scratch(x)
    for s, e in _blocks(x):
        acc += _sq_distances_block(x[:, s:e], None if c is None else c[s:e], scratch)
    _check_finite_rows(x, fn, acc)
    return acc.sqrt()


def _mix_and_distances(x: torch.Tensor, coef: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = coef @ x`` and ``||x_i - v||`` for every row (float64), in one pass: each
    block is read from memory once, its part of v computed, and the distances to it
    taken while the block is still in cache (a Weiszfeld step)."""
    n, d = x.shape
    c = coef.to(x.dtype)
    v = torch.empty(d, dtype=x.dtype, device=x.device)
    acc = torch.zeros(n, dtype=torch.float64, device=x.device)
    scratch = _block_scratch(x)
    for s, e in _blocks(x):
        b = x[:, s:e]
        torch.mv(b.t(), c, out=v[s:e])
        acc += _sq_distances_block(b, v[s:e], scratch)
    _check_finite_rows(x, fn, acc)
    return v, acc.sqrt()


def pairwise_sq_distances(updates) -> torch.Tensor:
    """The (n, n) float64 matrix of squared Euclidean distances between rows.

    One Gram matrix accumulated over column blocks (a BLAS product, no (n, n, d)
    temporary).  Each block is centered on its column mean first: distances do not
    change, and the Gram entries stay small, so ||a||^2 + ||b||^2 - 2 a.b loses little
    to cancellation when the updates share a large common offset."""
    x, _ = _prepare(updates, "pairwise_sq_distances", check=False)
    return _pairwise_sq_distances(x, "pairwise_sq_distances")


def _centered_gram(x: torch.Tensor, fn: str, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The (n, n) float64 Gram matrix ``Y Y^T`` of the rows centered on their mean,
    ``Y = S X - mean_rows(S X)`` with ``S = diag(row_scale)`` (identity when None).

    Accumulated over column blocks, no (n, d) copy: one product per block in the data's
    dtype (a BLAS call on a block in cache), the (n, n) results summed in float64.
    Centering keeps the entries small, so that ||a||^2 + ||b||^2 - 2 a.b loses little to
    cancellation.  While a block's common offset is no larger than its rows' spread
    around it, centering the (n, n) product, ``P G P`` with ``P = I - 11^T / n``, is
    within 2x as accurate as centering the rows first, and saves a pass over the block;
    a block with a larger offset is centered first and multiplied again.  A float32
    block whose product overflows (values beyond ~1e19) is redone in float64."""
    n = x.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    scratch, mu = _block_scratch(x), _block_scratch(x, 1)
    scale = None if row_scale is None else row_scale.to(x.dtype)[:, None]
    for s, e in _blocks(x):
        b, w = x[:, s:e], e - s
        if scale is not None:
            b = torch.mul(b, scale, out=scratch[:, :w])
        block = (b @ b.t()).to(torch.float64)
        row_means = block.mean(0)
        offset = row_means.mean()  # ||mean row||^2
        centered = block - row_means[:, None] - row_means[None, :] + offset
        if not bool(offset <= centered.diagonal().mean()):  # a large common offset, or overflow, NaN, inf
            b = torch.sub(b, torch.mean(b, 0, keepdim=True, out=mu[:, :w]), out=scratch[:, :w])
            centered = (b @ b.t()).to(torch.float64)
            if x.dtype != torch.float64 and not bool(torch.isfinite(centered).all()):
                wide = x[:, s:e].to(torch.float64) * (1.0 if row_scale is None else row_scale[:, None])
                wide = wide - wide.mean(0, keepdim=True)
                centered = wide @ wide.t()
        gram += centered
    _check_finite_rows(x, fn, gram.diagonal())  # a NaN or inf anywhere in a block spoils its whole diagonal
    return gram


def _pairwise_sq_distances(x: torch.Tensor, fn: str) -> torch.Tensor:
    gram = _centered_gram(x, fn)
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist = 0.5 * (dist + dist.t())  # exact symmetry, whatever the BLAS did
    dist.clamp_(min=0.0).fill_diagonal_(0.0)
    return dist


def _krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Blanchard et al. 2017, Sec. 4: score(i) = sum of the squared distances from
    row i to its n - f - 2 nearest other rows."""
    n = dist.shape[0]
    d = dist.clone().fill_diagonal_(math.inf)
    return d.topk(n - f - 2, dim=1, largest=False).values.sum(1)


# -- public aggregators ----------------------------------------------------------------


def _middle_mean(x: torch.Tensor, k: int, fn: str) -> torch.Tensor:
    """In every coordinate, the mean of the values ranked k+1 to n-k (the rest trimmed).

    The middle values come out of a comparator network (`networks`) as a set; one or
    two are combined in the data's dtype (halving before adding, which cannot overflow
    and equals (a + b) / 2 exactly, so the median matches ``np.median``), more are
    summed in float64 and the mean rounded once.  Each block's row sums, taken as the
    block is read in, are the evidence for the NaN/inf check."""
    n, d = x.shape
    m = n - 2 * k
    fast = compiled.middle_mean(x, k)
    if fast is not None:  # the same network as one compiled loop (large CPU matrices; `compiled`)
        out, finite = fast
        if not finite:
            _check_finite_rows(x, fn)
        return out
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    spans = _blocks(x)
    row_sums = torch.zeros(len(spans), n, dtype=x.dtype, device=x.device)
    kern = Kernels(x)
    dst, sums = kern.view(out), kern.view(row_sums)
    step = spans[0][1] if spans else 1

    def make_state():
        return kern.empty((n + 2, step)), kern.empty(step, wide=True)

    def work(state, s, e):
        scratch, wide = state
        w = e - s
        sums[s // step] = kern.data[:, s:e].sum(1)
        mid = order_statistics(kern, scratch[: n + 1], s, e, k, n - k, ordered=False)
        if m == 1:
            dst[s:e] = mid[0]
        elif m == 2:
            half = kern.lib.multiply(mid[1], 0.5, out=scratch[n + 1, :w])
            kern.lib.add(kern.lib.multiply(mid[0], 0.5, out=dst[s:e]), half, out=dst[s:e])
        else:
            acc = wide[:w]
            acc[...] = mid[0]
            for v in mid[1:]:
                kern.lib.add(acc, v, out=acc)
            dst[s:e] = kern.lib.divide(acc, m, out=acc)

    for_blocks(x, work, make_state)
    _check_finite_rows(x, fn, row_sums.sum(0, dtype=torch.float64))
    return out


def median(updates):
    """Coordinate-wise median (Yin et al., ICML 2018, Def. 1).

    For an even number of rows it is the mean of the two middle values, as
    ``np.median``.  Breakdown point 1/2: fewer than half the rows cannot move it
    outside the range of the honest values in any coordinate."""
    x, to_numpy = _prepare(updates, "median", check=False)
    return _finish(_middle_mean(x, (x.shape[0] - 1) // 2, "median"), to_numpy)


def _trim_count(n: int, beta: float) -> int:
    # The tiny slack keeps e.g. 0.29 * 100 = 28.999999999999996 from trimming 28.
    return int(math.floor(beta * n + 1e-9))


def trimmed_mean(updates, beta: float):
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018, Def. 2).

    In every coordinate, drop the ``k = floor(beta * n)`` smallest and the k
    largest values and average the remaining ``n - 2k``.  ``beta`` is per side,
    ``0 <= beta < 0.5`` (so at least one value always remains); beta = 0 is the
    plain unweighted mean."""
    fn = "trimmed_mean"
    if isinstance(beta, bool) or not isinstance(beta, Real) or not (0.0 <= beta < 0.5):
        raise ValueError(f"{fn}: beta is the fraction trimmed per side and must satisfy 0 <= beta < 0.5, got {beta!r}")
    x, to_numpy = _prepare(updates, fn, check=False)
    return _finish(_middle_mean(x, _trim_count(x.shape[0], float(beta)), fn), to_numpy)


def krum(updates, f: int, m: int = 1):
    """Krum and Multi-Krum (Blanchard et al., NeurIPS 2017, Sec. 4).

    Each row's score is the sum of squared distances to its ``n - f - 2`` nearest
    other rows.  ``m = 1`` (Krum) returns the row with the smallest score;
    ``m > 1`` (Multi-Krum) returns the mean of the m rows with the smallest
    scores.  Needs ``n > 2f + 2``; ties go to the lower row index."""
    fn = "krum" if m == 1 else "multi_krum"
    f = _check_int(f, fn, "f (the number of Byzantine clients)", 0)
    m = _check_int(m, fn, "m (the number of rows averaged)", 1)
    x, to_numpy = _prepare(updates, fn, check=False)
    n = x.shape[0]
    if not n > 2 * f + 2:
        raise ValueError(f"{fn} needs n > 2f + 2: n = {n}, f = {f}")
    if m > n:
        raise ValueError(f"{fn} needs m <= n: m = {m}, n = {n}")
    scores = _krum_scores(_pairwise_sq_distances(x, fn), f)
    if m == 1:
        out = x[int(torch.argmin(scores))].clone()
    else:
        best = torch.topk(scores, m, largest=False).indices
        # A 0/1 coefficient vector times the matrix: one memory-bound pass, no row copies.
        coef = torch.zeros(n, dtype=x.dtype, device=x.device).index_fill_(0, best, 1.0 / m)
        out = coef @ x
    return _finish(out, to_numpy)


def _bulyan_select(dist: torch.Tensor, f: int, theta: int) -> torch.Tensor:
    """Bulyan's first phase: apply Krum theta times, each time to the rows not yet
    chosen, moving Krum's choice into the selection.

    Krum on the remaining set R scores with |R| - f - 2 neighbours.  In the last
    two steps |R| <= 2f + 2 and that count drops below one, which the paper leaves
    open; we keep at least the nearest neighbour so the choice stays a function of
    the data (not of row order)."""
    n = dist.shape[0]
    d = dist.clone().fill_diagonal_(math.inf)
    free = torch.ones(n, dtype=torch.bool, device=dist.device)
    chosen = []
    for step in range(theta):
        r = n - step
        if r == 1:
            i = torch.nonzero(free).flatten()[0]
        else:
            k = min(max(r - f - 2, 1), r - 1)
            scores = d.topk(k, dim=1, largest=False).values.sum(1).masked_fill(~free, math.inf)
            i = torch.argmin(scores)
        chosen.append(i)
        free[i] = False
        d.index_fill_(1, i.reshape(1), math.inf)
    return torch.stack(chosen)


def bulyan(updates, f: int):
    """Bulyan over Krum (El Mhamdi, Guerraoui, Rouault, ICML 2018, Sec. 4).

    1. Select ``theta = n - 2f`` rows by applying Krum recursively (each time to
       the rows not yet selected).
    2. In every coordinate, average the ``beta = theta - 2f`` selected values
       closest to the coordinate-wise median of the selection.

    Needs ``n >= 4f + 3``."""
    fn = "bulyan"
    f = _check_int(f, fn, "f (the number of Byzantine clients)", 0)
    x, to_numpy = _prepare(updates, fn, check=False)
    n, d = x.shape
    if not n >= 4 * f + 3:
        raise ValueError(f"{fn} needs n >= 4f + 3: n = {n}, f = {f}")
    theta = n - 2 * f
    beta = theta - 2 * f
    sel = _bulyan_select(_pairwise_sq_distances(x, fn), f, theta).tolist()
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    kern = Kernels(x)
    dst, where = kern.view(out), kern.lib.where

    def make_state():
        w = _blocks(x)[0][1] if d else 0
        return kern.empty((theta + 1, w)), kern.empty(w, wide=True)

    def work(state, s, e):
        scratch, wide = state
        v = order_statistics(kern, scratch, s, e, 0, theta, ordered=True, rows=sel)
        med = v[(theta - 1) // 2] * 0.5 + v[theta // 2] * 0.5 if theta % 2 == 0 else v[theta // 2]
        dist = [abs(t - med) for t in v]
        # The beta values closest to the median are a contiguous window of the sorted
        # values; of the 2f + 1 windows take the one with the least total distance
        # (the first on ties, so the result depends on the values, not on row order).
        best, start = None, None
        for w in range(2 * f + 1):
            cost = dist[w]
            for t in dist[w + 1 : w + beta]:
                cost = cost + t
            if best is None:
                best, start = cost, kern.empty(e - s, integer=True)
                start[...] = 0
            else:
                better = cost < best
                best, start = where(better, cost, best), where(better, w, start)
        acc = wide[: e - s]
        acc[...] = 0
        for t in range(theta):  # the chosen window's values, summed in float64
            acc += where((start <= t) & (start > t - beta), v[t], 0)
        dst[s:e] = acc / beta

    for_blocks(x, work, make_state)
    return _finish(out, to_numpy)


def geometric_median(updates, weights=None, eps: float = 1e-6, max_iter: int = 100, ftol: float = 1e-10):
    """Weighted geometric median by the smoothed Weiszfeld algorithm (RFA:
    Pillutla, Kakade, Harchaoui, IEEE TSP 2022, Alg. 2).

    Minimises ``sum_i a_i max(eps, ||v - x_i||)`` (a = normalised weights) from
    the weighted mean:  ``v <- sum_i b_i x_i / sum_i b_i`` with
    ``b_i = a_i / max(eps, ||v - x_i||)``, until the objective improves by less
    than ``ftol`` (relative) or after ``max_iter`` iterations.  Breakdown point
    1/2 of the total weight."""
    fn = "geometric_median"
    eps = _check_positive(eps, fn, "eps (the smoothing)")
    max_iter = _check_int(max_iter, fn, "max_iter", 1)
    if isinstance(ftol, bool) or not isinstance(ftol, Real) or not math.isfinite(ftol) or ftol < 0:
        raise ValueError(f"{fn}: ftol must be a finite number >= 0, got {ftol!r}")
    x, to_numpy = _prepare(updates, fn, check=False)
    n = x.shape[0]
    alpha = _normalised_weights(weights, n, x.device, fn)
    v, dist = _mix_and_distances(x, alpha, fn)
    objective = float((alpha * dist).sum())
    for _ in range(max_iter):
        b = alpha / dist.clamp(min=eps)
        v, dist = _mix_and_distances(x, b / b.sum(), fn)
        new_objective = float((alpha * dist).sum())
        if abs(objective - new_objective) <= ftol * new_objective:
            break
        objective = new_objective
    return _finish(v, to_numpy)


def norm_bounded_mean(updates, max_norm: float | None, weights=None):
    """Clip every row to norm at most ``max_norm``, then take the weighted mean
    (norm bounding, Sun et al., "Can you really backdoor federated learning?", 2019).

    ``max_norm = None`` uses the median of the rows' norms (a scale-free bound
    that fewer than half of the clients cannot inflate)."""
    fn = "norm_bounded_mean"
    if max_norm is not None:
        max_norm = _check_positive(max_norm, fn, "max_norm")
    x, to_numpy = _prepare(updates, fn, check=False)
    n = x.shape[0]
    alpha = _normalised_weights(weights, n, x.device, fn)
    norms = _row_distances(x, None, fn)
    bound = float(norms.median()) if max_norm is None else max_norm  # median(): lower middle, fine for a bound
    scale = torch.where(norms > bound, bound / norms, torch.ones_like(norms))
    # Clipping folds into the coefficients: one matrix-vector product, no clipped copy.
    out = (alpha * scale).to(x.dtype) @ x
    return _finish(out, to_numpy)


def centered_clipping(updates, tau: float | None, iters: int = 3, center=None):
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021, Alg. 2 / eq. (CC)).

    ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``, ``iters`` times,
    from ``center`` (the paper uses the previous round's aggregate; the default is
    the zero vector, i.e. "no change").  Each step moves v by at most tau, so f
    outliers move the result by at most ``iters * tau * f / n``.
    ``tau = None`` uses the median distance of the rows from the starting center."""
    fn = "centered_clipping"
    if tau is not None:
        tau = _check_positive(tau, fn, "tau")
    iters = _check_int(iters, fn, "iters", 1)
    x, to_numpy = _prepare(updates, fn, check=False)
    n, d = x.shape
    if center is None:
        v = torch.zeros(d, dtype=torch.float64, device=x.device)
    else:
        v = _as_real_vector(center, fn, "center").to(x.device)
        if tuple(v.shape) != (d,):
            raise ValueError(f"{fn}: center must have shape ({d},), got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{fn}: center contains NaN or inf")
    for step in range(iters):
        dist = _row_distances(x, v, fn)
        if tau is None and step == 0:
            tau = float(dist.median())
        clip = torch.where(dist > tau, tau / dist, torch.ones_like(dist)) / n
        # sum_i c_i (x_i - v) / n = (c/n) @ X - (sum_i c_i / n) v, with c/n <= 1/n so the
        # float32 product cannot overflow.
        v = v + (clip.to(x.dtype) @ x).to(torch.float64) - clip.sum() * v
    return _finish(v.to(x.dtype), to_numpy)


def _median_norm_scale(x: torch.Tensor, max_norm: float | None, fn: str) -> torch.Tensor:
    """Per-row factors ``min(1, bound / ||x_i||)`` (float64) that clip every row to norm
    at most ``bound``: ``max_norm``, or the cohort's median row norm when None."""
    norms = _row_distances(x, None, fn)
    bound = float(norms.median()) if max_norm is None else max_norm
    return torch.where(norms > bound, bound / norms, torch.ones_like(norms))


def dnc_scores(updates, max_norm: float | None = None, clip: bool = False) -> torch.Tensor:
    """Divide-and-Conquer outlier scores (Shejwalkar & Houmansadr, NDSS 2021, Alg. 2,
    lines 4-7): center the rows, take the top right singular vector ``v`` of the
    centered (n, d) matrix and score row i by ``<x_i - mu, v>^2``.

    Computed from the (n, n) centered Gram matrix ``Y Y^T = U diag(s^2) U^T``: the
    projection of row i on ``v`` is ``s_1 u_1[i]``, so the score is ``s_1^2 u_1[i]^2``
    (no SVD of the (n, d) matrix).  With ``clip`` the rows are first clipped to
    ``max_norm`` (None: the median row norm).  Returns a float64 tensor of shape (n,)."""
    fn = "dnc_scores"
    x, _ = _prepare(updates, fn, check=False)
    scale = _median_norm_scale(x, max_norm, fn) if clip else None
    return _dnc_scores(x, scale, fn)


def _dnc_scores(x: torch.Tensor, scale: torch.Tensor | None, fn: str) -> torch.Tensor:
    gram = _centered_gram(x, fn, scale)
    gram = 0.5 * (gram + gram.t())
    if x.shape[0] == 1:
        return torch.zeros(1, dtype=torch.float64, device=x.device)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    top = evals[-1].clamp(min=0.0)
    return top * evecs[:, -1].square()


def _dnc_removed(n: int, f: int, c: float) -> int:
    return int(math.floor(c * f + 1e-9))


def _check_dnc(n: int, f: int, c: float, fn: str) -> int:
    if not n > 2 * f:
        raise ValueError(f"{fn} needs n > 2f (an honest majority): n = {n}, f = {f}")
    removed = _dnc_removed(n, f, c)
    if not removed < n:
        raise ValueError(f"{fn} needs n > floor(c * f) (at least one row kept): n = {n}, f = {f}, c = {c}")
    return removed


def dnc(updates, f: int, c: float = 1.0, max_norm: float | None = None, clip: bool = False):
    """Divide-and-Conquer (Shejwalkar & Houmansadr, "Manipulating the Byzantine",
    NDSS 2021, Alg. 2): drop the ``floor(c * f)`` rows with the largest `dnc_scores`
    (the largest squared projections on the top principal direction of the centered
    updates) and return the plain mean of the rest.

    Attackers that move the aggregate have to agree on a direction, and that shared
    direction is where the centered cohort varies most.  The paper samples ``b`` of
    the d coordinates per iteration and intersects the kept sets of ``niters``
    iterations; this uses all d coordinates (b = d), for which every iteration is the
    same, so one suffices and the result is deterministic.

    ``clip`` first clips every row to ``max_norm`` (None: the cohort's median norm),
    so a boosted update that is not removed weighs no more than a typical one; the
    kept rows are averaged clipped.  Needs an honest majority (``n > 2f``) and
    ``floor(c * f) < n``; ``c`` is the paper's filtering fraction (default 1)."""
    fn = "dnc"
    f = _check_int(f, fn, "f (the number of Byzantine clients)", 0)
    c = _check_positive(c, fn, "c (the filtering fraction)")
    if max_norm is not None:
        max_norm = _check_positive(max_norm, fn, "max_norm")
    x, to_numpy = _prepare(updates, fn)
    n = x.shape[0]
    removed = _check_dnc(n, f, c, fn)
    scale = _median_norm_scale(x, max_norm, fn) if clip else None
    drop = torch.zeros(n, dtype=torch.bool, device=x.device)
    if removed:
        drop[torch.topk(_dnc_scores(x, scale, fn), removed).indices] = True
    return _finish(_kept_mean(x, ~drop, scale), to_numpy)


def _kept_mean(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Unweighted mean of the kept (optionally clipped) rows as one coefficient-vector
    product: no copy of the rows."""
    coef = keep.to(torch.float64) / keep.sum()
    if scale is not None:
        coef = coef * scale
    return coef.to(x.dtype) @ x


# -- aggregator parts for the engine registry ---------------------------------------
#
# Each part: `name` (the `server.aggregator` value), `needs_individual_updates = True`
# (secure aggregation, which only reveals the sum, cannot feed them), and
# `config_keys`: `[server]` key -> constructor keyword, so the factory can build one with
#     cls(**{arg: getattr(srv, key) for key, arg in cls.config_keys.items() if getattr(srv, key) is not None})
# A precondition that the round's cohort violates raises ValueError at aggregate time.


def default_f(n: int, rule: str) -> int:
    """The number of Byzantine clients assumed when none is configured:
    ``floor(n / 5)`` (20% of the cohort), clamped to the largest f that the rule's
    precondition allows (krum: n > 2f + 2; bulyan: n >= 4f + 3; dnc: n > 2f), and never below 0.
    A cohort too small even for f = 0 still fails the precondition with a clear error."""
    if rule in ("krum", "multi_krum"):
        bound = (n - 3) // 2
    elif rule == "dnc":  # honest majority: n > 2f
        bound = (n - 1) // 2
    else:
        bound = (n - 3) // 4
    return max(0, min(n // 5, bound))


class MedianAggregator:
    """Coordinate-wise median (Yin et al., ICML 2018).  Ignores the example weights:
    a self-reported count must not buy influence over a robust statistic."""

    name = "median"
    needs_individual_updates = True
    config_keys: dict[str, str] = {}

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return median(updates)


class TrimmedMeanAggregator:
    """Coordinate-wise trimmed mean, ``beta`` per side (Yin et al., ICML 2018).  Unweighted."""

    name = "trimmed_mean"
    needs_individual_updates = True
    config_keys = {"trim_beta": "beta"}

    def __init__(self, beta: float = 0.1):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not (0.0 <= beta < 0.5):
            raise ValueError(f"trimmed_mean: beta must satisfy 0 <= beta < 0.5, got {beta!r}")
        self.beta = float(beta)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return trimmed_mean(updates, self.beta)


def _check_f(f, fn: str) -> int | None:
    return None if f is None else _check_int(f, fn, "f (the number of Byzantine clients)", 0)


class KrumAggregator:
    """Krum (Blanchard et al., NeurIPS 2017).  ``f = None``: see `default_f`.  Unweighted."""

    name = "krum"
    needs_individual_updates = True
    config_keys = {"byzantine_f": "f"}

    def __init__(self, f: int | None = None):
        self.f = _check_f(f, self.name)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        n = int(updates.shape[0]) if getattr(updates, "ndim", 0) == 2 else 0
        return krum(updates, self.f if self.f is not None else default_f(n, "krum"), 1)


class MultiKrumAggregator:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the mean of the m best-scored
    rows; ``m = None`` means ``n - f``.  ``f = None``: see `default_f`.  Unweighted."""

    name = "multi_krum"
    needs_individual_updates = True
    config_keys = {"byzantine_f": "f", "krum_m": "m"}

    def __init__(self, f: int | None = None, m: int | None = None):
        self.f = _check_f(f, self.name)
        self.m = None if m is None else _check_int(m, self.name, "m (the number of rows averaged)", 1)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        n = int(updates.shape[0]) if getattr(updates, "ndim", 0) == 2 else 0
        f = self.f if self.f is not None else default_f(n, "multi_krum")
        m = self.m if self.m is not None else max(1, n - f)
        return krum(updates, f, m)


class BulyanAggregator:
    """Bulyan over Krum (El Mhamdi et al., ICML 2018).  ``f = None``: see `default_f`.  Unweighted."""

    name = "bulyan"
    needs_individual_updates = True
    config_keys = {"byzantine_f": "f"}

    def __init__(self, f: int | None = None):
        self.f = _check_f(f, self.name)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        n = int(updates.shape[0]) if getattr(updates, "ndim", 0) == 2 else 0
        return bulyan(updates, self.f if self.f is not None else default_f(n, "bulyan"))


class GeometricMedianAggregator:
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022), weighted
    by the (capped) example counts as in RFA."""

    name = "geometric_median"
    needs_individual_updates = True
    config_keys = {"gm_eps": "eps", "gm_max_iter": "max_iter"}

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, ftol: float = 1e-10):
        self.eps = _check_positive(eps, self.name, "eps (the smoothing)")
        self.max_iter = _check_int(max_iter, self.name, "max_iter", 1)
        self.ftol = float(ftol)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return geometric_median(updates, weights, eps=self.eps, max_iter=self.max_iter, ftol=self.ftol)


class NormBoundedMeanAggregator:
    """Clip each update to ``max_norm`` then take the weighted mean.
    ``max_norm = None``: the cohort's median update norm."""

    name = "norm_bounded_mean"
    needs_individual_updates = True
    config_keys = {"norm_bound": "max_norm"}  # not `clip_norm`: that is privacy.clip_norm, the DP clip

    def __init__(self, max_norm: float | None = None):
        self.max_norm = None if max_norm is None else _check_positive(max_norm, self.name, "max_norm")

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return norm_bounded_mean(updates, self.max_norm, weights)

    # -- under central DP (aggregation.pipeline.CentralDPStage) -------------------------------
    def dp_refusal(self) -> str | None:
        if self.max_norm is None:
            return ("norm_bounded_mean's default bound is the cohort's median norm, which moves when one client joins or "
                    "leaves; set server.norm_bound")
        return None

    def contributions(self, updates: torch.Tensor, center=None):
        """Each row clipped to ``max_norm`` (then DP clips to C and counts every client once)."""
        x = updates.to(torch.float64)
        norms = torch.linalg.vector_norm(x, dim=1)
        scale = torch.where(norms > self.max_norm, self.max_norm / norms, torch.ones_like(norms))
        return (x * scale[:, None]).to(updates.dtype), None


class CenteredClippingAggregator:
    """Centered clipping (Karimireddy et al., ICML 2021) from the zero update.
    ``tau = None``: the median norm of the cohort's updates.  Unweighted."""

    name = "centered_clipping"
    needs_individual_updates = True
    config_keys = {"cc_tau": "tau", "cc_iters": "iters"}

    def __init__(self, tau: float | None = None, iters: int = 3):
        self.tau = None if tau is None else _check_positive(tau, self.name, "tau")
        self.iters = _check_int(iters, self.name, "iters", 1)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return centered_clipping(updates, self.tau, self.iters)

    # -- under central DP (aggregation.pipeline.CentralDPStage) -------------------------------
    def dp_refusal(self) -> str | None:
        if self.tau is None:
            return ("centered_clipping's default radius is the cohort's median distance, which moves when one client joins "
                    "or leaves; set server.cc_tau")
        if self.iters != 1:
            return (f"server.cc_iters = {self.iters}: every step after the first re-centres on this round's un-noised "
                    "iterate, so only one step from a public centre composes; set server.cc_iters = 1")
        return None

    def contributions(self, updates: torch.Tensor, center=None):
        """One step of centered clipping from a public centre (the previous round's released
        aggregate; zero in the first round): rows ``clip_tau(x_i - center)``, result
        ``center + sum / m`` after DP's clip, sum and noise."""
        d = updates.shape[1]
        c = torch.zeros(d, dtype=torch.float64) if center is None else center.to(torch.float64)
        x = updates.to(torch.float64) - c
        dist = torch.linalg.vector_norm(x, dim=1)
        scale = torch.where(dist > self.tau, self.tau / dist, torch.ones_like(dist))
        return (x * scale[:, None]).to(updates.dtype), c


class DnCAggregator:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021) on updates clipped to the
    cohort's median norm, optionally with a client `ClientReputation`.  Unweighted.

    Every round the ``floor(c * f)`` rows with the largest `dnc_scores` are flagged.
    Without reputation the flagged rows are dropped and the rest averaged (`dnc`).
    With ``reputation = True`` the flags are also recorded per client, and the rows of
    clients flagged in more than ``reputation_threshold`` of their (at least
    ``reputation_min_rounds``) appearances are dropped first; the round then drops only
    as many of the remaining highest-scored rows as are needed to drop ``floor(c * f)``
    in total (more when more distrusted clients are present, never every row).  This
    path needs the client ids: the engine calls `aggregate_round(ids, updates, weights)`.

    ``f = None``: see `default_f`.  ``clip = False`` averages the kept rows unclipped.
    After each round ``last_removed`` holds the removed row indices and
    ``last_distrusted`` those removed for their history."""

    name = "dnc"
    needs_individual_updates = True
    config_keys = {
        "byzantine_f": "f", "dnc_c": "c", "norm_bound": "max_norm", "dnc_clip": "clip",
        "reputation": "reputation", "reputation_min_rounds": "reputation_min_rounds",
        "reputation_threshold": "reputation_threshold",
    }

    def __init__(
        self,
        f: int | None = None,
        c: float = 1.0,
        max_norm: float | None = None,
        clip: bool = True,
        reputation: bool = False,
        reputation_min_rounds: int = 2,
        reputation_threshold: float = 0.5,
    ):
        self.f = _check_f(f, self.name)
        self.c = _check_positive(c, self.name, "c (the filtering fraction)")
        self.max_norm = None if max_norm is None else _check_positive(max_norm, self.name, "max_norm")
        self.clip = bool(clip)
        self.reputation = ClientReputation(reputation_min_rounds, reputation_threshold) if reputation else None
        # The engine passes client ids to aggregators that ask for them (as for MIFA).
        self.needs_client_ids = self.reputation is not None
        self.last_removed: list[int] = []
        self.last_distrusted: list[int] = []

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.reputation is not None:
            raise ValueError("dnc with reputation needs the client ids: call aggregate_round(ids, updates, weights)")
        return self._round(updates, None)

    def aggregate_round(self, ids, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.reputation is None:
            return self._round(updates, None)
        return self._round(updates, list(ids))

    def _round(self, updates, ids: list[int] | None):
        fn = self.name
        x, to_numpy = _prepare(updates, fn)
        n = x.shape[0]
        if ids is not None and len(ids) != n:
            raise ValueError(f"{fn}: {len(ids)} client ids for {n} updates")
        f = self.f if self.f is not None else default_f(n, "dnc")
        removed = _check_dnc(n, f, self.c, fn)
        scale = _median_norm_scale(x, self.max_norm, fn) if self.clip else None
        scores = _dnc_scores(x, scale, fn) if removed else torch.zeros(n, dtype=torch.float64, device=x.device)
        flagged = torch.zeros(n, dtype=torch.bool, device=x.device)
        if removed:
            flagged[torch.topk(scores, removed).indices] = True
        drop = flagged
        distrusted = torch.zeros(n, dtype=torch.bool, device=x.device)
        if ids is not None:
            distrusted = self.reputation.distrusted(ids).to(x.device)
            if int(distrusted.sum()) >= n:  # never drop every row: fall back to this round's evidence
                distrusted.zero_()
            extra = max(0, removed - int(distrusted.sum()))
            drop = distrusted.clone()
            if extra:
                rest = scores.masked_fill(distrusted, -math.inf)
                drop[torch.topk(rest, extra).indices] = True
            self.reputation.record(ids, flagged.cpu())
        self.last_removed = torch.nonzero(drop).flatten().tolist()
        self.last_distrusted = torch.nonzero(distrusted).flatten().tolist()
        return _finish(_kept_mean(x, ~drop, scale), to_numpy)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.reputation is None else self.reputation.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.reputation is not None:
            self.reputation.load_state_dict(state)


ROBUST_AGGREGATORS = {
    cls.name: cls
    for cls in (
        MedianAggregator,
        TrimmedMeanAggregator,
        KrumAggregator,
        MultiKrumAggregator,
        BulyanAggregator,
        GeometricMedianAggregator,
        NormBoundedMeanAggregator,
        CenteredClippingAggregator,
        DnCAggregator,
    )
}
