"""Dense references for BlockRank: the same prompt as one sequence with an explicit
block mask through the model's own eager attention (the equivalence tests), and
the usual full causal listwise input (the speed baseline)."""

from __future__ import annotations

import torch

from reranker.attention import NEG_INF
from reranker.blockrank import ScoringSpec
from reranker.model import HFModule
from reranker.prompt import Prompt


def block_sparse_layout(prompt: Prompt, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """The same prompt as ONE sequence: (ids, positions, additive mask (S, S), and per token the
    document slot whose score it counts towards, or -1).
    Documents are right-padded to the longest block; pads are masked as keys."""
    width = max(len(d) for d in prompt.docs)
    n0 = len(prompt.prefix)
    ids, pos, block, valid = list(prompt.prefix), list(range(n0)), [0] * n0, [True] * n0
    content = [False] * n0
    for i, doc in enumerate(prompt.docs):
        pad = width - len(doc)
        ids += doc + [0] * pad
        pos += list(range(n0, n0 + width))
        block += [i + 1] * width
        valid += [True] * len(doc) + [False] * pad
        tag = prompt.tag_lengths[i]
        content += [False] * tag + [True] * (len(doc) - tag) + [False] * pad
    nf = len(prompt.final)
    ids += prompt.final
    pos += list(range(n0 + block_tokens, n0 + block_tokens + nf))
    final_block = len(prompt.docs) + 1
    block += [final_block] * nf
    valid += [True] * nf
    content += [False] * nf
    block_t = torch.tensor(block)
    valid_t = torch.tensor(valid)
    s = len(ids)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    query_block, key_block = block_t[:, None], block_t[None, :]
    allowed = causal & ((key_block == 0) | (query_block == key_block) | (query_block == final_block))
    allowed &= valid_t[None, :]
    allowed |= torch.eye(s, dtype=torch.bool)  # pad queries see themselves: no all -inf rows
    mask = torch.zeros(s, s).masked_fill(~allowed, NEG_INF)
    slot = torch.where(torch.tensor(content), block_t - 1, -1)
    return torch.tensor(ids), torch.tensor(pos), mask, slot


def full_causal_ids(prompt: Prompt) -> torch.Tensor:
    """The usual listwise reranker input: all segments back to back, ordinary causal attention."""
    return torch.tensor(prompt.prefix + [t for doc in prompt.docs for t in doc] + prompt.final)


def reference_scores(model: HFModule, prompt: Prompt, spec: ScoringSpec) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Dense masked reference: eager attention over the full sequence with the block mask.
    Returns (scores (n_docs,), hidden states per layer) computed from the model's own attention
    probabilities at l*, renormalised over document tokens."""
    ids, pos, mask, slot = block_sparse_layout(prompt, spec.block_tokens)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = model.model(input_ids=ids[None].to(device), position_ids=pos[None].to(device),
                      attention_mask=mask[None, None].to(device=device, dtype=dtype),
                      output_hidden_states=True, output_attentions=True, use_cache=False)
    probs = out.attentions[spec.layer][0, :, -prompt.signal_tokens:, :].float()  # (heads, signal, S)
    on_docs = slot >= 0
    doc_probs = probs[:, :, on_docs.to(device)]
    doc_probs = doc_probs / doc_probs.sum(-1, keepdim=True)
    per_doc = torch.zeros(probs.shape[0], probs.shape[1], prompt.n_docs, device=device)
    per_doc.index_add_(2, slot[on_docs].to(device), doc_probs)
    heads = list(spec.heads) if spec.heads else list(range(probs.shape[0]))
    return per_doc[heads].mean(dim=(0, 1)).cpu(), out.hidden_states
