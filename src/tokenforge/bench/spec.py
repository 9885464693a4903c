"""`tokenforge bench spec`: what speculative decoding buys, per proposer and mode, against plain decoding.

Prompts are code-completion prompts cut from held-out Python files: the demo model's validation files
(listed in its training_log.json) or, for other models, files of the standard library. Each prompt ends
just after a `def` line, where the model must write the function body.

For every proposer and mode, in one run and on one engine build:
- batch 1: each prompt alone, greedy; decode tok/s = (n - 1) / (t_last - t_first) with and without
  speculation, the speed-up per prompt and its median; the outputs must be token-identical;
- acceptance: accepted draft tokens / drafted tokens, and mean tokens per verification step
  (accepted drafts + the target's own token, as vLLM's "mean acceptance length");
- concurrent: all `--concurrency` prompts at once, output tok/s with and without speculation (median
  of 3 runs each).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sysconfig
import time
from argparse import Namespace
from pathlib import Path

from tokenforge.sampling_params import SamplingParams

DEF_LINE = re.compile(r"^[ \t]*def [^\n]*:\n", re.M)
MODES = {
    # name: SpeculativeConfig keyword arguments
    "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 7, "adaptive": True},
    # chain and tree at the same number of verified draft tokens per step
    "ngram-chain-7": {"method": "ngram", "num_speculative_tokens": 7, "adaptive": False},
    "ngram-tree-7": {"method": "ngram", "num_speculative_tokens": 7, "adaptive": False, "tree": True},
}


def heldout_files(model: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    log = Path(model) / "training_log.json"
    if log.is_file():
        names = json.loads(log.read_text()).get("corpus", {}).get("val_file_names") or []
        files = [root / n for n in names if (root / n).is_file()]
        if files:
            return files
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 4000)


def code_prompts(tokenizer, model: str, count: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """Up to `count` prompts of about `prompt_tokens` tokens, each ending right after a `def ...:` line."""
    rng = random.Random(seed)
    cuts = []
    for path in heldout_files(model):
        text = path.read_text(encoding="utf-8", errors="replace")
        cuts += [(text, m.end()) for m in DEF_LINE.finditer(text)]
    rng.shuffle(cuts)
    prompts = []
    for text, end in cuts:
        ids = tokenizer.encode(text[:end])
        if len(ids) >= prompt_tokens:
            prompts.append(ids[-prompt_tokens:])
        if len(prompts) == count:
            break
    if not prompts:
        raise SystemExit("no code-completion prompts found in the held-out files")
    return prompts


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _batch1(engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    speeds, outputs = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b1-{i}", prompt_token_ids=prompt, params=_greedy(new_tokens))
        first = last = None
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                first = first or now
                last = now
                tokens = list(out.outputs[0].token_ids)
        speeds.append((len(tokens) - 1) / (last - first))
        outputs.append(tokens)
    return speeds, outputs


def _concurrent(llm, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> tuple[float, list[list[int]]]:
    """Median output tok/s over `repeats` runs (a run takes seconds: one hiccup would swing it)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(new_tokens))
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return statistics.median(rates), [o.outputs[0].token_ids for o in outs]


def run_spec(args: Namespace) -> dict:
    import torch

    from tokenforge import LLM
    from tokenforge.bench.report import machine_facts, progress
    from tokenforge.config import SpeculativeConfig

    torch.set_num_threads(args.threads)
    base_kwargs = dict(dtype=args.dtype, num_threads=args.threads, kv_cache_memory=int(args.kv_cache_gib * 1024**3))
    progress("loading the plain engine")
    plain = LLM(args.model, **base_kwargs)
    prompts = code_prompts(plain.get_tokenizer(), args.model, max(args.num_prompts, args.concurrency),
                           args.prompt_len, args.seed)
    b1_prompts = prompts[:args.num_prompts]
    conc_prompts = (prompts * args.concurrency)[:args.concurrency]
    plain.generate(prompt_token_ids=[b1_prompts[0][:8]], sampling_params=_greedy(4))  # warm-up
    progress(f"plain: batch 1 over {len(b1_prompts)} prompts")
    plain_b1, plain_out = _batch1(plain.engine, b1_prompts, args.new_tokens)
    progress(f"plain: {len(conc_prompts)} concurrent requests")
    plain_conc, plain_conc_out = _concurrent(plain, conc_prompts, args.new_tokens)
    del plain
    facts = {"model": args.model, "machine": machine_facts(args.threads, args.dtype),
             "workload": {"batch1_prompts": len(b1_prompts), "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens, "concurrency": len(conc_prompts), "greedy": True,
                          "prompts": "held-out Python files, cut after a def line"},
             "plain": {"batch1_decode_tok_s_median": statistics.median(plain_b1),
                       "concurrent_tok_s": plain_conc},
             "proposers": {}}
    for name in args.modes:
        cfg = SpeculativeConfig(**MODES[name])
        progress(f"{name}: loading")
        llm = LLM(args.model, speculative=cfg, **base_kwargs)
        llm.generate(prompt_token_ids=[b1_prompts[0][:8]], sampling_params=_greedy(4))
        b1, out = _batch1(llm.engine, b1_prompts, args.new_tokens)
        stats = llm.engine.stats()
        progress(f"{name}: {len(conc_prompts)} concurrent requests")
        conc, conc_out = _concurrent(llm, conc_prompts, args.new_tokens)
        drafts, drafted = stats["spec_decode_num_drafts"], stats["spec_decode_num_draft_tokens"]
        accepted = stats["spec_decode_num_accepted_tokens"]
        speedups = [s / p for s, p in zip(b1, plain_b1, strict=True)]
        facts["proposers"][name] = {
            "config": MODES[name],
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_tokens": (accepted + drafts) / drafts if drafts else 1.0,
            "batch1_decode_tok_s_median": statistics.median(b1),
            "batch1_speedup": statistics.median(speedups),
            "batch1_speedup_min": min(speedups), "batch1_speedup_max": max(speedups),
            "concurrent_tok_s": conc,
            "concurrent_throughput_ratio": conc / plain_conc,
            "token_identical": out == plain_out and conc_out == plain_conc_out,
        }
        del llm
    return facts


def spec_lines(facts: dict) -> list[str]:
    w, p = facts["workload"], facts["plain"]
    m = facts["machine"]
    lines = [f"tokenforge bench spec  model={facts['model']}",
             f"machine: {m['cpu']} ({m['num_cpus']} cpus, load {m['load_avg_1m']} at start)  threads={m['threads']}",
             f"workload: {w['batch1_prompts']} batch-1 prompts and {w['concurrency']} concurrent, "
             f"{w['prompt_len']}-token prompts ({w['prompts']}), {w['new_tokens']} new tokens, greedy",
             "batch-1 speed-up: median over prompts of (decode tok/s with / without speculation)",
             "mean tokens/step: accepted drafts + the target's token, per verification step",
             "",
             f"plain decoding: batch-1 {p['batch1_decode_tok_s_median']:.1f} tok/s (median), "
             f"{w['concurrency']} concurrent {p['concurrent_tok_s']:.1f} tok/s",
             "",
             f"{'proposer/mode':<18}{'accept':>8}{'tok/step':>10}{'b1 tok/s':>10}{'b1 x':>8}"
             f"{'conc tok/s':>12}{'conc x':>8}{'identical':>11}"]
    for name, r in facts["proposers"].items():
        lines.append(f"{name:<18}{r['acceptance_rate']:>8.2f}{r['mean_accepted_tokens']:>10.2f}"
                     f"{r['batch1_decode_tok_s_median']:>10.1f}{r['batch1_speedup']:>8.2f}"
                     f"{r['concurrent_tok_s']:>12.1f}{r['concurrent_throughput_ratio']:>8.2f}"
                     f"{'yes' if r['token_identical'] else 'NO':>11}")
    return lines
