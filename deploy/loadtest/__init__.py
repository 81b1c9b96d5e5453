"""Load test for SearchService (or RerankerService alone), on this machine only.

    python -m deploy.loadtest --target 127.0.0.1:50050 --collection scifact \
        --queries ../shared/data/scifact [--rerank-depth 0] [--concurrency 1,4,8] \
        [--requests 200] [--duration-s 60] --out bench-results/load.json

    python -m deploy.loadtest --service reranker --target 127.0.0.1:50052 \
        --queries ../shared/data/scifact --docs-per-request 20 --concurrency 1,2,4 \
        --requests 50 --out bench-results/reranker-load.json

Real queries come from the BEIR `queries.jsonl` under --queries (the directory, or
the file itself); in reranker mode the documents come from `corpus.jsonl` there
(or under --corpus). At each concurrency level, that many workers share one
grpc.aio channel and send requests back to back until --requests have been sent
or --duration-s has passed, whichever comes first (requests in flight then are
awaited, each bounded by --timeout-s). Each level reports throughput (successful
responses per second of wall time), client-side latency p50/p95/p99 in ms (over
successful responses), errors by gRPC status code, and the means of the
server-reported `timings` (retrieve_ms / rerank_ms / total_ms for Search;
queue_ms / model_ms / total_ms for Rerank).

Safety: the target must be HOST:PORT whose host is, or resolves only to, a
loopback address (127.0.0.0/8, localhost, ::1). Anything else is refused before
any connection is made, and the channel is opened to the resolved loopback
address, not the name. Writes JSON to --out and a PNG (throughput and p50/p99
latency against concurrency) beside it, and prints a table.
"""

