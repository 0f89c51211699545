"""Value codecs: how a dense run of float32 values becomes bytes.

A value codec codes either the whole vector or, after a sparsifier, the kept
values.  Each states the error bound that ``max_abs_error`` returns and that the
tests check on ``decode(encode(x))``.

Hot paths work chunk by chunk (`CHUNK` elements) into preallocated outputs:
no Python loop over elements, and no vector-sized temporaries.
"""

from __future__ import annotations

import math
import struct
import sys

import numpy as np
import torch

from ..params import PayloadError
from . import wire
from .base import CHUNK, Stage, parse_int, unknown_options
from .wire import Reader

_LITTLE = sys.byteorder == "little"
_F16_LIMIT = 65520.0  # values at or above round to inf in fp16
_BF16_LIMIT = float.fromhex("0x1.ff8p127")  # values at or above round to inf in bf16
_F32_MAX = float(np.finfo(np.float32).max)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _absmax(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _check_finite_out(out: torch.Tensor, what: str) -> torch.Tensor:
    if out.numel():
        lo, hi = torch.aminmax(out)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise PayloadError(f"{what} holds non-finite values; an encoder never produces them")
    return out


def _le(a: np.ndarray, dtype: str) -> np.ndarray:
    return a if _LITTLE else a.astype(dtype)


class ValueCodec(Stage):
    role = "value"
    wire_id: int

    def nbytes(self, n: int) -> int:
        """Exact size of the value section for n values."""
        raise NotImplementedError

    def write(self, x: torch.Tensor, rng: np.random.Generator | None) -> list:
        """Buffers of the value section for a contiguous float32 vector (finite)."""
        raise NotImplementedError

    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |x - decode(encode(x))| when this codec codes x."""
        raise NotImplementedError


def read_values(value_id: int, r: Reader, n: int) -> torch.Tensor:
    """Decodes a value section of n values; the reader knows where the payload ends."""
    return _READERS[value_id](r, n)


# -- float32 -----------------------------------------------------------------------
class Float32Codec(ValueCodec):
    """Plain little-endian float32: lossless, 4 bytes a value."""

    name = "none"
    lossy = False
    wire_id = wire.VALUE_F32

    def nbytes(self, n: int) -> int:
        return 4 * n

    def write(self, x, rng):
        return [memoryview(_le(_np(x), "<f4")).cast("B")]

    def max_abs_error(self, x):
        return torch.zeros_like(x)


def _read_f32(r: Reader, n: int) -> torch.Tensor:
    return read_f32_into(r, torch.empty(n, dtype=torch.float32))


def read_f32_into(r: Reader, out: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """A float32 value section of out.numel() values, read into `out` (contiguous or a row).
    `check_finite=False`: the caller checks the values (a cohort's rows at once)."""
    n = out.numel()
    buf = r.take(4 * n, f"{n} float32 values")
    np.copyto(_np(out), np.frombuffer(buf, dtype="<f4"))
    return _check_finite_out(out, "float32 section") if check_finite else out


# -- fp16 / bf16 ---------------------------------------------------------------------
class Float16Codec(ValueCodec):
    """IEEE half precision, round to nearest even.

    Bound: |x - x^| <= max(2^-11 |x|, 2^-25) (unit roundoff, subnormal spacing / 2).
    Values with |x| >= 65520 would become inf: encode refuses them (use bf16).
    """

    name = "fp16"
    lossy = True
    wire_id = wire.VALUE_F16

    def nbytes(self, n):
        return 2 * n

    def write(self, x, rng):
        m = _absmax(x)
        if m >= _F16_LIMIT:
            raise ValueError(f"fp16 cannot represent |x| = {m:.6g} (max 65504); use bf16 or a quantizer")
        h = torch.empty(x.numel(), dtype=torch.float16)
        h.copy_(x)
        return [memoryview(_le(_np(h), "<f2")).cast("B")]

    def max_abs_error(self, x):
        return torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)


def _read_f16(r: Reader, n: int) -> torch.Tensor:
    src = np.frombuffer(r.take(2 * n, f"{n} fp16 values"), dtype="<f2")
    out = torch.empty(n, dtype=torch.float32)
    scratch = torch.empty(min(n, CHUNK), dtype=torch.float16)
    sn = _np(scratch)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        np.copyto(sn[: e - s], src[s:e])  # a writable copy: torch refuses read-only buffers
        out[s:e].copy_(scratch[: e - s])
    return _check_finite_out(out, "fp16 section")


class BFloat16Codec(ValueCodec):
    """bfloat16 (float32 with the low 16 mantissa bits rounded off, nearest even).

    Bound: |x - x^| <= max(2^-8 |x|, 2^-134).  Same range as float32.
    """

    name = "bf16"
    lossy = True
    wire_id = wire.VALUE_BF16

    def nbytes(self, n):
        return 2 * n

    def write(self, x, rng):
        m = _absmax(x)
        if m >= _BF16_LIMIT:
            raise ValueError(f"bf16 cannot represent |x| = {m:.6g} (it would round to inf)")
        h = torch.empty(x.numel(), dtype=torch.bfloat16)
        h.copy_(x)
        return [memoryview(_le(_np(h.view(torch.int16)), "<i2")).cast("B")]

    def max_abs_error(self, x):
        return torch.clamp(x.abs() * 2.0**-8, min=2.0**-134)


def _read_bf16(r: Reader, n: int) -> torch.Tensor:
    src = np.frombuffer(r.take(2 * n, f"{n} bf16 values"), dtype="<u2")
    out = torch.empty(n, dtype=torch.float32)
    o32 = _np(out).view(np.uint32)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        o = o32[s:e]
        o[:] = src[s:e]
        o <<= 16  # bf16 is the top half of a float32
    return _check_finite_out(out, "bf16 section")


# -- uniform quantizer -----------------------------------------------------------------
_QHEAD = struct.Struct("<BBI")  # bits, flags (bit 0: stochastic, bit 1: dither), block
_QSEED = struct.Struct("<Q")  # the dither seed, after the header when flag bit 1 is set
_Q_STOCHASTIC, _Q_DITHER = 1, 2
_ROUNDINGS = ("nearest", "stochastic", "dither")


def dither(seed: int, start: int, count: int) -> np.ndarray:
    """The dither of values start..start+count-1 of a section seeded with ``seed``: float32
    in [0, 1), the top 24 bits of `wire.counter_hash` times 2^-24."""
    z = wire.counter_hash(seed, start, count)
    z >>= np.uint64(40)
    u = z.astype(np.uint32).astype(np.float32)  # 24-bit integers: exact, and faster than from uint64
    u *= np.float32(2.0**-24)
    return u


class UniformQuantizer(ValueCodec):
    """Uniform b-bit quantization with one float32 scale per block (b in 8, 4, 2).

    Each block of ``block`` values with max |x| = s gets the 2^b-level grid
    ``x^ = (j - c) * step``, j in 0..2^b-1, c = (2^b-1)/2, step = 2s/(2^b-1), which
    covers [-s, s] with the two ends exact.  Deterministic rounding (nearest level):
    |x - x^| <= step/2 = s/(2^b-1).  Stochastic rounding (``stochastic``) rounds up
    with probability equal to the distance to the lower level, so E[x^] = x
    (unbiased, as in QSGD, Alistarh et al. 2017, Lemma 3.1, with a per-block max
    scale instead of the norm) and |x - x^| < step.  Subtractive dither (``dither``)
    sends the same codes, j = floor(x/step + c + u) with u uniform in [0, 1), but u comes
    from a seed the section carries, so the decoder subtracts it again:
    x^ = (j - c + 1/2 - u) * step.  The error is then uniform in (-step/2, step/2],
    independent of x (Schuchman 1964; Gray and Stockham 1993): unbiased like stochastic
    rounding, bounded like nearest rounding, and its variance step^2/12 is a third of
    stochastic rounding's for a value half-way between two levels (step^2/4, where the
    many small values of a 2-bit block sit: its levels are +-step/2 and +-3 step/2), a half
    on average over a level's interval.  It costs 8 bytes (the seed) per section, and the
    decoded values leave the grid (zstd codes the codes, which are the same).
    ``max_abs_error`` adds float32 rounding slack: step * 2^-12 plus 2^-120 absolute for
    blocks so small that their step underflows.

    Wire: bits, flags (bit 0 stochastic, bit 1 dither), block, then the 8-byte dither
    seed when dithered, then ceil(n/block) float32 steps, then ceil(n*b/8) bytes of codes
    (8/b codes a byte, first code in the high bits).  The dither of value i is
    `dither(seed, i, 1)`.
    """

    lossy = True
    wire_id = wire.VALUE_QUANT
    DEFAULT_BLOCK = 256
    MAX_BLOCK = 1 << 16

    def __init__(self, bits: int, block: int = DEFAULT_BLOCK, stochastic: bool = False, rounding: str | None = None):
        if bits not in (8, 4, 2):
            raise ValueError(f"quantizer bits must be 8, 4 or 2, got {bits}")
        if not 1 <= block <= self.MAX_BLOCK:
            raise ValueError(f"codec 'q{bits}': block={block} is not allowed; block must be an integer in [1, {self.MAX_BLOCK}]")
        rounding = rounding if rounding is not None else ("stochastic" if stochastic else "nearest")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"codec 'q{bits}': rounding {rounding!r} is not one of {', '.join(_ROUNDINGS)}")
        self.bits, self.block, self.rounding = bits, block, rounding
        self.stochastic = rounding != "nearest"  # draws from the client's generator
        self.dither = rounding == "dither"
        self.levels = (1 << bits) - 1

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"q{self.bits}"

    def args(self):
        a = []
        if self.block != self.DEFAULT_BLOCK:
            a.append(f"block={self.block}")
        if self.rounding != "nearest":
            a.append(self.rounding)
        return a

    @classmethod
    def factory(cls, bits: int):
        def make(positional: list[str], options: dict[str, str]) -> "UniformQuantizer":
            name = f"q{bits}"
            rounding = "nearest"
            for p in positional:
                if p in ("stochastic", "dither"):
                    if rounding != "nearest":
                        raise ValueError(
                            f"codec {name!r}: '{rounding}' and '{p}' are two roundings; give one "
                            f"('dither' sends the codes of 'stochastic' and subtracts the dither when decoding)"
                        )
                    rounding = p
                else:
                    raise ValueError(
                        f"codec {name!r}: unknown argument {p!r}; allowed: 'stochastic', 'dither' and 'block=N' "
                        f"(N an integer in [1, {cls.MAX_BLOCK}], default {cls.DEFAULT_BLOCK}), e.g. '{name}:block=128,dither'"
                    )
            opts = dict(options)
            block = parse_int(name, "block", opts.pop("block"), 1, cls.MAX_BLOCK) if "block" in opts else cls.DEFAULT_BLOCK
            unknown_options(name, opts, f"block=N (an integer in [1, {cls.MAX_BLOCK}], default {cls.DEFAULT_BLOCK}), stochastic or dither")
            return cls(bits, block, rounding=rounding)

        return make

    def nbytes(self, n):
        return _QHEAD.size + (_QSEED.size if self.dither else 0) + 4 * (-(-n // self.block)) + (n * self.bits + 7) // 8

    def max_abs_error(self, x):
        n, B = x.numel(), self.block
        nb = -(-n // B)
        xp = torch.zeros(nb * B)
        xp[:n] = x.abs()
        step = xp.view(nb, B).amax(1) * (2.0 / self.levels)
        per = (step * ((1.0 if self.rounding == "stochastic" else 0.5) + 2.0**-12) + 2.0**-120).repeat_interleave(B)
        return per[:n]

    def _chunk_blocks(self) -> int:
        # Whole blocks per chunk, a multiple of 8 so every chunk packs into whole bytes.
        bpc = max(1, CHUNK // self.block)
        return -(-bpc // 8) * 8

    def write(self, x, rng):
        n, B, bits = x.numel(), self.block, self.bits
        nb = -(-n // B)
        steps = torch.empty(nb, dtype=torch.float32)
        bpc = self._chunk_blocks()
        clen = bpc * B
        codes = np.empty((nb * B * bits + 7) // 8 + clen, dtype=np.uint8)  # slack for the padded last chunk
        codes_t = torch.from_numpy(codes)
        y = torch.empty(min(clen, nb * B) + 8, dtype=torch.float32)  # + 8: room to pad the last byte
        q = torch.empty(y.numel(), dtype=torch.uint8)
        u = np.empty(y.numel(), dtype=np.float32) if self.rounding == "stochastic" else None
        seed = int(rng.bit_generator.random_raw()) if self.dither else 0
        c, levels = self.levels / 2.0, float(self.levels)
        per_byte = 8 // bits
        for b0 in range(0, nb, bpc):
            b1 = min(nb, b0 + bpc)
            s, e = b0 * B, min(n, b1 * B)
            cnt = (b1 - b0) * B
            yv = y[:cnt]
            if e - s == cnt:
                xb = x[s:e].view(-1, B)
            else:  # last, partial block: zero-pad a copy
                yv.zero_()
                yv[: e - s].copy_(x[s:e])
                xb = yv.view(-1, B).clone()
            yb = yv.view(-1, B)
            torch.abs(xb, out=yb)
            step = yb.amax(1).mul_(2.0 / levels)
            steps[b0:b1] = step
            inv = step.reciprocal().nan_to_num_(posinf=0.0)  # step 0 or subnormal: everything maps to the centre
            torch.mul(xb, inv.unsqueeze(1), out=yb)
            yv.add_(c)
            if self.dither:
                yv.add_(torch.from_numpy(dither(seed, s, cnt))).floor_()
            elif self.stochastic:
                rng.random(dtype=np.float32, out=u[:cnt])
                yv.add_(torch.from_numpy(u[:cnt])).floor_()
            else:
                yv.round_()
            yv.clamp_(0.0, levels)
            qv = q[:cnt]
            qv.copy_(yv)
            o0 = s * bits // 8
            nbytes = -(-cnt // per_byte)
            dst = codes_t[o0 : o0 + nbytes]
            if bits == 8:
                dst.copy_(qv)
            else:
                qq = qv.view(-1, per_byte) if cnt % per_byte == 0 else torch.cat([qv, qv.new_zeros(per_byte - cnt % per_byte)]).view(-1, per_byte)
                torch.bitwise_left_shift(qq[:, 0], 8 - bits, out=dst)
                for j in range(1, per_byte):
                    dst.bitwise_or_(torch.bitwise_left_shift(qq[:, j], 8 - bits * (j + 1)))
        flags = {"nearest": 0, "stochastic": _Q_STOCHASTIC, "dither": _Q_DITHER}[self.rounding]
        head = _QHEAD.pack(bits, flags, B) + (_QSEED.pack(seed) if self.dither else b"")
        return [head, memoryview(_le(_np(steps), "<f4")).cast("B"), memoryview(codes[: (n * bits + 7) // 8])]


def _read_quant(r: Reader, n: int) -> torch.Tensor:
    bits, flags, B = r.unpack(_QHEAD, "quantizer header")
    if bits not in (8, 4, 2):
        raise PayloadError(f"quantizer section announces {bits} bits; allowed 8, 4, 2")
    if not 1 <= B <= UniformQuantizer.MAX_BLOCK:
        raise PayloadError(f"quantizer section announces block {B}; allowed 1..{UniformQuantizer.MAX_BLOCK}")
    if flags & ~(_Q_STOCHASTIC | _Q_DITHER):
        raise PayloadError(f"quantizer section has unknown flags {flags:#x}")
    if flags == _Q_STOCHASTIC | _Q_DITHER:
        raise PayloadError("quantizer section is flagged both stochastic and dithered; an encoder sets one")
    dithered = bool(flags & _Q_DITHER)
    seed = r.unpack(_QSEED, "quantizer dither seed")[0] if dithered else 0
    nb = -(-n // B)
    steps_np = np.frombuffer(r.take(4 * nb, f"{nb} quantizer scales"), dtype="<f4")
    codes = np.frombuffer(r.take((n * bits + 7) // 8, f"{n} {bits}-bit codes"), dtype=np.uint8)
    steps = torch.from_numpy(steps_np.astype(np.float32))  # a writable copy (small)
    levels = (1 << bits) - 1
    c = levels / 2.0
    # x^ = (j - c) * step with |j - c| <= c (c + 1/2 dithered): an encoder's steps keep every value finite.
    reach = c + 0.5 if dithered else c
    if nb and not (bool(torch.isfinite(steps).all()) and float(steps.min()) >= 0.0 and float(steps.max()) * reach <= _F32_MAX):
        raise PayloadError("quantizer scales must be finite, >= 0 and small enough that every level is finite")
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    out = torch.empty(n, dtype=torch.float32)
    bpc = max(1, CHUNK // B)
    bpc = -(-bpc // 8) * 8
    clen = bpc * B
    pbuf = np.empty(clen // per_byte + 1, dtype=np.uint8)
    q = torch.empty(min(clen, nb * B) + 8, dtype=torch.uint8)  # + 8: room to unpack a partial last byte
    y = torch.empty(q.numel(), dtype=torch.float32)
    for b0 in range(0, nb, bpc):
        b1 = min(nb, b0 + bpc)
        s, e = b0 * B, min(n, b1 * B)
        cnt = (b1 - b0) * B
        o0, o1 = s * bits // 8, (e * bits + 7) // 8
        nbytes = o1 - o0
        pbuf[:nbytes] = codes[o0:o1]
        p = torch.from_numpy(pbuf[:nbytes])
        qv = q[: nbytes * per_byte]
        if bits == 8:
            qv.copy_(p)
        else:
            qq = qv.view(-1, per_byte)
            for j in range(per_byte):
                torch.bitwise_right_shift(p, 8 - bits * (j + 1), out=qq[:, j])
            qv.bitwise_and_(mask)
        full = e - s == cnt
        yv = out[s:e] if full else y[:cnt]
        if not full:
            yv.zero_()
        yv[: e - s].copy_(qv[: e - s])
        if dithered:  # j - c + 1/2 - u
            yv.sub_(c - 0.5).sub_(torch.from_numpy(dither(seed, s, cnt)))
        else:
            yv.sub_(c)
        yv.view(-1, B).mul_(steps[b0:b1].unsqueeze(1))
        if not full:
            out[s:e].copy_(yv[: e - s])
    return out


# -- sign ------------------------------------------------------------------------------
_SHEAD = struct.Struct("<I")


class SignCodec(ValueCodec):
    """1-bit sign with a mean-magnitude scale: x^ = s * sign(x), s = ||x||_1 / n.

    signSGD with the scaled sign of EF-signSGD (Karimireddy et al. 2019, Alg. 1,
    C(x) = ||x||_1/d * sign(x)).  With ``block=N`` the scale is per block of N
    values; the default (block 0) is one scale for the whole vector, as in the paper.
    sign(0) is +.  The error is an identity, per block (Karimireddy et al. 2019,
    Lemma 8): ||x - x^||^2 = ||x||^2 - ||x||_1^2 / n <= ||x||^2, so it is never
    larger than the input; elementwise |x - x^| <= |x| + s (``max_abs_error``).

    Wire: block (uint32, 0 = one block), float32 scales, then ceil(n/8) bytes of
    sign bits (np.packbits order, 1 = non-negative).
    """

    name = "sign"
    lossy = True
    wire_id = wire.VALUE_SIGN
    MAX_BLOCK = 1 << 24

    def __init__(self, block: int = 0):
        if not 0 <= block <= self.MAX_BLOCK:
            raise ValueError(f"codec 'sign': block={block} is not allowed; block must be an integer in [0, {self.MAX_BLOCK}]")
        self.block = block

    def args(self):
        return [f"block={self.block}"] if self.block else []

    @classmethod
    def from_args(cls, positional, options):
        if positional:
            raise ValueError(f"codec 'sign': unknown argument {positional[0]!r}; allowed: block=N (an integer in [0, {cls.MAX_BLOCK}], 0 = one scale for the whole vector)")
        opts = dict(options)
        block = parse_int("sign", "block", opts.pop("block"), 0, cls.MAX_BLOCK) if "block" in opts else 0
        unknown_options("sign", opts, f"block=N (an integer in [0, {cls.MAX_BLOCK}], 0 = one scale for the whole vector)")
        return cls(block)

    @staticmethod
    def _blocks(n: int, block: int) -> tuple[int, int]:
        B = block or max(n, 1)
        return B, -(-n // B)

    def nbytes(self, n):
        _, nb = self._blocks(n, self.block)
        return _SHEAD.size + 4 * nb + (n + 7) // 8

    def _chunk(self, n: int) -> int:
        """Elements per chunk: whole blocks and whole bytes of sign bits."""
        if self.block == 0:
            return CHUNK
        return -(-max(1, CHUNK // self.block) // 8) * 8 * self.block

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """Per-block mean |x| (float64 accumulation, stored as float32)."""
        n = x.numel()
        B, nb = self._blocks(n, self.block)
        sums = torch.zeros(nb, dtype=torch.float64)
        step = self._chunk(n)
        a = torch.empty(min(n, step))
        for s in range(0, n, step):
            e = min(n, s + step)
            av = torch.abs(x[s:e], out=a[: e - s])
            if self.block == 0:
                sums += av.sum(dtype=torch.float64)
                continue
            b0, full = s // B, (e - s) // B
            if full:
                sums[b0 : b0 + full] = av[: full * B].view(full, B).sum(1, dtype=torch.float64)
            if full * B < e - s:
                sums[b0 + full] = av[full * B :].sum(dtype=torch.float64)
        counts = torch.full((nb,), float(B), dtype=torch.float64)
        if nb and n % B:
            counts[-1] = n % B
        return (sums / counts).to(torch.float32)

    def max_abs_error(self, x):
        n = x.numel()
        B, nb = self._blocks(n, self.block)
        s = self.scales(x).repeat_interleave(B)[:n]
        return x.abs() + s

    def write(self, x, rng):
        n = x.numel()
        sc = self.scales(x)
        bits = np.empty((n + 7) // 8, dtype=np.uint8)
        xn = _np(x)
        ge = np.empty(min(n, CHUNK), dtype=bool)
        for s in range(0, n, CHUNK):  # CHUNK is a multiple of 8: chunks pack into whole bytes
            e = min(n, s + CHUNK)
            np.greater_equal(xn[s:e], 0.0, out=ge[: e - s])
            bits[s // 8 : (e + 7) // 8] = np.packbits(ge[: e - s])
        return [_SHEAD.pack(self.block), memoryview(_le(_np(sc), "<f4")).cast("B"), memoryview(bits)]


def _read_sign(r: Reader, n: int) -> torch.Tensor:
    (block,) = r.unpack(_SHEAD, "sign header")
    if block > SignCodec.MAX_BLOCK:
        raise PayloadError(f"sign section announces block {block}; allowed 0..{SignCodec.MAX_BLOCK}")
    B, nb = SignCodec._blocks(n, block)
    sc = torch.from_numpy(np.frombuffer(r.take(4 * nb, f"{nb} sign scales"), dtype="<f4").astype(np.float32))
    if nb and not (bool(torch.isfinite(sc).all()) and float(sc.min()) >= 0.0):
        raise PayloadError("sign scales must be finite and >= 0")
    bits = np.frombuffer(r.take((n + 7) // 8, f"{n} sign bits"), dtype=np.uint8)
    out = torch.empty(n, dtype=torch.float32)
    # Chunks of whole blocks (and whole bytes), so each chunk multiplies by its own scales.
    step = SignCodec(block)._chunk(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        o = out[s:e]
        o.copy_(torch.from_numpy(np.unpackbits(bits[s // 8 : (e + 7) // 8], count=e - s)))
        o.mul_(2.0).sub_(1.0)
        if block == 0:
            o.mul_(sc[0])
        else:
            b0 = s // B
            full = (e - s) // B
            if full:
                o[: full * B].view(full, B).mul_(sc[b0 : b0 + full].unsqueeze(1))
            if full * B < e - s:
                o[full * B :].mul_(sc[b0 + full])
    return out


_READERS = {
    wire.VALUE_F32: _read_f32,
    wire.VALUE_F16: _read_f16,
    wire.VALUE_BF16: _read_bf16,
    wire.VALUE_QUANT: _read_quant,
    wire.VALUE_SIGN: _read_sign,
}
