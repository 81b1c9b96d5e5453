"""deploy/k8s rendered the way an operator renders it (`kubectl kustomize`), and helpers to look into the rendered
objects. Nothing here talks to a cluster."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "milvus")
APPS = ("gateway", "retriever", "reranker")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# The Kubernetes version the manifests are checked against: kubernetes-validate's offline OpenAPI schemas. 1.32
# is the oldest with every field used here (the preStop sleep action) on by default, and the kubectl here.
KUBERNETES_VERSION = "1.32.0"

Obj = dict[str, Any]


def needs_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (it renders the kustomizations: kubectl kustomize, kustomize v5)")


@functools.cache
def render(path: Path) -> tuple[Obj, ...]:
    """Every object `kubectl kustomize PATH` renders."""
    done = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def overlay(name: str) -> tuple[Obj, ...]:
    needs_kubectl()
    return render(K8S / "overlays" / name)


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def of_kind(objects: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    return [o for o in objects if o["kind"] in kinds]


def workload(objects: tuple[Obj, ...], app: str) -> Obj:
    """The Deployment or StatefulSet whose pods are `app.kubernetes.io/name: app`."""
    found = [o for o in of_kind(objects, *WORKLOADS) if pod_labels(o).get("app.kubernetes.io/name") == app]
    assert len(found) == 1, f"{app}: {len(found)} workloads"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(obj: Obj) -> Iterator[Obj]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(obj: Obj) -> Obj:
    first: Obj = pod_spec(obj)["containers"][0]
    return first


def env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def flag(args: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (`--grace-s 20` or `--grace-s=20`)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) \
                or (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def selected_pods(objects: tuple[Obj, ...], selector: Obj) -> list[Obj]:
    """The workloads whose pod template `selector` matches (an empty selector matches all)."""
    return [w for w in of_kind(objects, *WORKLOADS) if selects(selector, pod_labels(w))]


def copy_tree(tmp: Path) -> Path:
    """deploy/ copied under `tmp` (the kustomizations refer to ../monitoring), for renders that need files the
    repository does not hold (key material)."""
    target = tmp / "deploy"
    shutil.copytree(ROOT / "deploy", target, ignore=shutil.ignore_patterns("__pycache__", "secrets", "*.py",
                                                                          "loadtest"))
    shutil.copytree(ROOT / "deploy" / "k8s" / "secrets", target / "k8s" / "secrets",
                    ignore=shutil.ignore_patterns("files"))
    return target / "k8s"
