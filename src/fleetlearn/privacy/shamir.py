"""t-out-of-n Shamir secret sharing over the prime field GF(2^127 - 1)
(Shamir, "How to share a secret", CACM 1979), as used by secure aggregation
(Bonawitz et al., CCS 2017) to share mask seeds and mask keys.

A byte secret is cut into 15-byte chunks (120 bits < 127, so every chunk is a
field element); each chunk gets its own random polynomial of degree t - 1 with
the chunk as constant term.  Shares for all recipients and chunks are evaluated
at once with Horner's rule on a (recipients, chunks) array of Python integers
(the field does not fit in a machine word, so numpy object arrays do the
arithmetic; the loop is over the polynomial degree only).  Reconstruction is
Lagrange interpolation at 0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15
SHARE_ELEMENT_BYTES = 16


class ShamirError(ValueError):
    """Shares that cannot reconstruct a secret (too few, duplicate or invalid points)."""


def n_chunks(secret_len: int) -> int:
    """Field elements per share of a `secret_len`-byte secret (15 bytes each)."""
    return -(-secret_len // CHUNK_BYTES)


def share_nbytes(secret_len: int) -> int:
    """Size of one serialised share of a `secret_len`-byte secret."""
    return n_chunks(secret_len) * SHARE_ELEMENT_BYTES


def _chunks(secret: bytes) -> np.ndarray:
    return np.array([int.from_bytes(secret[i : i + CHUNK_BYTES], "big") for i in range(0, len(secret), CHUNK_BYTES)], dtype=object)


def _random_elements(count: int, randbytes: Callable[[int], bytes]) -> np.ndarray:
    raw = randbytes(16 * count)
    # 127 uniform bits; the single value equal to PRIME folds onto 0 (bias 2^-127).
    vals = [int.from_bytes(raw[16 * i : 16 * (i + 1)], "big") & PRIME for i in range(count)]
    return np.array([v % PRIME for v in vals], dtype=object)


def split_secret(secret: bytes, xs: Sequence[int], threshold: int, randbytes: Callable[[int], bytes]) -> np.ndarray:
    """Shares of `secret` at the points `xs` (distinct, in [1, PRIME)), any
    `threshold` of which reconstruct it.  Returns a (len(xs), chunks) object
    array of field elements; `randbytes(n)` supplies the polynomial randomness."""
    t = int(threshold)
    if t < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    x = np.array([int(v) for v in xs], dtype=object)
    if len(set(x.tolist())) != len(x) or any(not (0 < v < PRIME) for v in x):
        raise ShamirError("share points must be distinct and in [1, p)")
    if t > len(x):
        raise ShamirError(f"threshold {t} exceeds the number of shares {len(x)}")
    secret_chunks = _chunks(secret)
    m = len(secret_chunks)
    coeffs = np.empty((t, m), dtype=object)
    coeffs[0] = secret_chunks
    if t > 1:
        coeffs[1:] = _random_elements((t - 1) * m, randbytes).reshape(t - 1, m)
    xcol = x.reshape(-1, 1)
    acc = np.tile(coeffs[t - 1], (len(x), 1))
    for k in range(t - 2, -1, -1):  # Horner over the degree, vectorised over shares x chunks
        acc = (acc * xcol + coeffs[k]) % PRIME
    return acc


def combine_shares(xs: Sequence[int], shares: np.ndarray, secret_len: int) -> bytes:
    """Lagrange interpolation at 0 of the (t, chunks) share rows at points `xs`."""
    x = [int(v) for v in xs]
    if len(set(x)) != len(x):
        raise ShamirError("duplicate share points")
    y = np.asarray(shares, dtype=object)
    if y.ndim != 2 or y.shape[0] != len(x) or y.shape[1] != n_chunks(secret_len):
        raise ShamirError(f"shares must have shape ({len(x)}, {n_chunks(secret_len)}), got {y.shape}")
    xa = np.array(x, dtype=object)
    diff = xa.reshape(1, -1) - xa.reshape(-1, 1)  # diff[i, j] = x_j - x_i
    np.fill_diagonal(diff, 1)
    num = np.array([np.prod(np.delete(xa, i)) % PRIME if len(x) > 1 else 1 for i in range(len(x))], dtype=object)
    den = np.prod(diff, axis=1) % PRIME
    lam = np.array([(int(n) * pow(int(d), -1, PRIME)) % PRIME for n, d in zip(num, den)], dtype=object)
    chunks = lam.dot(y) % PRIME
    out = bytearray()
    for i, c in enumerate(chunks):
        size = min(CHUNK_BYTES, secret_len - i * CHUNK_BYTES)
        c = int(c)
        if c >> (8 * size):
            raise ShamirError("shares are inconsistent: the reconstructed value does not fit the secret")
        out += c.to_bytes(size, "big")
    return bytes(out)


def share_to_bytes(row: np.ndarray) -> bytes:
    """One share (a row of field elements) as 16 big-endian bytes per element."""
    return b"".join(int(v).to_bytes(SHARE_ELEMENT_BYTES, "big") for v in row)


def share_from_bytes(data: bytes, secret_len: int) -> np.ndarray:
    """Inverse of `share_to_bytes`, checking the length and that elements are < p."""
    m = n_chunks(secret_len)
    if len(data) != m * SHARE_ELEMENT_BYTES:
        raise ShamirError(f"a share of a {secret_len}-byte secret has {m * SHARE_ELEMENT_BYTES} bytes, got {len(data)}")
    vals = [int.from_bytes(data[i * SHARE_ELEMENT_BYTES : (i + 1) * SHARE_ELEMENT_BYTES], "big") for i in range(m)]
    if any(v >= PRIME for v in vals):
        raise ShamirError("share element outside the field")
    return np.array(vals, dtype=object)
