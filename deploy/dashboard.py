"""`python -m deploy.dashboard`: the Grafana dashboard's panels drawn from a real Prometheus, as one PNG.

    python -m deploy.dashboard --prometheus http://127.0.0.1:9090 --minutes 15 --out deploy/monitoring/dashboard.png

Every panel of deploy/monitoring/grafana/dashboards/retrieval.json, its queries run over the last --minutes
through Prometheus' range API (Grafana's `$__rate_interval` as --rate-window), one line per returned series,
labelled by the panel's legend format. What Grafana shows, without a Grafana.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common.plots import figure_grid

DASHBOARD = Path(__file__).resolve().parent / "monitoring" / "grafana" / "dashboards" / "retrieval.json"


def query_range(prometheus: str, expr: str, start: float, end: float, step_s: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as reply:
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def render(prometheus: str, out: Path, minutes: float, rate_window: str = "1m", dashboard: Path = DASHBOARD) -> None:
    panels = json.loads(dashboard.read_text())["panels"]
    end = time.time()
    start, step = end - minutes * 60, max(1.0, minutes * 60 / 300)
    columns = 2
    with figure_grid(out, math.ceil(len(panels) / columns), columns, json.loads(dashboard.read_text())["title"]) \
            as axes:
        for ax, panel in zip(axes, panels, strict=False):
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", rate_window)
                for series in query_range(prometheus, expr, start, end, step):
                    points = [(float(t) - end, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
                    if points:
                        ax.plot([p[0] / 60 for p in points], [p[1] for p in points],
                                label=legend(target.get("legendFormat", ""), series["metric"]) or expr[:30])
            ax.set_title(f"{panel['title']} ({panel['fieldConfig']['defaults'].get('unit', '')})", fontsize=9)
            ax.set_xlabel("minutes before now", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rate-window", default="1m")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    render(args.prometheus, args.out, args.minutes, args.rate_window)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
