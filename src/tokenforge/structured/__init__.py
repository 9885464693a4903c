"""Structured output: constraints on what a request may generate, and tool calling.

- `params.py`    the request-side spec, `StructuredOutputsParams` (pure Python; `SamplingParams` holds one)
- `compiler.py`  spec -> compiled grammar for one tokenizer (llguidance), cached, time-limited; errors as ValueError
- `matcher.py`   one request's grammar state: bitmask rows, accept, drafts, rollback, termination
- `logits.py`    one vectorized pass applying grammar bitmasks, logit_bias, allowed_token_ids and bad_words
- `worker.py`    computes a step's bitmasks in a background thread while the model runs
- `state.py`     the engine's glue: one request's constraint state, and a step's rows for worker and logits
- `tool_calls.py`   tool calls as data, the parser contract and registry (`--tool-call-parser`)
- `hermes.py`    the Hermes `<tool_call>` format: whole-text and streaming parsing, the forcing grammar
- `tool_prompt.py`  rendering tools and tool messages through the chat template, or a fallback prompt

Only `params.py` is imported here: the grammar engine loads when a compiler is first built.
"""

from tokenforge.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
