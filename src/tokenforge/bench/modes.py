"""The benchmark modes (throughput, latency, prefix): the order of phases and the figures they yield.

Each side is loaded, warmed up, timed and released before the next is loaded, so the two models never
compete for the cores or the memory. Every mode returns a plain dict that `report` prints.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
from argparse import Namespace
from pathlib import Path

import torch

from tokenforge.bench import reference, tokenforge_side
from tokenforge.bench.peer import new_log_path, run_vllm
from tokenforge.bench.report import WARMUP_NOTE, machine_facts, progress
from tokenforge.bench.timing import ratio
from tokenforge.bench.workload import (
    DEFAULT_THROUGHPUT,
    QUICK_THROUGHPUT,
    Workload,
    make_workload,
    random_prompt,
)
from tokenforge.models.gguf_file import find_gguf, hf_config, read_gguf

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFIX_TARGET_SPEEDUP = 5.0


def checkpoint_config(model_path: str) -> dict:
    """config.json of a checkpoint folder, or the same keys read from a GGUF file's metadata."""
    gguf_file = find_gguf(model_path)
    if gguf_file is not None:
        return hf_config(read_gguf(gguf_file))
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"--model {model_path!r}: no config.json there; pass a Hugging Face checkpoint "
                         "folder or a GGUF file (`tokenforge bench make-model OUT_DIR --shape tiny` makes one)")
    with open(cfg_file) as f:
        return json.load(f)


def prompt_vocab_size(model_path: str, config: dict) -> int:
    """Ids random prompts may use: below both the model's vocab and the tokenizer's.

    Many checkpoints pad the embedding past the tokenizer (Qwen: 151936 rows, ~151665 tokens), and
    vLLM rejects prompt ids its tokenizer does not know.
    """
    from tokenizers import Tokenizer

    if find_gguf(model_path) is not None:
        from tokenforge.tokenizer import TokenizerWrapper

        return min(config["vocab_size"], TokenizerWrapper(model_path).vocab_size)
    tokenizer_file = Path(model_path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return config["vocab_size"]
    return min(config["vocab_size"], Tokenizer.from_file(str(tokenizer_file)).get_vocab_size())


def peer_max_model_len(config: dict, workload: Workload) -> int:
    """Long enough for every request and no longer: a model's full context (128k for some) need not fit
    the peer's fixed KV space, and this workload never uses it."""
    needed = -(-workload.max_seq_len // 256) * 256
    return min(needed, config.get("max_position_embeddings", needed))


def _base_facts(args: Namespace) -> dict:
    torch.set_num_threads(args.threads)
    return {"model": args.model, "machine": machine_facts(args.threads, args.dtype), "warmup": WARMUP_NOTE}


def _tokenforge(args: Namespace, measure):
    """Load and warm up the engine, return `measure(llm)`; the engine is freed before returning."""
    progress("tokenforge: loading model")
    llm = tokenforge_side.load_llm(args.model, args.dtype, args.threads, int(args.kv_cache_gib * 1024**3))
    progress("tokenforge: warm-up")
    tokenforge_side.warm_up(llm)
    result = measure(llm)
    del llm
    gc.collect()  # the next side loads its own copy of the weights; do not hold two at once
    return result


def _reference(args: Namespace, measure):
    """Load and warm up the transformers model, return `measure(model)`; the model is freed on return."""
    # The engine may have changed the torch thread count; both sides must run on the same number.
    torch.set_num_threads(args.threads)
    progress("reference: loading model with transformers")
    model = reference.load_model(args.model, TORCH_DTYPES[args.dtype])
    progress("reference: warm-up")
    reference.warm_up(model)
    result = measure(model)
    del model
    gc.collect()
    return result


def run_throughput(args: Namespace) -> dict:
    config = checkpoint_config(args.model)
    shape = QUICK_THROUGHPUT if args.quick else DEFAULT_THROUGHPUT
    if args.num_requests is not None:
        shape = dataclasses.replace(shape, num_requests=args.num_requests)
    if args.reference_batch_sizes:
        shape = dataclasses.replace(shape, reference_batch_sizes=tuple(args.reference_batch_sizes))
    workload = make_workload(shape, prompt_vocab_size(args.model, config), args.seed)
    facts = _base_facts(args) | {"workload": workload.describe()}

    def timed_tokenforge(llm):
        progress(f"tokenforge: timing {workload.num_requests} requests")
        return tokenforge_side.run_throughput(llm, workload)

    elapsed = _tokenforge(args, timed_tokenforge)
    facts |= {"tokenforge_elapsed_s": elapsed, "tokenforge_tok_s": workload.num_output_tokens / elapsed}
    if not args.skip_reference:
        facts |= _reference_throughput(args, workload, shape.reference_batch_sizes)
    facts["ratio"] = ratio(facts["tokenforge_tok_s"], facts.get("reference_tok_s"))
    if args.peer:
        facts |= _peer_throughput(args, workload, peer_max_model_len(config, workload))
        facts["peer_ratio"] = ratio(facts["tokenforge_tok_s"], facts["peer_tok_s"])
    return facts


def _reference_throughput(args: Namespace, workload: Workload, batch_sizes: tuple[int, ...]) -> dict:
    def timed_batches(model):
        figures = []
        for batch_size in reference.effective_batch_sizes(batch_sizes, workload.num_requests):
            progress(f"reference: timing static batches of {batch_size}")
            figures.append(reference.run_batch_size(model, workload, batch_size))
            progress(f"reference: batch {batch_size}: {figures[-1].output_tok_s:.1f} output tok/s "
                     f"({figures[-1].elapsed_s:.0f} s)")
        return figures

    figures = _reference(args, timed_batches)
    best = max(figures, key=lambda f: f.output_tok_s)
    return {"reference_tok_s": best.output_tok_s, "reference_best_batch_size": best.batch_size,
            "reference_batch_sizes": [dataclasses.asdict(f) for f in figures]}


def _peer_throughput(args: Namespace, workload: Workload, max_model_len: int) -> dict:
    log_path = new_log_path()
    progress(f"peer {args.peer}: running under {args.peer_python}; cold start can take minutes, "
             f"follow it with: tail -f {log_path}")
    peer = run_vllm(args.peer_python, args.model, args.dtype, args.threads, workload,
                    max_model_len, args.peer_timeout, log_path)
    if peer.error:
        progress(f"peer {args.peer}: FAILED: {peer.error}")
    return {"peer": peer.name, "peer_tok_s": peer.tok_s, "peer_elapsed_s": peer.elapsed_s,
            "peer_version": peer.version, "peer_error": peer.error, "peer_log": peer.log_path}


def _distinct_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, length, vocab_size) for _ in range(count)]


def run_latency(args: Namespace) -> dict:
    config = checkpoint_config(args.model)
    peer = getattr(args, "peer", None)
    # With llama.cpp beside it, the workload is llama-bench's own: pp512 and tg128.
    prompt_len = args.prompt_len or (32 if args.quick else 512 if peer else 128)
    num_new = args.new_tokens or (32 if args.quick else 128)
    # Distinct prompts per repeat: a repeat must not be served from the previous one's prefix cache.
    prompts = _distinct_prompts(args.repeats, prompt_len, prompt_vocab_size(args.model, config), args.seed)
    facts = _base_facts(args) | {"workload": {"prompt_len": prompt_len, "num_new_tokens": num_new,
                                              "repeats": args.repeats, "seed": args.seed}}
    # llama-bench's tg<n> generates from an empty context; beside it, tokenforge does too (one-token prompts)
    short = _distinct_prompts(args.repeats, 1, prompt_vocab_size(args.model, config), args.seed + 1) if peer else []
    progress(f"{args.repeats} batch-1 runs per side" + (" (and as many from a one-token prompt)" if peer else ""))
    tf, tg = _tokenforge(args, lambda llm: (tokenforge_side.run_latency(llm, prompts, num_new),
                                            tokenforge_side.run_latency(llm, short, num_new) if short else None))
    facts |= {"tokenforge_ttft_s": tf.ttft_s, "tokenforge_decode_tok_s": tf.decode_tok_s,
              # TTFT holds the whole prompt's forward pass and the first sampled token: a lower bound
              # on prompt-processing speed, comparable to llama-bench's ppN.
              "tokenforge_prefill_tok_s": ratio(prompt_len, tf.ttft_s)}
    if not args.skip_reference:
        ref = _reference(args, lambda model: reference.run_latency(model, prompts, num_new))
        facts |= {"reference_ttft_s": ref.ttft_s, "reference_decode_tok_s": ref.decode_tok_s}
    facts["ttft_ratio"] = ratio(facts.get("reference_ttft_s"), facts["tokenforge_ttft_s"])
    facts["decode_ratio"] = ratio(facts["tokenforge_decode_tok_s"], facts.get("reference_decode_tok_s"))
    if peer == "llama.cpp":
        facts["tokenforge_tg_tok_s"] = tg.decode_tok_s
        facts |= _llama_bench_facts(args, prompt_len, num_new, facts)
    if not getattr(args, "no_bandwidth", True):
        facts |= _bandwidth_facts(args)
    return facts


def _llama_bench_facts(args: Namespace, prompt_len: int, num_new: int, facts: dict) -> dict:
    from tokenforge.bench.llamacpp import run_llama_bench

    gguf = find_gguf(args.model)
    if gguf is None:
        return {"peer_error": f"{args.model} holds no .gguf file: llama-bench needs one"}
    extra = "".join(f" {a}" for a in args.peer_args)
    progress(f"llama.cpp: llama-bench -p {prompt_len} -n {num_new} -t {args.threads}{extra} on {gguf}")
    peer = run_llama_bench(args.peer_bin, str(gguf), args.threads, prompt_len, num_new, args.repeats,
                           extra_args=args.peer_args)
    return {"peer": "llama.cpp", "peer_args": args.peer_args, "peer_version": peer.version, "peer_error": peer.error,
            "peer_log": peer.log_path,
            "peer_prefill_tok_s": peer.prefill_tok_s, "peer_decode_tok_s": peer.decode_tok_s,
            "peer_prefill_ratio": ratio(facts["tokenforge_prefill_tok_s"], peer.prefill_tok_s),
            "peer_decode_ratio": ratio(facts["tokenforge_tg_tok_s"], peer.decode_tok_s)}


def _bandwidth_facts(args: Namespace) -> dict:
    from tokenforge.bench.bandwidth import decode_bytes_per_token, read_bandwidth_gb_s

    progress("memory read bandwidth (1 GiB sum)")
    gb_s = read_bandwidth_gb_s(args.threads)
    per_token = decode_bytes_per_token(args.model, args.dtype)
    return {"read_bandwidth_gb_s": gb_s, "weight_bytes_per_token": per_token,
            "decode_ceiling_tok_s": gb_s * 1e9 / per_token}


def run_prefix(args: Namespace) -> dict:
    config = checkpoint_config(args.model)
    prompt_len = args.prompt_len or (256 if args.quick else 1000)
    (prompt,) = _distinct_prompts(1, prompt_len, prompt_vocab_size(args.model, config), args.seed)
    facts = _base_facts(args) | {"workload": {"prompt_len": prompt_len, "seed": args.seed},
                                 "target_speedup": PREFIX_TARGET_SPEEDUP}

    def twice(llm):
        progress("tokenforge: first prefill (cold cache), then the same prompt again")
        return tokenforge_side.run_prefill(llm, prompt), tokenforge_side.run_prefill(llm, prompt)

    first, second = _tokenforge(args, twice)
    speedup = ratio(first, second)
    facts |= {"tokenforge_first_prefill_s": first, "tokenforge_second_prefill_s": second,
              "speedup": speedup, "meets_target": speedup is not None and speedup >= PREFIX_TARGET_SPEEDUP}
    if not args.skip_reference:
        facts["reference_prefill_s"] = _reference(args, lambda model: reference.run_prefill(model, prompt))
    return facts
