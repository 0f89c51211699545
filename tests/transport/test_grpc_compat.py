"""Compatibility at registration: incompatible clients are refused up front, with a reason."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_test_support import tiny_data
from grpc_raw_client import RawClient

from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.transport.grpc import Backoff, ClientRefused, GrpcTransport, RunRequirements, run_client, runtime_version

FP = grpc.StatusCode.FAILED_PRECONDITION


def register_refused(client: RawClient, words: str, **kw) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.register(**kw)
    assert err.value.code() == FP, err.value.details()
    assert words in err.value.details(), err.value.details()


def test_incompatible_clients_are_refused_with_reasons(tokens, learner):
    req = RunRequirements.for_run(learner.spec, uplink="topk:0.1 | q8", downlink="fp16", min_memory_mb=64)
    with GrpcTransport(tokens=tokens, requirements=req) as t:
        c = RawClient(t.address, tokens.add("old"))
        digest = learner.spec.digest()
        ok = dict(digest=digest, codecs=("topk", "q8", "fp16"), memory_mb=128)
        major = int(runtime_version().split(".")[0])
        register_refused(c, "major versions differ", **{**ok, "runtime": f"{major + 1}.0.0"})
        register_refused(c, "not MAJOR.MINOR", **{**ok, "runtime": "banana"})
        register_refused(c, "lacks codec(s) fp16, q8", **{**ok, "codecs": ("topk",)})
        register_refused(c, "differs from the run's model", **{**ok, "digest": "0123456789abcdef"})
        register_refused(c, "did not announce its model digest", **{**ok, "digest": ""})
        register_refused(c, "needs width 1.0", **{**ok, "widths": (0.5, 0.25)})
        register_refused(c, "at least 64 MiB", **{**ok, "memory_mb": 16})
        reply = c.register(**ok)  # same runtime major, every codec, the model, enough memory
        assert reply.accepted and reply.uplink_codec == "topk:0.1 | q8" and reply.downlink_codec == "fp16"
        assert t.refusals_total() == {"incompatible": 7}
        assert list(t.available(1)) == [reply.client_id]
        c.close()


def test_a_client_without_block_topk_is_refused_for_a_block_chain(tokens, learner):
    # A build from before topk's block option knows the name "topk" but not the block format:
    # it must be refused at registration, not handed a chain it cannot encode.
    from fleetlearn.compression import CODECS, capabilities

    req = RunRequirements.for_run(learner.spec, uplink="ef | topk:0.2,block=8 | q2")
    with GrpcTransport(tokens=tokens, requirements=req) as t:
        c = RawClient(t.address, tokens.add("older"))
        ok = dict(digest=learner.spec.digest(), codecs=tuple(capabilities()))
        register_refused(c, "lacks codec(s) topk_blocks", **{**ok, "codecs": tuple(sorted(CODECS))})
        reply = c.register(**ok)
        assert reply.accepted and reply.uplink_codec == "ef | topk:0.2,block=8 | q2"
        c.close()


def test_run_client_with_another_model_stops_with_client_refused(transport, tokens):
    other = TorchLearner(lambda: torch.nn.Sequential(logistic(4, 3), torch.nn.ReLU(), logistic(3, 3)), vectorize=False)
    with pytest.raises(ClientRefused) as err:
        run_client(transport.address, tokens.add("wrong-model"), other, tiny_data(0), backoff=Backoff(0.05, 0.2), give_up_after_s=5)
    assert err.value.code == FP and "differs from the run's model" in err.value.detail


def test_run_client_with_revoked_token_stops(transport, tokens, learner):
    tok = tokens.add("fired")
    tokens.revoke("fired")
    with pytest.raises(ClientRefused) as err:
        run_client(transport.address, tok, learner, tiny_data(0), backoff=Backoff(0.05, 0.2), give_up_after_s=5)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.detail


def test_bad_codec_chain_is_a_server_configuration_error(tokens, learner):
    with pytest.raises(ValueError, match="unknown codec"):
        RunRequirements.for_run(learner.spec, uplink="zip9")
