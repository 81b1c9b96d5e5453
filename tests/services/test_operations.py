"""Operations against live retriever, reranker and gateway processes on 127.0.0.1: Prometheus metrics scraped
after real traffic, and the gateway's admission control under a burst."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml

from services.gen.retrieval.v1 import (
    reranker_pb2,
    reranker_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from tests.conftest import FIXTURE_DOCS, fixture_documents, free_port
from tests.services.live_stack import Stack, scrape, stack_fixture, value  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.integration
SEARCHES = 4
DEPTH = 3


def test_every_service_exposes_its_metrics_after_traffic(stack: Stack) -> None:
    ports = stack.ports
    search = search_pb2_grpc.SearchServiceStub(stack.gateway.channel()).Search
    for query in ("blood sugar", "volcanic ash", "kittens purr", "baking bread")[:SEARCHES]:
        assert search(search_pb2.SearchRequest(collection="c", query=query, top_k=3, rerank_depth=DEPTH),
                      timeout=120).reranked
    for bad, code in ((search_pb2.SearchRequest(collection="c", query="", top_k=3), "INVALID_ARGUMENT"),
                      (search_pb2.SearchRequest(collection="nope", query="q", top_k=3), "NOT_FOUND")):
        with pytest.raises(grpc.RpcError) as info:
            search(bad, timeout=30)
        assert info.value.code().name == code

    g = scrape(ports["gateway"])
    rpc = {"grpc_service": "retrieval.v1.SearchService", "grpc_method": "Search"}
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="OK") == SEARCHES
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="INVALID_ARGUMENT") == 1
    assert value(g, "grpc_server_handled_total", **rpc, grpc_code="NOT_FOUND") == 1
    assert value(g, "grpc_server_started_total", **rpc) == SEARCHES + 2
    assert value(g, "grpc_server_handling_seconds_count", **rpc) == SEARCHES + 2
    assert value(g, "gateway_stage_seconds_count", stage="rerank") == SEARCHES
    assert value(g, "gateway_stage_seconds_count", stage="retrieve") == SEARCHES  # failed ones never got there
    assert value(g, "gateway_stage_seconds_sum", stage="rerank") > 0

    r = scrape(ports["reranker"])
    rerank = {"grpc_service": "retrieval.v1.RerankerService", "grpc_method": "Rerank"}
    assert value(r, "grpc_server_handled_total", **rerank, grpc_code="OK") == SEARCHES
    assert value(r, "reranker_documents_total") == SEARCHES * DEPTH
    assert value(r, "reranker_request_documents_count") == SEARCHES
    assert 1 <= value(r, "reranker_batch_requests_count") <= SEARCHES
    assert value(r, "reranker_batch_requests_sum") == SEARCHES
    assert value(r, "reranker_batch_tokens_sum") > SEARCHES * DEPTH
    assert value(r, "reranker_model_seconds_count") == SEARCHES and value(r, "reranker_model_seconds_sum") > 0
    assert value(r, "reranker_queue_wait_seconds_count") == SEARCHES
    assert value(r, "reranker_queue_depth") == 0
    assert value(r, "reranker_tenants_loaded") >= 1  # the shipped adapter, as the default tenant
    assert value(r, "reranker_tenant_block_bytes") > 0 and value(r, "reranker_base_model_bytes") > 0
    assert value(r, "reranker_prefix_cache_hits_total") + value(r, "reranker_prefix_cache_misses_total") > 0
    # One tenant's batches on a CPU: its adapter merged into weight copies once, then found again.
    assert value(r, "reranker_merged_weights_bytes") > 0 and value(r, "reranker_merged_weights_hits_total") > 0

    q = scrape(ports["retriever"])
    retrieve = {"grpc_service": "retrieval.v1.RetrieverService", "grpc_method": "Retrieve"}
    assert value(q, "grpc_server_handled_total", **retrieve, grpc_code="OK") == SEARCHES
    assert value(q, "grpc_server_handled_total", **retrieve, grpc_code="NOT_FOUND") == 1
    assert value(q, "retriever_collection_documents", collection="c") == len(FIXTURE_DOCS)
    assert value(q, "retriever_embedded_texts_total") >= len(FIXTURE_DOCS) + SEARCHES
    assert value(q, "retriever_embedding_seconds_total") > 0
    # Bounded cardinality: only these labels (RPC, code, stage, collection, a refusal's reason; the client library's own process
    # and Python metrics' labels; histogram buckets), never a query, a document or a tenant.
    allowed = {"grpc_service", "grpc_method", "grpc_code", "stage", "collection", "reason", "le", "method", "outcome", "state",
               "generation", "implementation", "major", "minor", "patchlevel", "version"}
    assert {name for samples in (g, r, q) for _, labels in samples for name, _ in labels} <= allowed


def test_gateway_admission_sheds_a_burst_and_recovers(stack: Stack, server_factory) -> None:
    """One request worked on at once and two queued: a burst of 12 gets the rest refused at once with the retry
    hint, every admitted one answers, a call that could not finish before its deadline is refused without
    waiting, and afterwards the gateway serves as before."""
    port = free_port()
    gateway = server_factory("services.gateway", ["--retriever-target", stack.retriever.target, "--reranker-target",
                                                  stack.reranker.target, "--max-in-flight", "1", "--max-queued", "2",
                                                  "--retry-after-ms", "250", "--metrics-port", str(port)]).start()
    request = search_pb2.SearchRequest(collection="c", query="blood sugar", top_k=3, rerank_depth=len(FIXTURE_DOCS))

    async def burst(n: int, timeout: float) -> list:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            return await asyncio.gather(*[stub.Search(request, timeout=timeout) for _ in range(n)],
                                        return_exceptions=True)

    outcomes = asyncio.run(burst(12, timeout=120))
    answered = [o for o in outcomes if isinstance(o, search_pb2.SearchResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(answered) == 3 and all(o.reranked for o in answered), "one in flight + two queued"
    assert len(refused) == 9 and {o.code() for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(("grpc-retry-pushback-ms", "250") in tuple(o.trailing_metadata() or ()) for o in refused)
    assert "overloaded" in (refused[0].details() or "")

    # Behind a full rerank (hundreds of ms on a CPU, which the gateway has now timed), a 0.1 s call cannot finish
    # in time: it is refused at once rather than queued until its deadline passes.
    async def short_behind_a_rerank() -> BaseException | search_pb2.SearchResponse:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            slow = asyncio.ensure_future(stub.Search(request, timeout=120))
            await asyncio.sleep(0.02)
            short = await asyncio.gather(stub.Search(request, timeout=0.1), return_exceptions=True)
            await slow
            return short[0]

    hopeless = asyncio.run(short_behind_a_rerank())
    assert isinstance(hopeless, grpc.aio.AioRpcError) and hopeless.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "would finish in about" in (hopeless.details() or "")

    assert search_pb2_grpc.SearchServiceStub(gateway.channel()).Search(request, timeout=60).reranked  # recovered
    samples = scrape(port)
    assert value(samples, "admission_rejected_total", reason="queue_full") == len(refused)
    assert value(samples, "admission_rejected_total", reason="expected_wait") == 1
    assert value(samples, "admission_in_flight") == 0 and value(samples, "admission_queued") == 0


def test_reranker_refuses_at_once_a_rerank_that_would_finish_past_its_share_of_the_deadline(stack: Stack) -> None:
    """Behind a long rerank (the reranker has timed a forward before), a call with 0.15 s left cannot finish
    within half of it: the reranker refuses it at once, with the retry hint, rather than queueing it until its
    deadline passes (which would end in DEADLINE_EXCEEDED)."""
    few = reranker_pb2.RerankRequest(query="blood sugar", documents=fixture_documents())
    many = reranker_pb2.RerankRequest(query="blood sugar", documents=fixture_documents() * 6)
    assert reranker_pb2_grpc.RerankerServiceStub(stack.reranker.channel()).Rerank(few, timeout=120).results

    async def short_behind_a_long_rerank() -> BaseException | reranker_pb2.RerankResponse:
        async with grpc.aio.insecure_channel(stack.reranker.target) as channel:
            stub = reranker_pb2_grpc.RerankerServiceStub(channel)
            long = asyncio.ensure_future(stub.Rerank(many, timeout=120))
            await asyncio.sleep(0.2)  # submitted (tokenising a few dozen documents takes milliseconds)
            short = await asyncio.gather(stub.Rerank(few, timeout=0.15), return_exceptions=True)
            assert (await long).results
            return short[0]

    refused = asyncio.run(short_behind_a_long_rerank())
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "would finish in about" in (refused.details() or "")
    assert ("grpc-retry-pushback-ms", "100") in tuple(refused.trailing_metadata() or ())
    samples = scrape(stack.ports["reranker"])
    assert value(samples, "reranker_rejected_total", reason="expected_late") == 1
    assert value(samples, "reranker_rejected_total", reason="queue_full") == 0


def test_three_times_capacity_is_shed_and_the_gateway_recovers(stack: Stack, server_factory, tmp_path) -> None:
    """The load test measures the stack's capacity (open loop, SLO p99 <= 3 s), then offers 3x that to a gateway
    with admission limits: the excess is refused at once, every admitted request answers within its deadline,
    and afterwards a closed-loop client sees no error and its old latency."""
    from deploy.loadtest import cli

    gateway = server_factory("services.gateway", ["--retriever-target", stack.retriever.target, "--reranker-target",
                                                  stack.reranker.target, "--max-in-flight", "2", "--max-queued", "2"]
                             ).start()
    (tmp_path / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": text}) + "\n"
        for i, text in enumerate(["blood sugar", "volcanic ash", "kittens purr", "baking bread", "roman emperors"])))
    common = ["--target", gateway.target, "--collection", "c", "--queries", str(tmp_path), "--top-k", "3",
              "--rerank-depth", str(len(FIXTURE_DOCS)), "--timeout-s", "10", "--no-progress"]

    def load(*args: str) -> dict:
        out = tmp_path / f"load-{len(list(tmp_path.glob('load-*.json')))}.json"
        assert cli.main([*common, *args, "--out", str(out)]) == 0
        return dict(json.loads(out.read_text()))

    before = load("--mode", "closed", "--concurrency", "1", "--requests", "8")["levels"][0]
    # Judged on the median with 10% allowed to fail, a probe needs only 10 arrivals (p99 and 1%: 100).
    capacity = load("--mode", "capacity", "--slo-ms", "3000", "--slo-percentile", "50", "--max-error-rate", "0.1",
                    "--requests", "12", "--duration-s", "4", "--bisections", "1")["capacity"]["capacity_rps"]
    assert capacity > 0
    over = load("--mode", "open", "--rates", f"{3 * capacity:.3f}", "--requests", "200", "--duration-s", "4")
    level = over["levels"][0]
    assert level["errors"].get("RESOURCE_EXHAUSTED", 0) > 0, level  # shed
    assert set(level["errors"]) == {"RESOURCE_EXHAUSTED"}, level  # no admitted request missed its deadline
    assert level["ok"] > 0 and level["latency_ms"]["max"] < 10_000

    after = load("--mode", "closed", "--concurrency", "1", "--requests", "8")["levels"][0]
    assert after["error_count"] == 0
    assert after["latency_ms"]["p50"] < 2 * before["latency_ms"]["p50"] + 50


# ---- compose monitoring: the files, the dashboard against live metrics, a real Prometheus ---------------------
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "monitoring" / "grafana" / "dashboards" / "retrieval.json"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "without", "avg", "max", "min", "irate", "increase"}


def needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: prometheus, docker-compose; `make test` installs "
                    "them when run as root)")


def dashboard_queries() -> dict[str, list[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in panels}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left without strings, label matchers, `by (...)`,
    ranges, functions and numbers."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^]]*\]|\bby \([^)]*\)', " ", expr)
    return {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if t not in PROMQL_WORDS}


def test_compose_and_prometheus_files_are_valid() -> None:
    needs("docker-compose", "promtool")
    compose = DEPLOY / "docker-compose.yml"
    rendered = subprocess.run(["docker-compose", "-f", str(compose), "config"], capture_output=True, text=True,
                              env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-only"}, check=False)
    assert rendered.returncode == 0, rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    assert {"retriever", "reranker", "gateway", "prometheus", "grafana"} <= set(config["services"])
    for service in ("retriever", "reranker", "gateway"):
        assert config["services"][service]["environment"][f"{service.upper()}_METRICS_PORT"] == "9100"
    unset = subprocess.run(["docker-compose", "-f", str(compose), "config"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}, check=False)
    assert unset.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in unset.stderr, "no default admin password"
    prometheus = DEPLOY / "monitoring" / "prometheus.yml"
    check = subprocess.run(["promtool", "check", "config", str(prometheus)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(prometheus.read_text())["scrape_configs"]}
    assert set(jobs) == {"gateway", "retriever", "reranker"}
    for name in ("gateway", "retriever"):
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:9100"]
    assert jobs["reranker"]["dns_sd_configs"] == [{"names": ["reranker"], "type": "A", "port": 9100}]  # replicas
    gateway_command = config["services"]["gateway"]["command"]
    assert "dns:///reranker:50052" in gateway_command and "dns:///retriever:50051" in gateway_command
    # Tenants: every replica reads one registry on a shared volume; the gateway routes tenants to replicas.
    reranker = config["services"]["reranker"]
    assert reranker["environment"]["RERANKER_TENANTS_STORE"] == "file:/tenants/tenants.json"
    assert any(v["type"] == "volume" and v["source"] == "tenants" and v["target"] == "/tenants"
               for v in reranker["volumes"])
    assert config["services"]["gateway"]["environment"]["GATEWAY_TENANT_SPREAD"] == "1"
    # Secure by default (tests/deploy/test_compose.py checks the rest): TLS to clients, mutual TLS from the
    # gateway to the downstreams, API keys everywhere, health checks over TLS.
    gateway = config["services"]["gateway"]
    assert gateway["environment"]["GATEWAY_TLS_CERT"] and gateway["environment"]["GATEWAY_KEYS_FILE"]
    assert gateway["environment"]["GATEWAY_DOWNSTREAM_CERT"] and "--ca" in gateway["healthcheck"]["test"]
    for name in ("retriever", "reranker"):
        environment = config["services"][name]["environment"]
        assert environment[f"{name.upper()}_TLS_CLIENT_CA"] and environment[f"{name.upper()}_KEYS_FILE"]
        assert environment[f"{name.upper()}_TRUSTED_FORWARDERS"] == "gateway"
        assert {"--ca", "--cert", "--key"} <= set(config["services"][name]["healthcheck"]["test"])


def test_the_milvus_override_renders_and_points_the_retriever_at_milvus() -> None:
    needs("docker-compose")
    files = ["-f", str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "docker-compose.milvus.yml")]
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-only", "MINIO_ROOT_PASSWORD": "test-only"}
    rendered = subprocess.run(["docker-compose", *files, "config"], capture_output=True, text=True, env=env,
                              check=False)
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert {"etcd", "minio", "milvus"} <= set(services)
    retriever = services["retriever"]
    assert retriever["command"][-4:] == ["--backend", "milvus", "--milvus-uri", "http://milvus:19530"]
    assert retriever["build"]["args"]["PROJECT_EXTRAS"] == "[milvus]" and retriever["image"] != services["gateway"]["image"]
    assert services["milvus"]["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert services["reranker"]["environment"]["RERANKER_TENANTS_STORE"] == "etcd://etcd:2379/blockrank/tenants/"
    assert retriever["environment"]["RETRIEVER_TLS_CLIENT_CA"] == "/secrets/ca.crt"  # still mutual TLS and keys
    assert retriever["environment"]["RETRIEVER_KEYS_FILE"] == "/secrets/keys.json"
    unset = subprocess.run(["docker-compose", *files, "config"], capture_output=True, text=True, check=False,
                           env={k: v for k, v in env.items() if k != "MINIO_ROOT_PASSWORD"})
    assert unset.returncode != 0 and "MINIO_ROOT_PASSWORD" in unset.stderr, "no default object-store secret"


def test_dashboard_queries_read_metrics_the_services_expose(stack: Stack) -> None:
    search = search_pb2_grpc.SearchServiceStub(stack.gateway.channel()).Search  # labelled series exist after use
    assert search(search_pb2.SearchRequest(collection="c", query="ash", top_k=2, rerank_depth=2), timeout=60).reranked
    exposed = {name for port in stack.ports.values() for name, _ in scrape(port)}
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, exprs in queries.items():
        names = set().union(*(metric_names(e) for e in exprs))
        assert names, title
        assert names <= exposed, (title, names - exposed)


def test_a_real_prometheus_scrapes_the_stack(stack: Stack, tmp_path: Path) -> None:
    """Prometheus (the Debian package) on 127.0.0.1 scraping the three live services each second: every target
    up, a query over real traffic returns it, and every dashboard query is valid PromQL there."""
    needs("prometheus")
    port = free_port()
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]}
                                 for name, p in stack.ports.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def get(path: str) -> dict:
            with urllib.request.urlopen(f"{api}/{path}", timeout=5) as reply:
                return dict(json.loads(reply.read()))

        def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if check():
                        return
                except OSError:
                    pass  # not listening yet
                time.sleep(0.5)
            raise AssertionError(f"{what} within {timeout}s: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")

        until(lambda: sorted(t["health"] for t in get("targets")["data"]["activeTargets"]) == ["up"] * 3,
              "all three targets up")
        search = search_pb2_grpc.SearchServiceStub(stack.gateway.channel()).Search
        before = search(search_pb2.SearchRequest(collection="c", query="lava", top_k=2, rerank_depth=2), timeout=60)
        assert before.reranked
        served = sum(v for (name, labels), v in scrape(stack.ports["gateway"]).items()
                     if name == "grpc_server_handled_total" and ("grpc_method", "Search") in labels)
        query = urllib.parse.quote('sum(grpc_server_handled_total{job="gateway",grpc_method="Search"})')
        until(lambda: [float(r["value"][1]) for r in get(f"query?query={query}")["data"]["result"]] == [served],
              f"the gateway's {served:.0f} Searches in Prometheus")
        for title, exprs in dashboard_queries().items():
            for expr in exprs:  # as Grafana sends them: its range variable replaced by a window
                reply = get(f"query?query={urllib.parse.quote(expr.replace('$__rate_interval', '1m'))}")
                assert reply["status"] == "success", (title, expr, reply)
        from deploy.dashboard import render  # the dashboard picture, from this Prometheus

        render(f"http://127.0.0.1:{port}", tmp_path / "dashboard.png", minutes=1)
        assert (tmp_path / "dashboard.png").stat().st_size > 50_000
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- replicas ---------------------------------------------------------------------------------------------------
def test_replica_targets_become_one_load_balanced_target() -> None:
    from services.downstream import channel_target

    assert channel_target("127.0.0.1:50052") == "127.0.0.1:50052"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("localhost:5,localhost:6") == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///reranker:50052") == "dns:///reranker:50052"
    with pytest.raises(ValueError, match="numeric"):
        channel_target("reranker-a:1,reranker-b:2")
