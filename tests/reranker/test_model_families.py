"""Any local Hugging Face Llama / Mistral / Qwen2 directory loads and runs the same fast path.

Tiny randomly initialised models of each family are saved as ordinary HF directories (with the real
SmolLM2 tokenizer), loaded through `load_model(dir)` on the --device of the run (tests/conftest.py), and
held to the dense block-masked reference.
"""

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from reranker.blockrank import BlockRankForward, ForwardPath, ScoringSpec
from reranker.engine import Reranker, RerankerConfig
from reranker.model import load_model
from reranker.prompt import PromptBuilder, PromptLimits
from reranker.reference import reference_scores

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},  # q/k/v biases: a different projection shape
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(device="cpu").tokenizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_local_hf_directory_matches_reference(tmp_path, tokenizer, device, family):
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=4096, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():  # non-zero biases, so that a projection that dropped them would show
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.2)
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)

    lm = load_model(str(tmp_path / family), device=device, dtype="fp32", attn_implementation="eager")
    assert lm.model.config.model_type == family
    prompt = PromptBuilder(lm.tokenizer, limits=PromptLimits(block_tokens=24)).build(
        "query text", [("A", "first document text"), ("B", "second, a longer document about other things")])
    spec = ScoringSpec(layer=2, block_tokens=24)
    reference, _ = reference_scores(lm.model, prompt, spec)
    for path in (ForwardPath.CHUNKED, ForwardPath.PACKED):  # the packed one stacks q|k|v with Qwen2's biases
        fast = BlockRankForward(lm.model, path=path).score([prompt], spec)[0].cpu()
        assert float((fast - reference).abs().max()) <= 1e-4, path

    served = Reranker(RerankerConfig(model=str(tmp_path / family), adapter="default", device=device,
                                     block_tokens=24))
    assert served.adapter is None, "the shipped adapter belongs to another base model"
    assert len(served.rank("query", ["one", "two", "three"])) == 3
