"""Prefill/decode disaggregation: who prefills where, and how a finished prefill's KV blocks travel.

A prompt of at least `threshold` tokens is prefilled on a prefill replica; once its first token is out,
the prefill replica exports the K/V of the prompt's full blocks (`LLMEngine.export_prefix`, keyed by the
stable block keys) through a `KVTransport`, the decode replica imports them into its prefix cache
(`LLMEngine.import_prefix`), and the request resumes there with prompt + first token: the decode
replica's prefix lookup finds the imported blocks and computes only the last partial block and the
first token. Shorter prompts are prefilled where they decode. The client drives the hand-off
(`client.py`); this module owns the decision and the transport.

`RayObjectTransport` puts the blocks in Ray's object store (shared memory on one node, Ray's transfer
between nodes). A faster transport (RDMA, NCCL between GPUs) implements the same two calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tokenforge.kv.block_hash import BlockKey


@dataclass(frozen=True)
class PDConfig:
    num_prefill: int
    num_decode: int
    threshold: int = 256  # prompts of at least this many tokens are prefilled on a prefill replica

    def __post_init__(self):
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(f"--prefill-replicas and --decode-replicas must both be >= 1, got "
                             f"{self.num_prefill} and {self.num_decode}")
        if self.threshold < 1:
            raise ValueError(f"--pd-threshold must be >= 1 token, got {self.threshold}")

    def disaggregate(self, num_prompt_tokens: int) -> bool:
        return num_prompt_tokens >= self.threshold


@dataclass
class KVHandle:
    """A shipped prefix: its block keys, the transport's reference to the data, and what the sending cost."""

    keys: list[BlockKey]
    ref: Any  # the transport's own handle (for Ray: [ObjectRef], a list so Ray does not resolve it in passing)
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    send_seconds: float


class KVTransport(Protocol):
    def send(self, keys: list[BlockKey], data: torch.Tensor) -> KVHandle:
        """On the sending replica: make the blocks available to another replica; returns the handle to pass."""
        ...

    def receive(self, handle: KVHandle) -> torch.Tensor:
        """On the receiving replica: the blocks' data, as `KVCache.read_blocks` returned it."""
        ...


class RayObjectTransport:
    """Blocks as one numpy array in Ray's object store; bf16 travels as int16 bits (numpy has no bf16)."""

    def send(self, keys: list[BlockKey], data: torch.Tensor) -> KVHandle:
        import ray

        started = time.perf_counter()
        bits = data.view(torch.int16) if data.dtype == torch.bfloat16 else data
        array = bits.numpy()
        ref = ray.put(array)
        return KVHandle(keys, [ref], str(data.dtype).removeprefix("torch."), tuple(data.shape), array.nbytes,
                        time.perf_counter() - started)

    def receive(self, handle: KVHandle) -> torch.Tensor:
        import ray

        array = ray.get(handle.ref[0])
        # the store hands out a read-only view; the copy is what write_blocks would make anyway
        data = torch.from_numpy(np.array(array, copy=True))
        return data.view(torch.bfloat16) if handle.dtype == "bfloat16" else data


TRANSPORTS = {"ray": RayObjectTransport}
