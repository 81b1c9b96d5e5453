"""`python -m services.certs create`: a private CA, server and client certificates that gRPC's TLS accepts for
what the deployments do with them (mutual TLS to the downstreams, a compose health check showing a server's own
certificate), keys mode 0600, no silent replacement of an existing CA."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services import certs
from services.client import health_status
from services.tls import ClientTls
from tests.conftest import ROOT, free_port

HOSTS = ["gateway", "retriever", "reranker"]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))]


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "secrets"
    done = subprocess.run([sys.executable, "-m", "services.certs", "create", "--out", str(out), "--hosts",
                           ",".join(HOSTS), "--clients", "gateway,operator", "--domain", "blockrank.svc",
                           "--san", "search.example.com"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 2 * (1 + len(HOSTS) + 2)  # every file it wrote, one a line
    return out


def test_the_command_writes_a_ca_servers_and_clients_with_private_keys_0600(bundle: Path) -> None:
    ca = load(bundle / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for stem in [*HOSTS, "gateway-client", "operator-client", "ca"]:
        assert stat.S_IMODE((bundle / f"{stem}.key").stat().st_mode) == 0o600, stem
        cert = load(bundle / f"{stem}.crt")
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca or stem == "ca"
    for host in HOSTS:
        cert = load(bundle / f"{host}.crt")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host
        assert sans(cert) == [host, f"{host}.blockrank.svc", "localhost", "search.example.com", "127.0.0.1"]
        assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client = load(bundle / "gateway-client.crt")
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway"  # trusted forwarder
    assert usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_an_existing_ca_is_replaced_only_when_asked(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    certs.create(out, ["gateway"])
    first = (out / "ca.crt").read_bytes()
    with pytest.raises(certs.CertsError, match="--force"):
        certs.create(out, ["gateway"])
    assert (out / "ca.crt").read_bytes() == first
    (out / "gateway.key").chmod(0o644)  # a key someone loosened is written back 0600
    certs.create(out, ["gateway"], force=True)
    assert (out / "ca.crt").read_bytes() != first
    assert stat.S_IMODE((out / "gateway.key").stat().st_mode) == 0o600
    for bad in ("", "../x", "a b", "-x"):
        with pytest.raises(certs.CertsError):
            certs.create(tmp_path / "bad", [bad])


def test_names_that_are_addresses_become_ip_sans() -> None:
    names = certs.subject_alternative_names(["retriever", "10.0.0.7", "::1", "retriever", " "])
    assert names.get_values_for_type(x509.DNSName) == ["retriever"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]


@pytest.fixture
def mutual_tls_server(bundle: Path) -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with the standard health service that requires client certificates from the bundle's CA, as
    the retriever and the reranker do (in-process: the handshake is what is tested)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((bundle / "retriever.key").read_bytes(), (bundle / "retriever.crt").read_bytes())],
        root_certificates=(bundle / "ca.crt").read_bytes(), require_client_auth=True)
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_the_certificates_work_for_mutual_tls_and_for_a_servers_own_health_check(
        bundle: Path, mutual_tls_server: tuple[str, health.HealthServicer], tmp_path: Path) -> None:
    target, servicer = mutual_tls_server
    ca = str(bundle / "ca.crt")
    gateway = ClientTls(ca, str(bundle / "gateway-client.crt"), str(bundle / "gateway-client.key"))
    own = ClientTls(ca, str(bundle / "retriever.crt"), str(bundle / "retriever.key"))  # compose's health check
    assert health_status(target, tls=gateway) == "SERVING"
    assert health_status(target, tls=own) == "SERVING"
    assert health_status(target, tls=ClientTls(ca)) == "UNREACHABLE"  # no client certificate
    stranger = certs.create(tmp_path / "other", ["retriever"], ["gateway"]).clients["gateway"]
    assert health_status(target, tls=ClientTls(ca, str(stranger.cert), str(stranger.key))) == "UNREACHABLE"
    # The compose health check's command line, with the server's own certificate: healthy only while SERVING.
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    check = [sys.executable, "-m", "services.client", "--ca", ca, "--cert", str(bundle / "retriever.crt"),
             "--key", str(bundle / "retriever.key"), "health", "--target", target]
    done = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "NOT_SERVING" in done.stdout, (done.stdout, done.stderr)
