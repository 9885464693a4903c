"""The OpenAI-compatible API end to end, through the official `openai` client and raw httpx: completions and
chat, streamed and not, usage, stops, n and seeds, logprobs, token-id and batched prompts, /health,
/v1/models, /metrics, and a 4xx with the OpenAI error shape for every kind of bad request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import MESSAGES, MODEL, PROMPT

pytestmark = pytest.mark.timeout(60)

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_health_and_models(live, client, engine):
    health = httpx.get(f"{live.url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == engine.model_config.max_model_len


def test_completion_stream_equals_non_stream_and_usage_is_exact(client, engine):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    num_prompt = len(engine.tokenizer.encode(PROMPT))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (
        num_prompt, 12, num_prompt + 12)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == full.choices[0].text
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_stream_equals_non_stream_and_usage_is_exact(client, engine):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, **GREEDY)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    template = engine.tokenizer.apply_chat_template(MESSAGES)
    num_prompt = len(engine.tokenizer.encode(template, add_special_tokens=False))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (num_prompt, 10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage == full.usage


def test_raw_stream_ends_with_done(live):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_is_exact(live, max_tokens):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
    assert response["usage"]["completion_tokens"] == max_tokens
    assert response["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, **GREEDY).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, stop=stop, **GREEDY).choices[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, stop=["@@@", stop],
                                         stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == out.text

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, **GREEDY)
    text = chat.choices[0].message.content
    assert len(text) > 6
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stop=[text[2:5]],
                                             **GREEDY).choices[0]
    assert stopped.message.content == text[:text.index(text[2:5])] and stopped.finish_reason == "stop"


def test_n_choices_use_seed_plus_index(client, engine):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    first = client.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in client.completions.create(n=3, seed=11, **kw).choices]
    assert len(set(texts)) > 1
    assert client.completions.create(n=1, seed=12, **kw).choices[0].text == texts[1]
    assert first.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert first.usage.completion_tokens == 24

    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=3, max_tokens=6,
                                              stream=True, temperature=1.0, extra_body={"ignore_eos": True})
    parts = {0: "", 1: ""}
    for chunk in streamed:
        parts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=3, max_tokens=6,
                                           temperature=1.0, extra_body={"ignore_eos": True})
    assert [parts[0], parts[1]] == [c.message.content for c in plain.choices]


def test_logprobs_in_openai_shapes(client, live):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=3, **GREEDY).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy takes the most likely token

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=2, **GREEDY).choices[0]
    assert len(chat.logprobs.content) == 4
    for entry in chat.logprobs.content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)

    body = {"prompt": PROMPT, "max_tokens": 4, "logprobs": 2, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp.token_logprobs)


def test_token_id_prompts_and_batches(client, engine):
    ids = [1, 40, 41, 42, 43]
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=3, **GREEDY).usage.prompt_tokens == 5
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello world"], n=2, max_tokens=5, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, **GREEDY).choices[0].text
    assert batch.choices[0].text == batch.choices[1].text == single
    assert batch.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT)) + len(engine.tokenizer.encode(
        "Hello world"))
    assert batch.usage.completion_tokens == 20


def test_return_token_ids_in_body_and_stream(live, engine):
    """vLLM's `return_token_ids`: the ids decode to the text, and a stream's chunks add up to the body's."""
    ids = engine.tokenizer.encode(PROMPT)
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    full = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert full["prompt_token_ids"] == ids and len(full["token_ids"]) == 6
    assert engine.tokenizer.decode(full["token_ids"]) == full["text"]
    with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(response)[:-1]]
    assert chunks[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == full["token_ids"]
    chat = httpx.post(f"{live.url}/v1/chat/completions", timeout=30, json={
        "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert len(chat.json()["choices"][0]["token_ids"]) == 4
    plain = httpx.post(f"{live.url}/v1/completions", json={**body, "return_token_ids": False}, timeout=30).json()
    assert "token_ids" not in plain["choices"][0] and plain["choices"][0]["text"] == full["text"]


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LONG = "hello " * 400
BAD_REQUESTS = [
    ("malformed JSON", COMPLETIONS, '{"prompt": "hi", ', 400, None),
    ("not an object", COMPLETIONS, "[1, 2]", 400, None),
    ("empty body", COMPLETIONS, "", 400, None),
    ("wrong type", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("bool for int", COMPLETIONS, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("unknown model", COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("temperature range", COMPLETIONS, {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("top_p range", COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("n range", COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n beyond the queue", COMPLETIONS, {"prompt": "hi", "n": 1000}, 400, "n"),
    ("logprobs range", COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("engine-side range", COMPLETIONS, {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("penalty range", COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("empty token list", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("missing prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("bad prompt type", COMPLETIONS, {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("token id out of vocab", COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt"),
    ("prompt too long", COMPLETIONS, {"prompt": LONG}, 400, "prompt"),
    ("max_tokens too large", COMPLETIONS, {"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("empty stop", COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("unsupported field", COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo"),
    ("stream_options without stream", COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("streamed, prompt too long", COMPLETIONS, {"prompt": LONG, "stream": True}, 400, "prompt"),
    ("streamed, max_tokens too large", COMPLETIONS, {"prompt": "hi", "max_tokens": 1000, "stream": True}, 400,
     "max_tokens"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("missing messages", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("top_logprobs without logprobs", CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat prompt too long", CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("lone surrogate in the prompt", COMPLETIONS, '{"prompt": "bad \\ud800 text"}', 400, "prompt"),
    # JSON allows "\ud800" escapes; httpx would refuse such text, so these bodies are sent pre-serialized
    ("lone surrogate in a batch", COMPLETIONS, json.dumps({"prompt": ["fine", "bad \ud800"]}), 400, "prompt[1]"),
    ("lone surrogate in a message", CHAT,
     json.dumps({"messages": [MESSAGES[0], {"role": "user", "content": "x\udfff"}]}), 400, "messages[1].content"),
    ("streamed chat, max tokens too large", CHAT, {"messages": MESSAGES, "max_completion_tokens": 1000,
                                                   "stream": True}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path, body, status, param", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_shaped_4xx(live, engine, path, body, status, param):
    if isinstance(body, str):
        response = httpx.post(f"{live.url}{path}", content=body, headers={"content-type": "application/json"},
                              timeout=10)
    else:
        response = httpx.post(f"{live.url}{path}", json=body, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_route_and_method_get_openai_shape(live):
    for response, status in ((httpx.post(f"{live.url}/v1/embeddings", json={}, timeout=10), 404),
                             (httpx.get(f"{live.url}/v1/completions", timeout=10), 405)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10_000)
    assert "max_tokens" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_metrics_expose_server_and_engine_figures(live, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, **GREEDY)
    httpx.post(f"{live.url}/v1/completions", json={"prompt": ""}, timeout=10)
    response = httpx.get(f"{live.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'tokenforge_requests_total{endpoint="/v1/completions",status_code="200"}' in text
    assert 'tokenforge_requests_total{endpoint="/v1/completions",status_code="400"}' in text
    for name in ("tokenforge_num_requests_waiting", "tokenforge_num_requests_running", "tokenforge_kv_blocks_used",
                 "tokenforge_kv_blocks_total", "tokenforge_prefix_cache_hit_rate",
                 "tokenforge_time_to_first_token_seconds_bucket", "tokenforge_inter_token_latency_seconds_bucket",
                 "tokenforge_e2e_request_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
