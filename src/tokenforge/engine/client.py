"""The engine client: the small surface the HTTP server and `LLM` use, whatever engine stands behind it.

`AsyncLLMEngine` (one engine in this process) implements it; a router over replicas or a remote engine
can too, and then the same server and the same offline API work over it unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tokenforge.config import ModelConfig
from tokenforge.engine.messages import RequestOutput
from tokenforge.sampling_params import SamplingParams
from tokenforge.tokenizer import TokenizerWrapper


class EngineClient(Protocol):
    tokenizer: TokenizerWrapper  # the model's tokenizer and chat template
    model_config: ModelConfig  # context length, vocabulary size, EOS ids

    def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                 req_id: str | None = None, prompt_token_ids: list[int] | None = None,
                 cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (the last has finished=True). Invalid input raises ValueError before
        the first output; a dead engine raises EngineDeadError. Leaving the iteration early aborts the
        request and frees what it held."""
        ...

    def abort(self, req_id: str) -> None:
        """Abort soon; safe from any thread or task, a no-op for unknown or finished requests."""
        ...

    def health(self) -> str | None:
        """None while the engine serves requests, otherwise why it does not."""
        ...

    def health_report(self) -> dict:
        """What `/health` shows: {"status": "ok"}, or "degraded" (serving, with less capacity: a replica
        down or restarting) with details, or "dead"."""
        ...

    def stats(self) -> dict:
        """A snapshot of the engine's counters (queue, running, KV blocks, prefix cache, speculation)."""
        ...

    async def shutdown(self) -> None:
        ...


class EngineDeadError(RuntimeError):
    """The engine stopped; the server should report it and stop taking requests."""
