"""Codecs: how a vector becomes bytes on the wire, and back.

Contract (docs/architecture.md, section 4.3): ``encode(vec, state) -> (payload, state)`` and
``decode(payload) -> vec``.  A payload is self-describing (see `wire`), so
``decode`` needs no side information, and ``len(payload)`` is exactly what travels.
State (error-feedback residuals, random seeds) is explicit so it can be
checkpointed.

Chain syntax (one syntax everywhere: configs, CLI, records)
-----------------------------------------------------------
``"[ef |] [sparsifier | sketch] [| value codec] [| zstd]"``, elements separated by ``|``,
whitespace ignored; ``"none"`` or ``""`` is plain float32.  An element is
``name`` or ``name:arg,arg`` where an arg is ``key=value`` or a bare word.

- wrapper: ``ef`` -- error feedback around the rest of the chain.
- sparsifier: ``topk:F[,block=B]``, ``randk:F[,unbiased]`` -- keep k coordinates; F is a
  fraction written with a decimal point (``0.01``, ``1.0``) or an integer count
  (``100``); ``block=B`` keeps whole blocks of B consecutive coordinates (the
  round(k/B) of largest L2 norm).  ``subset:F[,block=B]`` -- a random fraction F of the
  blocks, drawn independently of the values; the server averages each coordinate over
  the clients that sent it (`sparsify.Subset`).
- sketch: ``sketch:K[,cols=C][,rows=R][,seed=S]`` -- count sketch, K heavy hitters
  recovered on decode, C columns (default 4 K), R rows (default 5); must be last.
- value codec: ``none``, ``fp16``, ``bf16``; ``q8``/``q4``/``q2`` as
  ``qB[:block=N][,stochastic|,dither]`` (block default 256; ``stochastic``: unbiased
  rounding; ``dither``: subtractive dither, unbiased and at most half a step off, a third to
  a half of stochastic rounding's variance); ``sign[:block=N]`` (1 bit and a mean-|x| scale
  per block, 0 = one scale for the whole vector).
- entropy coder: ``zstd[:level=N]`` -- lossless Zstandard coding of the payload
  body, applied only when it makes the payload smaller (`entropy`); must be last
  (but for ``budget``).
- byte budget: ``budget:N`` -- every payload at most N bytes: the sparsifier keeps the
  most entries that fit (`budget`); last, and only with a sparsifier.

Composition: a sparsifier picks indices and hands the kept values, in index
order, to the value codec (``topk:0.01 | q8`` = top 1 %, values 8-bit
quantized; ``topk:0.01 | fp16``).  Without a sparsifier the value codec codes
the whole vector.  ``ef`` first wraps everything after it.  Refused with a
ValueError: two sparsifiers (or a sparsifier and a sketch), two value codecs, a
value codec before the sparsifier, anything after ``sketch`` (tables stay
float32 so they add up), ``ef`` anywhere but first, ``ef`` before a
lossless chain or around ``subset``, and ``zstd`` anywhere but last.

Examples: ``"q8"``, ``"q4:stochastic"``, ``"q8:block=128"``, ``"topk:0.01 | q8"``,
``"ef | topk:0.001 | q4"``, ``"ef | topk:0.16,block=16 | q2 | zstd"``, ``"ef | sign"``, ``"randk:0.1,unbiased | q8:stochastic"``,
``"q8 | zstd"``, ``"ef | topk:0.01 | q8 | zstd"``, ``"subset:0.125,block=16 | q2:stochastic | zstd"``,
``"sketch:0.01,cols=0.05,rows=5"``.

Decoding reads the structure from the payload, so *any* chain decodes *any*
valid payload: the server can accept clients that use different chains
(adaptive compression) with one ``uplink.decode``.

Randomness (``randk``, ``subset``, ``stochastic``): if the state holds ``"rng.seed"`` (an
int64 scalar tensor, see `seed_state`), that client's stream is seeded from it
and the next seed is returned in the state, so encodings are reproducible
whatever the order in which clients run; otherwise the chain's own generator
(seeded by ``parse_chain(spec, seed=...)``) is used; that generator is not
thread-safe, so clients encoding in parallel threads should bring a seed.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
import torch

from ..parts import register_part, table
from ..params import PayloadError
from . import wire
from .base import Stage, new_rng
from .budget import BUDGET_STATE, ByteBudget, fit
from .entropy import ZstdCoder
from .sketch import CountSketch, read_sketch, read_sketch_section, unsketch
from .sparsify import RandK, Sparsifier, Subset, TopK, block_entries, read_support, read_support_blocks
from .values import (
    read_f32_into,
    BFloat16Codec,
    Float16Codec,
    Float32Codec,
    SignCodec,
    UniformQuantizer,
    ValueCodec,
    _LITTLE,
    read_values,
)

State = dict[str, torch.Tensor]
RESIDUAL = "ef.residual"
RNG_SEED = "rng.seed"


class Codec(Protocol):
    name: str
    lossy: bool

    def encode(self, vec: torch.Tensor, state: State | None = None) -> tuple[bytes, State | None]: ...

    def decode(self, payload: bytes) -> torch.Tensor: ...


IdentityCodec = Float32Codec  # the name the seam started with


class ErrorFeedback(Stage):
    """Error feedback around the rest of the chain C: e <- v + e - C(v + e).

    Seide et al. 2014 (1-bit SGD); Stich et al. 2018 and Karimireddy et al. 2019
    (EF-SGD, Alg. 2): the client sends C(v + e) and keeps what was lost as the
    residual e for the next round.  The residual lives in the state under
    ``"ef.residual"`` (float32, shape (d,)); it equals exactly
    (v + e_old) - decode(payload).
    """

    name = "ef"
    lossy = False
    role = "ef"


_BUILTIN_CODECS: dict[str, Callable[[list[str], dict[str, str]], Stage]] = {
    "none": Float32Codec.from_args,
    "fp16": Float16Codec.from_args,
    "bf16": BFloat16Codec.from_args,
    "q8": UniformQuantizer.factory(8),
    "q4": UniformQuantizer.factory(4),
    "q2": UniformQuantizer.factory(2),
    "sign": SignCodec.from_args,
    "topk": TopK.from_args,
    "randk": RandK.from_args,
    "subset": Subset.from_args,
    "sketch": CountSketch.from_args,
    "ef": ErrorFeedback.from_args,
    "zstd": ZstdCoder.from_args,
    "budget": ByteBudget.from_args,
}


def register_codec(name: str, factory: Callable[[list[str], dict[str, str]], Stage]) -> None:
    """Register a chain element under `name`, so a chain such as ``"ef | <name>:0.1 | q8"`` runs
    it in `compression.uplink` (and clients announce it).  `factory(positional, options)`
    returns a `Stage` (a value codec, a `Sparsifier`, ...) whose payload uses one of the
    self-describing wire formats, so any build decodes it without knowing the new name.
    Refuses a name that is taken or not a plain lowercase word.  The same as
    ``fleetlearn.parts.register_part("codec", name, factory)``."""
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or name.lower() != name or name[0].isdigit():
        raise ValueError(f"codec name {name!r} must be a lowercase word (letters, digits, '_')")
    if name in CODECS and CODECS[name] is not factory:
        raise ValueError(f"codec name {name!r} is taken")
    if not callable(factory):
        raise ValueError(f"codec {name!r}: the factory must be callable (positional, options) -> Stage")
    register_part("codec", name, factory)


for _name, _factory in _BUILTIN_CODECS.items():
    register_part("codec", _name, _factory)
# name -> factory(positional, options): a live view of the registry's "codec" kind.
CODECS = table("codec")


# Wire formats added after their codec's name first shipped: a client announces them
# next to the names, so a server never hands an older client a chain it cannot encode.
# "topk_blocks": topk's block option; "dither": the quantizers' subtractive dither (``q2:dither``);
# "subset_keep": subset's keep option.
LATER_FORMATS = (wire.SUPPORT_NAMES[wire.SUPPORT_TOPK_BLOCKS], "dither", wire.SUPPORT_NAMES[wire.SUPPORT_SUBSET_KEEP])


def capabilities() -> list[str]:
    """What this build encodes and decodes, as a client announces it: every codec name plus `LATER_FORMATS`."""
    return sorted([*CODECS, *LATER_FORMATS])


def needed_capabilities(spec: str) -> list[str]:
    """What a client must announce to use chain `spec` ("ef | topk:0.1,block=8 | q2" ->
    [ef, topk, q2, topk_blocks]); ValueError for an invalid chain."""
    chain = parse_chain(spec)
    names = [c.name for c in chain.codecs]
    if isinstance(chain.support, TopK) and chain.support.block > 1:
        names.append(wire.SUPPORT_NAMES[wire.SUPPORT_TOPK_BLOCKS])
    if getattr(chain.value, "dither", False):
        names.append("dither")
    if isinstance(chain.support, Subset) and chain.support.keep:
        names.append(wire.SUPPORT_NAMES[wire.SUPPORT_SUBSET_KEEP])
    return names


def seed_state(seed: int) -> State:
    """Initial state that gives a client its own reproducible random stream."""
    return {RNG_SEED: torch.tensor(int(seed), dtype=torch.int64)}


def _as_vector(vec: torch.Tensor, checked: bool = False) -> torch.Tensor:
    """`vec` as a contiguous float32 CPU vector; ValueError for another shape or a NaN / inf
    entry (`checked`: the caller has seen every entry finite already: `rows_finite`)."""
    if not isinstance(vec, torch.Tensor):
        raise ValueError(f"encode takes a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1:
        raise ValueError(f"encode takes a flat (d,) vector, got shape {tuple(vec.shape)}")
    if vec.numel() > wire.MAX_DIM:
        raise ValueError(f"vector of {vec.numel()} entries; a payload holds at most {wire.MAX_DIM}")
    x = vec.detach().to("cpu", torch.float32).contiguous()
    if x.numel() and not checked:
        lo, hi = torch.aminmax(x)  # NaN propagates through min/max, so this one pass sees NaN and inf
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError("cannot encode a vector with NaN or inf entries")
    return x


def _row_runs(vecs: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]] | None:
    """`vecs` as runs (lo, hi, matrix) of consecutive rows of contiguous float32 (n, d) CPU
    matrices, without a copy (a cohort's deltas as a learner returns them: one matrix per
    group it trained); None when they are not such rows."""
    runs: list[tuple[int, int, torch.Tensor]] = []
    i, n = 0, len(vecs)
    while i < n:
        first = vecs[i]
        base = first._base if isinstance(first, torch.Tensor) else None
        if (base is None or base.dim() != 2 or base.dtype != torch.float32 or not base.is_contiguous()
                or base.device.type != "cpu" or first.dim() != 1 or first.shape[0] != base.shape[1]):
            return None
        row = base.stride(0) * base.element_size()
        start = first.data_ptr() - base.data_ptr()
        if row == 0 or start % row:
            return None
        j, ptr = i + 1, first.data_ptr()
        while j < n:
            v = vecs[j]
            if not isinstance(v, torch.Tensor) or v._base is not base or v.dim() != 1 or v.data_ptr() != ptr + (j - i) * row:
                break
            j += 1
        lo = start // row
        runs.append((i, j, base[lo : lo + j - i]))
        i = j
    return runs


def rows_finite(vecs: list[torch.Tensor]) -> list[bool]:
    """Which of `vecs` surely hold only finite values, with one pass over their matrices: a
    row's sum is NaN or inf when the row holds one (it may also overflow for finite values:
    such a row is False here, and `encode` judges it exactly).  All False when `vecs` are
    not rows of matrices (`_row_runs`: each is then checked by `encode`)."""
    return _runs_finite(_row_runs(vecs), len(vecs))


def _runs_finite(runs: list[tuple[int, int, torch.Tensor]] | None, n: int) -> list[bool]:
    """`rows_finite` of `n` vectors from their `_row_runs`."""
    if runs is None:
        return [False] * n
    ok: list[bool] = []
    for _, _, m in runs:
        ok.extend(torch.isfinite(m.sum(dim=1)).tolist() if m.numel() else [True] * m.shape[0])
    return ok


class CodecChain:
    """A validated chain ``[ef] [sparsifier | sketch] [value codec]``; see the module docstring."""

    def __init__(self, codecs: list[Stage] | tuple[Stage, ...] = (), seed: int = 0):
        stages = [c for c in codecs if not isinstance(c, Float32Codec)]
        _validate(stages)
        self.codecs = stages
        self.budget: ByteBudget | None = stages[-1] if stages and stages[-1].role == "budget" else None  # type: ignore[assignment]
        core = stages[:-1] if self.budget is not None else stages
        self.ef = bool(core) and core[0].role == "ef"
        self.entropy: ZstdCoder | None = core[-1] if core and core[-1].role == "entropy" else None  # type: ignore[assignment]
        body = core[1:] if self.ef else core
        self.support: Sparsifier | CountSketch | None = next((c for c in body if c.role in ("sparsifier", "sketch")), None)
        self.value: ValueCodec = next((c for c in body if c.role == "value"), Float32Codec())  # type: ignore[assignment]
        self.stochastic = any(c.stochastic for c in stages)
        self.spec = " | ".join(c.spec for c in stages) or "none"
        self._rng = new_rng(seed)

    def __repr__(self) -> str:
        return f"CodecChain({self.spec!r})"

    @property
    def lossy(self) -> bool:
        return any(c.lossy for c in self.codecs)

    @property
    def coverage(self) -> bool:
        """The server averages each coordinate over the clients that sent it (a `subset` chain:
        aggregation.pipeline.CoverageStage), instead of the plain mean of the decoded rows."""
        return isinstance(self.support, Sparsifier) and self.support.coverage

    @property
    def exact_size(self) -> bool:
        """True when `estimate_bytes` is exact (no sparsifier: no zstd-coded indices; no zstd stage)."""
        return not isinstance(self.support, Sparsifier) and self.entropy is None

    def estimate_bytes(self, dim: int) -> int:
        """Payload bytes for a vector of `dim` entries: exact when `exact_size`, else an upper bound
        (a ``zstd`` stage is applied only when it pays, so it never adds bytes)."""
        if dim < 0 or dim > wire.MAX_DIM:
            raise ValueError(f"dim must be in [0, {wire.MAX_DIM}], got {dim}")
        n = wire.OVERHEAD
        if isinstance(self.support, CountSketch):
            return n + self.support.nbytes(dim)
        if isinstance(self.support, Sparsifier):
            est = n + self.support.support_bytes(dim) + self.value.nbytes(self.support.k(dim))
            return est if self.budget is None else min(est, self.budget.max_bytes)
        return n + self.value.nbytes(dim)

    # -- encode / decode -------------------------------------------------------------
    def encode(self, vec: torch.Tensor, state: State | None = None, checked: bool = False) -> tuple[bytes, State | None]:
        """`vec` (d,) -> (payload, the client's next state).  ValueError for a vector that is not
        (d,) or holds NaN / inf.  `checked`: the caller has seen every entry of `vec` finite
        (`rows_finite`), so that pass is not repeated here."""
        x = _as_vector(vec, checked)
        u = x
        if self.ef and state is not None and RESIDUAL in state:
            e = state[RESIDUAL]
            if not isinstance(e, torch.Tensor) or e.shape != x.shape:
                got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"state[{RESIDUAL!r}] has shape {got}, the vector has shape {tuple(x.shape)}")
            u = _as_vector(x + e.to(torch.float32))
        rng, next_seed = self._rng_for(state)
        kept = None
        if self.budget is None:
            payload = self._encode_plain(u, rng)
        else:
            payload, kept = self._encode_budgeted(u, rng, state)
        if self.ef or next_seed is not None or kept is not None:
            state = dict(state) if state else {}
            if kept is not None:
                state[BUDGET_STATE] = torch.tensor(kept, dtype=torch.int64)
            if self.ef:
                dec = decode_payload(payload)
                state[RESIDUAL] = torch.sub(u, dec, out=dec)  # reuse the decoded buffer
            if next_seed is not None:
                state[RNG_SEED] = torch.tensor(next_seed, dtype=torch.int64)
        return payload, state

    @property
    def plain(self) -> bool:
        """Dense float32, stateless: a payload is the header, the vector's bytes and the checksum."""
        return not self.codecs

    def encode_many(self, vecs: list[torch.Tensor], states: list[State | None]) -> list[tuple[bytes, State | None] | ValueError]:
        """`encode` of each vector with its state, in order: (payload, next state), or the
        ValueError that `encode` raised for it.  The same payloads and states as one `encode`
        per vector; a cohort's vectors that are rows of one matrix are checked for NaN / inf
        in one pass (`rows_finite`), and a plain chain writes them without a per-vector
        pipeline (`wire.assemble_dense`)."""
        runs = _row_runs(vecs)
        ok = _runs_finite(runs, len(vecs))
        out: list[tuple[bytes, State | None] | ValueError] = []
        if self.plain and _LITTLE and runs is not None and all(ok):  # (every row finite implies runs)
            for lo, hi, m in runs:  # each run's rows as numpy views of one array: no per-row tensor call
                d = int(m.shape[1])
                if d > wire.MAX_DIM:
                    raise ValueError(f"vector of {d} entries; a payload holds at most {wire.MAX_DIM}")
                head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.SUPPORT_DENSE, wire.VALUE_F32, d)
                arr = m.detach().numpy()
                out.extend((wire.assemble_dense(head, arr[i]), st) for i, st in zip(range(hi - lo), states[lo:hi]))
            return out
        for v, st, good in zip(vecs, states, ok):
            try:
                out.append(self.encode(v, st, checked=good))
            except ValueError as exc:
                out.append(exc)
        return out

    def decode(self, payload: bytes, dim: int | None = None, out: torch.Tensor | None = None,
               check_finite: bool = True) -> torch.Tensor:
        """Any valid payload (whatever chain made it) -> (d,) float32; `PayloadError` otherwise.
        `out`: a (d,) float32 tensor (a row of a cohort's matrix) to decode into; returned.
        `check_finite`: see `decode_payload`."""
        return decode_payload(payload, dim=dim, out=out, check_finite=check_finite)

    # -- the space linear aggregation sums in ---------------------------------------------
    def summand_width(self, dim: int) -> int:
        """Entries of `summand` for a (d,) update: rows x cols of a count sketch, else d."""
        if isinstance(self.support, CountSketch):
            _, rows, cols = self.support.shape(dim)
            return rows * cols
        return int(dim)

    def summand(self, payload: bytes, dim: int) -> torch.Tensor:
        """What a linear aggregation (the mean, secure aggregation's sum, central DP's clipped
        sum) adds up for one of this chain's payloads: a count sketch's table, flattened
        (sketches are linear: the sum of the tables is the sketch of the sum, unsketched once
        by `from_sum`); for every other chain the decoded (d,) update.  A sketch whose shape,
        seed or k is not this chain's is a `PayloadError` (it could not be summed)."""
        sk = self.support
        if not isinstance(sk, CountSketch):
            return self.decode(payload, dim=dim)
        p = read_sketch(payload, dim=dim)
        k, rows, cols = sk.shape(dim)
        if (p.rows, p.cols, p.seed, p.k) != (rows, cols, sk.seed, k):
            raise PayloadError(f"sketch is {p.rows} x {p.cols} (seed {p.seed}, k {p.k}); this run's {self.spec!r} is "
                               f"{rows} x {cols} (seed {sk.seed}, k {k}) for dim {dim}: it cannot be summed with the others")
        return p.table.reshape(-1)

    def from_sum(self, total: torch.Tensor, dim: int) -> torch.Tensor:
        """The (d,) aggregate from a (weighted) sum of `summand`s: unsketched once for a sketch."""
        sk = self.support
        if not isinstance(sk, CountSketch):
            return total
        k, rows, cols = sk.shape(dim)
        return unsketch(total.detach().to(torch.float32).reshape(rows, cols).clone(), dim, k, sk.seed)

    def _rng_for(self, state: State | None) -> tuple[np.random.Generator | None, int | None]:
        if not self.stochastic:
            return None, None
        if state is not None and RNG_SEED in state:
            seed = int(state[RNG_SEED]) & (2**63 - 1)
            rng = new_rng(seed)
            return rng, int(rng.integers(0, 2**63 - 1))
        return self._rng, None

    def _encode_budgeted(self, u: torch.Tensor, rng, state: State | None) -> tuple[bytes, int]:
        """`budget:N`: the most entries whose payload fits in N bytes (`budget.fit`)."""
        sup, d, cap = self.support, u.numel(), self.budget.max_bytes
        assert isinstance(sup, Sparsifier)  # _validate
        k_max, unit = max(1, sup.k(d)), sup.block
        last = state.get(BUDGET_STATE) if state else None
        if isinstance(last, torch.Tensor) and last.numel() == 1 and 0 < int(last) <= k_max:
            start, warm = int(last), True
        else:  # cold: the largest count whose uncompressed size surely fits
            one, two = (CodecChain([sup.with_count(m * unit), self.value]).estimate_bytes(d) for m in (1, 2))
            per = max(1, two - one)
            start, warm = max(unit, (cap - (one - per)) // per * unit), False
        return fit(lambda k: self._encode_plain(u, rng, sup.with_count(k)), k_max, unit, cap, start, warm)

    def _encode_plain(self, x: torch.Tensor, rng, sup=None) -> bytes:
        d = x.numel()
        sup = self.support if sup is None else sup
        z = self.entropy.level if self.entropy is not None else None
        if isinstance(sup, CountSketch):
            return wire.assemble(sup.wire_id, wire.VALUE_F32, d, sup.write(x))
        if isinstance(sup, Sparsifier):
            idx, section = sup.pick(x, rng)
            vals = torch.from_numpy(x.numpy()[idx])
            scale = sup.scale(d, idx.shape[0])
            if scale != 1.0:
                vals.mul_(scale)
                _as_vector(vals)
            return wire.assemble(sup.wire_id, self.value.wire_id, d, section + self.value.write(vals, rng), zstd_level=z)
        return wire.assemble(wire.SUPPORT_DENSE, self.value.wire_id, d, self.value.write(x, rng), zstd_level=z)


def _validate(stages: list[Stage]) -> None:
    spec = " | ".join(c.spec for c in stages)
    budgets = [i for i, c in enumerate(stages) if c.role == "budget"]
    if budgets:
        if budgets != [len(stages) - 1]:
            raise ValueError(f"'budget' must be the last element of a chain, once (it bounds the finished payload); in {spec!r}")
        if not any(c.role == "sparsifier" for c in stages):
            raise ValueError(f"'budget' in {spec!r} needs a sparsifier to adjust (e.g. 'ef | topk:0.2,block=16 | q2 | zstd | budget:384')")
        stages = stages[:-1]
    for i, c in enumerate(stages):
        if c.role == "ef" and i > 0:
            raise ValueError(f"'ef' must be the first element of a chain (it wraps what follows), found at position {i + 1} in {spec!r}")
    for i, c in enumerate(stages):
        if c.role == "entropy" and i != len(stages) - 1:
            raise ValueError(
                f"'zstd' must be the last element of a chain (it codes the finished payload), found at position {i + 1} in {spec!r}"
            )
    body = stages[1:] if stages and stages[0].role == "ef" else stages
    if body and body[-1].role == "entropy":
        body = body[:-1]
        if any(c.role == "sketch" for c in body):
            raise ValueError(
                f"nothing may follow 'sketch' in {spec!r} (found 'zstd'): the server adds sketch tables as sent, "
                "and float32 tables of hashed sums do not compress"
            )
    supports = [c for c in body if c.role in ("sparsifier", "sketch")]
    values = [c for c in body if c.role == "value"]
    if len(supports) > 1:
        raise ValueError(
            f"{spec!r} has {len(supports)} sparsifiers/sketches ({', '.join(repr(c.spec) for c in supports)}); a chain has at most one"
        )
    if len(values) > 1:
        raise ValueError(
            f"{spec!r} has {len(values)} value codecs ({', '.join(repr(c.spec) for c in values)}); a chain has at most one of "
            "none, fp16, bf16, q8, q4, q2, sign"
        )
    if supports and values:
        s, v = body.index(supports[0]), body.index(values[0])
        if supports[0].role == "sketch":
            raise ValueError(
                f"nothing may follow 'sketch' in {spec!r} (found {values[0].spec!r}): sketch tables are sent as float32 "
                "so that the server can add them up"
            )
        if v < s:
            raise ValueError(
                f"{values[0].spec!r} comes before {supports[0].spec!r} in {spec!r}; the sparsifier goes first and the "
                f"value codec codes the kept values, e.g. '{supports[0].spec} | {values[0].spec}'"
            )
    if stages and stages[0].role == "ef" and any(getattr(c, "coverage", False) for c in supports):
        raise ValueError(
            f"'ef' cannot wrap {supports[0].spec!r} in {spec!r}: the server averages each coordinate over the clients that "
            "sent it, so what one client leaves out is estimated from the others; a residual would send it a second time. "
            "Drop 'ef'"
        )
    if stages and stages[0].role == "ef" and not any(c.lossy for c in body):
        raise ValueError(
            f"'ef' needs a lossy codec after it (e.g. 'ef | topk:0.01 | q8'); in {spec!r} the rest is lossless, "
            "so the residual would always be zero"
        )


def _parse_stage(part: str, spec: str) -> Stage:
    name, colon, argtext = part.partition(":")
    name = name.strip().lower()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} in {spec!r}; allowed: {', '.join(sorted(CODECS))}")
    positional: list[str] = []
    options: dict[str, str] = {}
    if colon:
        if not argtext.strip():
            raise ValueError(f"codec {name!r} in {spec!r}: ':' must be followed by arguments")
        for tok in argtext.split(","):
            tok = tok.strip()
            if not tok:
                raise ValueError(f"codec {name!r} in {spec!r}: empty argument between commas")
            key, eq, val = tok.partition("=")
            if eq:
                key, val = key.strip().lower(), val.strip()
                if not key or not val:
                    raise ValueError(f"codec {name!r} in {spec!r}: argument {tok!r} must be key=value")
                if key in options:
                    raise ValueError(f"codec {name!r} in {spec!r}: option {key!r} given twice")
                options[key] = val
            else:
                positional.append(tok.lower() if tok.isalpha() else tok)
    return CODECS[name](positional, options)


def parse_chain(spec: str, seed: int = 0) -> CodecChain:
    """``"name[:args] | name[:args]"`` -> a CodecChain.

    Unknown codecs, bad arguments and nonsensical chains are a ValueError that
    names the codec, the argument and what is allowed.  `seed` seeds the chain's
    own generator (used by stochastic codecs when the state brings no seed).
    """
    if not isinstance(spec, str):
        raise ValueError(f"a codec chain is a string like 'topk:0.01 | q8', got {type(spec).__name__}")
    if not spec.strip():
        return CodecChain([], seed=seed)
    parts = spec.split("|")
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty element in codec chain {spec!r}; elements are separated by single '|'")
    return CodecChain([_parse_stage(p, spec) for p in parts], seed=seed)


def estimate_bytes(spec: str, dim: int) -> int:
    """Payload bytes of `spec` for a `dim`-vector.

    Exact for chains without a sparsifier (none, fp16, bf16, q8/q4/q2, sign,
    sketch, with or without ef).  For topk/randk it is an upper bound: the
    indices are counted at 4 bytes each, while the real payload uses 1- or 2-byte
    gaps and zstd whenever they are smaller.
    """
    return parse_chain(spec).estimate_bytes(dim)


def payload_support(payload: bytes, dim: int) -> np.ndarray | None:
    """The sorted entry indices a payload carries values for; None for a dense one (every
    entry).  `PayloadError` for a malformed payload, a sketch, or one for another `dim`."""
    got = payload_blocks(payload, dim)
    if got is None:
        return None
    blocks, block = got
    return blocks if block == 1 else block_entries(blocks, block, dim)


def payload_blocks(payload: bytes, dim: int) -> tuple[np.ndarray, int] | None:
    """`payload_support` as (sorted block numbers, block size): the support is those blocks of
    `block` entries, the last cut at `dim` (topk, randk: blocks of 1).  The cheap form: a
    subset payload's blocks are regenerated from its seed and never expanded to entries."""
    h, r = wire.read_header(payload, dim=dim)
    if h.support == wire.SUPPORT_DENSE:
        return None
    if h.support == wire.SUPPORT_SKETCH:
        raise PayloadError("a sketch payload has no support: its table is summed, not averaged per coordinate")
    return read_support_blocks(r, h.support, h.dim)


def _read_sparse(h, r) -> tuple[np.ndarray, torch.Tensor]:
    """A sparse payload's (sorted entry indices, their values), the reader finished."""
    idx = read_support(r, h.support, h.dim)
    vals = read_values(h.value, r, idx.shape[0])
    r.finish()
    return idx, vals


def _scatter(out: torch.Tensor, idx: np.ndarray, vals: torch.Tensor) -> torch.Tensor:
    """`vals` at `idx` of the CPU float32 vector `out`, zeros elsewhere (numpy's scatter: about
    twice torch's indexed assignment on a row of a cohort's matrix)."""
    row = out.numpy()
    row.fill(0.0)
    row[idx] = vals.numpy()
    return out


def decode_payload(payload: bytes, dim: int | None = None, out: torch.Tensor | None = None,
                   check_finite: bool = True) -> torch.Tensor:
    """Decodes any payload a CodecChain produced; `PayloadError` with the reason otherwise.

    Pass `dim` (the model's dimension) when it is known: a payload for another
    dimension is then refused before anything of that size is allocated.  `out` (a
    float32 tensor of the payload's dim, e.g. a row of a cohort's matrix) receives the
    vector and is returned: a dense float32 payload is read straight into it, and with
    `check_finite=False` its values are not checked for NaN / inf here (the caller checks
    the cohort's rows at once: the intake's finite validator).  Every other payload is
    always checked (its decoding does arithmetic on the values).
    """
    if out is not None:
        if out.dtype != torch.float32 or out.dim() != 1 or (dim is not None and out.numel() != dim):
            raise ValueError(f"out must be a float32 vector of dim {dim}, got {out.dtype} {tuple(out.shape)}")
        dim = out.numel()
    h, r = wire.read_header(payload, dim=dim)  # checks dim before decompressing a zstd body
    if out is not None:
        if h.support == wire.SUPPORT_DENSE and h.value == wire.VALUE_F32:
            read_f32_into(r, out, check_finite)
            r.finish()
            return out
        if h.support not in (wire.SUPPORT_DENSE, wire.SUPPORT_SKETCH):  # sparse: scattered into the row
            return _scatter(out, *_read_sparse(h, r))
        return out.copy_(decode_payload(payload, dim=dim))
    try:
        if h.support == wire.SUPPORT_DENSE:
            out = read_values(h.value, r, h.dim)
            r.finish()
            return out
        if h.support == wire.SUPPORT_SKETCH:
            if h.value != wire.VALUE_F32:
                raise PayloadError(f"sketch tables are float32; payload announces value codec {h.value}")
            rows, cols, seed, k = read_sketch_section(r, h.dim)
            table = read_values(wire.VALUE_F32, r, rows * cols).view(rows, cols)
            r.finish()
            return unsketch(table, h.dim, k, seed)
        idx, vals = _read_sparse(h, r)
        return _scatter(torch.empty(h.dim, dtype=torch.float32), idx, vals)
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as RuntimeError
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
            raise
        raise PayloadError(f"payload announces dim {h.dim}, too large to allocate; pass dim= to decode") from None
