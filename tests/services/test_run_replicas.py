"""services.run's stack with several reranker replicas: each its own process, port and metrics port, with the
thread count asked for, and a gateway that spreads the default tenant's searches over all of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services import run


def started_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> dict[str, list[str]]:
    """The arguments each process of the stack would start with (no process is started)."""
    started: dict[str, list[str]] = {}

    def record(name: str, module: str, args: list[str], port: int, log_dir: Path,
               env: dict[str, str] | None = None) -> run.Process:
        started[name] = [module, *args, "--port", str(port)]
        return run.Process(name, f"127.0.0.1:{port}", subprocess.Popen(["true"]))

    monkeypatch.setattr(run, "start", record)
    run.start_stack(run.parse_args(["--var-dir", str(tmp_path), "--base-port", "40000", *argv]))
    return started


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_two_single_threaded_replicas_behind_one_gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = started_stack(monkeypatch, tmp_path, ["--capacity", str(tmp_path / "out"), "--reranker-replicas", "2",
                                                    "--reranker-threads", "1"])
    assert list(started) == ["retriever", "reranker-1", "reranker-2", "gateway"]
    for i, name in enumerate(("reranker-1", "reranker-2")):
        assert flag(started[name], "--cpu-threads") == "1"
        assert flag(started[name], "--port") == str(40002 + i)
        assert flag(started[name], "--metrics-port") == str(40012 + i)
    gateway = started["gateway"]
    assert flag(gateway, "--reranker-target") == "127.0.0.1:40002,127.0.0.1:40003"
    assert flag(gateway, "--tenant-spread") == "2"


def test_one_reranker_by_default_on_every_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = started_stack(monkeypatch, tmp_path, [])
    assert list(started) == ["retriever", "reranker", "gateway"]
    assert flag(started["reranker"], "--cpu-threads") == "0"
    assert flag(started["gateway"], "--reranker-target") == "127.0.0.1:40002"
    assert "--reranker-target" not in started_stack(monkeypatch, tmp_path, ["--no-reranker"])["gateway"]


def test_replicas_are_bounded_by_the_port_plan() -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--reranker-replicas", str(run.MAX_RERANKER_REPLICAS + 1)])
