"""Shared fixtures: real servers started as subprocesses on 127.0.0.1, and the --device option of the
device-aware reranker tests. gRPC and the generated stubs are imported where used, so the reranker tests
(which import FIXTURE_DOCS from here) run on a machine that has neither, a GPU machine say."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import grpc

    from services.gen.retrieval.v1 import document_pb2
    from services.tls import ClientTls

ROOT = Path(__file__).resolve().parent.parent
# The services this suite starts run their CPU row ops eager unless a test asks otherwise: compiling them costs each
# reranker process 3.5 s at start on a CPU with AMX (18 s the first time), some 25 processes here. The compiled
# ops are held to the eager ones by tests/reranker/test_rowops.py and served by test_reranker_service.py's server.
os.environ.setdefault("RERANKER_CPU_COMPILE", "off")
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"

# A small corpus on distinct topics, so the right answer is unambiguous.
FIXTURE_DOCS = [
    ("cats", "Domestic cats", "Cats are small carnivorous mammals kept as pets; kittens purr and chase mice."),
    ("stocks", "Stock market crash", "Share prices fell sharply as investors sold equities during the panic."),
    ("volcano", "Volcanic eruptions", "Magma rises through the crust and erupts as lava, ash and volcanic gas."),
    ("bread", "Baking bread", "Yeast ferments the dough, which rises before baking into a crusty loaf."),
    ("football", "Football tactics", "The team pressed high, won the ball in midfield and scored a late goal."),
    ("insulin", "Insulin and diabetes", "Insulin lowers blood glucose; type 1 diabetes destroys beta cells."),
    ("rome", "Ancient Rome", "The Roman Empire built roads, aqueducts and the Colosseum under its emperors."),
    ("quantum", "Quantum computing", "Qubits in superposition let quantum computers factor numbers faster."),
]


def fixture_documents() -> list[document_pb2.Document]:
    from services.gen.retrieval.v1 import document_pb2

    return [document_pb2.Document(id=i, title=t, text=x, metadata={"topic": i}) for i, t, x in FIXTURE_DOCS]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the device-aware reranker tests put the model (the `device` fixture); "
                          "cuda skips them when torch sees no GPU")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The --device of this run. With cuda and no usable GPU every test using it is skipped, not failed:
    the same command runs on a CPU machine and on a GPU one."""
    import torch

    name: str = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)")
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A service module run as its own process, the way it is deployed."""

    def __init__(self, module: str, args: list[str], port: int | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, tls: ClientTls | None = None) -> None:
        self.module = module
        self.tls = tls  # how the tests reach it when it serves TLS
        self.args = args
        self.env = env or {}
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None  # where a retriever keeps its collections, when a test needs it
        if module == "services.reranker" and "--tenants-store" not in args and "RERANKER_TENANTS_STORE" not in self.env:
            # Each reranker its own tenant registry (the default file is var/tenants.json, shared by every run
            # from this checkout); kept across stop() and start(), as a restarted replica keeps its registry.
            registry = Path(tempfile.mkdtemp(prefix="tenants-")) / "tenants.json"
            self.env["RERANKER_TENANTS_STORE"] = f"file:{registry}"

    def start(self, wait: bool = True, timeout: float = 300) -> Server:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 300) -> None:
        from services.client import health_status

        assert self.popen is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if health_status(self.target, timeout=1, tls=self.tls) == "SERVING":
                return
            assert self.popen.poll() is None, f"{self.module} exited with {self.popen.returncode}: {self.log_tail()}"
            time.sleep(0.3)
        raise TimeoutError(f"{self.module} not SERVING in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def channel(self) -> grpc.Channel:
        from services.tls import channel

        return channel(self.target, self.tls)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def make(module: str, args: list[str], port: int | None = None, env: dict[str, str] | None = None,
             tls: ClientTls | None = None) -> Server:
        server = Server(module, args, port, log_path=tmp_path / f"{module.split('.')[-1]}-{len(started)}.log",
                        env=env, tls=tls)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def embedder():
    from retriever.embedder import Embedder

    return Embedder()


def ingest_fixture(target: str, collection: str = "c", tls: ClientTls | None = None) -> None:
    from services.gen.retrieval.v1 import retriever_pb2, retriever_pb2_grpc
    from services.tls import channel

    with channel(target, tls) as ch:
        s = retriever_pb2_grpc.RetrieverServiceStub(ch)
        s.CreateCollection(retriever_pb2.CreateCollectionRequest(collection=collection), timeout=30)
        s.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(collection=collection, documents=fixture_documents()),
                          timeout=60)


@pytest.fixture(scope="module")
def fixture_retriever(tmp_path_factory) -> Iterator[Server]:
    """A retriever process holding the fixture corpus in collection "c"."""
    tmp = tmp_path_factory.mktemp("retriever")
    server = Server("services.retriever", ["--data-dir", str(tmp / "data")], log_path=tmp / "retriever.log").start()
    ingest_fixture(server.target)
    yield server
    server.stop()


# Ingesting all of SciFact embeds 5,183 documents of up to 256 tokens: 9.6 documents/s on 2 AVX2 cores in fp32
# (9 minutes), 2-4x faster with native bf16. A test using scifact_retriever may take this long, the ingest
# included (the first one pays it): room for a CPU half as fast as that.
SCIFACT_TIMEOUT_S = 1500


@pytest.fixture(scope="session")
def scifact_retriever(tmp_path_factory) -> Iterator[Server]:
    """A retriever process holding all of SciFact in collection "scifact" (ingested once per session)."""
    from services.client import ingest_corpus

    tmp = tmp_path_factory.mktemp("scifact")
    server = Server("services.retriever", ["--data-dir", str(tmp / "data")], log_path=tmp / "retriever.log").start()
    try:
        ingest_corpus(server.target, "scifact", SCIFACT, progress=False)
    except BaseException:  # a timeout too: a retriever left ingesting would slow every later test down
        server.stop()
        raise
    server.data_dir = tmp / "data"  # snapshots other tests may load in-process (read only)
    yield server
    server.stop()
