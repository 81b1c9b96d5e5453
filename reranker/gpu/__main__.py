"""python -m reranker.gpu prepare | run | score | profile | report  (see reranker/gpu/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.paths import SCIFACT
from reranker.gpu import job, prepare, profiling, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker.gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare.add_arguments(sub.add_parser("prepare", help="here: the files the GPU run needs, into --out"))
    job.add_arguments(sub.add_parser("run", help="there: the whole GPU job"))
    p = sub.add_parser("score", help="there: adapters' scores on the candidates")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--adapter", action="append", required=True, help="NAME=PATH (PATH 'default': the shipped one)")
    p.add_argument("--max-queries", type=int, default=0)
    p.add_argument("--depth", type=int, default=0, help="rerank the top DEPTH candidates (0: all)")
    p.add_argument("--out", type=Path, required=True)
    profiling.add_arguments(sub.add_parser("profile", help="where one rerank's time goes"))
    p = sub.add_parser("report", help="here: nDCG@10 of returned scores")
    p.add_argument("--scores", type=Path, required=True)
    p.add_argument("--assets", type=Path, default=Path(".gpu/b"))
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--dev-meta", type=Path, default=job.SHIPPED_META)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps(prepare.prepare(args), indent=2))
    elif args.command == "run":
        summary = job.run(args)
        print(json.dumps(summary["stages"], indent=2))
    elif args.command == "score":
        score.score(args)
    elif args.command == "profile":
        text = profiling.run_profile(args)
        args.out.write_text(text)
        print(text)
    else:
        result = score.report(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
