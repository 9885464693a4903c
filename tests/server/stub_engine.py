"""A stand-in `EngineClient` to test the server's structured-output and tool-calling path end to end
before the engine enforces constraints: a request with `structured_outputs` gets a random walk through its
compiled grammar (tests/structured/walk.py: the kind of output the engine integration must produce), any
other request gets the scripted `reply`. It records each prompt and its params.

Real parts throughout: the demo model's tokenizer, the grammar compiler, the incremental detokenizer and
the engine's output messages."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from tests.structured.walk import Walker
from tokenforge.config import DEMO_MODEL_DIR
from tokenforge.detokenizer import IncrementalDetokenizer
from tokenforge.engine.messages import CompletionOutput, RequestMetrics, RequestOutput
from tokenforge.sampling_params import SamplingParams
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.tokenizer import TokenizerWrapper


class StubEngine:
    def __init__(self, reply: str = "Hello there."):
        self.tokenizer = TokenizerWrapper(DEMO_MODEL_DIR)
        eos = tuple(sorted(self.tokenizer.eos_token_ids))
        self.model_config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size, max_model_len=1024,
                                            eos_token_ids=eos)
        self.compiler = GrammarCompiler(self.tokenizer.tokenizer, self.tokenizer.vocab_size, eos)
        self.walker = Walker(self.tokenizer, self.tokenizer.vocab_size, eos)
        self.reply = reply
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []

    def health(self) -> str | None:
        return None

    async def generate(self, prompt=None, params: SamplingParams | None = None, req_id: str | None = None,
                       prompt_token_ids: list[int] | None = None, cache_salt: str | None = None):
        self.prompts.append(self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False))
        self.params.append(params)
        ids, finish = self._output(params)
        detok = IncrementalDetokenizer(self.tokenizer.tokenizer, prompt_token_ids, params)
        text = ""
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            new_text = detok.step([token]).text_delta + (detok.flush() if last else "")
            text += new_text
            yield RequestOutput(req_id, None, prompt_token_ids, [CompletionOutput(
                0, text, ids[:i + 1], new_text, [token], None, finish if last else None)], last,
                RequestMetrics(0.0, None, None, 0, 0))
            await asyncio.sleep(0)

    def _output(self, params: SamplingParams) -> tuple[list[int], str]:
        if params.structured_outputs is None:
            ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
            ended = True
        else:
            matcher = self.compiler.matcher(params.structured_outputs)
            ids, ended = self.walker.walk(matcher, random.Random(params.seed))
        if params.max_tokens is not None and len(ids) > params.max_tokens:
            return ids[:params.max_tokens], "length"
        return ids, "stop" if ended else "length"

    def stats(self) -> dict:
        return dict.fromkeys(("num_waiting", "num_running", "kv_blocks_used", "kv_blocks_total",
                              "prefix_cache_queries", "prefix_cache_hits", "num_preemptions"), 0)

    async def shutdown(self) -> None:
        self.compiler.close()
