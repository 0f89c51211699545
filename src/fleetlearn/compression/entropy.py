"""Lossless entropy coding of a whole payload body: the ``zstd`` chain element.

Quantized codes are far from uniform (deltas pile up near zero, so most 8-bit
codes sit near the centre of the grid): a Huffman/FSE stage recovers the
difference between 8 bits and their entropy.  ``zstd`` is the last element of a
chain (``"q8 | zstd"``, ``"topk:0.01 | q8 | zstd"``) and compresses everything
between the payload header and the CRC with Zstandard (RFC 8878, via the
``zstandard`` package).  It is applied only when it pays: if the compressed body
plus its 4-byte length is not smaller, the payload goes out exactly as without
the stage.  So a ``... | zstd`` payload is never larger than the chain without it,
and ``estimate_bytes`` of the chain without it stays an upper bound.

Wire: bit 7 of the support byte set (`wire.SUPPORT_ZSTD_FLAG`), then the
uncompressed body length (uint32), then one zstd frame.  The decoder refuses a
body longer than `wire.max_body_bytes` for the announced dimension before it
decompresses (no decompression bomb), and a frame whose size does not match.
"""

from __future__ import annotations

from .base import Stage, parse_int, unknown_options


class ZstdCoder(Stage):
    """Zstandard entropy coding of the payload body (lossless, applied when it pays)."""

    name = "zstd"
    lossy = False
    role = "entropy"
    DEFAULT_LEVEL = 1  # level 1 already Huffman-codes literals, at ~1 GB/s: higher levels gain ~0 on codes
    MAX_LEVEL = 19

    def __init__(self, level: int = DEFAULT_LEVEL):
        if not 1 <= level <= self.MAX_LEVEL:
            raise ValueError(f"codec 'zstd': level={level} is not allowed; level must be an integer in [1, {self.MAX_LEVEL}]")
        self.level = level

    def args(self):
        return [f"level={self.level}"] if self.level != self.DEFAULT_LEVEL else []

    @classmethod
    def from_args(cls, positional, options):
        allowed = f"level=N (an integer in [1, {cls.MAX_LEVEL}], default {cls.DEFAULT_LEVEL})"
        if positional:
            raise ValueError(f"codec 'zstd': unknown argument {positional[0]!r}; allowed: {allowed}")
        opts = dict(options)
        level = parse_int("zstd", "level", opts.pop("level"), 1, cls.MAX_LEVEL) if "level" in opts else cls.DEFAULT_LEVEL
        unknown_options("zstd", opts, allowed)
        return cls(level)
