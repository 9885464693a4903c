"""`tokenforge bench perplexity`: perplexity of a text file, computed the way `llama-perplexity` computes it,
so the two numbers compare (with `--peer llama.cpp`, both in one run).

The method: the whole file is tokenized once (with the tokenizer's BOS, if it adds one); it is cut into
consecutive, non-overlapping chunks of `ctx` tokens (at least two are needed; a partial last chunk is
dropped); each chunk's first token is replaced by BOS (for tokenizers that add one) and the chunk runs as
one sequence; only the second half of each
chunk is scored (each of those positions predicts the next token with at least ctx/2 tokens of context).
Perplexity = exp(mean negative log-likelihood over every scored token).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def chunks(tokens: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    if len(tokens) < 2 * ctx:
        raise SystemExit(f"the text tokenizes to {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx}")
    out = []
    for i in range(len(tokens) // ctx):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        out.append(chunk)
    return out


def chunk_nll(logits: torch.Tensor, chunk: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the chunk's second half, and how many tokens it covers."""
    first = len(chunk) // 2
    targets = torch.tensor(chunk[first + 1:])
    logprobs = torch.log_softmax(logits[first:len(chunk) - 1].double(), dim=-1)
    return float(-logprobs.gather(1, targets.unsqueeze(1)).sum()), len(targets)


def tokenforge_perplexity(model_path: str, text: str, ctx: int, dtype: str, threads: int) -> dict:
    """Load the model once and score every chunk, one chunk per forward pass."""
    from tokenforge.config import ModelConfig, parse_dtype
    from tokenforge.models.registry import load_model
    from tokenforge.platform import configure_cpu, current_platform
    from tokenforge.runner.batch import BatchEntry, prepare_batch
    from tokenforge.runner.kv_cache import KVCache, kv_cache_dtype
    from tokenforge.tokenizer import TokenizerWrapper

    configure_cpu(threads)
    cfg = ModelConfig.from_pretrained(model_path)
    tokenizer = TokenizerWrapper(model_path)
    bos = tokenizer.tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    if bos is not None and tokenizer.encode("x")[:1] != [bos]:
        bos = None  # as llama.cpp: chunks start with BOS only for tokenizers that add one
    pieces = chunks(tokenizer.encode(text), ctx, bos)
    model = load_model(cfg, parse_dtype(dtype))
    platform = current_platform()
    block_size = 16
    num_blocks = -(-ctx // block_size)
    cache = KVCache(cfg, num_blocks, block_size, kv_cache_dtype(parse_dtype(dtype)), platform.device)
    attention = platform.attention_backend()
    nll, count = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for chunk in pieces:
            entry = BatchEntry("ppl", chunk, 0, list(range(num_blocks)), [], None, False)
            batch = prepare_batch([entry], attention, block_size, cfg.sliding_window)
            hidden = model(batch.input_ids, batch.positions, batch.meta, cache.layers)
            part, n = chunk_nll(model.compute_logits(hidden), chunk)
            nll += part
            count += n
    return {"perplexity": math.exp(nll / count), "num_chunks": len(pieces), "scored_tokens": count,
            "seconds": time.perf_counter() - start}


def run_perplexity(args) -> dict:
    from tokenforge.bench.report import machine_facts, progress

    text = Path(args.text).read_text(encoding="utf-8")
    facts = {"model": args.model, "text": args.text, "ctx": args.ctx,
             "machine": machine_facts(args.threads, args.dtype)}
    progress(f"tokenforge: perplexity over {args.text} at ctx {args.ctx}")
    facts |= tokenforge_perplexity(args.model, text, args.ctx, args.dtype, args.threads)
    if args.peer == "llama.cpp":
        from tokenforge.bench.llamacpp import run_llama_perplexity

        progress("llama.cpp: llama-perplexity on the same file")
        peer = run_llama_perplexity(args.peer_bin, args.model, args.text, args.ctx, args.threads,
                                    extra_args=args.peer_args)
        facts |= {"peer": "llama.cpp", "peer_args": args.peer_args, "peer_perplexity": peer.perplexity,
                  "peer_error": peer.error,
                  "peer_log": peer.log_path}
        if peer.perplexity:
            facts["perplexity_rel_diff"] = facts["perplexity"] / peer.perplexity - 1
    return facts


def perplexity_lines(facts: dict) -> list[str]:
    lines = [f"tokenforge perplexity: {facts['perplexity']:.4f} over {facts['scored_tokens']} tokens "
             f"({facts['num_chunks']} chunks of {facts['ctx']}, {facts['seconds']:.1f} s)"]
    if facts.get("peer"):
        if facts.get("peer_perplexity") is not None:
            lines.append(f"llama.cpp perplexity:  {facts['peer_perplexity']:.4f} "
                         f"(tokenforge / llama.cpp - 1 = {100 * facts['perplexity_rel_diff']:+.2f} %)")
        else:
            lines.append(f"llama.cpp: FAILED: {facts['peer_error']} (log: {facts['peer_log']})")
    return lines
