"""The offline API: LLM(model_path).generate(prompts, params) runs a whole batch to completion.

It talks to an `EngineClient` like the server does: by default one engine in this process, stepped on its
own thread (`AsyncLLMEngine`); pass `client=` to run the same calls over any other engine client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tokenforge.engine.client import EngineClient
from tokenforge.engine.messages import RequestOutput
from tokenforge.sampling_params import SamplingParams


class LLM:
    """Accepts the keyword arguments of `build_engine_config` (dtype, kv_cache_memory, max_num_seqs, ...)."""

    def __init__(self, model: str | None = None, client: EngineClient | None = None, **engine_args):
        if (model is None) == (client is None):
            raise ValueError("give either a model path or an engine client")
        if client is None:
            from tokenforge.engine.async_engine import AsyncLLMEngine

            client = AsyncLLMEngine.from_args(model, **engine_args)
        self.client = client
        self._loop = asyncio.new_event_loop()
        self._counter = 0

    def get_tokenizer(self):
        return self.client.tokenizer

    def stats(self) -> dict:
        return self.client.stats()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Outputs in the order of the prompts. Invalid input raises ValueError, and nothing of the batch
        is left running."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts")
        jobs = []
        for i in range(n):
            jobs.append(dict(req_id=f"offline-{self._counter}", params=sampling_params[i],
                             prompt=prompts[i] if prompts is not None else None,
                             prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids is not None else None))
            self._counter += 1
        return self.run(self._gather(jobs))

    def close(self) -> None:
        """Shut the engine client down (an in-process engine flushes its KV tiers to disk first)."""
        self.run(self.client.shutdown())

    def run(self, coro):
        """Run a coroutine that uses `self.client` on this LLM's event loop (what `generate` does); the
        engine's loop task is stopped again before it returns."""

        async def main():
            try:
                return await coro
            finally:
                stop = getattr(self.client, "stop_loop", None)
                if stop is not None:  # an in-process engine's loop task must not outlive this run
                    await stop()

        return self._loop.run_until_complete(main())

    async def _gather(self, jobs: list[dict]) -> list[RequestOutput]:
        tasks = [asyncio.ensure_future(self._last(job)) for job in jobs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # cancelling a stream aborts its request
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _last(self, job: dict) -> RequestOutput:
        last = None
        async for out in self.client.generate(**job):
            last = out
        return last
