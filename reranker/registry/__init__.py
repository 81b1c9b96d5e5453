"""The tenant registry: the durable, shared source of truth for tenant -> adapter bindings (and each tenant's
scoring overrides and limits) that every reranker replica and the gateway read.

    store = open_store("file:/var/lib/blockrank/tenants.json")   # or "etcd://127.0.0.1:2379[/PREFIX]"
    store.put(Binding("acme", "acme-lora", fusion_weight=0.3))     # durable when it returns
    store.get("acme"); store.snapshot()                           # cached: no I/O, current within ~1 s
    store.subscribe(lambda bindings: ...)                         # called on a background thread on change

Two backends share everything but their I/O (reranker.registry.store): `file:` (reranker.registry.filestore)
and `etcd://` (reranker.registry.etcdstore, imported only when asked for). Not reranker.tenants, which is one
process's loaded adapters. Imports neither torch nor gRPC: the gateway uses it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from reranker.registry.model import Binding, RegistryInvalid, RegistryUnavailable, TenantLimits
from reranker.registry.store import Callback, TenantStore

__all__ = ["Binding", "Callback", "RegistryInvalid", "RegistryUnavailable", "TenantLimits", "TenantStore",
           "open_store"]

FORMS = "file:PATH or etcd://HOST:PORT[/PREFIX]"
_PREFIX = re.compile(r"^/[A-Za-z0-9._/-]*$")


def open_store(url: str) -> TenantStore:
    """`file:PATH` (file:///abs/path too) or `etcd://HOST:PORT[/PREFIX]`; anything else is RegistryInvalid.
    A file that exists but is not valid is RegistryInvalid; an etcd that cannot be reached within
    etcdstore.CONNECT_TIMEOUT_S is RegistryUnavailable."""
    if not isinstance(url, str):
        raise RegistryInvalid(f"a tenant store is {FORMS}, got {type(url).__name__}")
    if url.startswith("file:"):
        from reranker.registry.filestore import FileStore

        return FileStore(_file_path(url))
    if url.startswith("etcd://"):
        host, port, prefix = _etcd_address(url)
        from reranker.registry.etcdstore import EtcdStore

        return EtcdStore(host, port, prefix)
    raise RegistryInvalid(f"a tenant store is {FORMS}, got {url!r}")


def _file_path(url: str) -> str:
    path = url.removeprefix("file:")
    if path.startswith("//"):
        if not path.startswith("///"):
            raise RegistryInvalid(f"a file tenant store is file:PATH or file:///ABSOLUTE/PATH (no host), got {url!r}")
        path = path[2:]
    if not path or path.endswith("/"):
        raise RegistryInvalid(f"a file tenant store names a file: file:PATH, got {url!r}")
    return path


def _etcd_address(url: str) -> tuple[str, int, str]:
    from reranker.registry.etcdstore import DEFAULT_PREFIX

    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise RegistryInvalid("an etcd tenant store URL carries no credentials (etcd://HOST:PORT[/PREFIX])")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.query or parts.fragment:
        raise RegistryInvalid(f"an etcd tenant store is etcd://HOST:PORT[/PREFIX], got {url!r}")
    prefix = parts.path if parts.path not in ("", "/") else DEFAULT_PREFIX
    if not _PREFIX.match(prefix) or "//" in prefix:
        raise RegistryInvalid(f"an etcd tenant store is etcd://HOST:PORT[/PREFIX], the prefix /NAME[/NAME...] of "
                              f"A-Z a-z 0-9 . _ -, got {prefix!r}")
    return parts.hostname, port, prefix if prefix.endswith("/") else prefix + "/"
