"""`tokenforge bench structured`: what a JSON schema costs on any OpenAI-compatible server, and whether every
answer is valid.

For each of a set of realistic schemas, a chat request asks for an answer in that schema
(`response_format: json_schema`, strict; greedy). The same request then runs free, with `max_tokens` set
to the constrained answer's length and `ignore_eos`, so both sides produce the same number of tokens from
the same prompt: the difference in output tokens/s is the constraint's cost. Two settings: batch 1 (one
request at a time, constrained and free alternating) and `--concurrency` requests at once (each side's
whole batch in turn, `--repeats` times, medians). Every schema is used once before the timing: compiling
it happens once and is cached, so it is reported on its own (`first_use_extra_ms_*`), not spread over the
tok/s. Each constrained answer is parsed and validated with
`jsonschema`. Where the server exports them (tokenforge's /metrics), the grammar mask time per token at
p50/p99 is read too. Only httpx is used, so a peer (vLLM) is measured exactly the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass

STRING = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": STRING, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 120},
                                                "email": {"type": "string",
                                                          "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"}},
               "required": ["name", "age", "email"], "additionalProperties": False},
    "product": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                                 "price": {"type": "number", "minimum": 0, "maximum": 10000},
                                                 "in_stock": {"type": "boolean"}},
                "required": ["sku", "price", "in_stock"], "additionalProperties": False},
    "address": {"type": "object", "properties": {"street": STRING, "city": STRING, "zip": {"type": "string",
                                                                                        "pattern": "^[0-9]{5}$"},
                                                 "country": {"enum": ["US", "FR", "DE", "JP"]}},
                "required": ["street", "city", "zip", "country"], "additionalProperties": False},
    "event": {"type": "object", "properties": {"title": STRING, "day": {"type": "string", "format": "date"},
                                               "attendees": {"type": "array", "items": STRING, "minItems": 1,
                                                             "maxItems": 3}},
              "required": ["title", "day", "attendees"], "additionalProperties": False},
    "review": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                                "sentiment": {"enum": ["positive", "neutral", "negative"]},
                                                "summary": {"type": "string", "maxLength": 40}},
               "required": ["stars", "sentiment", "summary"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": STRING, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["name", "qty"], "additionalProperties": False}}},
        "required": ["id", "items"], "additionalProperties": False},
    "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                               "label": {"anyOf": [STRING, {"type": "null"}]}},
              "required": ["x", "y", "label"], "additionalProperties": False},
    "task": {"type": "object", "properties": {"task": STRING, "done": {"type": "boolean"},
                                              "priority": {"const": "high"}},
             "required": ["task", "done", "priority"], "additionalProperties": False},
}
TOPICS = {"person": "a software engineer", "product": "a kitchen knife", "address": "an office in Paris",
          "event": "a team meeting", "review": "a movie you liked", "order": "a grocery order",
          "point": "a city on a map", "task": "an urgent chore"}


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float
    finish_reason: str


def _body(model: str, name: str, max_tokens: int, constrained: bool) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": "You answer in JSON."},
                         {"role": "user", "content": f"Describe {TOPICS[name]} as a JSON object."}]}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    else:
        body["ignore_eos"] = True
    return body


async def _ask(client, url: str, body: dict) -> Answer:
    start = time.perf_counter()
    response = await client.post(url, json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
    data = response.json()
    choice = data["choices"][0]
    return Answer(choice["message"]["content"] or "", data["usage"]["completion_tokens"], seconds,
                  choice["finish_reason"])


def valid(name: str, text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=jsonschema.FormatChecker())
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


async def _first_use(client, url: str, model: str) -> dict:
    """One untimed-for-throughput request per schema, so that compiling (once per schema, then cached) stays
    out of the throughput figures; reported instead as what a schema's first request pays beyond a free
    request of the same length (one token)."""
    await _ask(client, url, _body(model, "person", 1, False))  # the server's own first step
    extra = []
    for name in SCHEMAS:
        c = await _ask(client, url, _body(model, name, 1, True))
        f = await _ask(client, url, _body(model, name, 1, False))
        extra.append(1000 * (c.seconds - f.seconds))
    return {"first_use_extra_ms_p50": statistics.median(extra), "first_use_extra_ms_max": max(extra)}


async def _batch1(client, url: str, model: str, names: list[str], max_tokens: int) -> dict:
    constrained, free = [], []
    for name in names:
        c = await _ask(client, url, _body(model, name, max_tokens, True))
        f = await _ask(client, url, _body(model, name, max(1, c.tokens), False))
        constrained.append((name, c))
        free.append(f)
    c_rate = sum(a.tokens for _, a in constrained) / sum(a.seconds for _, a in constrained)
    f_rate = sum(a.tokens for a in free) / sum(a.seconds for a in free)
    return {"constrained_tok_s": c_rate, "free_tok_s": f_rate, "answers": constrained}


async def _concurrent(client, url: str, model: str, names: list[str], max_tokens: int, repeats: int) -> dict:
    c_rates, f_rates, answers = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        got = await asyncio.gather(*(_ask(client, url, _body(model, n, max_tokens, True)) for n in names))
        c_rates.append(sum(a.tokens for a in got) / (time.perf_counter() - start))
        answers += list(zip(names, got, strict=True))
        start = time.perf_counter()
        free = await asyncio.gather(*(_ask(client, url, _body(model, n, max(1, a.tokens), False))
                                      for n, a in zip(names, got, strict=True)))
        f_rates.append(sum(a.tokens for a in free) / (time.perf_counter() - start))
    return {"constrained_tok_s": statistics.median(c_rates), "free_tok_s": statistics.median(f_rates),
            "constrained_runs": c_rates, "free_runs": f_rates, "answers": answers}


async def _mask_times(client, base_url: str) -> dict:
    """tokenforge's grammar mask time per token from /metrics (absent on other servers)."""
    try:
        text = (await client.get(f"{base_url}/metrics")).text
    except Exception:  # noqa: BLE001 - a peer without /metrics simply has no figure
        return {}
    found = dict(re.findall(r'^tokenforge_structured_mask_seconds\{quantile="([0-9.]+)"\} ([0-9.e+-]+)$', text,
                            re.MULTILINE))
    return {f"mask_ms_p{round(float(q) * 100)}": float(v) * 1000 for q, v in found.items()}


async def run(args: argparse.Namespace) -> dict:
    import httpx

    url = f"{args.base_url}/v1/chat/completions"
    names = (list(SCHEMAS) * args.concurrency)[:args.concurrency]
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        first_use = await _first_use(client, url, args.model)  # every schema compiled before the timing
        b1 = await _batch1(client, url, args.model, list(SCHEMAS), args.max_tokens)
        conc = await _concurrent(client, url, args.model, names, args.max_tokens, args.repeats)
        masks = await _mask_times(client, args.base_url)
    answers = b1.pop("answers") + conc.pop("answers")
    ok = [valid(name, a.text) for name, a in answers]
    return {"base_url": args.base_url, "model": args.model, "schemas": list(SCHEMAS),
            "batch1": b1, "concurrency": args.concurrency, "concurrent": conc,
            "overhead_batch1": 1 - b1["constrained_tok_s"] / b1["free_tok_s"],
            "overhead_c16": 1 - conc["constrained_tok_s"] / conc["free_tok_s"],
            "valid_fraction": sum(ok) / len(ok), "num_answers": len(ok),
            "num_cut_by_max_tokens": sum(a.finish_reason == "length" for _, a in answers),
            "mean_answer_tokens": statistics.mean(a.tokens for _, a in answers), **first_use, **masks}


def lines(facts: dict) -> list[str]:
    b1, c = facts["batch1"], facts["concurrent"]
    out = [f"batch 1: {b1['constrained_tok_s']:.1f} tok/s with a schema, {b1['free_tok_s']:.1f} without: "
           f"overhead {100 * facts['overhead_batch1']:.1f} %",
           f"{facts['concurrency']} concurrent: {c['constrained_tok_s']:.1f} tok/s with a schema, "
           f"{c['free_tok_s']:.1f} without: overhead {100 * facts['overhead_c16']:.1f} %",
           f"valid answers: {100 * facts['valid_fraction']:.1f} % of {facts['num_answers']} "
           f"(mean {facts['mean_answer_tokens']:.1f} tokens; {facts['num_cut_by_max_tokens']} cut by max_tokens)"]
    if "first_use_extra_ms_p50" in facts:
        out.append(f"a schema's first request (compiling it) took {facts['first_use_extra_ms_p50']:.1f} ms more than "
                   f"a free one at the median, {facts['first_use_extra_ms_max']:.1f} ms at most (not in the tok/s)")
    if "mask_ms_p50" in facts:
        out.append(f"grammar mask per token: p50 {facts['mask_ms_p50']:.3f} ms, "
                   f"p99 {facts.get('mask_ms_p99', 0):.3f} ms")
    return out


def add_structured_bench_parser(modes) -> None:
    p = modes.add_parser("structured", help="JSON-schema output on any OpenAI-compatible server: cost and validity")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name the server expects")
    p.add_argument("--concurrency", type=int, default=16, help="requests at once in the concurrent phase (16)")
    p.add_argument("--repeats", type=int, default=3, help="concurrent runs per side; medians (default 3)")
    p.add_argument("--max-tokens", type=int, default=200, help="cap on each answer (default 200)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def run_structured_bench(args: argparse.Namespace) -> int:
    from tokenforge.bench.report import emit

    facts = asyncio.run(run(args))
    emit(facts, lines(facts), args.json)
    return 0
