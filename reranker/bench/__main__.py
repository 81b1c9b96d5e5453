"""Reranker benchmarks; each writes JSON and a PNG beside it.

    python -m reranker.bench speed --n-docs 10,25,50,100,200,500 --block-tokens 160 \
        --out bench-results/reranker_speed.json
    python -m reranker.bench tenants --tenants 1,4,16 --out bench-results/reranker_tenants.json

`speed`: BlockRank against full causal attention, one rerank, same model and documents (speed.py).
`tenants`: memory, mixed-tenant throughput and adapter load time of tenants served as shared blocks,
against one model copy per tenant (tenants.py).
"""

from __future__ import annotations

import argparse
import sys

from common.files import write_result
from reranker.bench import speed, tenants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed.add_arguments(sub.add_parser("speed", help="BlockRank vs full-attention wall time per rerank"))
    tenants.add_arguments(sub.add_parser("tenants", help="multi-tenant memory, throughput and load time"))
    args = parser.parse_args(argv)
    run, plot = (speed.speed, speed.plot_speed) if args.command == "speed" else (tenants.run, tenants.plot)
    write_result(args.out, run(args), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
