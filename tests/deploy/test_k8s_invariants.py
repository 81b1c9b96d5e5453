"""What must hold in every rendered overlay of deploy/k8s, whatever is changed later: probes on the standard
health service, termination grace above the preStop and the servers' drain, Secrets mounted read-only at 0400,
requests and limits everywhere, pinned images, non-root pods with read-only root filesystems, who may reach
whom, and how each part scales."""

from __future__ import annotations

import json

import pytest

from tests.deploy.kustomize import (
    APPS,
    OVERLAYS,
    ROOT,
    Obj,
    containers,
    env,
    flag,
    main_container,
    named,
    of_kind,
    overlay,
    pod_labels,
    pod_spec,
    selected_pods,
    selects,
    workload,
)

PORTS = {"gateway": 50050, "retriever": 50051, "reranker": 50052}
DRAIN_DEFAULTS = {"gateway": 10.0, "retriever": 10.0, "reranker": 20.0}  # the servers' --grace-s defaults
MUTUAL = ("retriever", "reranker")  # their ports require the gateway's client certificate
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = {"exec", "httpGet", "tcpSocket", "grpc"}


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    return overlay(request.param)


def test_every_container_has_requests_limits_and_a_pinned_image(rendered: tuple[Obj, ...]) -> None:
    for w in of_kind(rendered, "Deployment", "StatefulSet"):
        for c in containers(w):
            resources = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (c["name"], kind)
            image = c["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")), image


def test_pods_run_unprivileged_with_a_read_only_root_filesystem(rendered: tuple[Obj, ...]) -> None:
    for w in of_kind(rendered, "Deployment", "StatefulSet"):
        spec = pod_spec(w)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
        # Service links would put <SERVICE>_PORT=tcp://... into the environment: the services read
        # <PREFIX>_PORT as their --port, etcd reads ETCD_* as flags.
        assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]  # every service here allows it
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])) or c["name"] == "etcd"
    assert named(rendered, "Namespace", "blockrank")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] \
        == "restricted"


def setting(container: Obj, option: str, variable: str) -> str | None:
    """What a server reads for `option`: the flag when its command line has one, else the environment variable
    (services/config.py: the flag wins over <PREFIX>_FIELD_NAME)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    found = flag(argv, option)
    if found is not None:
        return found
    value: str | None = env(container).get(variable, {}).get("value")
    return value


def health_port(rendered: tuple[Obj, ...], app: str) -> int:
    """The plaintext health-only port `app`'s server binds (--health-port); 0: none."""
    c = main_container(workload(rendered, app))
    return int(setting(c, "--health-port", f"{app.upper()}_HEALTH_PORT") or 0)


def test_probes_are_native_grpc_on_the_plaintext_health_port(rendered: tuple[Obj, ...]) -> None:
    """The kubelet's own gRPC probes, on the port each server's --health-port binds (plaintext and the health
    service only: the kubelet's gRPC probe speaks plaintext, the service ports TLS). Readiness asks "" (loaded; for the gateway, its
    downstreams serving), liveness "liveness" (SERVING from start: a server still loading, or a gateway whose
    downstreams are down, is not ready but must not be restarted). No exec probes (a Python start each), and no
    startupProbe: liveness answers from start and tolerates a minute."""
    for app in APPS:
        w = workload(rendered, app)
        c, prefix = main_container(w), app.upper()
        health = health_port(rendered, app)
        assert health > 0 and health not in (PORTS[app], 9100), (app, health)
        # --host is shared by the service, metrics and health ports; the kubelet probes the pod's address.
        assert setting(c, "--host", f"{prefix}_HOST") == "0.0.0.0", app
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": PORTS[app], "metrics": 9100,
                                                                       "health": health}
        ready, live = c["readinessProbe"], c["livenessProbe"]
        assert set(ready) & PROBE_HANDLERS == set(live) & PROBE_HANDLERS == {"grpc"}, app
        assert (ready["grpc"]["port"], ready["grpc"].get("service", "")) == (health, ""), app
        assert (live["grpc"]["port"], live["grpc"]["service"]) == (health, "liveness"), app
        tolerated = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
        assert tolerated >= 60, "a slow start or a busy moment must not restart the server"
        for container in containers(w):
            assert "startupProbe" not in container, (app, container["name"])
            assert not [k for k in PROBES if "exec" in container.get(k, {})], (app, container["name"])
    etcd = main_container(workload(rendered, "etcd"))
    assert all("httpGet" in etcd[k] for k in PROBES)


def test_termination_grace_covers_the_prestop_and_the_drain(rendered: tuple[Obj, ...]) -> None:
    for app in APPS:
        w = workload(rendered, app)
        c = main_container(w)
        drain = float(flag(c["args"], "--grace-s") or DRAIN_DEFAULTS[app])
        assert drain >= DRAIN_DEFAULTS[app], app
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep >= 5, "the endpoint leaves the Service and DNS before SIGTERM"
        assert pod_spec(w)["terminationGracePeriodSeconds"] > sleep + drain, app


def test_secrets_are_mounted_read_only_0400_and_name_the_servers_files(rendered: tuple[Obj, ...]) -> None:
    for w in of_kind(rendered, "Deployment", "StatefulSet"):
        spec = pod_spec(w)
        secret_volumes = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
        for volume in secret_volumes.values():
            assert volume["defaultMode"] == 0o400, volume
        assert not secret_volumes or spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
        for c in containers(w):
            for mount in c.get("volumeMounts", []):
                if mount["name"] in secret_volumes:
                    assert mount["readOnly"] is True and "subPath" not in mount, mount  # updated in place
    for app in APPS:
        c = main_container(workload(rendered, app))
        variables, prefix = env(c), app.upper()
        secret_mounts = {m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly") and m["name"] in (
            "tls", "keys", "client-tls")}
        files = [f"{prefix}_TLS_CERT", f"{prefix}_TLS_KEY", f"{prefix}_KEYS_FILE"]
        files += [f"{prefix}_TLS_CLIENT_CA"] if app in MUTUAL else \
            ["GATEWAY_DOWNSTREAM_CA", "GATEWAY_DOWNSTREAM_CERT", "GATEWAY_DOWNSTREAM_KEY"]
        for name in files:
            assert variables[name]["value"].rsplit("/", 1)[0] in secret_mounts, (app, name)
        if app in MUTUAL:
            assert variables[f"{prefix}_TRUSTED_FORWARDERS"]["value"] == "gateway"


def test_the_gateway_resolves_every_downstream_replica_and_clients_have_a_service(rendered: tuple[Obj, ...]) -> None:
    args = main_container(workload(rendered, "gateway"))["args"]
    assert flag(args, "--retriever-target") == "dns:///retriever:50051"
    assert flag(args, "--reranker-target") == "dns:///reranker:50052"
    for name in ("retriever", "reranker"):  # headless: DNS answers with each ready pod
        service = named(rendered, "Service", name)
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == PORTS[name]
    assert named(rendered, "Service", "gateway")["spec"]["type"] == "ClusterIP"
    for service in of_kind(rendered, "Service"):  # every Service selects pods that have its target port
        pods = selected_pods(rendered, {"matchLabels": service["spec"]["selector"]})
        assert pods, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            named_ports = {p["name"] for w in pods for c in containers(w) for p in c.get("ports", [])}
            assert port["targetPort"] in named_ports, (service["metadata"]["name"], port)


def test_autoscaling_and_disruption_budgets(rendered: tuple[Obj, ...]) -> None:
    hpas = {h["metadata"]["name"]: h["spec"] for h in of_kind(rendered, "HorizontalPodAutoscaler")}
    for name, spec in hpas.items():
        target = named(rendered, spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"])
        assert target["kind"] == "Deployment" and 1 < spec["minReplicas"] < spec["maxReplicas"], name
        assert "replicas" not in target["spec"], f"{name}: re-applying would reset what the HPA chose"
    reranker = hpas["reranker"]["metrics"]
    pods_metrics = {m["pods"]["metric"]["name"] for m in reranker if m["type"] == "Pods"}
    assert {"reranker_queue_depth", "reranker_rejected_per_second"} <= pods_metrics
    cpu = [m for m in reranker if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    gpu = "nvidia.com/gpu" in main_container(workload(rendered, "reranker"))["resources"]["limits"]
    assert len(cpu) == (0 if gpu else 1), "CPU is the fallback on CPUs; a GPU replica's CPU is not its load"
    assert [m["resource"]["name"] for m in hpas["gateway"]["metrics"]] == ["cpu"]
    for pdb in of_kind(rendered, "PodDisruptionBudget"):
        assert len(selected_pods(rendered, pdb["spec"]["selector"])) == 1, pdb["metadata"]["name"]
    budgets = {pdb["metadata"]["name"] for pdb in of_kind(rendered, "PodDisruptionBudget")}
    assert {"gateway", "reranker", "etcd"} <= budgets


def allowed_peers(rendered: tuple[Obj, ...], app: str, port: int) -> list[Obj]:
    """The `from` entries of every NetworkPolicy rule that opens `port` on `app`'s pods ({} = anyone). A rule's
    port may be a number or the name of a container port; a rule without ports opens them all."""
    w = workload(rendered, app)
    named_ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", []) if "name" in p}
    peers: list[Obj] = []
    for policy in of_kind(rendered, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], pod_labels(w)):
            continue
        for rule in policy["spec"].get("ingress", []):
            opened = [named_ports.get(p.get("port"), p.get("port")) for p in rule.get("ports", [{}])]
            if port in opened or None in opened:
                peers += rule.get("from") or [{}]
    return peers


def test_network_policies_let_only_gateways_in_and_only_monitoring_scrape(rendered: tuple[Obj, ...]) -> None:
    deny = named(rendered, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    gateway_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    for app in MUTUAL:
        assert allowed_peers(rendered, app, PORTS[app]) == [gateway_pods], app
    assert allowed_peers(rendered, "gateway", PORTS["gateway"]) == [{}]  # clients: TLS and an API key
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for app in APPS:
        assert allowed_peers(rendered, app, 9100) == [monitoring], app
        # The plaintext health port: the kubelet reaches it from the pod's node, which NetworkPolicy does not
        # filter; no pod may.
        assert allowed_peers(rendered, app, health_port(rendered, app)) == [], app
    reranker_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "reranker"}}}
    assert reranker_pods in allowed_peers(rendered, "etcd", 2379)
    assert gateway_pods not in allowed_peers(rendered, "etcd", 2379)


def test_where_each_part_keeps_its_state(rendered: tuple[Obj, ...]) -> None:
    retriever = workload(rendered, "retriever")
    args = main_container(retriever)["args"]
    if flag(args, "--backend") == "milvus":  # stateless: a Deployment, scaled by an HPA
        assert retriever["kind"] == "Deployment" and "volumeClaimTemplates" not in retriever["spec"]
        assert named(rendered, "HorizontalPodAutoscaler", "retriever")
        assert "configMapKeyRef" in env(main_container(retriever))["RETRIEVER_MILVUS_URI"]["valueFrom"]
    else:  # one writer per collection directory: a StatefulSet of one, its own volume
        assert retriever["kind"] == "StatefulSet" and retriever["spec"]["replicas"] == 1
        assert [t["metadata"]["name"] for t in retriever["spec"]["volumeClaimTemplates"]] == ["data"]
        assert {"name": "data", "mountPath": "/data/retriever"} in main_container(retriever)["volumeMounts"]
        assert flag(args, "--data-dir") == "/data/retriever"
        assert not [h for h in of_kind(rendered, "HorizontalPodAutoscaler") if h["metadata"]["name"] == "retriever"]
    reranker = main_container(workload(rendered, "reranker"))
    assert flag(reranker["args"], "--adapters-root") == "/adapters"
    adapters = next(v for v in pod_spec(workload(rendered, "reranker"))["volumes"] if v["name"] == "adapters")
    assert adapters["persistentVolumeClaim"]["readOnly"] is True
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in reranker["volumeMounts"]
    assert named(rendered, "PersistentVolumeClaim", "reranker-adapters")["spec"]["accessModes"] == ["ReadWriteMany"]
    store = named(rendered, "ConfigMap", "reranker")["data"]["RERANKER_TENANTS_STORE"]
    assert store.startswith("etcd://etcd-client:2379/") and named(rendered, "Service", "etcd-client")
    assert workload(rendered, "etcd")["spec"]["replicas"] == 3


def test_the_gpu_overlay_puts_each_reranker_on_a_gpu() -> None:
    reranker = workload(overlay("gpu"), "reranker")
    c = main_container(reranker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod_spec(reranker)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert flag(c["args"], "--device") == "cuda" and c["image"].startswith("blockrank-retrieval-gpu:")
    assert env(c)["TRITON_CACHE_DIR"]["value"].startswith("/tmp/")  # the root filesystem is read-only
    for name in ("cpu", "milvus"):
        assert "nvidia.com/gpu" not in main_container(workload(overlay(name), "reranker"))["resources"]["limits"]


def test_tracing_settings_and_the_dashboard(rendered: tuple[Obj, ...]) -> None:
    telemetry = named(rendered, "ConfigMap", "telemetry")["data"]
    assert telemetry == {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "LOG_FORMAT": "text"}  # tracing off by default
    for app in APPS:
        variables = env(main_container(workload(rendered, app)))
        assert variables["OTEL_SERVICE_NAME"]["value"] == app
        for name, key in (("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
                          (f"{app.upper()}_LOG_FORMAT", "LOG_FORMAT")):
            ref = variables[name]["valueFrom"]["configMapKeyRef"]
            assert ref == {"name": "telemetry", "key": key, "optional": True}
    dashboard = named(rendered, "ConfigMap", "grafana-dashboard-retrieval")
    source = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "retrieval.json"
    assert json.loads(dashboard["data"]["retrieval.json"]) == json.loads(source.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    monitor = named(rendered, "PodMonitor", "blockrank-retrieval")["spec"]
    assert {w["metadata"]["name"] for w in selected_pods(rendered, monitor["selector"])} == set(APPS)
    relabel = monitor["podMetricsEndpoints"][0]["relabelings"][0]  # job="gateway", as the dashboard queries
    assert relabel["targetLabel"] == "job" and relabel["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name"]
