"""TLS with certificates from `make_certs`: works with the CA, fails without it."""

from __future__ import annotations

import ipaddress
import stat
import threading

import grpc
import pytest
from grpc_test_support import make_task, tiny_data
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_raw_client import RawClient

from fleetlearn.messages import Update
from fleetlearn.transport.grpc import Backoff, ClientRefused, ClientTls, GrpcTransport, ServerTls, make_certs, run_client
from fleetlearn.transport.grpc.transport import is_loopback


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), client_names=("client", "phone-1"))


def test_certificates_are_signed_by_the_ca_with_the_right_names(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (certs.ca_key, certs.server_key, *(k for _, k in certs.client_certs.values())):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        make_certs(certs.ca_cert.parent)


def test_tls_round_trip_with_the_ca(certs, tokens, learner):
    with GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, tls=ServerTls.from_dir(certs.ca_cert.parent), heartbeat_interval_s=0.2) as t:
        tok = tokens.add("secure")
        th = threading.Thread(target=run_client, args=(t.address, tok, learner, tiny_data(0)),
                              kwargs=dict(tls_ca=certs.ca_cert, max_rounds=1, backoff=Backoff(0.05, 0.5)), daemon=True)
        th.start()
        assert t.wait_available(1, timeout_s=10)
        (reply,) = list(t.dispatch(make_task(1, 0, learner.init_params(0)), t.available(1)))
        assert isinstance(reply.message, Update)
        th.join(10)
        # "localhost" is in the certificate too
        c = RawClient(f"localhost:{t.port}", tok, credentials=ClientTls(certs.ca_cert).credentials())
        assert c.register(learner.spec.digest()).accepted
        c.close()


def test_clients_without_the_ca_or_without_tls_fail(certs, tokens, learner):
    with GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, tls=ServerTls.from_dir(certs.ca_cert.parent)) as t:
        tok = tokens.add("x")
        for creds in (grpc.ssl_channel_credentials(), None):  # system roots only / plaintext
            c = RawClient(t.address, tok, credentials=creds)
            with pytest.raises(grpc.RpcError) as err:
                c.register(learner.spec.digest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            c.close()


def test_mutual_tls_requires_a_client_certificate(certs, tokens, learner):
    tls = ServerTls.from_dir(certs.ca_cert.parent, mutual=True)
    with GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, tls=tls) as t:
        tok = tokens.add("m")
        anonymous = RawClient(t.address, tok, credentials=ClientTls(certs.ca_cert).credentials())
        with pytest.raises(grpc.RpcError) as err:
            anonymous.register(learner.spec.digest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
        cert, key = certs.client_certs["phone-1"]
        holder = RawClient(t.address, tok, credentials=ClientTls(certs.ca_cert, cert, key).credentials())
        assert holder.register(learner.spec.digest()).accepted
        holder.close()
        assert ClientTls.from_dir(certs.ca_cert.parent).cert == certs.client_certs["client"][0]


# -- item 11: certificate mistakes are named, plaintext is refused off loopback ---------------
def refused_client(address: str, tok: str, learner, tls: ClientTls) -> str:
    """The error of a client that must stop at once (not retry until it gives up)."""
    with pytest.raises(ClientRefused) as err:
        run_client(address, tok, learner, tiny_data(0), tls=tls, backoff=Backoff(0.05, 0.2), give_up_after_s=5)
    return str(err.value)


def test_a_certificate_for_another_name_is_named_as_such(certs, tokens, learner):
    # `fleetlearn certs` without --host covers 127.0.0.1 and localhost only: a server that
    # clients dial by another address (here 127.0.0.2, still this machine) fails verification.
    with GrpcTransport("127.0.0.2:0", tokens=tokens, spec=learner.spec, tls=ServerTls.from_dir(certs.ca_cert.parent)) as t:
        tok = tokens.add("elsewhere")
        msg = refused_client(t.address, tok, learner, ClientTls(certs.ca_cert))
        assert "certificate is not valid for '127.0.0.2' (it names 127.0.0.1, localhost)" in msg, msg
        assert "fleetlearn certs --host 127.0.0.2" in msg
        msg = refused_client(f"127.0.0.2:{t.port}", tok, learner, ClientTls(certs.ca_cert, server_name="fleet.example"))
        assert "not valid for 'fleet.example'" in msg, msg
        # with the name it holds, the same server is fine
        c = RawClient(t.address, tok, credentials=ClientTls(certs.ca_cert).credentials(),
                      options=ClientTls(certs.ca_cert, server_name="localhost").channel_options())
        assert c.register(learner.spec.digest()).accepted
        c.close()


def test_a_certificate_from_another_ca_and_a_plaintext_server_are_named(certs, tokens, learner, tmp_path):
    other = make_certs(tmp_path / "other")
    with GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, tls=ServerTls.from_dir(certs.ca_cert.parent)) as t:
        msg = refused_client(t.address, tokens.add("wrong-ca"), learner, ClientTls(other.ca_cert))
        assert f"does not verify against the CA in {other.ca_cert}" in msg, msg
    with GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec) as t:  # no TLS
        msg = refused_client(t.address, tokens.add("tls-to-plain"), learner, ClientTls(certs.ca_cert))
        assert "does not answer in TLS" in msg, msg


def test_plaintext_off_loopback_needs_insecure(tokens, learner):
    for address in ("0.0.0.0:0", "[::]:0"):
        with pytest.raises(ValueError, match="refusing to serve plaintext gRPC on .*--insecure"):
            GrpcTransport(address, tokens=tokens, spec=learner.spec)
    with GrpcTransport("0.0.0.0:0", tokens=tokens, spec=learner.spec, insecure=True) as t:
        assert t.port > 0
    for address in ("127.0.0.1:0", "localhost:0", "[::1]:0"):
        assert is_loopback(address)
    assert not is_loopback("fleet.example:7777") and not is_loopback("10.0.0.5:7777")
