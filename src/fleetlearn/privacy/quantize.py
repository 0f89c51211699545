"""Quantization of float updates into the ring Z_{2^k} for secure aggregation
(Bonawitz et al., CCS 2017: inputs are vectors in Z_R; here R = 2^k).

A value x is clipped to [-c, c], scaled by ``s = L / c`` and rounded to an
integer in [-L, L] (stochastic rounding ``floor(x s + U[0, 1))`` is unbiased;
deterministic rounding is round-to-nearest), then stored in two's complement
mod 2^k.  Arithmetic is in uint64 with wrap-around and a final ``& (2^k - 1)``,
which is exact mod 2^k because 2^k divides 2^64.

Headroom (no wrap-around): L = floor((2^(k-1) - 1) / n_max), rounded down to
an even number.  A sum of at most n_max clients then lies in
[-n_max L, n_max L], inside (-2^(k-1), 2^(k-1)), so reading the field sum as a
signed k-bit integer recovers it exactly.  With k = 32 and n_max = 1000,
L ~ 2.1e6 levels per client.  L is even so that 1/2 (the centered clip
indicator of adaptive clipping) is represented exactly when c = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROUNDING = ("stochastic", "deterministic")


def field_mask(modulus_bits: int) -> np.uint64:
    """2^k - 1: ``v & mask`` reduces a uint64 value mod 2^k."""
    return np.uint64((1 << modulus_bits) - 1)


def check_modulus_bits(modulus_bits: int) -> int:
    """k for the ring Z_{2^k}: an integer in [8, 62] (uint64 arithmetic with headroom)."""
    k = int(modulus_bits)
    if k != modulus_bits or not (8 <= k <= 62):
        raise ValueError(f"modulus_bits must be an integer in [8, 62], got {modulus_bits!r}")
    return k


def check_field(vec: np.ndarray, modulus_bits: int) -> np.ndarray:
    """A field vector as uint64, checked to lie in [0, 2^k)."""
    a = np.asarray(vec)
    if a.dtype.kind not in "ui":
        raise ValueError(f"field vectors must be integer arrays, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError("field vectors must be non-negative (elements of Z_{2^k})")
    a = a.astype(np.uint64, copy=False)
    if a.size and int(a.max()) >> modulus_bits:
        raise ValueError(f"field vector has elements >= 2^{modulus_bits}")
    return a


class Quantizer:
    """Float <-> Z_{2^k} with headroom for the sum of `max_clients` inputs
    (see the module docstring for the bound)."""

    def __init__(self, clip_range: float, max_clients: int, modulus_bits: int = 32, rounding: str = "stochastic"):
        c = float(clip_range)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {clip_range!r}")
        if int(max_clients) < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")
        if rounding not in ROUNDING:
            raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
        self.modulus_bits = check_modulus_bits(modulus_bits)
        self.max_clients = int(max_clients)
        levels = ((1 << (self.modulus_bits - 1)) - 1) // self.max_clients
        levels -= levels % 2
        if levels < 2:
            raise ValueError(f"modulus 2^{self.modulus_bits} leaves no headroom for {self.max_clients} clients; raise modulus_bits")
        self.levels = levels
        self.clip_range = c
        self.scale = levels / c
        self.rounding = rounding
        self.mask = field_mask(self.modulus_bits)

    def max_l2_error(self, dim: int) -> float:
        """Upper bound on ||dequantize(quantize(x)) - x|| for a (dim,) vector
        already within the range: below 1/s per coordinate (1/(2s) when rounding
        deterministically)."""
        per = (0.5 if self.rounding == "deterministic" else 1.0) / self.scale
        return math.sqrt(dim) * per

    def quantize(self, x, rng: np.random.Generator | None = None) -> np.ndarray:
        """Float array (any shape; torch or numpy) -> uint64 elements of Z_{2^k}."""
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        a = a.astype(np.float64, copy=False)
        if not np.isfinite(a).all():
            raise ValueError("cannot quantize non-finite values (NaN or inf)")
        scaled = np.clip(a, -self.clip_range, self.clip_range) * self.scale
        if self.rounding == "stochastic":
            if rng is None:
                rng = np.random.default_rng()
            ints = np.floor(scaled + rng.random(scaled.shape))
        else:
            ints = np.rint(scaled)
        # Clip in the integer domain: above 2^53 levels, float64 cannot hold L exactly.
        ints = np.clip(ints.astype(np.int64), -self.levels, self.levels)
        return ints.astype(np.uint64) & self.mask  # two's complement mod 2^k

    def to_signed(self, field_vec) -> np.ndarray:
        """Elements of Z_{2^k} read as signed k-bit integers (int64)."""
        v = check_field(field_vec, self.modulus_bits)
        half = np.uint64(1 << (self.modulus_bits - 1))
        out = v.astype(np.int64)
        return np.where(v >= half, out - np.int64(1 << self.modulus_bits), out)

    def dequantize(self, field_sum, count: int | None = None) -> np.ndarray:
        """A field element (one input or a sum of up to `max_clients` inputs)
        back to float64.  `count`, when given, is checked against the headroom."""
        if count is not None and count > self.max_clients:
            raise ValueError(f"a sum of {count} inputs can wrap around: this quantizer has headroom for {self.max_clients}")
        return self.to_signed(field_sum).astype(np.float64) / self.scale

    @staticmethod
    def field_sum(field_vectors: np.ndarray, modulus_bits: int) -> np.ndarray:
        """Sum of the rows of an (n, d) field matrix in Z_{2^k} (uint64 wrap, then mask)."""
        m = check_field(field_vectors, modulus_bits)
        return m.sum(axis=0, dtype=np.uint64) & field_mask(modulus_bits)
