"""Structured output and forced tool calls end to end on the real engine (the demo model behind the server,
through the official `openai` client): the engine's masks make every answer valid, streamed answers equal
whole ones, and constrained and free requests share the batch."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import LiveServer, tiny_engine
from tokenforge.config import DEMO_MODEL_DIR
from tokenforge.server.api import build_app

pytestmark = pytest.mark.timeout(180)
MODEL = "demo"
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"type": "string", "maxLength": 8}}, "required": ["key"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ADD, LOOKUP)}
ASK = [{"role": "user", "content": "def add(a, b):"}]


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    count: int = pydantic.Field(ge=0, le=50)
    tags: list[str] = pydantic.Field(max_length=2)


@pytest.fixture(scope="module")
def client():
    engine = tiny_engine(DEMO_MODEL_DIR)
    with LiveServer(build_app(engine, MODEL, request_timeout=120)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model(client):
    for seed in range(3):
        out = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Item, seed=seed,
                                            temperature=1.0, max_tokens=120)
        assert out.choices[0].finish_reason == "stop" and isinstance(out.choices[0].message.parsed, Item)


def test_a_streamed_schema_answer_equals_the_whole_one(client):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["x", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=0,
                                           max_tokens=60)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=0,
                                            max_tokens=60, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_required_tool_calls_are_valid_streamed_or_not(client):
    # one call: with parallel calls allowed, the greedy demo model keeps adding calls until max_tokens
    # (the stub-engine tests in test_tools_api.py cover parallel calls)
    kwargs = dict(model=MODEL, messages=ASK, tools=[ADD, LOOKUP], tool_choice="required", temperature=0,
                  parallel_tool_calls=False, max_tokens=150)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    streamed: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
        [(e["name"], e["arguments"]) for _, e in sorted(streamed.items())]


def test_a_named_function_while_free_requests_run(client):
    named = {"type": "function", "function": {"name": "add"}}
    free = []

    def run_free():
        free.append(client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0))

    threads = [threading.Thread(target=run_free) for _ in range(3)]
    for t in threads:
        t.start()
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[ADD, LOOKUP], tool_choice=named,
                                         temperature=0.7, seed=1, max_tokens=150)
    for t in threads:
        t.join(timeout=120)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])
    assert len(free) == 3 and all(f.choices[0].finish_reason == "length" for f in free)
