"""python -m reranker.gpu prepare | run | score | profile  (see reranker/gpu/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys

from reranker.gpu import job, prepare, profiling, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker.gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare.add_arguments(sub.add_parser("prepare", help="here: the files the GPU run needs, into --out"))
    job.add_arguments(sub.add_parser("run", help="there: the whole GPU job"))
    score.add_arguments(sub.add_parser("score", help="there: adapters' scores over evidence files' candidates"))
    profiling.add_arguments(sub.add_parser("profile", help="where one rerank's time goes"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps(prepare.prepare(args), indent=2))
    elif args.command == "run":
        summary = job.run(args)
        print(json.dumps(summary["stages"], indent=2))
    elif args.command == "score":
        score.score(args)
    else:
        text = profiling.run_profile(args)
        args.out.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
