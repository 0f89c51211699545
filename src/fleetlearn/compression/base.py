"""What every chain element has in common, and the argument grammar of the spec.

A chain element ("stage") is written ``name`` or ``name:arg,arg,...`` where each
arg is either ``key=value`` or a bare word (a positional value such as the ``0.01``
of ``topk:0.01``, or a flag such as the ``stochastic`` of ``q4:stochastic``).
Each stage class parses its own arguments in ``from_args`` and prints them back
in one canonical order in ``spec``, so ``parse_chain(chain.spec).spec == chain.spec``.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import numpy as np
import torch

# Elements per chunk in the hot loops: big enough that Python overhead is noise,
# small enough that temporaries stay in cache and come from malloc's free lists
# (fresh multi-megabyte allocations page-fault on every call and dominate the time).
CHUNK = 1 << 18

_INT = re.compile(r"[0-9]+")


class Stage:
    """One element of a codec chain."""

    name: ClassVar[str]
    lossy: ClassVar[bool]
    role: ClassVar[str]  # "value" | "sparsifier" | "sketch" | "ef"
    stochastic: bool = False  # needs a random generator when encoding

    def args(self) -> list[str]:
        """Canonical non-default arguments, in order."""
        return []

    @property
    def spec(self) -> str:
        a = self.args()
        return f"{self.name}:{','.join(a)}" if a else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @classmethod
    def from_args(cls, positional: list[str], options: dict[str, str]) -> "Stage":
        no_args(cls.name, positional, options)
        return cls()


def no_args(name: str, positional: list[str], options: dict[str, str]) -> None:
    if positional or options:
        given = ",".join(positional + [f"{k}={v}" for k, v in options.items()])
        raise ValueError(f"codec {name!r} takes no arguments, got {given!r}")


def unknown_options(name: str, options: dict[str, str], allowed: str) -> None:
    if options:
        keys = ", ".join(repr(k) for k in options)
        raise ValueError(f"codec {name!r}: unknown option {keys}; allowed: {allowed}")


def parse_int(name: str, key: str, text: str, lo: int, hi: int) -> int:
    if not _INT.fullmatch(text) or not lo <= int(text) <= hi:
        raise ValueError(f"codec {name!r}: {key}={text!r} is not allowed; {key} must be an integer in [{lo}, {hi}]")
    return int(text)


def parse_amount(name: str, what: str, text: str) -> float | int:
    """A fraction of the dimension or a count.

    A plain integer (``100``, ``1``) is a count; anything with a decimal point or an
    exponent (``0.01``, ``1.0``, ``1e-3``) is a fraction 0 < F <= 1.
    """
    help_ = (
        f"{what} is a fraction 0 < F <= 1 written with a decimal point (e.g. 0.01, 1.0) "
        f"or an integer count >= 1 (e.g. 100)"
    )
    if _INT.fullmatch(text):
        k = int(text)
        if k < 1 or k > 2**32 - 1:
            raise ValueError(f"codec {name!r}: {text!r} is not allowed; {help_}")
        return k
    try:
        f = float(text)
    except ValueError:
        raise ValueError(f"codec {name!r}: {text!r} is not a number; {help_}") from None
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise ValueError(f"codec {name!r}: {text!r} is not allowed; {help_}")
    return f


def format_amount(a: float | int) -> str:
    return str(a) if isinstance(a, int) else repr(float(a))


def resolve_amount(a: float | int, dim: int) -> int:
    """Count for a dimension: a fraction rounds to the nearest count, at least 1 (0 only when dim is 0)."""
    if dim == 0:
        return 0
    k = a if isinstance(a, int) else int(round(a * dim))
    return min(dim, max(1, k))


def new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))
