"""The load-test script against a real gateway + retriever on 127.0.0.1, and its loopback-only rule."""

import json

import grpc
import pytest

from deploy.loadtest import cli
from deploy.loadtest.target import NotLoopbackError, loopback_target

pytestmark = pytest.mark.integration

QUERIES = ["blood sugar and the pancreas", "volcanic ash and lava", "emperors of ancient Rome",
           "kittens chasing mice", "qubits and superposition"]


def write_queries(directory) -> None:
    (directory / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": text}) + "\n" for i, text in enumerate(QUERIES)))


def test_load_levels_against_gateway(server_factory, fixture_retriever, tmp_path, capsys):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target]).start()
    write_queries(tmp_path)
    out = tmp_path / "bench" / "load.json"

    code = cli.main(["--target", gateway.target, "--collection", "c", "--queries", str(tmp_path),
                          "--top-k", "3", "--concurrency", "1,2", "--requests", "20", "--duration-s", "20",
                          "--no-progress", "--out", str(out)])

    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["error_count"] == 0 and level["errors"] == {}
        assert 0 < level["ok"] == level["requests"] <= 20
        assert level["throughput_rps"] > 0
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
        assert level["server_mean_ms"]["retrieve_ms"] > 0
        assert level["server_mean_ms"]["rerank_ms"] == 0  # rerank depth 0: no reranking
    assert result["config"]["resolved_target"] == gateway.target
    assert out.with_suffix(".png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "p99 ms" in table and "srv retrieve_ms" in table


def test_non_loopback_target_is_refused_before_connecting(tmp_path, monkeypatch, capsys):
    def no_channel(*args, **kwargs):
        raise AssertionError("a channel was opened to a refused target")

    monkeypatch.setattr(grpc.aio, "insecure_channel", no_channel)
    monkeypatch.setattr(grpc, "insecure_channel", no_channel)
    write_queries(tmp_path)
    out = tmp_path / "load.json"

    code = cli.main(["--target", "10.1.2.3:50050", "--collection", "c", "--queries", str(tmp_path),
                          "--concurrency", "1", "--requests", "1", "--duration-s", "1", "--out", str(out)])

    assert code != 0
    assert "loopback" in capsys.readouterr().err
    assert not out.exists()
    for target in ["10.1.2.3:50050", "192.168.1.1:1", "8.8.8.8:443", "[2001:db8::1]:50050", "0.0.0.0:50050",
                   "dns:///127.0.0.1:50050", "unix:/tmp/socket", "127.0.0.1", "127.0.0.1:0"]:
        with pytest.raises(NotLoopbackError):
            loopback_target(target)
    assert loopback_target("127.0.0.1:50050") == "127.0.0.1:50050"
    assert loopback_target("127.1.2.3:9") == "127.1.2.3:9"
    assert loopback_target("[::1]:50050") == "[::1]:50050"
    assert loopback_target("localhost:50050") in {"127.0.0.1:50050", "[::1]:50050"}


def test_open_loop_rates_against_gateway(server_factory, fixture_retriever, tmp_path, capsys):
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target]).start()
    write_queries(tmp_path)
    out = tmp_path / "open.json"

    code = cli.main(["--target", gateway.target, "--collection", "c", "--queries", str(tmp_path), "--top-k", "3",
                     "--mode", "open", "--rates", "10,20", "--requests", "30", "--duration-s", "20",
                     "--no-progress", "--out", str(out)])

    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert [lv["rate_rps"] for lv in result["levels"]] == [10, 20]
    for level in result["levels"]:
        assert level["ok"] == level["requests"] == 30 and level["error_count"] == 0
        # Poisson arrivals at the offered rate: 30 of them take about 30 / rate seconds to send.
        assert 0.4 * 30 / level["rate_rps"] < level["wall_s"] < 3 * 30 / level["rate_rps"] + 2
        assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
    assert "offered req/s" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0


def test_capacity_search_doubles_then_bisects():
    import asyncio

    from deploy.loadtest.openloop import Slo, find_capacity

    async def probe(rate: float) -> dict:  # a server whose p99 grows 10 ms per request/s, no errors
        return {"rate_rps": rate, "requests": 100, "error_count": 0, "latency_ms": {"p99": 10 * rate}}

    found = asyncio.run(find_capacity(probe, Slo(latency_ms=100), start_rps=1, max_rps=1000, bisections=3))
    assert [p["rate_rps"] for p in found["probes"]] == [1, 2, 4, 8, 10, 11, 12, 16]
    assert found["capacity_rps"] == 10 and found["first_failing_rps"] == 11
    assert [p["meets_slo"] for p in found["probes"]] == [True] * 5 + [False] * 3

    async def erroring(rate: float) -> dict:  # fast, but refuses 5% beyond 4 requests/s
        return {"rate_rps": rate, "requests": 100, "error_count": 5 if rate > 4 else 0, "latency_ms": {"p99": 1.0}}

    assert asyncio.run(find_capacity(erroring, Slo(latency_ms=100), 1, 1000, 0))["capacity_rps"] == 4
    unbounded = asyncio.run(find_capacity(probe, Slo(latency_ms=1e9), 1, 8, 3))
    assert unbounded["capacity_rps"] == 8 and unbounded["reached_max_rps"]
    # A start above capacity: halve until a rate passes, then bisect.
    down = asyncio.run(find_capacity(probe, Slo(latency_ms=100), start_rps=40, max_rps=1000, bisections=1))
    assert [p["rate_rps"] for p in down["probes"]] == [10, 15, 20, 40]
    assert down["capacity_rps"] == 10 and down["first_failing_rps"] == 15
    nothing = asyncio.run(find_capacity(probe, Slo(latency_ms=1), start_rps=16, max_rps=1000))
    assert nothing["capacity_rps"] == 0 and [p["rate_rps"] for p in nothing["probes"]] == [1, 2, 4, 8, 16]


def test_a_probe_is_judged_on_enough_arrivals_for_its_percentile_and_error_budget():
    import asyncio

    from deploy.loadtest.openloop import Slo, find_capacity

    # p99 needs 100 arrivals before it is not simply the slowest; a 1% budget needs 100 before one error fits.
    assert Slo(100).min_arrivals == 100
    assert Slo(100, percentile=95, max_error_rate=0.05).min_arrivals == 20
    assert Slo(100, percentile=50, max_error_rate=0.1).min_arrivals == 10
    assert Slo(100, percentile=95, max_error_rate=0.01).min_arrivals == 100

    async def short(rate: float) -> dict:  # fast and error-free, but probes above 4 req/s end with 99 arrivals
        return {"rate_rps": rate, "requests": 99 if rate > 4 else 100, "error_count": 0, "latency_ms": {"p99": 1.0}}

    found = asyncio.run(find_capacity(short, Slo(latency_ms=100), 1, 1000, 0))
    assert found["capacity_rps"] == 4 and not found["probes"][-1]["meets_slo"]
    one_error = {"rate_rps": 1, "requests": 100, "error_count": 1, "latency_ms": {"p99": 1.0}}
    assert Slo(100).met_by(one_error) and not Slo(100).met_by({**one_error, "requests": 99})


def test_capacity_mode_refuses_probes_too_small_to_judge(tmp_path):
    from deploy.loadtest.cli import parse_args

    common = ["--target", "127.0.0.1:1", "--queries", str(tmp_path), "--out", str(tmp_path / "o.json"),
              "--mode", "capacity"]
    with pytest.raises(SystemExit):
        parse_args([*common, "--requests", "99"])
    assert parse_args([*common, "--requests", "100"]).requests == 100
    assert parse_args([*common, "--requests", "10", "--slo-percentile", "50", "--max-error-rate", "0.1"]).requests == 10
    with pytest.raises(SystemExit):
        parse_args([*common, "--max-error-rate", "0"])


def test_an_open_level_holds_its_minimum_arrivals_past_its_duration():
    """A Poisson count over a fixed time falls short of its mean about half the time: a level that must hold N
    arrivals goes on past --duration-s until it has them, up to its request cap and its time limit."""
    import asyncio

    from deploy.loadtest.openloop import run_rate
    from deploy.loadtest.workloads import Workload
    from services.gen.retrieval.v1 import search_pb2

    async def answer(request: search_pb2.SearchRequest, timeout: float) -> search_pb2.SearchResponse:
        return search_pb2.SearchResponse()  # at once: only the arrivals are counted

    workload = Workload("instant", answer, lambda i: search_pb2.SearchRequest(query=f"q{i}"), ())
    for seed in range(5):  # 1,000 req/s for 10 ms: about 10 arrivals by the clock, at least 40 by the minimum
        samples, _ = asyncio.run(run_rate(workload, 1000.0, 200, 0.01, 1.0, seed=seed, progress=False,
                                          min_arrivals=40))
        assert len(samples) == 40
    capped, _ = asyncio.run(run_rate(workload, 1000.0, 30, 0.01, 1.0, progress=False, min_arrivals=40))
    assert len(capped) == 30  # the request cap still holds
    timed, _ = asyncio.run(run_rate(workload, 1000.0, 200, 0.01, 1.0, progress=False, min_arrivals=150,
                                    max_duration_s=0.02))
    assert len(timed) < 60  # and so does the time limit (about 20 arrivals in 20 ms)
