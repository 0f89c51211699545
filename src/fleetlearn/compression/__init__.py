"""Codecs and codec chains; byte-exact, self-describing, checksummed payloads.

See `codec` for the chain syntax, `wire` for the payload format, `sketch` for
server-side aggregation of count sketches and `adaptive` for the per-client
level policy.
"""

from .adaptive import AdaptiveCompression, Plan, choose_levels, pace_levels
from .codec import (
    CODECS,
    RESIDUAL,
    RNG_SEED,
    Codec,
    CodecChain,
    ErrorFeedback,
    IdentityCodec,
    capabilities,
    decode_payload,
    estimate_bytes,
    needed_capabilities,
    parse_chain,
    register_codec,
    seed_state,
)
from .sketch import CountSketch, SketchPayload, clear_sketch_cache, read_sketch, sum_sketches, unsketch
from .sparsify import RandK, Sparsifier, TopK
from .values import BFloat16Codec, Float16Codec, Float32Codec, SignCodec, UniformQuantizer
from .wire import read_header

__all__ = [
    "AdaptiveCompression",
    "BFloat16Codec",
    "CODECS",
    "Codec",
    "CodecChain",
    "CountSketch",
    "ErrorFeedback",
    "Float16Codec",
    "Float32Codec",
    "IdentityCodec",
    "Plan",
    "RESIDUAL",
    "RNG_SEED",
    "RandK",
    "Sparsifier",
    "register_codec",
    "SignCodec",
    "SketchPayload",
    "TopK",
    "UniformQuantizer",
    "choose_levels",
    "pace_levels",
    "capabilities",
    "clear_sketch_cache",
    "decode_payload",
    "estimate_bytes",
    "needed_capabilities",
    "parse_chain",
    "read_header",
    "read_sketch",
    "seed_state",
    "sum_sketches",
    "unsketch",
]
