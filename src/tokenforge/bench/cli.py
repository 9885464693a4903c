"""Command-line front of `tokenforge bench`: its options and the dispatch to each mode.

The main CLI calls `add_bench_parser(subparsers)` and, for `tokenforge bench ...`, `run_bench(args)`;
`python -m tokenforge.bench ...` goes through `main` with the same modes at the top level.
"""

from __future__ import annotations

import argparse
import shlex

from tokenforge.bench.peer import SUPPORTED_PEERS
from tokenforge.bench.serve import add_serve_bench_parser, run_serve_bench
from tokenforge.bench.simulate import add_simulate_parser, run_simulate
from tokenforge.bench.spec import MODES as SPEC_MODES
from tokenforge.bench.structured import add_structured_bench_parser, run_structured_bench

DTYPE_ALIASES = {"float32": "float32", "f32": "float32", "fp32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_PEER_PYTHON = "/tmp/peer-vllm/python"
DEFAULT_LLAMA_CPP_BIN = "/tmp/peer-llama/bin"



def add_peer_args_option(p: argparse.ArgumentParser, tool: str) -> None:
    p.add_argument("--peer-args", type=shlex.split, default=[], metavar="'ARGS'",
                   help=f"more flags for {tool}, as one shell-quoted string (write --peer-args='--flag 0': "
                   "a separate value that starts with -- would be read as an option)")

def dtype_name(value: str) -> str:
    try:
        return DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(DTYPE_ALIASES)}, got {value!r}") from None


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _common(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    p.add_argument("--model", required=default_model is None, default=default_model,
                   help="Hugging Face checkpoint folder, GGUF file, or a name: smollm2 or demo"
                   + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--dtype", type=dtype_name, default="float32", help="float32 | bfloat16 (f32, bf16)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for every side (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="tokenforge KV cache size (default 2)")
    p.add_argument("--quick", action="store_true", help="a small workload that finishes in under a minute")
    p.add_argument("--skip-reference", action="store_true", help="do not run the transformers reference")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def _add_modes(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="bench_mode", required=True, metavar="MODE")

    p = modes.add_parser("throughput", help="offline batch: tokenforge vs HF generate (and a peer) tok/s")
    _common(p)
    p.add_argument("--num-requests", type=positive_int, help="override the number of requests")
    p.add_argument("--reference-batch-sizes", type=lambda v: [positive_int(b) for b in v.split(",")],
                   help="static batch sizes the reference tries, best reported (default 8,16,32,64)")
    p.add_argument("--peer", choices=SUPPORTED_PEERS, help="also run the workload through this engine")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help=f"Python of the peer's environment (default {DEFAULT_PEER_PYTHON})")
    p.add_argument("--peer-timeout", type=float, default=1800.0,
                   help="seconds before the peer run, start-up included, is abandoned (default 1800)")

    p = modes.add_parser("latency", help="batch 1: time to first token and decode tok/s")
    _common(p)
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per side; the median is reported")
    p.add_argument("--prompt-len", type=positive_int, help="prompt tokens (default 128, quick 32)")
    p.add_argument("--new-tokens", type=positive_int, help="generated tokens, >= 2 (default 128, quick 32)")
    p.add_argument("--peer", choices=("llama.cpp",),
                   help="also run llama-bench on the same file (defaults become its -p 512 -n 128)")
    p.add_argument("--peer-bin", default=DEFAULT_LLAMA_CPP_BIN,
                   help=f"folder with llama.cpp's tools (default {DEFAULT_LLAMA_CPP_BIN})")
    add_peer_args_option(p, "llama-bench")
    p.add_argument("--no-bandwidth", action="store_true",
                   help="skip measuring memory bandwidth and the decode ceiling it implies")

    p = modes.add_parser("prefix", help="the same long prompt twice: prefix-cache prefill speed-up")
    _common(p)
    p.add_argument("--prompt-len", type=positive_int, help="prompt tokens (default 1000, quick 256)")

    p = modes.add_parser("spec", help="speculative decoding: acceptance and speed-up per proposer and mode")
    _common(p, default_model="demo")  # the demo model comes with a distilled draft model
    p.add_argument("--modes", type=lambda v: v.split(","), default=list(SPEC_MODES),
                   help=f"comma list of proposer modes (default {','.join(SPEC_MODES)})")
    p.add_argument("--num-prompts", type=positive_int, default=16, help="batch-1 prompts (default 16)")
    p.add_argument("--concurrency", type=positive_int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--prompt-len", type=positive_int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="generated tokens (default 128)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="concurrent runs, plain and speculative stepping in turn (default 5)")
    p.add_argument("--draft-model", help="draft checkpoint for the draft-* modes (default: the demo draft model)")

    p = modes.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity computes it")
    p.add_argument("--model", required=True, help="checkpoint folder or GGUF file")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=positive_int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--dtype", type=dtype_name, default="float32", help="float32 | bfloat16 (f32, bf16)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    p.add_argument("--peer", choices=("llama.cpp",), help="also run llama-perplexity on the same file")
    p.add_argument("--peer-bin", default=DEFAULT_LLAMA_CPP_BIN,
                   help=f"folder with llama.cpp's tools (default {DEFAULT_LLAMA_CPP_BIN})")
    add_peer_args_option(p, "llama-perplexity")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")

    add_serve_bench_parser(modes)
    add_simulate_parser(modes)
    add_structured_bench_parser(modes)

    p = modes.add_parser("make-model", help="write a random-weight Llama checkpoint")
    p.add_argument("out_dir", help="folder to write the checkpoint to")
    p.add_argument("--shape", required=True, choices=("smollm2-135m", "tiny"))
    p.add_argument("--dtype", type=dtype_name, default="float32", help="float32 | bfloat16 (f32, bf16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` and its modes to the main CLI's subparsers.

    The parsed args carry `func=run_bench`, for CLIs that dispatch on `args.func(args)`.
    """
    parser = subparsers.add_parser("bench", help="benchmarks against transformers (and vLLM)")
    _add_modes(parser)
    parser.set_defaults(func=run_bench)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run the mode named by `args.bench_mode`; returns the process exit code."""
    if args.bench_mode == "serve":  # a pure HTTP client: no torch, no engine
        return run_serve_bench(args)
    if args.bench_mode == "simulate":
        return run_simulate(args)
    if args.bench_mode == "structured":  # the same: any OpenAI-compatible server
        return run_structured_bench(args)
    # Imported here so `--help` and argument errors do not pay for torch.
    from tokenforge.bench import modes, report
    from tokenforge.config import ConfigError
    from tokenforge.models.catalog import resolve_model

    if args.bench_mode != "make-model":
        try:
            args.model = resolve_model(args.model)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None

    if args.bench_mode == "make-model":
        from tokenforge.bench.make_model import make_model

        report.progress(f"make-model: writing {args.shape} ({args.dtype}) to {args.out_dir}")
        print(make_model(args.out_dir, args.shape, args.dtype, args.seed))
        return 0
    if args.bench_mode == "perplexity":
        from tokenforge.bench.perplexity import perplexity_lines, run_perplexity

        facts = run_perplexity(args)
        report.emit(facts, perplexity_lines(facts), args.json)
        return 0
    if args.bench_mode == "spec":
        from tokenforge.bench.spec import run_spec, spec_lines

        unknown = sorted(set(args.modes) - set(SPEC_MODES))
        if unknown:
            raise SystemExit(f"--modes: unknown {unknown}; choose from {sorted(SPEC_MODES)}")
        facts = run_spec(args)
        report.emit(facts, spec_lines(facts), args.json)
        return 0
    if args.bench_mode == "latency" and args.new_tokens == 1:
        raise SystemExit("--new-tokens must be >= 2: decode speed needs a token after the first")
    run, lines = {
        "throughput": (modes.run_throughput, report.throughput_lines),
        "latency": (modes.run_latency, report.latency_lines),
        "prefix": (modes.run_prefix, report.prefix_lines),
    }[args.bench_mode]
    facts = run(args)
    report.emit(facts, lines(facts), args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenforge.bench", description=__doc__.splitlines()[0])
    _add_modes(parser)
    return run_bench(parser.parse_args(argv))
