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
from fleetlearn.transport.grpc import Backoff, ClientTls, GrpcTransport, ServerTls, make_certs, run_client


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
