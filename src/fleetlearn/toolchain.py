"""Whether torch.compile's inductor can build C++ kernels on this machine: `compiler()`.

Both compiled kernels ask it before compiling: the robust aggregators' sorting networks
(aggregation/compiled.py) and the learner's batched training step (learners/torch_learner.py,
``[engine] training_kernels = "compiled"``).  Looked up once per process.
"""

from __future__ import annotations

import shutil

_compiler: str | None | bool = False  # False: not looked up yet


def compiler() -> str | None:
    """The C++ compiler inductor would use, if it is installed (None otherwise)."""
    global _compiler
    if _compiler is False:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            _compiler = shutil.which(get_cpp_compiler())
        except Exception:  # noqa: BLE001 - no inductor, or no compiler: callers run their fallback
            _compiler = None
    return _compiler  # type: ignore[return-value]
