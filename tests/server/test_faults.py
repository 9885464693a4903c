"""Faults the server must survive: clients that disconnect mid-stream (their KV blocks are freed at once and
the server keeps answering correctly), a full queue (503 with Retry-After, no hang) and requests that run
past the timeout (aborted: 504, or a stream that ends with finish_reason "abort")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from tests.server.conftest import MESSAGES, MODEL, PROMPT, LiveServer, engine_idle, tiny_engine, wait_until
from tokenforge.server.api import build_app

pytestmark = pytest.mark.timeout(60)

STEP_DELAY_S = 0.02
REQUEST_TIMEOUT_S = 3.0
LONG = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}  # >= 4 s at STEP_DELAY_S a token


@pytest.fixture(scope="module")
def slow(llama_dir):
    """A server on its own engine, slowed to >= STEP_DELAY_S a step, with room for 4 generations."""
    engine = tiny_engine(llama_dir)
    step = engine.engine.step

    def slow_step():
        time.sleep(STEP_DELAY_S)
        return step()

    engine.engine.step = slow_step
    with LiveServer(build_app(engine, MODEL, max_queue=4, request_timeout=REQUEST_TIMEOUT_S)) as server:
        yield server, engine


def greedy_text(url: str, max_tokens: int) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def read_events(http: httpx.AsyncClient, body: dict, max_events: int | None = None) -> list[str]:
    """The stream's data lines; with max_events, leave (closing the connection) after that many."""
    events = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == max_events:
                    break
    return events


def test_disconnects_mid_stream_free_kv_blocks_at_once(live, engine):
    reference = greedy_text(live.url, 16)
    steps_before = engine.stats()["num_steps"]
    stay = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    leave = {**LONG, "prompt": "Hello world!"}

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            return await asyncio.gather(*[read_events(http, stay) for _ in range(20)],
                                        *[read_events(http, leave, max_events=2) for _ in range(20)])

    results = asyncio.run(asyncio.wait_for(main(), timeout=45))
    for events in results[:20]:
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == reference
    assert wait_until(lambda: engine_idle(engine), timeout=5), engine.stats()
    # The streams that left asked for 200 tokens, at most one a step: fewer steps means they were aborted.
    assert engine.stats()["num_steps"] - steps_before < LONG["max_tokens"]
    assert greedy_text(live.url, 16) == reference


def test_full_queue_answers_503_with_retry_after(slow):
    server, engine = slow

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            async with contextlib.AsyncExitStack() as streams:  # leaving it disconnects the four streams
                for _ in range(4):
                    response = await streams.enter_async_context(
                        http.stream("POST", "/v1/completions", json={**LONG, "stream": True}))
                    assert response.status_code == 200
                return (await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}),
                        await http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}))

    for busy in asyncio.run(asyncio.wait_for(main(), timeout=30)):
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert set(busy.json()["error"]) == {"message", "type", "param", "code"}
        assert busy.json()["error"]["code"] == "queue_full"
    assert wait_until(lambda: engine_idle(engine), timeout=5), engine.stats()
    assert greedy_text(server.url, 2)


def test_a_client_that_leaves_a_plain_request_aborts_it(slow):
    server, engine = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=0.5)
    # Well before the request would finish (>= 4 s) or time out (3 s):
    assert wait_until(lambda: engine_idle(engine), timeout=1.5), engine.stats()


def test_requests_past_the_timeout_are_aborted(slow):
    server, engine = slow

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            return await asyncio.gather(read_events(http, LONG), http.post("/v1/completions", json=LONG))

    started = time.monotonic()
    events, plain = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 5
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert len(events) - 1 < LONG["max_tokens"]
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "request_timeout"
    assert wait_until(lambda: engine_idle(engine), timeout=5), engine.stats()
