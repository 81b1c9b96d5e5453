"""Fixtures of the reranker tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from reranker.registry import TenantStore, open_store


@pytest.fixture
def stores() -> Iterator[Callable[[str], TenantStore]]:
    """Tenant stores opened by a test, closed after it."""
    opened: list[TenantStore] = []

    def open_(url: str) -> TenantStore:
        opened.append(open_store(url))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()
