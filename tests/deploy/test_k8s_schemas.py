"""Every kustomization under deploy/k8s renders with `kubectl kustomize`, and every object it renders is valid:
Kubernetes' own kinds against the OpenAPI schemas of Kubernetes 1.32 (kubernetes-validate, offline, strict: an
unknown field is an error), the custom resources it has no schema for (Prometheus Operator's PodMonitor,
cert-manager's Certificate and Issuer) by the checks below, which hold them to the fields those operators define
and to the objects they refer to. Not applied to a cluster."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from services import certs, keys
from tests.deploy.kustomize import (
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    Obj,
    containers,
    copy_tree,
    named,
    needs_kubectl,
    of_kind,
    overlay,
    pod_spec,
    render,
    selected_pods,
)

DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
PROMETHEUS_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# cert-manager.io/v1 KeyUsage values (its API reference).
CERT_USAGES = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
               "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
               "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
               "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
CERTIFICATE_FIELDS = {"secretName", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses", "usages",
                      "duration", "renewBefore", "privateKey", "issuerRef", "isCA", "subject", "secretTemplate",
                      "keystores", "literalSubject", "revisionHistoryLimit", "encodeUsagesInRequest"}
ISSUER_TYPES = {"selfSigned", "ca", "acme", "vault", "venafi"}
POD_METRICS_ENDPOINT_FIELDS = {"port", "portNumber", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                               "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "params",
                               "bearerTokenSecret", "basicAuth", "authorization", "oauth2", "tlsConfig",
                               "followRedirects", "enableHttp2", "filterRunning", "proxyUrl"}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


def check_pod_monitor(obj: Obj, rendered: tuple[Obj, ...]) -> None:
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels",
                         "sampleLimit", "targetLimit", "attachMetadata", "scrapeProtocols"}, spec.keys()
    pods = selected_pods(rendered, spec["selector"])
    assert pods, "the PodMonitor selects no pod"
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= POD_METRICS_ENDPOINT_FIELDS, endpoint.keys()
        assert endpoint["path"].startswith("/") and endpoint.get("scheme", "http") in ("http", "https")
        assert PROMETHEUS_DURATION.match(endpoint["interval"]), endpoint["interval"]
        for rule in endpoint.get("relabelings", []):
            assert set(rule) <= RELABEL_FIELDS, rule.keys()
            assert rule.get("action", "replace") in ("replace", "keep", "drop", "labelmap", "labeldrop",
                                                      "labelkeep", "hashmod", "lowercase", "uppercase")
        for pod in pods:  # a named port the pods actually have
            ports = {p.get("name") for c in containers(pod) for p in c.get("ports", [])}
            assert endpoint["port"] in ports, (pod["metadata"]["name"], endpoint["port"])


def check_certificate(obj: Obj, rendered: tuple[Obj, ...]) -> None:
    spec = obj["spec"]
    assert set(spec) <= CERTIFICATE_FIELDS, spec.keys()
    assert isinstance(spec["secretName"], str) and spec["secretName"]
    assert spec.get("dnsNames") or spec.get("commonName") or spec.get("ipAddresses")
    assert set(spec.get("usages", [])) <= CERT_USAGES, spec.get("usages")
    assert all(isinstance(n, str) for n in spec.get("dnsNames", []) + spec.get("ipAddresses", []))
    for field in ("duration", "renewBefore"):
        assert field not in spec or DURATION.match(spec[field]), spec[field]
    key = spec.get("privateKey", {})
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    assert key.get("rotationPolicy", "Never") in ("Never", "Always")
    ref = spec["issuerRef"]
    assert ref.get("group", "cert-manager.io") == "cert-manager.io" and ref["kind"] in ("Issuer", "ClusterIssuer")
    if ref["kind"] == "Issuer":  # a namespaced issuer must be in this build
        named(rendered, "Issuer", ref["name"])


def check_issuer(obj: Obj, rendered: tuple[Obj, ...]) -> None:
    spec = obj["spec"]
    assert len(set(spec) & ISSUER_TYPES) == 1 and set(spec) <= ISSUER_TYPES, spec.keys()
    if "ca" in spec:  # its CA Secret is made by a Certificate of this build
        assert any(c["spec"]["secretName"] == spec["ca"]["secretName"] for c in of_kind(rendered, "Certificate"))


CUSTOM: dict[tuple[str, str], Callable[[Obj, tuple[Obj, ...]], None]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): check_pod_monitor,
    ("cert-manager.io/v1", "Certificate"): check_certificate,
    ("cert-manager.io/v1", "Issuer"): check_issuer,
}


def validate_all(rendered: tuple[Obj, ...]) -> list[str]:
    """Each object against its schema; the kinds without one by CUSTOM. Returns what was checked how."""
    checked = []
    for obj in rendered:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            version = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            checked.append(f"{what}: schema {version}")
        except kubernetes_validate.SchemaNotFoundError:
            check = CUSTOM.get((obj["apiVersion"], obj["kind"]))
            assert check is not None, f"{what} ({obj['apiVersion']}): no schema and no structural check"
            check(obj, rendered)
            checked.append(f"{what}: structural")
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
    return checked


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_renders_and_every_object_validates(name: str) -> None:
    rendered = overlay(name)
    checked = validate_all(rendered)
    assert len(checked) == len(rendered) >= 20
    assert [c for c in checked if c.endswith("structural")] == ["PodMonitor/blockrank-retrieval: structural"]
    assert {o["metadata"].get("namespace") for o in rendered if o["kind"] != "Namespace"} == {"blockrank"}
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim", "PodMonitor", "Namespace"} <= kinds


def test_a_broken_object_is_caught() -> None:
    """The validation is not vacuous: an unknown field and a wrong type fail it."""
    service = next(o for o in overlay("cpu") if o["kind"] == "Service")
    bad = {**service, "spec": {**service["spec"], "clusterIPs": "None", "bogus": 1}}
    with pytest.raises(AssertionError):
        validate_all((bad,))


def test_cert_manager_issues_every_tls_secret_the_workloads_mount() -> None:
    needs_kubectl()
    issued = render(K8S / "cert-manager")
    validate_all(issued)
    certificates = {c["spec"]["secretName"]: c["spec"] for c in of_kind(issued, "Certificate")}
    for name in OVERLAYS:
        mounted = {v["secret"]["secretName"] for w in of_kind(overlay(name), "Deployment", "StatefulSet")
                   for v in pod_spec(w).get("volumes", []) if "secret" in v}
        assert mounted - set(certificates) == {"api-keys"}, "the keys file comes from services.keys, not a CA"
    for service in ("gateway", "retriever", "reranker"):
        spec = certificates[f"{service}-tls"]
        assert service in spec["dnsNames"] and "127.0.0.1" in spec["ipAddresses"]  # the gateway's; port-forward
        # Server authentication only: the probes read the plaintext health port, no pod shows its own certificate.
        assert "server auth" in spec["usages"] and "client auth" not in spec["usages"]
    client = certificates["gateway-client-tls"]
    assert client["commonName"] == "gateway" and "server auth" not in client["usages"]  # the trusted forwarder


def test_local_secrets_render_from_make_k8s_secrets_files(tmp_path: Path) -> None:
    """deploy/k8s/secrets turns what `make k8s-secrets` writes (services.certs, services.keys) into the Secrets
    the overlays mount, with the keys their environment names."""
    needs_kubectl()
    k8s = copy_tree(tmp_path)
    files = k8s / "secrets" / "files"
    certs.create(files, ["gateway", "retriever", "reranker"], ["gateway", "operator"], domains=["blockrank.svc"])
    keys.create(files / "keys.json", "demo", admin=False)
    rendered = render(k8s / "secrets")
    validate_all(rendered)
    secrets = {s["metadata"]["name"]: s for s in of_kind(rendered, "Secret")}
    for name in OVERLAYS:
        for w in of_kind(overlay(name), "Deployment", "StatefulSet"):
            volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec(w).get("volumes", []) if "secret" in v}
            for c in containers(w):
                for mount in c.get("volumeMounts", []):
                    if mount["name"] not in volumes:
                        continue
                    secret = secrets[volumes[mount["name"]]]
                    paths = [e["value"] for e in c.get("env", []) if str(e.get("value", "")).startswith(
                        mount["mountPath"] + "/")]
                    assert paths, (w["metadata"]["name"], mount["mountPath"], "mounted but never named")
                    for path in paths:
                        assert Path(path).name in secret["data"], (path, sorted(secret["data"]))
    assert secrets["gateway-tls"]["type"] == "kubernetes.io/tls" and set(secrets["api-keys"]["data"]) == {"keys.json"}


def test_the_prometheus_adapter_serves_every_custom_metric_the_hpas_read() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    for name in OVERLAYS:
        for hpa in of_kind(overlay(name), "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    assert metric["pods"]["metric"]["name"] in served, metric
    for rule in served.values():  # per pod, from series the PodMonitor's targets carry
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert 'grpc_code="RESOURCE_EXHAUSTED"' in served["reranker_rejected_per_second"]["metricsQuery"]
    sources = "".join(p.read_text() for p in (K8S.parents[1] / "reranker").glob("*.py"))
    sources += "".join(p.read_text() for p in (K8S.parents[1] / "services").glob("*.py"))
    assert '"reranker_queue_depth"' in sources and "grpc_server_handled_total" in sources
