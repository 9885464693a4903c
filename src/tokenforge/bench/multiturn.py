"""`bench serve --dataset sharegpt-multiturn`: users replaying real conversations, the traffic KV tiers exist for.

Each of `--num-users` users takes one ShareGPT conversation and sends its turns in order, each turn's
prompt being the whole history so far (earlier questions and answers) plus the new question, with a think
time between turns (exponential, mean `--think-time`). The server is asked for as many tokens as the
dataset's answer has (at most `--output-len`'s upper bound). The history carries, as each earlier answer,
the tokens the server gave (`--history generated`, the default: what a chat client sends back, so the
answer's KV, computed while decoding, can be reused) or the dataset's answer cut to the asked length
(`--history dataset`: prompts identical across runs and servers, the answers always recomputed). Either
way every prompt has the same length in every run. Histories soon outgrow a small KV pool, so earlier
blocks are evicted and each turn either recomputes its history or loads it from a lower tier.

Reported beside `bench serve`'s usual figures: TTFT per turn index (`ttft_ms_by_turn`), TTFT over every turn
after the first (`ttft_ms_turn2plus`), and the hit rate of each KV tier the run caused (from the server's
/metrics). With `--restart-after N` the users play turns 1..N, the server is restarted (`--server-cmd`),
and the same users continue: `ttft_ms_first_turn_after_restart` is their first turn back, whose whole
history a disk tier may still hold and a plain server must recompute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from tokenforge.bench.serve import RequestResult, ServeRequest, distribution_ms, send, summarize, table
from tokenforge.bench.server_process import ServerProcess
from tokenforge.bench.sharegpt import Conversation, TextToIds, load_conversations, model_tokenizer
from tokenforge.bench.tier_metrics import tier_counters, tier_figures


def num_turns(conv: Conversation, max_prompt_len: int, max_output: int) -> int:
    """Turns whose prompt (history + question) and answer fit in max_prompt_len + max_output tokens."""
    length = 0
    for k, (question, answer) in enumerate(conv.turns):
        if length + len(question) + max_output > max_prompt_len:
            return k
        length += len(question) + _answer_len(answer, max_output)
    return len(conv.turns)


def _answer_len(answer: list[int], max_output: int) -> int:
    return max(2, min(len(answer), max_output))


def turn_request(conv: Conversation, k: int, max_output: int, history: list[int] | None = None) -> ServeRequest:
    """Turn k: the history, then the question; the server is asked for the length of the dataset's answer, up
    to max_output. Without `history`, the dataset's: questions, and answers as long as the server was asked
    to make them."""
    if history is None:
        history = [t for question, answer in conv.turns[:k]
                   for t in question + answer[:_answer_len(answer, max_output)]]
    return ServeRequest(history + conv.turns[k][0], _answer_len(conv.turns[k][1], max_output))


def next_history(conv: Conversation, k: int, req: ServeRequest, result: RequestResult, generated: bool) -> list[int]:
    """The history after turn k: its prompt and the server's answer (`generated`, when the server returned
    every token's id) or the dataset's answer of the same length."""
    if generated and result.ok and len(result.token_ids) == req.output_len:
        return req.prompt + result.token_ids
    return req.prompt + conv.turns[k][1][:req.output_len]


async def _play(args, client, url: str, convs: list[Conversation], turns: list[range], seed: int,
                histories: dict[int, list[int]]) -> list:
    """Every user plays its turns in `turns[user]`, its history carried in `histories` (across a restart);
    returns (turn index, result) in completion order."""
    results = []
    max_output = args.output_len[1]
    generated = args.history == "generated"

    async def user(u: int) -> None:
        rng = random.Random(seed * 1000 + u)
        await asyncio.sleep(rng.uniform(0, args.think_time))  # users do not all start at once
        for k in turns[u]:
            req = turn_request(convs[u], k, max_output, histories.get(u))
            result = await send(client, url, args.model, req, token_ids=generated)
            results.append((k, result))
            histories[u] = next_history(convs[u], k, req, result, generated)
            await asyncio.sleep(rng.expovariate(1 / args.think_time) if args.think_time > 0 else 0)

    await asyncio.gather(*(user(u) for u in range(len(convs))))
    return results


async def _phase(args, convs, turns, seed: int, histories: dict[int, list[int]]) -> tuple[list, float, dict, dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout, connect=30.0),
                                 headers=headers) as client:
        before = await tier_counters(client, args.base_url)
        start = time.perf_counter()
        results = await _play(args, client, args.base_url.rstrip("/") + "/v1/completions", convs, turns, seed,
                              histories)
        duration = time.perf_counter() - start
        after = await tier_counters(client, args.base_url)
    return results, duration, before, after


def figures_for(results: list, duration: float, think_time: float) -> dict:
    figures = summarize([r for _, r in results], duration, float("inf"), None)
    by_turn: dict[int, list[float]] = {}
    for k, r in results:
        if r.ok:
            by_turn.setdefault(k + 1, []).append(r.ttft)
    figures["ttft_ms_by_turn"] = {k: distribution_ms(v) for k, v in sorted(by_turn.items())}
    figures["ttft_ms_turn2plus"] = distribution_ms([t for k, v in by_turn.items() if k >= 2 for t in v])
    figures["think_time_s"] = think_time
    return figures


def run_multiturn(args: argparse.Namespace, vocab_size: int) -> int:
    if args.restart_after is not None and not args.server_cmd:
        raise SystemExit("--restart-after restarts the server: give the command that starts it with --server-cmd")
    to_ids = TextToIds(model_tokenizer(args.tokenizer or args.model, "sharegpt-multiturn"), vocab_size)
    convs = load_conversations(to_ids, args.num_users, args.min_turns, args.max_turns, args.seed)
    counts = [num_turns(c, args.max_prompt_len, args.output_len[1]) for c in convs]
    split = [min(args.restart_after, n) if args.restart_after is not None else n for n in counts]
    phases = [[range(0, s) for s in split]]
    if args.restart_after is not None:
        phases.append([range(s, n) for s, n in zip(split, counts, strict=True)])
    server = ServerProcess(args.server_cmd, args.base_url) if args.server_cmd else None
    runs, histories = [], {}
    try:
        for i, turns in enumerate(phases):
            if server is not None:
                server.restart() if i else server.start()
            runs.append(asyncio.run(_phase(args, convs, turns, args.seed + i, histories)))
    finally:
        if server is not None:
            server.stop()
    report = _report(args, runs, convs, counts, to_ids.hash_words)
    if args.json:
        print(json.dumps(report))
    else:
        print(_text(report, args))
    return 0 if report["failed"] == 0 else 1


def _report(args, runs, convs, counts, hashed: bool) -> dict:
    results = [item for run in runs for item in run[0]]
    report = figures_for(results, sum(run[1] for run in runs), args.think_time)
    report.update(tier_figures([run[2] for run in runs], [run[3] for run in runs]))
    report.update(server=args.label or args.base_url, model=args.model, workload={
        "dataset": "sharegpt-multiturn", "num_users": len(convs), "turns": sum(counts),
        "max_output": args.output_len[1], "max_prompt_len": args.max_prompt_len, "seed": args.seed,
        "words_hashed_to_ids": hashed, "history": args.history,
        "answers_from_server": sum(1 for _, r in results if r.ok and r.token_ids),
        "history_tokens_at_last_turn": sum(len(turn_request(c, n - 1, args.output_len[1]).prompt)
                                           for c, n in zip(convs, counts) if n),
    })
    if len(runs) == 2:
        first_back = [r.ttft for k, r in runs[1][0] if r.ok and k == args.restart_after]
        report["restart_after"] = args.restart_after
        report["ttft_ms_first_turn_after_restart"] = distribution_ms(first_back)
        report["phases"] = [figures_for(run[0], run[1], args.think_time) for run in runs]
    return report


def _text(report: dict, args) -> str:
    w = report["workload"]
    lines = [table(report, f"tokenforge bench serve  server={report['server']}  model={args.model}  dataset="
                           f"sharegpt-multiturn ({w['num_users']} users, {w['turns']} turns, histories "
                           f"{w['history_tokens_at_last_turn']} tokens at the last turns, "
                           f"{w['history']} answers in the history)")]
    lines.append(f"{'turn':8}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}  TTFT (ms)")
    rows = [(str(k), v) for k, v in report["ttft_ms_by_turn"].items()] + [("2+", report["ttft_ms_turn2plus"])]
    if "ttft_ms_first_turn_after_restart" in report:
        rows.append((f"{report['restart_after'] + 1} (back)", report["ttft_ms_first_turn_after_restart"]))
    for name, row in rows:
        lines.append(f"{name:8}" + "".join(f"{'n/a' if row[k] is None else format(row[k], '.1f'):>10}"
                                           for k in ("mean", "median", "p90", "p99")))
    return "\n".join(lines)
