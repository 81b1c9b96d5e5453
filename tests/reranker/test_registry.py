"""The tenant registry (reranker.registry): bindings and their validation, open_store's URLs, and the file backend
with real processes sharing one file (the etcd backend: test_registry_etcd.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from reranker.limits import LimitsInvalid
from reranker.registry import (
    Binding,
    RegistryInvalid,
    RegistryUnavailable,
    TenantLimits,
    TenantStore,
    open_store,
)
from reranker.registry.model import decode_document, encode_document

ROOT = Path(__file__).resolve().parents[2]
WITHIN_S = 1.0  # every process sharing the file sees a change within this

# A child process: puts tenants PREFIX0..PREFIX{N-1}, printing each index once its put has returned (acknowledged).
WRITER = """
import sys
from reranker.registry import Binding, open_store
store = open_store(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.put(Binding(f"{sys.argv[2]}{i}", f"adapter-{i}"))
    print(i, flush=True)
store.close()
"""


def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0) -> float:
    """Seconds until `predicate()` is true (bounded: fails after timeout_s)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s}s"
        time.sleep(0.005)
    return time.monotonic() - start


def python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"file:{tmp_path / 'registry' / 'tenants.json'}"




# ---- bindings ------------------------------------------------------------------------------------------------
def test_a_binding_round_trips_and_defaults_to_the_adapters_own_settings():
    full = Binding("acme", "acme-lora.v2", layer=13, fusion_weight=0.25, limits=TenantLimits(8, 2))
    assert Binding.from_dict(full.to_dict()) == full
    assert Binding.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    plain = Binding.from_dict({"adapter": "x"}, tenant="t1")
    assert plain == Binding("t1", "x") and plain.layer is None and plain.fusion_weight is None
    assert plain.limits == TenantLimits(None, None)
    assert Binding("t", "x", fusion_weight=1).fusion_weight == 1.0 and Binding("t", "x", layer=0).layer == 0
    assert decode_document(encode_document({"acme": full, "t1": plain})) == {"acme": full, "t1": plain}


@pytest.mark.parametrize("make", [
    lambda: Binding("Acme", "x"), lambda: Binding("", "x"), lambda: Binding("a" * 33, "x"),
    lambda: Binding("-a", "x"), lambda: Binding("a b", "x"), lambda: Binding("acme\n", "x"),
    lambda: Binding("acme", "../etc"), lambda: Binding("acme", "a..b"), lambda: Binding("acme", "a/b"),
    lambda: Binding("acme", ".hidden"), lambda: Binding("acme", "x" * 129), lambda: Binding("acme", ""),
    lambda: Binding("acme", "x", layer=-1), lambda: Binding("acme", "x", layer=5000),
    lambda: Binding("acme", "x", layer=True), lambda: Binding("acme", "x", fusion_weight=1.5),
    lambda: Binding("acme", "x", fusion_weight=float("nan")), lambda: Binding("acme", "x", fusion_weight=-0.1),
    lambda: Binding.from_dict({"adapter": "x", "fusion_wieght": 0.3}, "acme"),
    lambda: Binding.from_dict({"adapter": "x", "tenant": "other"}, "acme"),
    lambda: Binding.from_dict({"tenant": "acme"}), lambda: Binding.from_dict(["acme"]),
    lambda: Binding.from_dict({"tenant": "acme", "adapter": "x", "limits": {"max_queud": 1}}),
])
def test_names_and_numbers_outside_the_limits_are_refused(make):
    with pytest.raises(RegistryInvalid):
        make()


@pytest.mark.parametrize("make", [
    lambda: TenantLimits(max_queued=0), lambda: TenantLimits(max_inflight=-1),
    lambda: TenantLimits(max_queued=10**9), lambda: TenantLimits(max_inflight=2.5),  # type: ignore[arg-type]
])
def test_limits_outside_their_range_are_refused(make):
    with pytest.raises(LimitsInvalid):
        make()


@pytest.mark.parametrize("bad", ["", "file:", "file://host/x.json", "file:/tmp/", "redis://h:1", "etcd://h",
                                 "etcd://:2379", "etcd://h:notaport", "etcd://u:secret@h:2379", "etcd://h:2379/a b",
                                 "etcd://h:2379/a?x=1", "/tmp/tenants.json"])
def test_open_store_names_the_accepted_forms(bad):
    with pytest.raises(RegistryInvalid) as raised:
        open_store(bad)
    assert "secret" not in str(raised.value)
    assert "file:PATH" in str(raised.value) or "etcd://HOST:PORT" in str(raised.value)


def test_importing_the_registry_pulls_in_no_model_or_grpc_code():
    """The gateway reads the registry: neither backend may bring torch, transformers, safetensors or gRPC."""
    probe = ("import sys, reranker.registry, reranker.registry.filestore, reranker.registry.etcdstore, "
             "common.names; print('\\n'.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = {m.split(".")[0] for m in result.stdout.split()} & {"torch", "transformers", "safetensors", "grpc",
                                                               "google", "numpy"}
    assert not heavy, f"reranker.registry imports {sorted(heavy)}"


# ---- the file backend ----------------------------------------------------------------------------------------
def test_put_get_delete_are_durable_and_idempotent(tmp_path, url, stores):
    store = stores(url)
    path = Path(url.removeprefix("file:"))
    assert store.snapshot() == {} and not path.exists(), "a missing file is an empty registry"
    binding = Binding("acme", "acme-lora", fusion_weight=0.5)
    store.put(binding)
    assert store.get("acme") == binding, "read-your-writes"
    assert decode_document(path.read_text()) == {"acme": binding}, "written through, parents created"
    inode = path.stat().st_ino
    store.put(binding)
    assert path.stat().st_ino == inode, "the same binding again writes nothing"
    store.put(Binding("acme", "acme-lora", fusion_weight=0.7))
    assert store.get("acme") == Binding("acme", "acme-lora", fusion_weight=0.7), "put replaces"
    assert store.delete("acme") is True and store.delete("acme") is False
    assert store.get("acme") is None and decode_document(path.read_text()) == {}
    with pytest.raises(RegistryInvalid):
        store.delete("../acme")
    reopened = stores(url)
    assert reopened.snapshot() == {}
    store.put(Binding("t2", "x"))
    assert wait_for(lambda: "t2" in reopened.snapshot()) < WITHIN_S


def test_two_stores_in_one_process_see_each_others_writes_within_a_second(url, stores):
    a, b = stores(url), stores(url)
    heard: list[tuple[Mapping[str, Binding], str]] = []
    b.subscribe(lambda snapshot: heard.append((snapshot, threading.current_thread().name)))
    a.put(Binding("acme", "x"))
    assert wait_for(lambda: b.get("acme") is not None) < WITHIN_S
    assert wait_for(lambda: heard and "acme" in heard[-1][0]) < WITHIN_S
    assert heard[-1][1] != threading.current_thread().name, "callbacks run on a background thread"
    b.put(Binding("globex", "y"))
    assert wait_for(lambda: a.get("globex") == Binding("globex", "y")) < WITHIN_S
    b.delete("acme")
    assert wait_for(lambda: "acme" not in a.snapshot()) < WITHIN_S
    with pytest.raises(TypeError):
        a.snapshot()["x"] = Binding("x", "y")


def test_another_process_sees_writes_and_its_writes_are_seen(url, stores):
    child = python("""
import sys, time
from reranker.registry import Binding, open_store
store = open_store(sys.argv[1])
print("ready", flush=True)
start = time.monotonic()
while store.get("from-parent") is None and time.monotonic() - start < 10:
    time.sleep(0.005)
print(f"seen {time.monotonic() - start:.3f}" if store.get("from-parent") else "timeout", flush=True)
store.put(Binding("from-child", "child-adapter"))
store.close()
""", url)
    store = stores(url)
    heard: list[Mapping[str, Binding]] = []
    store.subscribe(heard.append)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        store.put(Binding("from-parent", "parent-adapter"))
        line = child.stdout.readline().split()
        assert line[0] == "seen" and float(line[1]) < WITHIN_S, (line, child.stderr)
        wait_for(lambda: store.get("from-child") == Binding("from-child", "child-adapter"), WITHIN_S)
        wait_for(lambda: heard and "from-child" in heard[-1], WITHIN_S)
        assert child.wait(timeout=30) == 0, child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.wait()


def test_concurrent_writers_in_two_processes_lose_nothing(url, stores):
    writers = [python(WRITER, url, prefix, "50") for prefix in ("a", "b")]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        assert out.split() == [str(i) for i in range(50)]
    expected = {f"{p}{i}": Binding(f"{p}{i}", f"adapter-{i}") for p in "ab" for i in range(50)}
    assert decode_document(Path(url.removeprefix("file:")).read_text()) == expected
    assert stores(url).snapshot() == expected


def test_a_writer_killed_mid_write_leaves_a_whole_file_with_every_acknowledged_write(url, stores):
    path = Path(url.removeprefix("file:"))
    for trial, kill_after in enumerate((3, 7, 11, 17, 24)):
        prefix = f"k{trial}x"
        writer = python(WRITER, url, prefix, "400")
        assert writer.stdout is not None
        acknowledged = -1
        for _ in range(kill_after):
            line = writer.stdout.readline()
            assert line, writer.stderr.read() if writer.stderr else ""
            acknowledged = int(line)
        time.sleep(0.002 * trial)  # land the kill at different points of the next put
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        acknowledged = max([acknowledged, *(int(x) for x in writer.stdout.read().split())])
        ours = sorted(int(t.removeprefix(prefix)) for t in decode_document(path.read_text()) if t.startswith(prefix))
        assert ours == list(range(len(ours))), "a prefix of the writes"
        assert acknowledged < len(ours) <= acknowledged + 2, "every acknowledged write, at most the one in flight"
    store = stores(url)  # the lock of a killed writer is gone with it
    store.put(Binding("after", "x"))
    assert "after" in decode_document(path.read_text())


def test_a_half_written_temporary_file_is_ignored(url, stores):
    store = stores(url)
    store.put(Binding("acme", "x"))
    path = Path(url.removeprefix("file:"))
    path.with_name(path.name + ".tmp").write_text('{"format": 1, "tenants": {"ha')  # a crash before the rename
    assert stores(url).snapshot() == {"acme": Binding("acme", "x")}
    store.put(Binding("globex", "y"))
    assert set(decode_document(path.read_text())) == {"acme", "globex"}


def test_a_hand_edit_that_breaks_the_file_keeps_the_last_good_state_and_refuses_writes(url, stores, caplog):
    store = stores(url)
    heard: list[Mapping[str, Binding]] = []
    store.subscribe(heard.append)
    store.put(Binding("acme", "x"))
    path = Path(url.removeprefix("file:"))
    wait_for(lambda: heard)
    for broken in ('{"format": 1, "tenants": {"acme": {"adapter": "x",}}}',  # a stray comma
                   '{"format": 1, "tenants": {"acme": {"adapter": "../etc"}}}',
                   '{"format": 1, "tenants": {"acme": {"adapter": "x", "fusion_wieght": 0.3}}}'):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="reranker.registry.filestore"):
            path.write_text(broken)  # by hand: not atomic, no lock
            wait_for(lambda: caplog.records, 2 * WITHIN_S)
            time.sleep(0.7)  # more checks of the same broken file: still reported once
        assert len(caplog.records) == 1 and "last good state" in caplog.records[0].getMessage()
        assert store.snapshot() == {"acme": Binding("acme", "x")}, "the last good state is served"
        with pytest.raises(RegistryInvalid, match="not valid.*fix it by hand"):
            store.put(Binding("globex", "y"))
        with pytest.raises(RegistryInvalid, match="fix it by hand"):
            store.delete("acme")
        assert path.read_text() == broken, "a hand edit is never overwritten"
    with pytest.raises(RegistryInvalid, match="not valid"):
        open_store(url)  # a server does not start on a broken registry
    calls = len(heard)
    path.write_text(json.dumps({"format": 1, "tenants": {"fixed": {"adapter": "z", "layer": 3}}}))
    wait_for(lambda: store.get("fixed") == Binding("fixed", "z", layer=3), WITHIN_S + 0.5)
    assert "acme" not in store.snapshot()
    # Subscribers hear of a change on the store's notifier thread, a moment after the snapshot changes.
    wait_for(lambda: len(heard) > calls and "fixed" in heard[-1], WITHIN_S)
    store.put(Binding("globex", "y"))
    assert set(decode_document(path.read_text())) == {"fixed", "globex"}


def test_subscribers_hear_only_changes_and_one_failing_does_not_stop_the_others(url, stores):
    store = stores(url)
    heard: list[Mapping[str, Binding]] = []

    def broken(snapshot: Mapping[str, Binding]) -> None:
        raise RuntimeError("a subscriber's bug")

    store.subscribe(broken)
    store.subscribe(heard.append)
    store.put(Binding("acme", "x"))
    wait_for(lambda: heard)
    store.put(Binding("acme", "x"))
    store.delete("nobody")
    time.sleep(0.7)
    assert len(heard) == 1, "no change, no call"
    store.delete("acme")
    wait_for(lambda: len(heard) == 2 and heard[-1] == {})


def test_close_stops_the_threads_and_refuses_writes(url):
    before = threading.active_count()
    store = open_store(url)
    store.put(Binding("acme", "x"))
    store.close()
    store.close()
    assert threading.active_count() <= before
    with pytest.raises(RegistryUnavailable):
        store.put(Binding("acme", "y"))
    assert store.get("acme") == Binding("acme", "x"), "the last snapshot is still readable"
    assert os.path.exists(url.removeprefix("file:"))


def test_threads_writing_through_two_stores_in_one_process_lose_nothing(url, stores):
    a, b = stores(url), stores(url)

    def write(store: TenantStore, prefix: str) -> None:
        for i in range(25):
            store.put(Binding(f"{prefix}{i}", "x"))

    threads = [threading.Thread(target=write, args=(store, prefix)) for store, prefix in ((a, "a"), (b, "b"), (a, "c"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = {f"{p}{i}" for p in "abc" for i in range(25)}
    assert set(decode_document(Path(url.removeprefix("file:")).read_text())) == expected
    wait_for(lambda: set(a.snapshot()) == set(b.snapshot()) == expected, WITHIN_S)


def test_a_subscriber_may_use_the_store(url, stores):
    store = stores(url)

    def mirror(snapshot: Mapping[str, Binding]) -> None:
        if "acme" in snapshot and "mirror" not in snapshot:
            store.put(Binding("mirror", snapshot["acme"].adapter))

    store.subscribe(mirror)
    store.put(Binding("acme", "x"))
    wait_for(lambda: store.get("mirror") == Binding("mirror", "x"))


def test_a_stuck_writer_makes_writes_unavailable_not_hang(url, stores, monkeypatch):
    import fcntl

    from reranker.registry import filestore

    monkeypatch.setattr(filestore, "LOCK_WAIT_S", 0.3)
    store = stores(url)
    store.put(Binding("acme", "x"))
    with open(url.removeprefix("file:") + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another writer, stuck holding the lock
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="held by another writer"):
            store.put(Binding("globex", "y"))
        assert time.monotonic() - start < 2
    store.put(Binding("globex", "y"))
    assert set(store.snapshot()) == {"acme", "globex"}
