"""The tokenforge side of every benchmark, driven only through the public `LLM` API and its engine client.

The engine is imported inside `load_llm`, so `tokenforge bench make-model` and the reference side work
even where the engine cannot be built.
"""

from __future__ import annotations

import time

from tokenforge.bench.timing import LatencyFigures, latency_from_token_times, median_latency
from tokenforge.bench.workload import Workload
from tokenforge.sampling_params import SamplingParams

WARMUP_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
WARMUP_NEW_TOKENS = 4


def greedy(num_tokens: int) -> SamplingParams:
    """Exactly `num_tokens` greedy tokens: EOS ignored, as in the reference and the peer."""
    return SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)


def load_llm(model_path: str, dtype: str, num_threads: int, kv_cache_memory: int):
    from tokenforge import LLM

    return LLM(model_path, dtype=dtype, num_threads=num_threads, kv_cache_memory=kv_cache_memory,
               enable_prefix_caching=True)


def warm_up(llm) -> None:
    """One tiny request so one-time costs (allocation, kernel set-up) stay out of the timings."""
    llm.generate(prompt_token_ids=[WARMUP_PROMPT], sampling_params=greedy(WARMUP_NEW_TOKENS))


def run_throughput(llm, workload: Workload) -> float:
    """Seconds for the whole workload through `LLM.generate`; checks every request got its tokens."""
    params = [greedy(n) for n in workload.output_lens]
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=workload.prompt_token_ids, sampling_params=params)
    elapsed = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != workload.output_lens:
        bad = next(i for i, (g, n) in enumerate(zip(got, workload.output_lens, strict=True)) if g != n)
        raise RuntimeError(f"tokenforge returned {got[bad]} tokens for request {bad}, asked for "
                           f"{workload.output_lens[bad]}: the throughput figure would be wrong")
    return elapsed


def _token_times(llm, req_id: str, prompt: list[int], num_new_tokens: int) -> tuple[float, list[float]]:
    """Submit one request through the engine client, noting when each token first shows in its stream."""

    async def stream() -> tuple[float, list[float]]:
        token_times: list[float] = []
        t_submit = time.perf_counter()
        async for out in llm.client.generate(req_id=req_id, prompt_token_ids=prompt, params=greedy(num_new_tokens)):
            now = time.perf_counter()
            # A step may emit several tokens (speculative decoding); they all became visible now.
            token_times.extend([now] * (len(out.outputs[0].token_ids) - len(token_times)))
        return t_submit, token_times

    return llm.run(stream())


def run_latency(llm, prompts: list[list[int]], num_new_tokens: int) -> LatencyFigures:
    """Batch-1 latency through the engine client's stream, one run per prompt, median over the runs.

    Callers pass distinct prompts so the prefix cache cannot serve a repeat from the run before it:
    each run pays a real prefill, as a new user would.
    """
    samples = []
    for rep, prompt in enumerate(prompts):
        t_submit, times = _token_times(llm, f"bench-latency-{rep}", prompt, num_new_tokens)
        samples.append(latency_from_token_times(t_submit, times))
    return median_latency(samples)


def run_prefill(llm, prompt: list[int]) -> float:
    """Seconds for a request with max_tokens=1: the prefill plus one sampled token."""
    start = time.perf_counter()
    llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(1))
    return time.perf_counter() - start
