"""The benchmark workloads: which prompts and output lengths each side is given.

Prompts are random token ids drawn with a fixed seed, so tokenforge, the Hugging Face reference and a
peer engine all see exactly the same requests in the same order, run after run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Ids below this are left out of random prompts: checkpoints put their special tokens (bos, eos, pad)
# first, and a stray eos or bos in the middle of a prompt is not what real traffic looks like.
FIRST_ORDINARY_TOKEN_ID = 3


@dataclass(frozen=True)
class ThroughputShape:
    """How many requests and the uniform ranges their lengths are drawn from (inclusive)."""

    num_requests: int
    prompt_len_range: tuple[int, int]
    output_len_range: tuple[int, int]
    reference_batch_sizes: tuple[int, ...]


DEFAULT_THROUGHPUT = ThroughputShape(64, (32, 512), (16, 256), (8, 16, 32, 64))
QUICK_THROUGHPUT = ThroughputShape(8, (16, 64), (8, 32), (4, 8))


@dataclass(frozen=True)
class Workload:
    """One offline batch of requests; `output_lens[i]` is what request i asks for, EOS ignored."""

    prompt_token_ids: list[list[int]]
    output_lens: list[int]
    seed: int
    shape: ThroughputShape

    @property
    def num_requests(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_seq_len(self) -> int:
        return max(len(p) + n for p, n in zip(self.prompt_token_ids, self.output_lens, strict=True))

    def describe(self) -> dict:
        """The figures a reader needs to reproduce or compare the run; goes into the JSON report."""
        return {
            "num_requests": self.num_requests,
            "prompt_len_range": list(self.shape.prompt_len_range),
            "output_len_range": list(self.shape.output_len_range),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "seed": self.seed,
            "greedy": True,
            "ignore_eos": True,
        }


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(length)]


def make_workload(shape: ThroughputShape, vocab_size: int, seed: int) -> Workload:
    """Draw `shape.num_requests` requests; the same arguments always give the same workload."""
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ORDINARY_TOKEN_ID}, got {vocab_size}")
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(shape.num_requests):
        prompts.append(random_prompt(rng, rng.randint(*shape.prompt_len_range), vocab_size))
        output_lens.append(rng.randint(*shape.output_len_range))
    return Workload(prompts, output_lens, seed, shape)


def batches(num_requests: int, batch_size: int) -> list[range]:
    """Consecutive slices of the request list in arrival order, the last one possibly short."""
    starts = range(0, num_requests, batch_size)
    return [range(start, min(start + batch_size, num_requests)) for start in starts]
