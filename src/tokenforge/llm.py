"""The offline API: LLM(model_path).generate(prompts, params) runs a whole batch to completion."""

from __future__ import annotations

from collections.abc import Sequence

from tokenforge.engine.engine import LLMEngine
from tokenforge.engine.messages import RequestOutput
from tokenforge.sampling_params import SamplingParams


class LLM:
    """Accepts the keyword arguments of `build_engine_config` (dtype, kv_cache_memory, max_num_seqs, ...)."""

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine.from_args(model, **engine_args)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Outputs in the order of the prompts. Invalid input raises ValueError before anything runs."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts")
        ids = []
        try:
            for i in range(n):
                req_id = f"offline-{self._counter}"
                self._counter += 1
                self.engine.add_request(
                    req_id, prompt=prompts[i] if prompts is not None else None, params=sampling_params[i],
                    prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids is not None else None)
                ids.append(req_id)
        except ValueError:
            self.engine.abort_request(ids)
            raise
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.req_id] = out
        return [final[i] for i in ids]
