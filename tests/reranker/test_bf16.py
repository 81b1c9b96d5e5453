"""bf16 on the --device of the run (the default dtype on CPUs with native bf16 and on GPUs), held to the bounds the
CUDA tests set: each forward path's bf16 scores no further from fp32 than the model's own dense bf16 forward
(DENSE_BF16_FACTOR x its mean error over a dozen prompts, the same top-1), and a tenant served as a LoRA block over
the shared bf16 base no further from its fp32 merged model than that merged model run in bf16.

Skipped on a CPU without native bf16, where "auto" never picks bf16 and emulated bf16 would make these minutes
long; they check the numbers, not the speed."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common.device import Dtype, cpu_has_native_bf16
from reranker.adapters import DEFAULT_ADAPTER
from reranker.blockrank import BlockRankForward, ForwardPath, ScoringSpec
from reranker.engine import Reranker, RerankerConfig
from reranker.model import HFModule, LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits
from reranker.reference import reference_scores
from reranker.tenants import EquivalenceMode
from reranker.training.derive import derive_adapter, merge_adapter
from tests.reranker.numerics import DENSE_BF16_FACTOR, TOP1_MARGIN
from tests.reranker.test_blockrank import BLOCK, rel_err
from tests.reranker.test_cuda import BF16_PROMPTS, SHIPPED_LAYER
from tests.reranker.test_zoo import DOCS as TENANT_DOCS
from tests.reranker.test_zoo import OTHER_QUERY, QUERY

pytestmark = pytest.mark.slow
SPEC = ScoringSpec(layer=SHIPPED_LAYER, block_tokens=BLOCK)


@pytest.fixture(scope="module")
def lm(device: str) -> LoadedModel:
    if device == "cpu" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): the reranker does not run bf16 here")
    """fp32 with eager attention: the reference needs its attention probabilities."""
    return load_model(device=device, dtype=Dtype.FP32, attn_implementation="eager")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class References:
    """The prompts, the fp32 model's dense reference scores of each, and the dense bf16 forward's error from them."""

    prompts: list[Prompt]
    fp32: list[torch.Tensor]
    dense_bf16_errors: list[float]


@pytest.fixture(scope="module")
def bf16_model(lm: LoadedModel) -> HFModule:
    return copy.deepcopy(lm.model).to(torch.bfloat16)


@pytest.fixture(scope="module")
def references(lm: LoadedModel, bf16_model: HFModule) -> References:
    builder = PromptBuilder(lm.tokenizer, limits=PromptLimits(block_tokens=BLOCK))
    prompts = [builder.build(query, docs) for query, docs in BF16_PROMPTS]
    fp32, errors = [], []
    for prompt in prompts:
        reference = reference_scores(lm.model, prompt, SPEC)[0].float().cpu()
        fp32.append(reference)
        errors.append(rel_err(reference_scores(bf16_model, prompt, SPEC)[0].float().cpu(), reference))
    return References(prompts, fp32, errors)


@pytest.mark.parametrize("path", [ForwardPath.PACKED, ForwardPath.CHUNKED])
def test_each_path_in_bf16_is_as_close_to_fp32_as_the_dense_bf16_forward(
        bf16_model: HFModule, references: References, path: ForwardPath) -> None:
    fast = BlockRankForward(bf16_model, path=path, cuda_graphs=0).score(references.prompts, SPEC)
    errors = []
    for prompt, scores, reference in zip(references.prompts, fast, references.fp32, strict=True):
        got = scores.float().cpu()
        top2 = reference.topk(2).values
        if float(top2[0] - top2[1]) >= TOP1_MARGIN * float(top2[0].abs()):  # fp32's best is clearly the best
            assert int(got.argmax()) == int(reference.argmax()), (prompt.n_docs, got, reference)
        errors.append(rel_err(got, reference))
    dense = references.dense_bf16_errors
    print(f"{path} bf16: mean relative error {mean(errors):.4f}, dense bf16 {mean(dense):.4f}")
    assert mean(errors) <= DENSE_BF16_FACTOR * mean(dense), (errors, dense)


def test_a_bf16_tenant_block_is_as_close_to_fp32_as_its_merged_model_in_bf16(lm: LoadedModel, device: str,
                                                                           tmp_path: Path) -> None:
    """Mixed tenants in one routed bf16 forward, each against its adapter merged into an fp32 model: no further
    from it than that merged model's own bf16 BlockRank forward."""
    root = tmp_path / "adapters"
    shutil.copytree(DEFAULT_ADAPTER, root / "scifact", ignore=shutil.ignore_patterns("*.png", "*.jsonl", "*.md"))
    derive_adapter(DEFAULT_ADAPTER, root / "noisy", seed=1, noise=0.5)
    adapters = {"acme": "scifact", "beta": "noisy"}
    reranker = Reranker(RerankerConfig(adapter="none", device=device, dtype=Dtype.BF16,
                                       equivalence=EquivalenceMode.OFF, adapters_root=str(root)),
                        loaded=dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(torch.bfloat16),
                                                   dtype=torch.bfloat16))
    assert reranker.lm.dtype == torch.bfloat16
    for tenant, adapter in adapters.items():
        reranker.tenants.load(tenant, adapter)
    order = [(t, q) for q in (QUERY, OTHER_QUERY) for t in adapters]
    handles = [reranker.handle(tenant) for tenant, _ in order]
    prompts = [reranker.build_prompt(q, TENANT_DOCS, h) for (_, q), h in zip(order, handles, strict=True)]
    served = [torch.tensor(s) for s in reranker.score_prompts(prompts, handles)]
    errors, merged_errors = [], []
    for (tenant, _), handle, prompt, got in zip(order, handles, prompts, served, strict=True):
        merged = merge_adapter(copy.deepcopy(lm.model), root / adapters[tenant])
        spec = handle.settings.spec
        reference = BlockRankForward(merged).score([prompt], spec)[0].float().cpu()
        merged_bf16 = BlockRankForward(merged.to(torch.bfloat16), cuda_graphs=0).score([prompt], spec)[0]
        errors.append(rel_err(got, reference))
        merged_errors.append(rel_err(merged_bf16.float().cpu(), reference))
    print(f"bf16 tenant blocks: mean relative error {mean(errors):.4f}, merged model in bf16 {mean(merged_errors):.4f}")
    assert mean(errors) <= DENSE_BF16_FACTOR * mean(merged_errors), (errors, merged_errors)
