"""`tokenforge bench simulate`: options and report for the replica simulator (`cluster/simulate.py`).

`--fit` times a real engine's steps and writes the cost model (`--fit-from DIR`: fits it from the steps the
engines of a real serving run logged with `--step-log DIR`); every other run reads one (`--cost`) and
replays `bench serve`'s workload (same options, same seed: the same requests and arrivals) through each
combination of `--replicas` and `--router`, printing TTFT, ITL, throughput and the prefix hit rate.
"""

from __future__ import annotations

import argparse
import json
import sys

from tokenforge.bench.serve import add_workload_args, build_requests


def add_simulate_parser(modes) -> None:
    p = modes.add_parser("simulate", help="a discrete-event model of R replicas: compare routers and "
                         "prefill/decode disaggregation at any scale")
    p.add_argument("--cost", help="cost model JSON written by --fit")
    p.add_argument("--fit", action="store_true", help="time a real engine (--model, --threads) and write --cost")
    p.add_argument("--fit-from", nargs="+", metavar="DIR",
                   help="fit the cost model from the step logs a real run's engines wrote (`tokenforge serve "
                   "--step-log DIR`) and write --cost: costs timed where the replicas ran, under that run's load")
    p.add_argument("--model", help="checkpoint: for --fit, the vocabulary and the KV bytes per block")
    p.add_argument("--threads", type=int, default=1, help="threads per replica for --fit (default 1)")
    p.add_argument("--fit-concurrent", type=int, default=1, metavar="N",
                   help="--fit: time N engines stepping at once, one process each, as N replicas on this "
                   "machine would (default 1: one engine alone)")
    p.add_argument("--replicas", default="2", help="comma list of fleet sizes (default 2)")
    p.add_argument("--router", default="kv-aware", help="comma list of routers (default kv-aware)")
    p.add_argument("--prefill-replicas", type=int, default=0,
                   help="replicas of each fleet that prefill long prompts (0: none; default 0)")
    p.add_argument("--pd-threshold", type=int, default=256, help="prompt tokens from which to disaggregate")
    p.add_argument("--num-blocks", type=int, default=4096, help="KV blocks per replica (default 4096)")
    p.add_argument("--kv-cache-memory", help="KV cache per replica, e.g. 16MiB: sets --num-blocks from --model")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--overhead-ms", type=float, default=0.0, help="added to each first token (HTTP, Ray)")
    p.add_argument("--trace-file", help="a ShareGPT JSON file (--dataset sharegpt)")
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt ids below this (default 32000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_workload_args(p, datasets=("random", "shared-prefix", "sharegpt"))


def run_simulate(args: argparse.Namespace) -> int:
    from tokenforge.cluster.simulate import (
        CostModel,
        SimConfig,
        Simulation,
        fit_cost_model,
        fit_from_step_logs,
        make_trace,
        sharegpt_trace,
    )

    if args.fit_from:
        if not args.cost:
            raise SystemExit("--fit-from needs --cost (where to write the model)")
        try:
            cost = fit_from_step_logs(args.fit_from)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        cost.save(args.cost)
        print(f"wrote {args.cost}: {cost}")
        return 0
    if args.fit:
        if not args.model or not args.cost:
            raise SystemExit("--fit needs --model (the checkpoint to time) and --cost (where to write the model)")
        cost = fit_cost_model(args.model, args.threads, concurrent=args.fit_concurrent)
        cost.save(args.cost)
        print(f"wrote {args.cost}: {cost}")
        return 0
    if not args.cost:
        raise SystemExit("give --cost FILE (made by `tokenforge bench simulate --fit --model PATH --cost FILE`)")
    cost = CostModel.load(args.cost)
    if args.dataset == "sharegpt":
        if not args.trace_file:
            raise SystemExit("--dataset sharegpt needs --trace-file (ShareGPT JSON)")
        trace = sharegpt_trace(args.trace_file, args.num_prompts, args.request_rate, args.seed)
    else:
        trace = make_trace(build_requests(args, args.vocab_size), args.request_rate, args.seed, args.burstiness)
    bytes_per_block = _bytes_per_block(args.model, args.block_size) if args.model else 0
    if args.kv_cache_memory:
        from tokenforge.config import parse_size

        if not bytes_per_block:
            raise SystemExit("--kv-cache-memory needs --model (for the bytes of one KV block)")
        args.num_blocks = parse_size(args.kv_cache_memory) // bytes_per_block
    results = []
    for replicas in (int(r) for r in args.replicas.split(",")):
        for router in args.router.split(","):
            cfg = SimConfig(num_replicas=replicas, router=router, num_prefill=args.prefill_replicas,
                            pd_threshold=args.pd_threshold, block_size=args.block_size, num_blocks=args.num_blocks,
                            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                            bytes_per_block=bytes_per_block, overhead=args.overhead_ms / 1000)
            results.append(Simulation(cfg, cost).run(trace))
            if not args.json:
                print(_line(results[-1]), file=sys.stdout, flush=True)
    if args.json:
        print(json.dumps({"cost_model": cost.__dict__, "runs": results}))
    return 0


def _bytes_per_block(model: str, block_size: int) -> int:
    import torch

    from tokenforge.config import ModelConfig
    from tokenforge.runner.kv_cache import bytes_per_block

    return bytes_per_block(ModelConfig.from_pretrained(model), block_size, torch.float32)


def _line(r: dict) -> str:
    return (f"replicas={r['replicas']:<5} prefill={r['prefill_replicas']:<3} router={r['router']:<13} "
            f"TTFT p50/p99 {r['ttft_ms']['median']:.0f}/{r['ttft_ms']['p99']:.0f} ms  "
            f"ITL p50/p99 {r['itl_ms']['median']:.1f}/{r['itl_ms']['p99']:.1f} ms  "
            f"{r['output_tok_s']:.0f} tok/s  prefix hits {100 * r['prefix_hit_rate']:.1f} %  "
            f"(simulated in {r['simulated_in_s']:.1f} s)")
