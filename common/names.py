"""The names clients choose that reach disk paths and shared records: tenants and adapters. One rule each, used
by the keys file (services.keys), the adapters root (reranker.adapters) and the tenant registry
(reranker.registry). No imports beyond `re`: the gateway and the CLI client use it too.

A tenant name prefixes storage names ("<tenant>.<collection>"), an adapter name is a directory under the
reranker's adapters root: so short, plain identifiers, never a path ('/', a leading '.', '..').
"""

from __future__ import annotations

import re

# `fullmatch` everywhere below: `match` with '$' would accept a trailing newline.
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class NameInvalid(ValueError):
    """A tenant or adapter name outside its rule; the message says the rule."""


def is_tenant_name(name: object) -> bool:
    return isinstance(name, str) and TENANT_NAME.fullmatch(name) is not None


def is_adapter_name(name: object) -> bool:
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None and ".." not in name


def check_tenant_name(name: object) -> str:
    if not is_tenant_name(name):
        raise NameInvalid(f"tenant names are 1-32 of a-z, 0-9, '_' and '-' (starting with a letter or digit), "
                          f"got {name!r}")
    assert isinstance(name, str)
    return name


def check_adapter_name(name: object) -> str:
    if not is_adapter_name(name):
        raise NameInvalid(f"adapter name {name!r} must match {ADAPTER_NAME.pattern} without '..' "
                          f"(a name, not a path)")
    assert isinstance(name, str)
    return name
