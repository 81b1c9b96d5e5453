"""What keeps the codebase one a new engineer can take over: serving code that imports no tooling, a
serving image without training/benchmark packages, and small files and functions."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ["services.retriever", "services.reranker", "services.gateway"]
TOOLING = ["reranker.training", "reranker.bench", "retriever.bench", "deploy", "common.plots", "common.report",
           "matplotlib", "peft", "ir_measures", "sentence_transformers"]
PACKAGES = ["common", "retriever", "reranker", "services", "deploy", "tests"]


def test_servers_import_no_training_benchmark_or_plotting_code():
    probe = f"import sys, {', '.join(SERVERS)}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    offending = [m for m in loaded if any(m == t or m.startswith(t + ".") for t in TOOLING)]
    assert not offending, f"serving processes import tooling: {offending}"


def test_serving_dependencies_exclude_tooling_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = {re.split(r"[=<>\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert not serving & {"peft", "matplotlib", "ir-measures", "sentence-transformers", "pytest"}
    assert {"train", "bench", "dev"} <= set(project["optional-dependencies"])
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ARG PROJECT_EXTRAS=""' in dockerfile, "the serving image installs no extras by default"
    assert "['project']['dependencies']" in dockerfile


def python_files() -> list[Path]:
    return [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "gen" not in p.parts]


def test_no_file_over_400_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in python_files():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                if node.end_lineno - node.lineno + 1 > 60:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_engines_know_nothing_of_grpc():
    for package in ("common", "retriever", "reranker"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert not {m for m in imported if m.split(".")[0] in ("grpc", "services", "deploy")}, path


def test_the_cli_client_stays_light():
    """Compose health checks run the client every few seconds: it must not pull in torch or the indexes."""
    probe = "import sys, services.client; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = {m.split(".")[0] for m in result.stdout.split()} & {"torch", "transformers", "faiss", "tantivy", "numpy"}
    assert not heavy, f"services.client imports {sorted(heavy)}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file: at the top, inside functions (lazy) and under
    TYPE_CHECKING alike, since each is a dependency a reader has to follow. `from pkg import mod` counts as mod."""
    modules = {module_name(p): p for p in python_files() if not module_name(p).startswith("tests")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles():
    """Every dependency between the project's modules goes one way (Tarjan's strongly connected components:
    a component of more than one module is a cycle). Package __init__ modules count as their package."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
