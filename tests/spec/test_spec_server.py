"""The server with speculative decoding on: same text as without, and vLLM-named counters in /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer, engine_idle, wait_until
from tokenforge.config import SpeculativeConfig
from tokenforge.engine.async_engine import AsyncLLMEngine
from tokenforge.server.api import build_app

pytestmark = pytest.mark.timeout(120)
# text that repeats, so prompt lookup has something to draft from
PROMPT = "x = 1\ny = 2\nz = 3\nx = 1\ny = 2\nz = 3\nx = 1\ny ="


def test_spec_server_streams_the_same_text_and_counts_drafts(llama_dir):
    plain = AsyncLLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", num_threads=1)
    spec = AsyncLLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", num_threads=1,
                                    speculative=SpeculativeConfig(num_speculative_tokens=4))
    texts = {}
    for name, engine in (("plain", plain), ("spec", spec)):
        with LiveServer(build_app(engine, MODEL, max_queue=64, request_timeout=60)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
            body = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            full = client.completions.create(**body)
            streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **body)
                               if c.choices)
            assert streamed == full.choices[0].text and full.usage.completion_tokens == 40
            texts[name] = full.choices[0].text
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert wait_until(lambda engine=engine: engine_idle(engine))
        if name == "spec":
            values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("tokenforge_spec_decode")}
            assert values["tokenforge_spec_decode_num_drafts_total"] > 0
            assert values["tokenforge_spec_decode_num_draft_tokens_total"] >= \
                values["tokenforge_spec_decode_num_accepted_tokens_total"]
        else:
            assert "tokenforge_spec_decode" not in metrics
    assert texts["spec"] == texts["plain"]
