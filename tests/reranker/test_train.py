"""Fine-tuning end to end at toy scale: real model, real first stage, real PEFT adapter."""

import json
import subprocess
import sys

import pytest

from reranker.engine import Reranker, RerankerConfig
from tests.conftest import ROOT, SCIFACT, SCIFACT_TIMEOUT_S

pytestmark = [pytest.mark.slow, pytest.mark.long]  # all of SciFact ingested, then trained on


def train(out, retriever_dir, steps: int = 3):
    cmd = [sys.executable, "-m", "reranker.training.train", "--data", str(SCIFACT), "--out", str(out), "--steps", str(steps),
           "--n-docs", "4", "--block-tokens", "32", "--dev-queries", "5", "--save-every", "2",
           "--layer", "6", "--retriever-dir", str(retriever_dir), "--collection", "scifact"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(SCIFACT_TIMEOUT_S)
def test_train_saves_a_loadable_reproducible_adapter(tmp_path, scifact_retriever):
    log_a = train(tmp_path / "a", scifact_retriever.data_dir)
    log_b = train(tmp_path / "b", scifact_retriever.data_dir)
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-5), "seeded"
    adapter = tmp_path / "a"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "checkpoint-2").is_dir()
    assert (adapter / "loss.png").stat().st_size > 0
    meta = json.loads((adapter / "blockrank.json").read_text())
    assert meta["layer"] == 6 and len(meta["dev_query_ids"]) == 5 and meta["block_tokens"] == 32

    tuned = Reranker(RerankerConfig(adapter=str(adapter)))
    base = Reranker(RerankerConfig(adapter="none", block_tokens=32, scoring_layer=6))
    docs = [("Cats", "Cats purr."), ("Stocks", "Markets fell."), ("Insulin", "Insulin lowers glucose.")]
    tuned_handle, base_handle = tuned.handle(), base.handle()
    assert tuned_handle.settings.spec.layer == 6 and tuned_handle.settings.model_name.endswith("+a")
    tuned_scores = tuned.score_prompts([tuned.build_prompt("blood sugar", docs, tuned_handle)], [tuned_handle])[0]
    base_scores = base.score_prompts([base.build_prompt("blood sugar", docs, base_handle)], [base_handle])[0]
    assert tuned_scores != pytest.approx(base_scores, abs=1e-7), "the adapter changes the model"

    # Calibration on the held-out train queries: an adapter keeps its layer and the all-head score it was
    # trained on; the fusion weight comes from the grid, and the choice is written into its blockrank.json.
    calibrate = [sys.executable, "-m", "reranker.training.select_layer", "--adapter", str(adapter), "--data",
                 str(SCIFACT), "--retriever-dir", str(scifact_retriever.data_dir), "--collection", "scifact"]
    result = subprocess.run(calibrate, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = json.loads((adapter / "blockrank.json").read_text())
    assert chosen["layer"] == 6 and chosen["heads"] == [] and chosen["picked_on"]["queries"] == 5
    assert chosen["fusion_weight"] in [float(w) for w in chosen["fusion_grid"]]
    assert chosen["dev_query_ids"] == meta["dev_query_ids"], "training's record is kept"
