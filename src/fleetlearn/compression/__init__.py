"""Codecs and codec chains; byte-exact payloads."""

from .codec import CODECS, Codec, CodecChain, IdentityCodec, parse_chain

__all__ = ["CODECS", "Codec", "CodecChain", "IdentityCodec", "parse_chain"]
