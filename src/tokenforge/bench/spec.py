"""`tokenforge bench spec`: what speculative decoding buys, per proposer and mode, against plain decoding.

Prompts are code-completion prompts cut from held-out Python files: the demo model's validation files
(listed in its training_log.json) or, for other models, files of the standard library. Each prompt ends
just after a `def` line, where the model must write the function body.

For every proposer and mode, in one run and on one engine build, with the plain and the speculative engine
loaded side by side and run alternately (so a slow spell of the machine hits both sides alike):
- batch 1: each prompt alone, greedy, on both engines in alternating order; decode tok/s = (n - 1) / (t_last - t_first),
  the speed-up per prompt and its median; the outputs must be token-identical;
- acceptance: accepted draft tokens / drafted tokens, and mean tokens per verification step
  (accepted drafts + the target's own token, as vLLM's "mean acceptance length");
- concurrent: all `--concurrency` prompts at once on both engines, which step in turn with each step timed
  on its own (throughput = output tokens / the engine's own step time), `--repeats` times; the ratio is the
  median of the runs' ratios.
"""

from __future__ import annotations

import gc
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
    # a separate draft model (--draft-model; the demo model's distilled draft by default)
    "draft-adaptive": {"method": "draft", "num_speculative_tokens": 7, "adaptive": True},
    "draft-chain-7": {"method": "draft", "num_speculative_tokens": 7, "adaptive": False, "draft_confidence": 0.0},
    "draft-tree-7": {"method": "draft", "num_speculative_tokens": 7, "adaptive": False, "tree": True,
                     "tree_width": 2, "draft_confidence": 0.0},
    # self-speculation: an int8 weight-only copy of the target, made at load time
    "self-adaptive": {"method": "self", "num_speculative_tokens": 7, "adaptive": True},
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


def _decode_speed(engine, prompt: list[int], new_tokens: int, tag: str) -> tuple[float, list[int]]:
    engine.add_request(tag, prompt_token_ids=prompt, params=_greedy(new_tokens))
    first = last = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            first = first or now
            last = now
            tokens = list(out.outputs[0].token_ids)
    return (len(tokens) - 1) / (last - first), tokens


def _order(i: int) -> tuple[str, str]:
    return ("plain", "spec") if i % 2 == 0 else ("spec", "plain")


def _batch1(plain, spec, prompts: list[list[int]], new_tokens: int) -> dict:
    """Each prompt alone on both engines, in alternating order."""
    rows = []
    for i, prompt in enumerate(prompts):
        runs = {}
        for side in _order(i):  # alternating who goes first cancels any drift within a pair
            runs[side] = _decode_speed(plain if side == "plain" else spec, prompt, new_tokens, f"{side}-{i}")
        (p_speed, p_out), (s_speed, s_out) = runs["plain"], runs["spec"]
        rows.append((p_speed, s_speed, p_out == s_out))
    speedups = [s / p for p, s, _ in rows]
    return {"plain_tok_s": statistics.median(p for p, _, _ in rows),
            "spec_tok_s": statistics.median(s for _, s, _ in rows),
            "speedups": speedups, "identical": all(same for _, _, same in rows)}


def _lockstep(plain, spec, prompts: list[list[int]], new_tokens: int, tag: str) -> dict:
    """All prompts on both engines at once, the engines stepping in turn with each step timed on its own:
    a slow spell of the machine lands on both sides alike. Throughput = output tokens / own step time."""
    engines = {"plain": plain, "spec": spec}
    for side, engine in engines.items():
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{tag}-{side}-{i}", prompt_token_ids=prompt, params=_greedy(new_tokens))
    busy = dict.fromkeys(engines, 0.0)
    outputs: dict[str, dict[str, list[int]]] = {side: {} for side in engines}
    order = list(engines.items())
    while any(e.has_unfinished_requests() for e in engines.values()):
        order.reverse()  # who steps first alternates: neither side always follows the other's step
        for side, engine in order:
            if not engine.has_unfinished_requests():
                continue
            start = time.perf_counter()
            outs = engine.step()
            busy[side] += time.perf_counter() - start
            for out in outs:
                if out.finished:
                    outputs[side][out.req_id.split("-")[-1]] = list(out.outputs[0].token_ids)
    rate = {side: sum(map(len, outputs[side].values())) / busy[side] for side in engines}
    return {"plain_tok_s": rate["plain"], "spec_tok_s": rate["spec"], "identical": outputs["plain"] == outputs["spec"]}


def _concurrent(plain, spec, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """`repeats` lockstep runs after a short one that touches the KV pages a full batch uses (the first
    run on a fresh engine otherwise pays for page faults); the ratio is the median of the runs' ratios."""
    _lockstep(plain, spec, prompts, 2, "warm")
    runs = [_lockstep(plain, spec, prompts, new_tokens, f"conc{i}") for i in range(repeats)]
    ratios = [r["spec_tok_s"] / r["plain_tok_s"] for r in runs]
    return {"plain_tok_s": statistics.median(r["plain_tok_s"] for r in runs),
            "spec_tok_s": statistics.median(r["spec_tok_s"] for r in runs),
            "ratio": statistics.median(ratios), "ratios": ratios, "identical": all(r["identical"] for r in runs)}


def mode_config(name: str, draft_model: str | None):
    from tokenforge.config import DEMO_DRAFT_MODEL_DIR, SpeculativeConfig

    kwargs = dict(MODES[name])
    if kwargs["method"] == "draft":
        kwargs["draft_model"] = draft_model or str(DEMO_DRAFT_MODEL_DIR)
    return SpeculativeConfig(**kwargs)


def run_spec(args: Namespace) -> dict:
    import torch

    from tokenforge.bench.report import machine_facts, progress
    from tokenforge.engine.engine import LLMEngine

    torch.set_num_threads(args.threads)
    base_kwargs = dict(dtype=args.dtype, num_threads=args.threads, kv_cache_memory=int(args.kv_cache_gib * 1024**3))
    progress("loading the plain engine")
    plain = LLMEngine.from_args(args.model, **base_kwargs)
    prompts = code_prompts(plain.tokenizer, args.model, max(args.num_prompts, args.concurrency),
                           args.prompt_len, args.seed)
    b1_prompts = prompts[:args.num_prompts]
    conc_prompts = (prompts * args.concurrency)[:args.concurrency]
    _decode_speed(plain, b1_prompts[0][:8], 4, "warm-plain")
    facts = {"model": args.model, "machine": machine_facts(args.threads, args.dtype),
             "workload": {"batch1_prompts": len(b1_prompts), "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens, "concurrency": len(conc_prompts), "greedy": True,
                          "concurrent_repeats": args.repeats,
                          "prompts": "held-out Python files, cut after a def line"},
             "proposers": {}}
    for name in args.modes:
        cfg = mode_config(name, args.draft_model)
        progress(f"{name}: loading")
        llm = LLMEngine.from_args(args.model, speculative=cfg, **base_kwargs)
        _decode_speed(llm, b1_prompts[0][:8], 4, f"warm-{name}")
        progress(f"{name}: batch 1 over {len(b1_prompts)} prompts, plain and speculative")
        b1 = _batch1(plain, llm, b1_prompts, args.new_tokens)
        stats = llm.stats()
        progress(f"{name}: {len(conc_prompts)} concurrent requests x {args.repeats}, plain and speculative")
        conc = _concurrent(plain, llm, conc_prompts, args.new_tokens, args.repeats)
        drafts, drafted = stats["spec_decode_num_drafts"], stats["spec_decode_num_draft_tokens"]
        accepted = stats["spec_decode_num_accepted_tokens"]
        facts["proposers"][name] = {
            "config": {k: v for k, v in vars(cfg).items() if v is not None},
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_tokens": (accepted + drafts) / drafts if drafts else 1.0,
            "batch1_plain_tok_s_median": b1["plain_tok_s"],
            "batch1_decode_tok_s_median": b1["spec_tok_s"],
            "batch1_speedup": statistics.median(b1["speedups"]),
            "batch1_speedup_min": min(b1["speedups"]), "batch1_speedup_max": max(b1["speedups"]),
            "concurrent_plain_tok_s": conc["plain_tok_s"],
            "concurrent_tok_s": conc["spec_tok_s"],
            "concurrent_throughput_ratio": conc["ratio"],
            "concurrent_ratios": conc["ratios"],
            "token_identical": b1["identical"] and conc["identical"],
        }
        del llm
        gc.collect()  # free this engine's weights and KV pool before the next one loads
    return facts


def spec_lines(facts: dict) -> list[str]:
    w = facts["workload"]
    m = facts["machine"]
    lines = [f"tokenforge bench spec  model={facts['model']}",
             f"machine: {m['cpu']} ({m['num_cpus']} cpus, load {m['load_avg_1m']} at start)  threads={m['threads']}",
             f"workload: {w['batch1_prompts']} batch-1 prompts and {w['concurrency']} concurrent "
             f"(x{w['concurrent_repeats']}), {w['prompt_len']}-token prompts ({w['prompts']}), "
             f"{w['new_tokens']} new tokens, greedy",
             "b1: batch-1 decode tok/s, plain -> speculative (medians); x: median over prompts of the ratio",
             "tok/step: accepted drafts + the target's token, per verification step",
             "conc: output tok/s at full concurrency, engines stepping in turn, plain -> speculative; x: median ratio",
             "",
             f"{'proposer/mode':<16}{'accept':>7}{'tok/step':>9}{'b1 tok/s':>16}{'b1 x':>7}"
             f"{'conc tok/s':>16}{'conc x':>8}{'identical':>10}"]
    for name, r in facts["proposers"].items():
        b1 = f"{r['batch1_plain_tok_s_median']:.0f} -> {r['batch1_decode_tok_s_median']:.0f}"
        conc = f"{r['concurrent_plain_tok_s']:.0f} -> {r['concurrent_tok_s']:.0f}"
        lines.append(f"{name:<16}{r['acceptance_rate']:>7.2f}{r['mean_accepted_tokens']:>9.2f}{b1:>16}"
                     f"{r['batch1_speedup']:>7.2f}{conc:>16}{r['concurrent_throughput_ratio']:>8.2f}"
                     f"{'yes' if r['token_identical'] else 'NO':>10}")
    return lines
