"""How benchmark results reach the user: progress lines on stderr, a table or one JSON object on stdout.

The modes build a plain dict of figures; this module only formats it, so `--json` and the table always
show the same numbers.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

import torch

from tokenforge import kernels

WARMUP_NOTE = "each side ran one tiny warm-up request before timing; model load and start-up are not timed"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(threads: int, dtype: str) -> dict:
    # The load average at start says whether other work shared the cores: with more runnable threads
    # than cores, OpenMP barriers stall and every side slows down many times over.
    # cpu_kernels: the CPU's flags, the kernel variant loaded and the matmul plans measured so far
    return {"threads": threads, "dtype": dtype, "torch": torch.__version__,
            "transformers": _version("transformers"), "cpu": _cpu_name(), "num_cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "cpu_kernels": kernels.kernel_report()}


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _header(title: str, facts: dict) -> list[str]:
    m = facts["machine"]
    return [
        f"tokenforge bench {title}  model={facts['model']}",
        f"machine: {m['cpu']} ({m['num_cpus']} cpus, load {m['load_avg_1m']} at start)  "
        f"threads={m['threads']}  dtype={m['dtype']}  torch={m['torch']}  transformers={m['transformers']}",
        f"note: {WARMUP_NOTE}",
    ]


def throughput_lines(facts: dict) -> list[str]:
    w = facts["workload"]
    (p_lo, p_hi), (o_lo, o_hi) = w["prompt_len_range"], w["output_len_range"]
    lines = _header("throughput", facts) + [
        f"workload: {w['num_requests']} requests, prompt {p_lo}..{p_hi} tokens "
        f"({w['num_prompt_tokens']} total), output {o_lo}..{o_hi} tokens ({w['num_output_tokens']} total), "
        f"greedy, EOS ignored, seed {w['seed']}",
        "output tok/s = requested output tokens / wall time (reference padding and overshoot not counted)",
        "",
        f"{'side':<34}{'elapsed s':>12}{'output tok/s':>15}",
        f"{'tokenforge (continuous batching)':<34}{_fmt(facts.get('tokenforge_elapsed_s'), '.2f'):>12}"
        f"{_fmt(facts.get('tokenforge_tok_s')):>15}",
    ]
    for ref in facts.get("reference_batch_sizes", []):
        lines.append(f"{'reference HF static bs=' + str(ref['batch_size']):<34}{ref['elapsed_s']:>12.2f}"
                     f"{ref['output_tok_s']:>15.1f}")
    if "peer" in facts:
        lines.append(f"{facts['peer'] + ' (peer)':<34}{_fmt(facts.get('peer_elapsed_s'), '.2f'):>12}"
                     f"{_fmt(facts.get('peer_tok_s')):>15}")
    lines.append("")
    if "reference_tok_s" in facts:
        best = f"bs={facts['reference_best_batch_size']} {facts['reference_tok_s']:.1f} tok/s"
        lines += [f"reference best: {best}",
                  f"ratio tokenforge / reference (best): {_fmt(facts['ratio'], '.2f', 'x')}"]
    else:
        lines.append("reference: skipped (--skip-reference)")
    if "peer" in facts:
        lines.append(f"ratio tokenforge / {facts['peer']}: {_fmt(facts.get('peer_ratio'), '.2f', 'x')}")
        if facts.get("peer_error"):
            lines.append(f"peer {facts['peer']} FAILED: {facts['peer_error']}")
        if facts.get("peer_log"):
            lines.append(f"peer log: {facts['peer_log']}")
    return lines


def latency_lines(facts: dict) -> list[str]:
    w = facts["workload"]
    lines = _header("latency", facts) + [
        f"workload: batch 1, {w['prompt_len']}-token prompt, {w['num_new_tokens']} new tokens, greedy, "
        f"median of {w['repeats']} runs (distinct prompts, seed {w['seed']})",
        "decode tok/s = (n - 1) / (t_last_token - t_first_token)",
        "",
        f"{'side':<24}{'TTFT ms':>12}{'decode tok/s':>15}",
    ]
    for side in ("tokenforge", "reference"):
        ttft = facts.get(f"{side}_ttft_s")
        lines.append(f"{side:<24}{_fmt(None if ttft is None else ttft * 1e3):>12}"
                     f"{_fmt(facts.get(f'{side}_decode_tok_s')):>15}")
    lines += ["", f"TTFT ratio reference / tokenforge: {_fmt(facts.get('ttft_ratio'), '.2f', 'x')}",
              f"decode ratio tokenforge / reference: {_fmt(facts.get('decode_ratio'), '.2f', 'x')}",
              "(ratios > 1 mean tokenforge is faster)"]
    if facts.get("peer") == "llama.cpp":
        lines += _llama_bench_lines(facts, w)
    if facts.get("read_bandwidth_gb_s") is not None:
        lines += ["", f"memory read bandwidth: {facts['read_bandwidth_gb_s']:.1f} GB/s; weights read per token: "
                  f"{facts['weight_bytes_per_token'] / 2**20:.1f} MiB; batch-1 decode ceiling: "
                  f"{facts['decode_ceiling_tok_s']:.0f} tok/s"]
    return lines


def _llama_bench_lines(facts: dict, w: dict) -> list[str]:
    pp, tg = f"pp{w['prompt_len']}", f"tg{w['num_new_tokens']}"
    lines = ["", f"llama.cpp (llama-bench, build {facts.get('peer_version') or '?'}) on the same file:",
             f"{'side':<24}{pp + ' tok/s':>14}{tg + ' tok/s':>14}",
             f"{'tokenforge':<24}{_fmt(facts.get('tokenforge_prefill_tok_s')):>14}"
             f"{_fmt(facts.get('tokenforge_tg_tok_s')):>14}",
             f"{'llama.cpp':<24}{_fmt(facts.get('peer_prefill_tok_s')):>14}{_fmt(facts.get('peer_decode_tok_s')):>14}",
             f"{'tokenforge / llama.cpp':<24}{_fmt(facts.get('peer_prefill_ratio'), '.2f', 'x'):>14}"
             f"{_fmt(facts.get('peer_decode_ratio'), '.2f', 'x'):>14}",
             f"(tokenforge's {pp} = prompt tokens / TTFT, so it also pays the first sampled token; its {tg}, "
             f"like llama-bench's, decodes from a one-token prompt; the table above decodes after the "
             f"{w['prompt_len']}-token prompt)"]
    if facts.get("peer_error"):
        lines.append(f"llama.cpp failed: {facts['peer_error']} (log: {facts.get('peer_log')})")
    return lines


def prefix_lines(facts: dict) -> list[str]:
    w = facts["workload"]
    verdict = "n/a" if facts.get("speedup") is None else ("yes" if facts["meets_target"] else "NO")
    return _header("prefix", facts) + [
        f"workload: the same {w['prompt_len']}-token prompt sent twice, max_tokens=1, prefix caching on",
        "",
        f"tokenforge first prefill:  {_fmt(facts.get('tokenforge_first_prefill_s'), '.4f', ' s')}",
        f"tokenforge second prefill: {_fmt(facts.get('tokenforge_second_prefill_s'), '.4f', ' s')}",
        f"reference prefill (HF, no cache): {_fmt(facts.get('reference_prefill_s'), '.4f', ' s')}",
        f"prefix-cache speed-up (first / second): {_fmt(facts.get('speedup'), '.1f', 'x')}  "
        f"target >= {facts['target_speedup']:.0f}x: {verdict}",
    ]


def emit(facts: dict, lines: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(facts, indent=None, sort_keys=True))
    else:
        print("\n".join(lines))
