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
