"""The tenant registry's etcd backend on a real etcd (Debian's etcd-server) started here on 127.0.0.1 with free
ports and a temporary data directory; skipped, saying what to install, where the binary is absent."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

import pytest
from etcd3gw.client import Etcd3Client

from reranker.registry import Binding, RegistryUnavailable, etcdstore
from reranker.registry.etcdstore import REQUEST_TIMEOUT_S, EtcdStore
from tests.conftest import free_port
from tests.etcd import Etcd, etcd_member

SEEN_S = 5.0  # a change reaches the other store's watcher within this
RESYNC_S = 15.0  # after etcd comes back: the backoff (at most 2 s) plus a full read


def wait_for(predicate: Callable[[], object], timeout_s: float = SEEN_S) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s}s"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    yield from etcd_member(tmp_path_factory)




def test_two_stores_share_bindings_through_etcd(etcd, stores, request):
    prefix = f"/test/{request.node.name}/"
    a, b = stores(etcd.url(prefix)), stores(etcd.url(prefix.rstrip("/")))
    assert a.url == b.url == f"etcd://127.0.0.1:{etcd.port}{prefix}"
    heard: list[Mapping[str, Binding]] = []
    b.subscribe(heard.append)
    binding = Binding("acme", "acme-lora", layer=13, fusion_weight=0.25)
    a.put(binding)
    assert a.get("acme") == binding, "read-your-writes"
    assert wait_for(lambda: b.get("acme") == binding) < SEEN_S
    wait_for(lambda: heard and heard[-1] == {"acme": binding})
    a.put(binding)  # idempotent
    b.put(Binding("globex", "g"))
    wait_for(lambda: set(a.snapshot()) == {"acme", "globex"})
    assert b.delete("acme") is True and b.delete("acme") is False
    wait_for(lambda: a.snapshot() == {"globex": Binding("globex", "g")})
    wait_for(lambda: heard[-1] == {"globex": Binding("globex", "g")})
    late = stores(etcd.url(prefix))
    assert late.snapshot() == {"globex": Binding("globex", "g")}, "a new store starts from a full read"
    assert stores(etcd.url("/test/elsewhere/")).snapshot() == {}, "prefixes do not mix"
    start = time.monotonic()
    b.close()  # interrupts the watch stream it is blocked on
    assert time.monotonic() - start < 1.0


def test_a_bad_record_written_around_the_store_keeps_the_last_good_binding(etcd, stores, request, caplog):
    prefix = f"/test/{request.node.name}/"
    store = stores(etcd.url(prefix))
    store.put(Binding("acme", "x"))
    raw = Etcd3Client(host="127.0.0.1", port=etcd.port, api_path="/v3/")  # a second, independent client
    raw.put(prefix + "acme", '{"adapter": "../etc"}')
    raw.put(prefix + "Not A Tenant", '{"adapter": "x"}')
    raw.put(prefix + "globex", '{"adapter": "g"}')
    wait_for(lambda: "globex" in store.snapshot())
    assert store.snapshot() == {"acme": Binding("acme", "x"), "globex": Binding("globex", "g")}
    assert any("not a valid binding" in r.getMessage() for r in caplog.records)
    reopened = stores(etcd.url(prefix))
    assert reopened.snapshot() == {"globex": Binding("globex", "g")}, "no good state to keep: ignored"
    raw.session.close()


def test_a_quiet_watch_is_renewed_without_alarm(etcd, stores, request, monkeypatch, caplog):
    """A watch idle for IDLE_S is dropped and re-established with a full read (how a peer that vanished without
    closing the connection is noticed); that is routine: nothing is lost and nothing is logged as an outage."""
    monkeypatch.setattr(etcdstore, "IDLE_S", 0.5)
    prefix = f"/test/{request.node.name}/"
    a, b = stores(etcd.url(prefix)), stores(etcd.url(prefix))
    caplog.set_level(logging.DEBUG, logger=etcdstore.__name__)
    for i in range(3):
        time.sleep(1.2)  # more than one idle period
        a.put(Binding(f"t{i}", "x"))
        wait_for(lambda: len(b.snapshot()) == i + 1)  # noqa: B023 (called at once, in this iteration)
    assert any("renewing" in r.getMessage() for r in caplog.records), "the quiet watches were renewed"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_opening_an_unreachable_etcd_fails_promptly():
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="cannot be reached"):
        EtcdStore("127.0.0.1", free_port(), connect_timeout_s=1.0)
    assert time.monotonic() - start < 5


def test_an_etcd_restart_refuses_writes_promptly_then_resyncs(tmp_path, stores, caplog):
    server = Etcd(tmp_path / "data")
    server.start()
    try:
        url = server.url("/blockrank/tenants/")
        a, b = stores(url), stores(url)
        heard: list[Mapping[str, Binding]] = []
        b.subscribe(heard.append)
        before = {f"t{i}": Binding(f"t{i}", f"adapter-{i}") for i in range(5)}
        for binding in before.values():
            a.put(binding)
        wait_for(lambda: b.snapshot() == before)

        server.stop()
        for write in (lambda: a.put(Binding("down", "x")), lambda: b.delete("t0")):
            start = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                write()
            assert time.monotonic() - start < REQUEST_TIMEOUT_S + 1, "refused in bounded time, not hanging"
        assert a.snapshot() == b.snapshot() == before, "the cached bindings are still served"

        server.start()
        writer = stores(url)  # another client, after the restart: its write must reach the watchers
        writer.put(Binding("after", "after-lora"))
        expected = {**before, "after": Binding("after", "after-lora")}
        assert wait_for(lambda: a.snapshot() == expected and b.snapshot() == expected, RESYNC_S) < RESYNC_S
        wait_for(lambda: heard and heard[-1] == expected)
        a.put(Binding("again", "x"))
        wait_for(lambda: b.get("again") == Binding("again", "x"))
        writer.delete("t1")
        wait_for(lambda: "t1" not in a.snapshot() and "t1" not in b.snapshot())
        outages = [r.getMessage() for r in caplog.records if r.name == etcdstore.__name__ and r.levelno >= logging.WARNING]
        assert sum("lost etcd" in m for m in outages) == 2, "one report per store and outage, not per attempt"
        assert sum("reconnected" in m for m in outages) == 2, outages
    finally:
        server.stop()
