import pytest
import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import mlp
from fleetlearn.params import ParamSpec, PayloadError, bytes_to_vector, vector_to_bytes


def test_spec_split_flatten_round_trip():
    m = mlp(5, 3, [4])
    spec = ParamSpec.from_module(m)
    assert spec.dim == 5 * 4 + 4 + 4 * 3 + 3
    flat = spec.flatten(dict(m.named_parameters()))
    parts = spec.split(flat)
    for name, p in m.named_parameters():
        assert torch.equal(parts[name], p.detach())
    assert ParamSpec.from_json(spec.to_json()) == spec
    assert spec.digest() == ParamSpec.from_module(mlp(5, 3, [4])).digest() != ParamSpec.from_module(mlp(5, 3, [5])).digest()


def test_split_batched():
    spec = ParamSpec(("a", "b"), ((2, 2), (3,)))
    batch = torch.arange(14, dtype=torch.float32).reshape(2, 7)
    parts = spec.split(batch)
    assert parts["a"].shape == (2, 2, 2) and parts["b"].shape == (2, 3)
    assert torch.equal(parts["b"][1], torch.tensor([11.0, 12.0, 13.0]))


def test_wire_bytes_are_exact():
    v = torch.randn(11)
    b = vector_to_bytes(v)
    assert len(b) == 44
    assert torch.equal(bytes_to_vector(b, 11), v)
    with pytest.raises(PayloadError, match="43 bytes, expected 44"):
        bytes_to_vector(b[:-1], 11)


def test_identity_codec_refuses_truncation():
    v = torch.randn(100)
    payload, _ = parse_chain("none").encode(v)
    assert 400 < len(payload) <= 400 + 32  # float32 values and a small self-describing header
    assert torch.equal(parse_chain("none").decode(payload), v)
    for cut in (0, 3, 5, len(payload) - 1):
        with pytest.raises(PayloadError):
            parse_chain("none").decode(payload[:cut])
