"""A throwaway public-key infrastructure for the TLS tests, on services.certs (the code behind
`python -m services.certs`): certificate authorities, server certificates for 127.0.0.1/localhost, client
certificates; PEM files, keys mode 600, valid for a day."""

from __future__ import annotations

from pathlib import Path

from services import certs
from services.certs import Issued

__all__ = ["Authority", "Issued"]
DAYS = 1


class Authority:
    """A self-signed CA that issues certificates into `directory` (`<name>-ca.pem`, `<name>-<cn>.crt/.key`)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        directory.mkdir(parents=True, exist_ok=True)
        self._authority = certs.Authority(f"{name} test CA", days=DAYS)
        self.key, self.cert = self._authority.pair.key, self._authority.cert
        self.pem = directory / f"{name}-ca.pem"
        self._authority.pair.write(self.pem, directory / f"{name}-ca.key")

    def issue(self, common_name: str, server: bool) -> Issued:
        """A server certificate (SANs the name, localhost and 127.0.0.1) or a client certificate."""
        names = [common_name, *certs.LOCAL_NAMES] if server else []
        stem = self.directory / f"{self.name}-{common_name}"
        return self._authority.issue(common_name, names, client=not server, days=DAYS).write(
            stem.with_suffix(".crt"), stem.with_suffix(".key"))
