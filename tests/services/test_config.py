"""Service configs (services.config): flags and environment variables generated from the dataclasses,
nested engine configs, one dtype flag, secrets masked."""

from __future__ import annotations

import logging

import pytest

from common.device import Dtype
from reranker.tenants import EquivalenceMode
from services import gateway, reranker, retriever
from services.config import Secret, build_parser, describe


def test_flags_reach_the_nested_engine_and_batcher_configs():
    config = reranker.parse_args(["--port", "7", "--max-queue", "5", "--tenant-budget-mb", "64", "--dtype", "bf16",
                                  "--scoring-heads", "1,3", "--equivalence", "off", "--model", "/m"])
    assert config.server.port == 7 and config.server.grace_s == 20.0
    assert config.batcher.max_queue == 5
    assert config.engine.tenant_budget_mb == 64 and config.engine.dtype is Dtype.BF16
    assert config.engine.scoring_heads == (1, 3) and config.engine.equivalence is EquivalenceMode.OFF
    assert config.engine.model == "/m"


def test_environment_sits_under_flags(monkeypatch):
    monkeypatch.setenv("RETRIEVER_DATA_DIR", "/from/env")
    monkeypatch.setenv("RETRIEVER_DTYPE", "fp32")
    monkeypatch.setenv("RETRIEVER_PORT", "9000")
    config = retriever.parse_args(["--port", "9001"])
    assert config.data_dir == "/from/env" and config.embedder.dtype is Dtype.FP32
    assert config.server.port == 9001, "a flag wins over the environment"
    monkeypatch.setenv("GATEWAY_RERANK_FAIL_OPEN", "true")
    assert gateway.parse_args([]).rerank_fail_open
    assert not gateway.parse_args(["--no-rerank-fail-open"]).rerank_fail_open


def test_one_dtype_flag_across_services():
    for module in (retriever, reranker):
        flags = build_parser(module.parse_args([]), "X").format_help()
        assert "--dtype" in flags and "--precision" not in flags
    with pytest.raises(SystemExit):
        retriever.parse_args(["--dtype", "int4"])


def test_secrets_are_masked_everywhere_they_could_be_shown(monkeypatch, caplog, capsys):
    monkeypatch.setenv("RERANKER_ADMIN_TOKEN", "hunter2-from-env")
    config = reranker.parse_args([])
    assert config.admin_token.reveal() == "hunter2-from-env"
    assert "hunter2" not in describe(config) and "admin_token=Secret('****')" in describe(config)
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.admin_token)
    with pytest.raises(SystemExit):
        reranker.parse_args(["--help"])
    assert "hunter2" not in capsys.readouterr().out
    flagged = reranker.parse_args(["--admin-token", "from-flag"])
    assert flagged.admin_token == Secret("from-flag") and "from-flag" not in describe(flagged)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("config: %s", describe(flagged))
    assert "from-flag" not in caplog.text


def test_a_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RERANKER_MAX_QUEUE", "many")
    with pytest.raises(SystemExit, match="RERANKER_MAX_QUEUE"):
        reranker.parse_args([])
    monkeypatch.setenv("RERANKER_MAX_QUEUE", "8")
    monkeypatch.setenv("RERANKER_EQUIVALENCE", "sometimes")
    with pytest.raises(SystemExit, match="RERANKER_EQUIVALENCE"):
        reranker.parse_args([])
