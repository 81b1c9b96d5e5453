"""TLS for every server and client here: a server's certificate and key (reloaded on SIGHUP, no restart), client
certificates required when a client CA is given (mutual TLS: the gateway's downstreams accept only the
gateway), and the channel credentials clients and the gateway connect with. PEM files throughout.

A reload reads the files again on the next handshake after SIGHUP: connections already open keep the
certificate they were made with; a reload that fails (a file missing or not PEM) is logged and the current
certificate stays. Clients (the gateway to its downstreams included) read their files when they start: rotate
a client certificate by restarting that client.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.tracing import client_interceptors

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A TLS setting that cannot work (a key without its certificate, an unreadable file)."""


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{what} {path!r} is not a PEM file")
    return data


def warn_if_readable_by_others(path: str, what: str) -> None:
    """A private key anyone on the machine can read is not private; say so (the server still starts)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by group or others (mode %o); chmod 600 it", what, path, mode & 0o777)


class ServerTls:
    """A server's TLS credentials from PEM paths; `request_reload` (on SIGHUP) makes the next handshake read
    the files again."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        if not cert or not key:
            raise TlsConfigError("TLS needs both --tls-cert and --tls-key")
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._reload = threading.Event()
        self._initial = self._load()  # fail at start-up, not at the first handshake
        warn_if_readable_by_others(key, "TLS key")

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=self.mutual)

    def request_reload(self) -> None:
        self._reload.set()

    def _load(self) -> Any:
        chain = read_pem(self.cert, "TLS certificate")
        key = read_pem(self.key, "TLS key")
        roots = read_pem(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _fetch(self) -> Any:
        """Called by gRPC at each handshake: a new configuration after a reload request, else None (keep)."""
        if not self._reload.is_set():
            return None
        self._reload.clear()
        try:
            config = self._load()
        except TlsConfigError as exc:
            log.error("TLS reload failed, the current certificate stays: %s", exc)
            return None
        log.info("TLS certificate reloaded from %s", self.cert)
        return config


def server_tls(cert: str, key: str, client_ca: str) -> ServerTls | None:
    """The server's TLS from its flags; None when neither certificate nor key is given (plaintext)."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    return ServerTls(cert, key, client_ca)


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a TLS server: the CA that signed the server's certificate, and for mutual TLS the
    client's own certificate and key; `server_name` overrides the name checked in the server's certificate
    (when the address is not a name the certificate carries)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TlsConfigError("a client certificate needs its key, and a key its certificate")
        if self.cert and not self.ca:
            raise TlsConfigError("a client certificate is only sent over TLS: give the server's CA too")

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def credentials(self) -> grpc.ChannelCredentials:
        key = read_pem(self.key, "client key") if self.key else None
        chain = read_pem(self.cert, "client certificate") if self.cert else None
        return grpc.ssl_channel_credentials(read_pem(self.ca, "CA"), key, chain)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca, --cert, --key, --server-name and --api-key for a client command line (env RETRIEVAL_CA, ...
    beside them; the key is better given by its variable, RETRIEVAL_API_KEY, than on a command line)."""
    for flag, what in [("api-key", "API key (python -m services.keys) sent as authorization: Bearer"),
                       ("ca", "PEM CA that signed the server's certificate: connect over TLS"),
                       ("cert", "PEM client certificate (mutual TLS)"), ("key", "PEM key of --cert"),
                       ("server-name", "name to check in the server's certificate (default: the target's host)")]:
        env = "RETRIEVAL_" + flag.upper().replace("-", "_")
        parser.add_argument(f"--{flag}", default=os.environ.get(env, ""), help=f"{what} (env {env})")


def client_tls(args: argparse.Namespace) -> ClientTls:
    return ClientTls(args.ca, args.cert, args.key, args.server_name)


def channel(target: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = (), api_key: str = ""
            ) -> grpc.Channel:
    """A blocking channel, over TLS when `tls` is enabled, sending `api_key` (services.keys) on every call."""
    if tls is None or not tls.enabled:
        made = grpc.insecure_channel(target, options=list(options))
    else:
        made = grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
    return grpc.intercept_channel(made, _ApiKey(api_key)) if api_key else made


def aio_channel(target: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = (), api_key: str = ""
                ) -> grpc.aio.Channel:
    """An asyncio channel, over TLS when `tls` is enabled, sending `api_key` on every call and, with tracing on,
    the trace context."""
    interceptors = [*([_AioApiKey(api_key)] if api_key else []), *client_interceptors()] or None
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()],
                                   interceptors=interceptors)


def _with_key(details: Any, api_key: str) -> Any:
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {api_key}")]
    return details._replace(metadata=metadata)


class _ApiKey(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(_with_key(client_call_details, self._api_key), request)


class _AioApiKey(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_key(client_call_details, self._api_key), request)
