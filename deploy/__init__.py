"""Operations tooling beside the deployment files: the load test (`python -m deploy.loadtest`) and the
retrieval-quality evaluation through a running gateway (`python -m deploy.eval`). gRPC clients only;
no server imports this package."""
