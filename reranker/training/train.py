"""Fine-tune BlockRank with LoRA: next-token loss on the relevant document's
identifier plus the auxiliary InfoNCE loss on the attention scores at l*.

    python -m reranker.training.train --data ../shared/data/scifact --out reranker/adapters/scifact-lora \
        --steps 300 --n-docs 8 --block-tokens 96            # CPU, small settings
    python -m reranker.training.train ... --steps 3000 --n-docs 30 --block-tokens 160 --device cuda   # GPU

Training data: the train split's judged queries (never test), each with one
relevant document and hard negatives from the first-stage retriever (its
top-`--negatives-depth` minus the judged documents), shuffled into random
slots, drawn anew at every use (so each epoch sees new lists).
`--pseudo-queries N` adds, from each training collection's corpus, N titles (or
with `--pseudo-source sentence` sentences cut out of the text: the inverse cloze
task) as queries for their own document (GPL/InPars-style) with the query's
first-stage neighbours as negatives, skipping every document judged in another
split (dev, test). `--also DIR` adds another
collection's train queries (one example per query, its relevant documents drawn
in turn); steps take the collections in turn. `--dev-queries` train queries of
`--data` are held out of training and used after it to pick the scoring heads
and fit the first-stage/reranker fusion weight.

The LM loss runs through layers 0..l* followed by the final norm and lm_head:
layers after l* are never served (early exit), so the identifier has to be
decodable where the scores are read. Saves a PEFT adapter directory plus
blockrank.json (layer, heads, fusion weight, settings), a loss curve PNG and
a JSONL log; checkpoints every --save-every steps. Seeded and reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.beir import iter_corpus, load_qrels
from common.paths import SCIFACT, VAR_DIR
from common.plots import figure
from common.types import Document
from reranker.adapters import ADAPTER_META, base_scoring, held_out_query_ids
from reranker.blockrank import BlockRankForward
from reranker.model import HFModule, LoadedModel, load_model
from reranker.prompt import Prompt, PromptBuilder, PromptLimits, PromptTemplate
from reranker.training.candidates import Candidates, first_stage, load_candidates, search


@dataclass
class Example:
    """A query, its relevant document(s) and its pool of hard negatives; every use draws one relevant
    document, fresh negatives and fresh slots, so later epochs see new lists."""

    query: str
    positives: list[Document]
    negatives: list[Document]

    def draw(self, n_docs: int, rng: random.Random) -> tuple[list[tuple[str, str]], int]:
        # rng.choice draws even from one item: skipping it keeps the shipped adapter's lists as they were drawn
        positive = self.positives[0] if len(self.positives) == 1 else rng.choice(self.positives)
        chosen = [positive, *rng.sample(self.negatives, n_docs - 1)]
        rng.shuffle(chosen)
        return [(d.title, d.text) for d in chosen], chosen.index(positive)


def build_examples(candidates: list[Candidates], qrels: dict, n_docs: int, per_query: bool = False) -> list[Example]:
    """Negatives are the unjudged first-stage candidates. One example per (query, relevant document), or with
    `per_query` one per query drawing among its relevant ones (collections that judge dozens per query, like
    NFCorpus, would otherwise weigh each query by its number of judgements)."""
    examples = []
    for cand in candidates:
        relevant = qrels.get(cand.query_id, {})
        negatives = [d for d in cand.documents if d.id not in relevant]
        positives = [d for d in cand.documents if d.id in relevant]
        if len(negatives) < n_docs - 1 or not positives:
            continue
        examples += [Example(cand.query, positives, negatives)] if per_query else \
            [Example(cand.query, [d], negatives) for d in positives]
    return examples


class ExampleStream:
    """The training collections' examples in turn, one per step; each collection's list is walked in order and
    reshuffled at the start of each of its later epochs."""

    def __init__(self, sources: list[list[Example]], rng: random.Random) -> None:
        self.sources = [s for s in sources if s]
        self.rng = rng
        self.drawn = [0] * len(self.sources)
        self.turn = 0

    def next(self) -> Example:
        examples, taken = self.sources[self.turn], self.drawn[self.turn]
        if taken and taken % len(examples) == 0:
            self.rng.shuffle(examples)  # a new epoch, in a new order
        self.drawn[self.turn] += 1
        self.turn = (self.turn + 1) % len(self.sources)
        return examples[taken % len(examples)]


def training_losses(forward: BlockRankForward, lm_head: torch.nn.Module, norm: torch.nn.Module, prompt: Prompt,
                    answer_token: int, positive_slots: list[int], layer: int, block_tokens: int,
                    tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss on the identifier's first token, InfoNCE on the l* attention scores)."""
    captured: list = []
    last = min(layer + 1, forward.num_layers - 1)
    masses = forward.head_masses([prompt], last, [layer], block_tokens, capture=captured)[0]
    scores = masses[0].mean(dim=(0, 1))  # (n_docs,)
    logits = scores / tau
    aux = -(torch.logsumexp(logits[positive_slots], 0) - torch.logsumexp(logits, 0))
    final_hidden = captured[-1][2][0][0, -1]  # input of layer l*+1 = output of l*, at the "[" token
    token_logits = lm_head(norm(final_hidden))
    lm = torch.nn.functional.cross_entropy(token_logits[None].float(), torch.tensor([answer_token],
                                                                                    device=token_logits.device))
    return lm, aux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layer", type=int, default=-1, help="l*; default: the base model's scoring file")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-docs", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=96)
    parser.add_argument("--negatives-depth", type=int, default=30)
    parser.add_argument("--negatives-mode", choices=["dense", "lexical", "hybrid", "default"], default="dense",
                        help="first stage the hard negatives come from; dense (MiniLM) is the shipped adapter's, "
                             "hybrid ones made a weaker reranker (model card); default: the collection's mode")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another BEIR collection whose --split queries join training (repeatable); its "
                             "collection in --retriever-dir is named after the directory. Steps take the "
                             "collections in turn, so --data keeps its share whatever the others' sizes")
    parser.add_argument("--pseudo-queries", type=int, default=0,
                        help="documents of each training collection's corpus (--data and every --also) that "
                             "become pseudo-queries for themselves; together they take one turn among the "
                             "training sources, so --data keeps its share of the steps")
    parser.add_argument("--pseudo-source", choices=["title", "sentence"], default="title",
                        help="title: the document's title is the query; sentence: one of its sentences is, and "
                             "is cut from the document (the inverse cloze task), so the match is not verbatim")
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--dev-query-ids-from", type=Path, default=None,
                        help="hold out the dev queries recorded in this blockrank.json (compare two adapters "
                             "on the same held-out queries) instead of drawing --dev-queries")
    parser.add_argument("--candidates", type=Path, default=None,
                        help="first-stage candidates written by save_candidates (no retriever needed)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="if > 0: time the first steps and cut --steps to fit this many seconds")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--aux-weight", type=float, default=1.0,
                        help="λ; the paper uses 0.1, but serving reads only the attention scores")
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--retriever-dir", type=Path, default=VAR_DIR / "retriever")
    parser.add_argument("--collection", default="scifact")
    args = parser.parse_args(argv)
    if args.split == "test":
        sys.exit("refusing to train on the test split")
    train(args)
    return 0


@dataclass
class Run:
    """What one training run works on: the model, l*, the prompt builder, examples (one list per training
    collection) and held-out queries."""

    lm: LoadedModel
    layer: int
    builder: PromptBuilder
    examples: list[list[Example]]
    dev: list[Candidates]


def prepare(args: argparse.Namespace, rng: random.Random) -> Run:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # fp32 weights everywhere (LoRA updates are small against bf16's 8-bit mantissa); on a GPU the matmuls run
    # in TF32, which keeps fp32's range at tensor-core speed.
    torch.set_float32_matmul_precision("high")
    lm = load_model(args.model, args.device, "fp32")
    layer = args.layer if args.layer >= 0 else int(base_scoring(lm.name).get("layer",
                                                                              lm.model.config.num_hidden_layers // 2))
    builder = PromptBuilder(lm.tokenizer, PromptTemplate(), PromptLimits(block_tokens=args.block_tokens))
    candidates = load_candidates(args.candidates, args.data, args.negatives_depth) if args.candidates else \
        first_stage(args.data, args.split, args.negatives_depth, args.retriever_dir, args.collection,
                    mode=negatives_mode(args))
    rng.shuffle(candidates)
    if args.dev_query_ids_from:
        held_out = held_out_query_ids(args.dev_query_ids_from)
        dev = [c for c in candidates if c.query_id in held_out]
        train_cands = [c for c in candidates if c.query_id not in held_out]
    else:
        dev, train_cands = candidates[: args.dev_queries], candidates[args.dev_queries:]
    examples = build_examples(train_cands, load_qrels(args.data, args.split), args.n_docs)
    rng.shuffle(examples)
    pseudo = [e for e in pseudo_examples(args, rng) if len(e.negatives) >= args.n_docs - 1] \
        if args.pseudo_queries else []
    sources = [examples, pseudo, *(other_examples(args, data, rng) for data in args.also)]
    print(f"{' + '.join(str(len(s)) for s in sources)} training examples, {len(dev)} dev queries held out, "
          f"l*={layer}")
    return Run(lm, layer, builder, sources, dev)


def negatives_mode(args: argparse.Namespace) -> str:
    return "" if args.negatives_mode == "default" else str(args.negatives_mode)


def other_examples(args: argparse.Namespace, data: Path, rng: random.Random) -> list[Example]:
    """An --also collection's examples: all of its --split queries (none held out; its own dev split is the
    held-out set), one example per query."""
    candidates = first_stage(data, args.split, args.negatives_depth, args.retriever_dir, data.name,
                             mode=negatives_mode(args))
    examples = build_examples(candidates, load_qrels(data, args.split), args.n_docs, per_query=True)
    rng.shuffle(examples)
    return examples


def train(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model

    rng = random.Random(args.seed)
    run = prepare(args, rng)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      layers_to_transform=list(range(run.layer + 1)))
    for p in run.lm.model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(run.lm.model, lora)
    model.print_trainable_parameters()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_loop(args, run, model, rng, args.out / "train_log.jsonl")
    model.save_pretrained(args.out)
    plot_losses(args.out / "train_log.jsonl", args.out / "loss.png")
    settings = json.loads(json.dumps(vars(args), default=str))  # paths (--data, every --also) as strings
    meta = {"layer": run.layer, "heads": [], "block_tokens": args.block_tokens, "base_model": run.lm.name,
            "train_seconds": time.perf_counter() - start, "device": str(run.lm.device), "settings": settings,
            "dev_query_ids": [c.query_id for c in run.dev]}
    (args.out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved adapter to {args.out} in {meta['train_seconds']:.0f}s")


CALIBRATION_STEPS = 12  # with --budget-s: steps timed (after the first two, which warm kernels up) to size the run


def train_loop(args: argparse.Namespace, run: Run, model: HFModule, rng: random.Random,
               log_path: Path) -> None:
    """AdamW with linear warm-up and cosine decay; one prompt per step; a JSON line per step. With
    --budget-s the step count is fixed after timing the first steps, so the schedule still runs to its end."""
    base = model.base_model.model
    forward = BlockRankForward(base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    plan = {"steps": args.steps}

    def lr_factor(s: int) -> float:
        warmup = max(1, plan["steps"] // 20)
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / plan["steps"])))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log_path.write_text("")
    model.train()
    start = time.perf_counter()
    stream = ExampleStream(run.examples, rng)
    bar = tqdm(total=args.steps, desc="training", unit="step")
    step = 0
    while step < plan["steps"]:
        example = stream.next()
        docs, slot = example.draw(args.n_docs, rng)
        prompt = run.builder.build(example.query, docs)
        lm_loss, aux_loss = training_losses(forward, base.lm_head, base.model.norm, prompt,
                                            run.builder.answer_ids(slot)[0], [slot], run.layer,
                                            args.block_tokens, args.tau)
        loss = lm_loss + args.aux_weight * aux_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        row = {"step": step, "loss": loss.item(), "lm": lm_loss.item(), "aux": aux_loss.item(),
               "lr": schedule.get_last_lr()[0], "elapsed_s": time.perf_counter() - start}
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if args.budget_s > 0 and step == 2:
            timed_from = time.perf_counter()
        if args.budget_s > 0 and step == CALIBRATION_STEPS:
            per_step = (time.perf_counter() - timed_from) / (CALIBRATION_STEPS - 2)
            plan["steps"] = max(step, min(args.steps, int(args.budget_s / per_step)))
            bar.total = plan["steps"]
            tqdm.write(f"{per_step * 1000:.0f} ms/step: {plan['steps']} steps fit --budget-s {args.budget_s:.0f}")
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux']:.3f}")
        if step % args.save_every == 0 and step < plan["steps"]:
            model.save_pretrained(args.out / f"checkpoint-{step}")
    args.steps = plan["steps"]  # recorded in blockrank.json as the steps actually run
    bar.close()


def pseudo_examples(args: argparse.Namespace, rng: random.Random) -> list[Example]:
    """Corpus documents as pseudo-queries for themselves (GPL/InPars-style without a generator): the title, or
    with --pseudo-source sentence one sentence cut out of the text (ICT, Lee et al. 2019); negatives are the
    query's first-stage neighbours. --pseudo-queries of them from --data's corpus and as many from each --also
    collection's, in one list. Documents judged in any other split (dev, test) are never used."""
    examples: list[Example] = []
    for data, collection in ((args.data, args.collection), *((d, d.name) for d in args.also)):
        examples += corpus_pseudo_examples(args, data, collection, rng)
    rng.shuffle(examples)
    return examples


def corpus_pseudo_examples(args: argparse.Namespace, data: Path, collection: str,
                           rng: random.Random) -> list[Example]:
    judged_elsewhere: set[str] = set()
    for path in (data / "qrels").glob("*.tsv"):
        if path.stem != args.split:
            for rel in load_qrels(data, path.stem).values():
                judged_elsewhere.update(rel)
    corpus = [d for d in iter_corpus(data) if d.id not in judged_elsewhere]
    pairs = [pair for d in corpus if (pair := pseudo_pair(d, args.pseudo_source, rng))]
    picked = rng.sample(pairs, min(args.pseudo_queries, len(pairs)))
    neighbours = search(data, args.retriever_dir, collection, [query for query, _ in picked],
                        args.negatives_depth, negatives_mode(args))
    return [Example(query, [doc], [n for n, _ in near if n.id != doc.id and n.id not in judged_elsewhere])
            for (query, doc), near in zip(picked, neighbours, strict=True)]


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
ICT_WORDS = (6, 30)  # a pseudo-query's length in words, about that of a claim or question


def pseudo_pair(doc: Document, source: str, rng: random.Random) -> tuple[str, Document] | None:
    """(query, the document it was drawn from, without the query when it was cut out of it), or None."""
    if source == "title":
        return (doc.title, doc) if doc.title else None
    sentences = SENTENCE_END.split(doc.text)
    usable = [i for i, s in enumerate(sentences) if ICT_WORDS[0] <= len(s.split()) <= ICT_WORDS[1]]
    if len(sentences) < 3 or not usable:
        return None  # too short to lose a sentence and still be a document
    cut = rng.choice(usable)
    rest = " ".join(s for i, s in enumerate(sentences) if i != cut)
    return sentences[cut], dataclasses.replace(doc, text=rest)


def plot_losses(log_path: Path, out: Path) -> None:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    window = max(1, len(rows) // 30)

    def smooth(key: str) -> list[float]:
        values = [r[key] for r in rows]
        return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                for i in range(len(values))]

    with figure(out) as ax:
        steps = [r["step"] for r in rows]
        for key in ("loss", "lm", "aux"):
            ax.plot(steps, smooth(key), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (moving average, {window} steps)")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
