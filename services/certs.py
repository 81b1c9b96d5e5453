"""A private certificate authority for a local or test deployment: the CA, a server certificate per service and
the client certificates the gateway (and an operator's tools) show the services, as PEM files.

    python -m services.certs create --out deploy/secrets --hosts gateway,retriever,reranker [--clients gateway]
                                    [--domain blockrank.svc] [--san search.example.com] [--days 365] [--force]

writes into DIR:

    ca.crt, ca.key                  the CA (keep ca.key off the servers: it only signs)
    <host>.crt, <host>.key          a server certificate per host: SANs the host, <host>.<domain> for each
                                    --domain, localhost, 127.0.0.1 and every --san;
                                    its usages include client authentication, so a health check inside a mutual-TLS
                                    server's container can show the server's own certificate
    <client>-client.crt, .key       a client certificate per --clients name, the name as its common name (the
                                    downstreams believe the x-retrieval-tenant header only from `gateway`)

Private keys are written mode 0600 from the moment they exist. This is a stand-in for an operator's own PKI or
cert-manager (deploy/k8s/cert-manager), not a replacement: the CA key sits in a file, nothing revokes, and
nothing renews (rerun with --force: a new CA, so every server and client needs its new files; servers read
them on SIGHUP, clients, the gateway's downstream side included, when restarted).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1")  # health checks inside a container, tests, a port published on loopback
DEFAULT_DAYS = 365
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now: hosts' clocks disagree


class CertsError(ValueError):
    """A request the command cannot carry out (a file it would overwrite, a name no certificate can hold)."""


@dataclass(frozen=True)
class Issued:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, cert_path: Path, key_path: Path) -> Issued:
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        write_private(key_path, self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        return Issued(cert_path, key_path)


def write_private(path: Path, data: bytes) -> None:
    """Mode 0600 from creation (never readable by others, not even for a moment), and 0600 again when the file
    existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: float
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def subject_alternative_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses, each once, in order."""
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class Authority:
    """A self-signed CA (ECDSA P-256) that signs server and client certificates."""

    def __init__(self, common_name: str, days: float = DEFAULT_DAYS, pair: KeyPair | None = None) -> None:
        if pair is None:
            key = ec.generate_private_key(ec.SECP256R1())
            subject = _name(common_name)
            cert = (_builder(subject, subject, key.public_key(), days)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                 key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                 decipher_only=False), critical=True)
                    .sign(key, hashes.SHA256()))
            pair = KeyPair(key, cert)
        self.pair = pair

    @property
    def cert(self) -> x509.Certificate:
        return self.pair.cert

    def issue(self, common_name: str, server_names: Sequence[str] = (), client: bool = True,
              days: float = DEFAULT_DAYS) -> KeyPair:
        """A certificate for `common_name`: a server's when `server_names` is given (those SANs; server
        authentication), a client's when `client` (client authentication), or both."""
        if not server_names and not client:
            raise CertsError(f"{common_name}: a certificate needs server names, client use, or both")
        key = ec.generate_private_key(ec.SECP256R1())
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + \
            ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (_builder(_name(common_name), self.cert.subject, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.pair.key.public_key()),
                                  critical=False))
        if server_names:
            builder = builder.add_extension(subject_alternative_names(server_names), critical=False)
        return KeyPair(key, builder.sign(self.pair.key, hashes.SHA256()))


@dataclass(frozen=True)
class Bundle:
    """What `create` wrote."""

    ca: Issued
    servers: dict[str, Issued]
    clients: dict[str, Issued]

    def paths(self) -> list[Path]:
        issued = [self.ca, *self.servers.values(), *self.clients.values()]
        return [p for i in issued for p in (i.cert, i.key)]


def bundle_paths(out: Path, hosts: Sequence[str], clients: Sequence[str]) -> list[Path]:
    names = ["ca", *hosts, *(f"{c}-client" for c in clients)]
    return [out / f"{n}.{ext}" for n in names for ext in ("crt", "key")]


def check_name(name: str) -> str:
    """A host or client name becomes a file name and a certificate's common name: DNS-like names only."""
    if not name or len(name) > 253 or not all(c.isalnum() or c in ".-_" for c in name) or name.startswith((".", "-")):
        raise CertsError(f"{name!r} is not a host name (letters, digits, '.', '-', '_')")
    return name


def server_names(host: str, domains: Sequence[str] = (), extra_sans: Sequence[str] = ()) -> list[str]:
    """What a host's server certificate names: the host, the host in each domain (a Kubernetes Service's
    `NAME.NAMESPACE.svc`, say), the loopback names, and names every server shares."""
    return [host, *(f"{host}.{d.strip('.')}" for d in domains), *LOCAL_NAMES, *extra_sans]


def create(out: Path, hosts: Sequence[str], clients: Sequence[str] = ("gateway",), extra_sans: Sequence[str] = (),
           days: float = DEFAULT_DAYS, force: bool = False, domains: Sequence[str] = ()) -> Bundle:
    """A new CA in `out` and every certificate signed by it. Refuses to replace existing files without `force`:
    a new CA silently replacing the old one would make every deployed certificate untrusted."""
    hosts, clients = [check_name(h) for h in hosts], [check_name(c) for c in clients]
    if not hosts:
        raise CertsError("--hosts names no host")
    existing = [p for p in bundle_paths(out, hosts, clients) if p.exists()]
    if existing and not force:
        raise CertsError(f"{', '.join(map(str, existing))} exist; --force replaces them (and the CA with them)")
    out.mkdir(parents=True, exist_ok=True)
    authority = Authority("blockrank-retrieval local CA", days)
    ca = authority.pair.write(out / "ca.crt", out / "ca.key")
    servers = {h: authority.issue(h, server_names(h, domains, extra_sans), client=True, days=days)
               .write(out / f"{h}.crt", out / f"{h}.key") for h in hosts}
    client_certs = {c: authority.issue(c, client=True, days=days)
                    .write(out / f"{c}-client.crt", out / f"{c}-client.key") for c in clients}
    return Bundle(ca, servers, client_certs)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="a new CA and every certificate signed by it")
    p.add_argument("--out", type=Path, required=True, help="directory to write into (created)")
    p.add_argument("--hosts", required=True, help="comma-separated server names: a certificate each")
    p.add_argument("--clients", default="gateway", help="comma-separated client names: a client certificate each "
                                                        "(default: gateway)")
    p.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                   help="each server certificate also names <host>.DOMAIN (repeatable), e.g. blockrank.svc")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address for every server certificate (repeatable)")
    p.add_argument("--days", type=float, default=DEFAULT_DAYS, help="validity of every certificate")
    p.add_argument("--force", action="store_true", help="replace existing files (a new CA)")
    args = parser.parse_args(argv)
    try:
        bundle = create(args.out, _names(args.hosts), _names(args.clients), args.san, args.days, args.force,
                        args.domain)
    except (CertsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in bundle.paths():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
