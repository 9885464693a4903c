"""The Hugging Face `transformers` side of every benchmark: what a user gets from `model.generate()`.

transformers is a dev dependency only, so it is imported inside these functions, never at module level.
Throughput runs static padded batches (left padding, attention mask; each batch generates to its
longest request) and counts only the tokens the requests asked for, exactly as for tokenforge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tokenforge.bench.timing import LatencyFigures, latency_from_token_times, median_latency
from tokenforge.bench.workload import Workload, batches

WARMUP_PROMPT = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16]]
WARMUP_NEW_TOKENS = 4


@dataclass(frozen=True)
class BatchSizeFigures:
    """One static batch size's run over the whole workload."""

    batch_size: int
    elapsed_s: float
    output_tok_s: float  # requested output tokens / elapsed
    num_computed_output_tokens: int  # including padding rows and overshoot past a request's own length


def load_model(model_path: str, dtype: torch.dtype):
    """A checkpoint folder, or a GGUF file, which transformers dequantizes to `dtype` at load."""
    from transformers import AutoModelForCausalLM

    from tokenforge.models.gguf_file import find_gguf

    gguf_file = find_gguf(model_path)
    if gguf_file is not None:
        return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


def _pad_token_id(model) -> int:
    cfg = model.generation_config
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    eos = cfg.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def generate_batch(model, prompts: list[list[int]], num_new_tokens: int, streamer=None) -> torch.Tensor:
    """Greedy `generate` on one padded batch; min == max new tokens so EOS cannot end it early."""
    pad_id = _pad_token_id(model)
    input_ids, attention_mask = _left_padded(prompts, pad_id)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
            pad_token_id=pad_id, streamer=streamer,
        )
    generated = out[:, input_ids.shape[1]:]
    if generated.shape[1] != num_new_tokens:
        raise RuntimeError(f"reference generated {generated.shape[1]} tokens, asked for {num_new_tokens}")
    return generated


def warm_up(model) -> None:
    """One tiny batch so lazy initialisation and first-call allocations stay out of the timings."""
    generate_batch(model, WARMUP_PROMPT, WARMUP_NEW_TOKENS)


def effective_batch_sizes(batch_sizes: tuple[int, ...], num_requests: int) -> list[int]:
    """Sizes above the request count all mean "one batch of everything"; run that only once."""
    return sorted({min(b, num_requests) for b in batch_sizes})


def run_batch_size(model, workload: Workload, batch_size: int) -> BatchSizeFigures:
    num_computed = 0
    start = time.perf_counter()
    for rows in batches(workload.num_requests, batch_size):
        num_new = max(workload.output_lens[i] for i in rows)
        generate_batch(model, [workload.prompt_token_ids[i] for i in rows], num_new)
        num_computed += num_new * len(rows)
    elapsed = time.perf_counter() - start
    return BatchSizeFigures(batch_size, elapsed, workload.num_output_tokens / elapsed, num_computed)


class TokenTimer:
    """Records when each new token arrives during `generate`.

    It implements transformers' `BaseStreamer` interface (`put`, `end`), which is all `generate` calls;
    not subclassing keeps this module importable without transformers. The first `put` is the prompt.
    """

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.token_times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        """Nothing to flush: times are recorded as tokens arrive."""


def run_latency(model, prompts: list[list[int]], num_new_tokens: int) -> LatencyFigures:
    """Batch-1 greedy generate, one run per prompt, timed per token by a streamer; median over runs."""
    samples = []
    for prompt in prompts:
        timer = TokenTimer()
        t_submit = time.perf_counter()
        generate_batch(model, [prompt], num_new_tokens, streamer=timer)
        samples.append(latency_from_token_times(t_submit, timer.token_times))
    return median_latency(samples)


def run_prefill(model, prompt: list[int]) -> float:
    """Seconds for one full-prompt forward pass plus the first token: the no-cache baseline."""
    start = time.perf_counter()
    generate_batch(model, [prompt], 1)
    return time.perf_counter() - start
