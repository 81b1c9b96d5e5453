"""A real etcd member for tests (Debian's etcd-server) on 127.0.0.1 with free ports and a temporary data directory;
the tests that need it skip, saying what to install, where the binary is absent."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

SKIP = "install etcd-server (apt-get install etcd-server) to run the etcd registry tests"


class Etcd:
    """One etcd member on 127.0.0.1, its data kept across stop/start (a restart on the same ports and data)."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.skip(SKIP)
        self.binary, self.data_dir = binary, data_dir
        self.port, self.peer_port = free_port(), free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        log = open(self.data_dir.with_suffix(".log"), "ab")
        self.popen = subprocess.Popen(
            [self.binary, "--name", "registry-test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"registry-test={peer}"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while not self.healthy():
            assert self.popen.poll() is None, f"etcd exited: {self.log_tail()}"
            assert time.monotonic() < deadline, f"etcd not healthy in 30 s: {self.log_tail()}"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def url(self, prefix: str) -> str:
        return f"etcd://127.0.0.1:{self.port}{prefix}"

    def log_tail(self) -> str:
        return self.data_dir.with_suffix(".log").read_text(errors="replace")[-2000:]


def etcd_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """For a fixture: `yield from etcd_member(tmp_path_factory)` (stopped when the fixture ends)."""
    server = Etcd(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()
