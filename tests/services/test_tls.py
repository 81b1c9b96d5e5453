"""TLS and mutual TLS on real servers (127.0.0.1), with certificates made for the test (tests/services/pki.py):
a plaintext client cannot talk to a TLS server; a downstream that requires client certificates refuses a client
without the gateway's certificate (no certificate, or one from another CA); the gateway reaches it over mutual
TLS and serves a search through it; SIGHUP reloads a server's certificate (a broken file keeps the old one)."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import search
from services.gen.retrieval.v1 import retriever_pb2, retriever_pb2_grpc
from services.server import GRPC_OPTIONS
from services.tls import ClientTls
from tests.conftest import Server, free_port, ingest_fixture
from tests.services.pki import Authority, Issued

pytestmark = pytest.mark.integration


def status(target: str, tls: ClientTls | None) -> str:
    """Health over a fresh connection (a channel of its own subchannel pool: no connection reused across
    checks, so each one is a new TLS handshake)."""
    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    with (grpc.secure_channel(target, tls.credentials(), options=options) if tls is not None
          else grpc.insecure_channel(target, options=options)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca, self.other_ca = Authority(root, "service"), Authority(root, "other")
        self.server = self.ca.issue("retriever", server=True)
        self.gateway = self.ca.issue("gateway", server=False)
        self.stranger = self.other_ca.issue("stranger", server=False)  # a client certificate from another CA
        self.other_server = self.other_ca.issue("retriever", server=True)

    def client(self, issued: Issued | None = None, ca: Authority | None = None) -> ClientTls:
        ca = ca or self.ca
        return ClientTls(str(ca.pem), str(issued.cert) if issued else "", str(issued.key) if issued else "")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_retriever(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A retriever that serves TLS and accepts only clients with a certificate from the service CA."""
    tmp = tmp_path_factory.mktemp("mtls")
    server = Server("services.retriever", ["--data-dir", str(tmp / "data"), "--tls-cert", str(pki.server.cert),
                                           "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.pem),
                                           "--health-port", str(free_port())],
                    log_path=tmp / "retriever.log", tls=pki.client(pki.gateway)).start()
    ingest_fixture(server.target, tls=server.tls)
    yield server
    server.stop()


def test_a_downstream_accepts_only_the_gateways_certificate(pki: Pki, mtls_retriever: Server) -> None:
    target = mtls_retriever.target
    assert status(target, pki.client(pki.gateway)) == "SERVING"
    assert status(target, None) == "UNAVAILABLE"  # plaintext: no TLS handshake at all
    assert status(target, pki.client()) == "UNAVAILABLE"  # TLS, but no client certificate
    assert status(target, pki.client(pki.stranger)) == "UNAVAILABLE"  # a certificate the server's CA did not sign
    assert status(target, pki.client(pki.gateway, ca=pki.other_ca)) == "UNAVAILABLE"  # the client distrusts it
    assert status(target, pki.client(pki.gateway)) == "SERVING"  # and it keeps serving


def test_probes_read_health_on_a_plaintext_port_that_serves_nothing_else(mtls_retriever: Server) -> None:
    """--health-port: what a probe without a client certificate (Kubernetes' gRPC probes) can read; the service's
    own port still demands the gateway's certificate."""
    port = mtls_retriever.args[mtls_retriever.args.index("--health-port") + 1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "liveness", "retrieval.v1.RetrieverService"):
            assert check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            retriever_pb2_grpc.RetrieverServiceStub(channel).ListCollections(
                retriever_pb2.ListCollectionsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_gateway_searches_through_mutual_tls(pki: Pki, mtls_retriever: Server, server_factory) -> None:
    # The gateway's own port serves TLS too (server certificate only); the client trusts the service CA.
    front = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    downstream = ["--retriever-target", mtls_retriever.target, "--downstream-ca", str(pki.ca.pem)]
    gateway = server_factory("services.gateway", [*front, *downstream, "--downstream-cert", str(pki.gateway.cert),
                                                  "--downstream-key", str(pki.gateway.key)], tls=pki.client()).start()
    reply = search(gateway.target, "c", "kittens purring", top_k=3, tls=pki.client())
    assert reply.results and not reply.reranked
    assert status(gateway.target, None) == "UNAVAILABLE"
    # Without its client certificate the gateway cannot reach the downstream, so it never reports SERVING.
    keyless = server_factory("services.gateway", [*front, *downstream], tls=pki.client()).start(wait=False)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert status(keyless.target, pki.client()) in ("NOT_SERVING", "UNAVAILABLE")
        time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as err:
        search(keyless.target, "c", "kittens purring", top_k=3, tls=pki.client(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sighup_reloads_the_certificate(pki: Pki, server_factory, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    server = server_factory("services.retriever", ["--data-dir", str(tmp_path / "data"), "--tls-cert", str(cert),
                                                   "--tls-key", str(key)], tls=pki.client()).start()
    assert status(server.target, pki.client()) == "SERVING"
    assert status(server.target, None) == "UNAVAILABLE"
    shutil.copy(pki.other_server.cert, cert)  # rotated: a certificate from the other CA
    shutil.copy(pki.other_server.key, key)
    assert server.popen is not None
    server.popen.send_signal(signal.SIGHUP)
    assert _eventually(lambda: status(server.target, pki.client(ca=pki.other_ca)) == "SERVING")
    assert status(server.target, pki.client()) == "UNAVAILABLE"  # the old CA's clients no longer trust it
    cert.write_text("not a certificate")  # a broken rotation: logged, the current certificate stays
    server.popen.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert status(server.target, pki.client(ca=pki.other_ca)) == "SERVING"
    assert "TLS reload failed" in server.log_tail()


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False
