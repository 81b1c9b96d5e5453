"""Tenants' collection namespaces on a shared retriever. With authentication on, a tenant's collection `docs` is
stored as `<tenant>.docs`: two tenants may both have `docs`, each sees, searches and writes only its own, and
another tenant's collection answers exactly as one that does not exist (the names in errors and replies are
the caller's own). Without authentication, names are stored as given (collections made before authentication
was turned on stay reachable that way, or by an admin key without a tenant header)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from retriever.types import CollectionExists, CollectionNotFound, CollectionStats, InvalidArgument
from services.auth import authenticated, principal
from services.convert import collection_info_to_pb
from services.gen.retrieval.v1 import retriever_pb2

# A tenant's own collection names: no dots (the namespace separator), 1-64 characters.
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Namespace:
    prefix: str  # "<tenant>." or "" (no authentication)

    @classmethod
    def of_caller(cls) -> Namespace:
        """The calling tenant's namespace (read on the event loop: the principal is a context variable)."""
        return cls(f"{principal().tenant}." if authenticated() else "")

    def stored(self, name: str) -> str:
        if self.prefix and not COLLECTION_NAME.match(name):
            raise InvalidArgument(f"collection: names are 1-64 of A-Z, a-z, 0-9, '_' and '-', got {name!r}")
        return self.prefix + name

    def owns(self, stats: CollectionStats) -> bool:
        return stats.spec.name.startswith(self.prefix)

    def info(self, stats: CollectionStats) -> retriever_pb2.CollectionInfo:
        info = collection_info_to_pb(stats)
        info.name = info.name.removeprefix(self.prefix)
        return info

    @contextmanager
    def errors(self, name: str) -> Iterator[None]:
        """Errors about a collection name it in the caller's terms, never as stored."""
        try:
            yield
        except (CollectionNotFound, CollectionExists) as exc:
            if not self.prefix:
                raise
            raise type(exc)(str(exc).replace(self.prefix + name, name)) from None
