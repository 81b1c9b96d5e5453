"""Load tests only target this machine: a target is accepted only if its host is, or resolves only
to, a loopback address; the channel is then opened to that address, not the name."""

from __future__ import annotations

import ipaddress
import socket


class LoadTestError(Exception):
    """A problem with the arguments or inputs; reported without a traceback."""


class NotLoopbackError(LoadTestError):
    """The target is not on this machine's loopback interface."""


def split_target(target: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port). gRPC URI schemes (dns:, unix:, ...) are not accepted."""
    if "/" in target or target.split(":", 1)[0] in {"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"}:
        raise NotLoopbackError(f"target {target!r}: give a plain HOST:PORT (e.g. 127.0.0.1:50050)")
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NotLoopbackError(f"target {target!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)


def _as_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` stands for: itself when it is an IP literal, else what the resolver says."""
    try:
        return [_as_ip(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise NotLoopbackError(f"cannot resolve {host!r} ({err}); load tests only target loopback") from None
    return sorted({_as_ip(str(info[4][0])) for info in infos}, key=lambda ip: (ip.version, int(ip)))


def loopback_target(target: str) -> str:
    """Check that `target` is on loopback and return it pinned to one resolved loopback address.

    Raises NotLoopbackError for anything else, before any connection is attempted."""
    host, port = split_target(target)
    addresses = resolve_addresses(host, port)
    outside = [str(ip) for ip in addresses if not ip.is_loopback]
    if not addresses or outside:
        raise NotLoopbackError(
            f"refusing to load-test {target!r}: it resolves to {', '.join(outside) or 'nothing'}, not a loopback "
            "address. Load tests here may only target this machine (127.0.0.0/8, localhost or [::1]).")
    chosen = addresses[0]  # IPv4 first: servers here bind 127.0.0.1
    return f"{chosen}:{port}" if chosen.version == 4 else f"[{chosen}]:{port}"
