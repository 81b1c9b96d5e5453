"""deploy/docker-compose.yml is secure by default, checked without a container engine: `docker-compose config`
for every combination of files, the `secrets` service's script run against what `make compose-certs` writes,
and the compose file's own environment, health checks and ingest command run against real servers on
127.0.0.1 (TLS to the gateway, mutual TLS to the retriever, API keys)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.client import search
from services.tls import ClientTls
from tests.conftest import FIXTURE_DOCS, ROOT, Server

DEPLOY = ROOT / "deploy"
APPS = ("gateway", "retriever", "reranker")
ENV = {"GRAFANA_ADMIN_PASSWORD": "test-only", "MINIO_ROOT_PASSWORD": "test-only"}


def compose(*overrides: str, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (Debian: docker-compose; `make test` installs it as root)")
    files = [arg for name in ("docker-compose.yml", *overrides) for arg in ("-f", str(DEPLOY / name))]
    done = subprocess.run(["docker-compose", *files, *(a for p in profiles for a in ("--profile", p)), "config"],
                          capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for the short (source:target[:mode]) and long volume syntax."""
    found = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            found[target] = source + (":ro" if v.endswith(":ro") else "")
        else:
            found[v["target"]] = str(v.get("source", v["type"])) + (":ro" if v.get("read_only") else "")
    return found


def test_the_default_file_serves_tls_mutual_tls_and_api_keys() -> None:
    services = compose()["services"]
    for app in APPS:
        service, prefix = services[app], app.upper()
        environment = service["environment"]
        assert mounts(service)["/secrets"] == f"{app}-secrets:ro"  # its own volume, read-only
        for name in ("TLS_CERT", "TLS_KEY", "KEYS_FILE"):
            assert environment[f"{prefix}_{name}"].startswith("/secrets/"), (app, name)
        assert service["read_only"] and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert service["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.client"] and "--ca" in test
        assert environment[f"{prefix}_METRICS_PORT"] == "9100"  # /metrics stays plain HTTP for Prometheus
    for app in ("retriever", "reranker"):
        environment = services[app]["environment"]
        assert environment[f"{app.upper()}_TLS_CLIENT_CA"] == "/secrets/ca.crt"
        assert environment[f"{app.upper()}_TRUSTED_FORWARDERS"] == "gateway"
        assert {"--cert", "--key"} <= set(services[app]["healthcheck"]["test"])
    gateway = services["gateway"]["environment"]
    assert (gateway["GATEWAY_DOWNSTREAM_CA"], gateway["GATEWAY_DOWNSTREAM_CERT"], gateway["GATEWAY_DOWNSTREAM_KEY"]) \
        == ("/secrets/ca.crt", "/secrets/client.crt", "/secrets/client.key")
    assert "GATEWAY_TLS_CLIENT_CA" not in gateway  # clients show an API key, not a certificate
    secrets = services["secrets"]
    assert mounts(secrets)["/in"].endswith("deploy/secrets:ro") and secrets["network_mode"] == "none"
    assert secrets["cap_drop"] == ["ALL"] and set(secrets["cap_add"]) == {"CHOWN", "DAC_OVERRIDE", "FOWNER"}


def test_tracing_is_an_optional_profile_and_off_by_default() -> None:
    services = compose(profiles=("tracing",))["services"]
    collector = services["otel-collector"]
    assert collector["profiles"] == ["tracing"] and services["otel-init"]["profiles"] == ["tracing"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:0.")  # a pinned version
    assert mounts(collector)["/etc/otelcol-contrib/config.yaml"].endswith("monitoring/otel-collector.yaml:ro")
    assert "4317" in str(collector["ports"])
    for app in APPS:
        environment = services[app]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""  # empty: tracing off
        assert environment["OTEL_SERVICE_NAME"] == app and environment[f"{app.upper()}_LOG_FORMAT"] == "text"
    config = yaml.safe_load((DEPLOY / "monitoring" / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert mounts(collector)["/var/lib/otelcol/traces"] == "otel-traces"  # a volume, written by uid 10001
    assert config["exporters"]["file"]["path"].startswith("/var/lib/otelcol/traces/")
    assert config["exporters"]["file"]["format"] == "json" and "debug" in config["exporters"]
    pipeline = config["service"]["pipelines"]["traces"]
    assert "batch" in pipeline["processors"] and set(pipeline["exporters"]) == {"file", "debug"}
    for kind in ("receivers", "processors", "exporters"):  # every component the pipeline names is defined
        assert set(pipeline[kind]) <= set(config[kind]), kind


def test_the_plaintext_override_turns_tls_and_keys_off_and_says_what_it_is_for() -> None:
    assert "local experiments only" in (DEPLOY / "docker-compose.plaintext.yml").read_text()
    services = compose("docker-compose.plaintext.yml", profiles=("ingest",))["services"]
    for app in APPS:
        environment = services[app]["environment"]
        assert not [k for k, v in environment.items() if ("_TLS_" in k or "KEYS_FILE" in k or "DOWNSTREAM" in k) and v]
        assert "--ca" not in services[app]["healthcheck"]["test"]
    assert mounts(services["secrets"])["/in"] == "tmpfs" and services["secrets"]["command"] == ["true"]
    assert "--ca" not in services["ingest"]["command"]


def test_the_gpu_and_milvus_overrides_keep_tls_and_the_adapters() -> None:
    services = compose("docker-compose.gpu.yml", "docker-compose.milvus.yml")["services"]
    reranker = services["reranker"]
    assert reranker["command"][-4:] == ["--adapters-root", "/adapters", "--device", "cuda"]
    assert reranker["environment"]["RERANKER_TLS_CLIENT_CA"] == "/secrets/ca.crt"
    assert reranker["environment"]["TRITON_CACHE_DIR"].startswith("/tmp/")  # the root filesystem is read-only
    assert services["retriever"]["environment"]["RETRIEVER_KEYS_FILE"] == "/secrets/keys.json"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make compose-certs` into a temporary directory, then the `secrets` service's own script copying them into
    per-service directories (as root: owned by uid 10001, as the containers run; otherwise by this user)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    tmp = tmp_path_factory.mktemp("compose")
    made = subprocess.run(["make", "-s", "-o", ".venv/.installed", "-o", "services/gen/.generated",
                           "compose-certs", f"COMPOSE_SECRETS={tmp / 'in'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    script = compose()["services"]["secrets"]["command"][2].replace("$$", "$")
    script = script.replace("/in/", f"{tmp}/in/").replace("/out/", f"{tmp}/out/")
    if os.geteuid() != 0:
        script = script.replace("-o 10001 -g 10001", f"-o {os.getuid()} -g {os.getgid()}")
    for name in ("gateway", "retriever", "reranker", "operator"):
        (tmp / "out" / name).mkdir(parents=True)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return tmp / "out"


def test_the_secrets_service_gives_each_service_only_its_own_files(installed: Path) -> None:
    owner = 10001 if os.geteuid() == 0 else os.getuid()
    expected = {"gateway": {"ca.crt", "server.crt", "server.key", "keys.json", "client.crt", "client.key"},
                "retriever": {"ca.crt", "server.crt", "server.key", "keys.json"},
                "reranker": {"ca.crt", "server.crt", "server.key", "keys.json"},
                "operator": {"ca.crt", "client.crt", "client.key", "api-key"}}
    for service, names in expected.items():
        assert {p.name for p in (installed / service).iterdir()} == names, service
        for path in (installed / service).iterdir():
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o400, owner), path
    assert (installed / "retriever" / "server.crt").read_bytes() != (installed / "reranker" / "server.crt").read_bytes()


def env_for(service: dict[str, Any], secrets: Path) -> dict[str, str]:
    """The service's compose environment with its /secrets paths on this machine, metrics off."""
    environment = {k: str(v).replace("/secrets/", f"{secrets}/") for k, v in service["environment"].items()}
    return {**environment, **{k: "0" for k in environment if k.endswith("_METRICS_PORT")}}


def host_command(argv: list[str], secrets: Path, target: str, replace: str) -> list[str]:
    return [sys.executable if a == "python" else a.replace("/secrets/", f"{secrets}/").replace(replace, target)
            for a in argv if a != "CMD"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_compose_environment_health_checks_and_ingest_work_under_tls(installed: Path, tmp_path: Path) -> None:
    """The retriever and the gateway started with the compose file's environment (paths mapped here): the
    health checks pass over TLS and mutual TLS, the ingest command writes as tenant demo through mutual TLS with
    its API key, and a client with the demo key searches it through the gateway; without a key, refused."""
    services = compose(profiles=("ingest",))["services"]
    operator = ClientTls(*(str(installed / "operator" / f) for f in ("ca.crt", "client.crt", "client.key")))
    retriever = Server("services.retriever", ["--data-dir", str(tmp_path / "data")], log_path=tmp_path / "r.log",
                       env=env_for(services["retriever"], installed / "retriever"), tls=operator)
    gateway = Server("services.gateway", ["--retriever-target", retriever.target, "--reranker-target", ""],
                     log_path=tmp_path / "g.log", env=env_for(services["gateway"], installed / "gateway"),
                     tls=ClientTls(str(installed / "gateway" / "ca.crt")))
    try:
        retriever.start(timeout=300)
        gateway.start(timeout=120)
        for server, name, port in ((retriever, "retriever", "127.0.0.1:50051"), (gateway, "gateway", "127.0.0.1:50050")):
            check = host_command(services[name]["healthcheck"]["test"], installed / name, server.target, port)
            done = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0 and "SERVING" in done.stdout, (name, done.stdout, done.stderr)
        assert "(mutual TLS)" in retriever.log_tail() and "(TLS)" in gateway.log_tail()
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                                     for i, t, x in FIXTURE_DOCS))
        ingest = services["ingest"]["command"][2].replace("$$", "$").replace("/secrets/", f"{installed}/operator/")
        ingest = ingest.replace("retriever:50051", retriever.target).replace("/corpus", str(corpus))
        ingest = ingest.replace("exec python", f"exec {sys.executable}")
        done = subprocess.run(["sh", "-c", ingest], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **services["ingest"]["environment"]}, check=False)
        assert done.returncode == 0 and f"upserted {len(FIXTURE_DOCS)}" in done.stdout, done.stderr[-2000:]
        client = ClientTls(str(installed / "gateway" / "ca.crt"))
        demo_key = (installed / "operator" / "api-key").read_text().strip()
        found = search(gateway.target, "scifact", "emperors of Rome", top_k=1, tls=client, api_key=demo_key)
        assert found.results[0].document.id == "rome"
        with pytest.raises(grpc.RpcError) as refused:
            search(gateway.target, "scifact", "emperors of Rome", top_k=1, tls=client)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        gateway.stop()
        retriever.stop()
