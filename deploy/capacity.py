"""The capacity table (`make capacity`, i.e. `python -m services.run --capacity OUT_DIR`): how much Search load
this machine holds, without and with reranking, and what happens past it.

For each configuration: the capacity under its SLO (deploy.loadtest's capacity search, open loop), then open-loop
levels at 0.5x, 1x and 3x of it, through a gateway with admission limits (GATEWAY_ADMISSION) and each request's
deadline at the SLO, so that 3x shows shedding (RESOURCE_EXHAUSTED) rather than an ever-growing queue. A
Prometheus (Debian's package, when installed) scrapes the three services meanwhile, and the dashboard is drawn
from it (deploy.dashboard). Writes
OUT_DIR/capacity.json, capacity.md (the table), the load tests' JSON/PNG, and dashboard.png.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from common.report import text_table
from deploy.loadtest import cli

# Two requests worked on at once (on a 2-core CPU the reranker batches them into one forward pass); the queue is
# bounded by time rather than count: each request's deadline is its configuration's SLO, and the gateway refuses
# at once what its running estimate says would not finish by then. (A count has to be sized for one service
# time: two queued suited an fp32 reranker and shed a bf16 one, three times faster, long before its SLO.)
GATEWAY_ADMISSION = ["--max-in-flight", "2", "--max-queued", "64"]
# (name, rerank depth (None: the run's --rerank-depth), p99 SLO in ms)
CONFIGS = [("search", 0, 250.0), ("search + rerank", None, 8000.0)]
MULTIPLES = (0.5, 1.0, 3.0)


def capacity_table(gateway: str, metrics: dict[str, int], data: Path, collection: str, rerank_depth: int,
                   out: Path, var_dir: Path, prometheus_port: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    prometheus = _start_prometheus(metrics, var_dir / "prometheus-capacity", prometheus_port)
    started = time.time()
    rows: list[dict] = []
    try:
        for name, depth, slo_ms in CONFIGS:
            rows += _measure(gateway, data, collection, name, rerank_depth if depth is None else depth, slo_ms, out)
        if prometheus is not None:
            from deploy.dashboard import render

            time.sleep(3)  # the last scrape
            render(f"http://127.0.0.1:{prometheus_port}", out / "dashboard.png", (time.time() - started) / 60 + 1)
            print(f"wrote {out / 'dashboard.png'}")
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    (out / "capacity.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = format_rows(rows)
    (out / "capacity.md").write_text(table + "\n")
    print(table)
    return 0


def _measure(gateway: str, data: Path, collection: str, name: str, depth: int, slo_ms: float, out: Path) -> list[dict]:
    slug = name.replace(" + ", "-").replace(" ", "-")
    common = ["--target", gateway, "--collection", collection, "--queries", str(data), "--top-k", "10",
              "--rerank-depth", str(depth), "--timeout-s", str(slo_ms / 1000), "--no-progress",
              "--requests", "400", "--duration-s", "10", "--min-requests", "100"]
    print(f"\n{name}: capacity under p99 <= {slo_ms:g} ms")
    cli.main([*common, "--mode", "capacity", "--slo-ms", str(slo_ms), "--bisections", "2",
              "--out", str(out / f"{slug}-capacity.json")])
    capacity = json.loads((out / f"{slug}-capacity.json").read_text())["capacity"]["capacity_rps"]
    if not capacity:
        return [{"config": name, "rerank_depth": depth, "slo_ms": slo_ms, "capacity_rps": 0.0, "levels": []}]
    rates = ",".join(f"{m * capacity:.4g}" for m in MULTIPLES)
    cli.main([*common, "--mode", "open", "--rates", rates, "--out", str(out / f"{slug}-levels.json")])
    levels = json.loads((out / f"{slug}-levels.json").read_text())["levels"]
    return [{"config": name, "rerank_depth": depth, "slo_ms": slo_ms, "capacity_rps": capacity,
             "multiple": m, **level} for m, level in zip(MULTIPLES, levels, strict=True)]


def format_rows(rows: list[dict]) -> str:
    columns = [("config", ""), ("SLO p99 ms", "g"), ("capacity req/s", ".3g"), ("load", ""), ("offered req/s", ".3g"),
               ("sent", ""), ("OK", ""), ("RESOURCE_EXHAUSTED", ""), ("other errors", ""), ("p50 ms", ".0f"),
               ("p95 ms", ".0f"), ("p99 ms", ".0f")]
    table = []
    for r in rows:
        if "multiple" not in r:
            table.append([r["config"], r["slo_ms"], 0.0, "-", None, None, None, None, None, None, None, None])
            continue
        shed = r["errors"].get("RESOURCE_EXHAUSTED", 0)
        lat = r["latency_ms"]
        table.append([r["config"], r["slo_ms"], r["capacity_rps"], f"{r['multiple']:g}x", r["rate_rps"],
                      r["requests"], r["ok"], shed, r["error_count"] - shed, lat["p50"], lat["p95"], lat["p99"]])
    return text_table(columns, table)


def _start_prometheus(metrics: dict[str, int], tsdb: Path, port: int) -> subprocess.Popen | None:
    if shutil.which("prometheus") is None:
        print("prometheus not installed: no dashboard picture (apt-get install prometheus)")
        return None
    shutil.rmtree(tsdb, ignore_errors=True)
    tsdb.mkdir(parents=True)
    jobs = "".join(f"  - job_name: {name}\n    static_configs:\n      - targets: ['127.0.0.1:{p}']\n"
                   for name, p in metrics.items())
    config = tsdb / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 2s\nscrape_configs:\n{jobs}")
    log = open(tsdb / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tsdb / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
