"""Structured output and tool calling through the server and the official `openai` client, on a stub engine
that walks each request's grammar at random (stub_engine.py): `chat.completions.parse` with a pydantic model,
guided choice and regex on completions, and tools with every tool_choice, streamed and not, with a tool
result sent back in the next turn."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import LiveServer
from tests.server.stub_engine import StubEngine
from tokenforge.server.api import build_app

pytestmark = pytest.mark.timeout(120)

MODEL = "stub"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                '"unit": "celsius"}}\n</tool_call>')


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    species: str


class Household(pydantic.BaseModel):
    owner: str = pydantic.Field(max_length=12)
    size: int = pydantic.Field(ge=1, le=9)
    pets: list[Pet] = pydantic.Field(max_length=2)


@pytest.fixture(scope="module")
def stub() -> StubEngine:
    return StubEngine()


@pytest.fixture(scope="module")
def client(stub) -> openai.OpenAI:
    with LiveServer(build_app(stub, MODEL, request_timeout=60)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def reply(stub):
    """Set the stub's scripted reply for one test."""
    def set_reply(text: str) -> None:
        stub.reply = text
    yield set_reply
    stub.reply = "Hello there."


def test_parse_with_a_pydantic_model(client, stub):
    for seed in range(3):
        completion = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Household, seed=seed)
        assert isinstance(completion.choices[0].message.parsed, Household)
        assert completion.choices[0].finish_reason == "stop"
    spec = stub.params[-1].structured_outputs
    assert spec.kind == "json" and spec.json["title"] == "Household"


def test_guided_choice_and_regex_on_completions(client):
    for seed in range(4):
        out = client.completions.create(model=MODEL, prompt="Sentiment:", seed=seed,
                                        extra_body={"guided_choice": ["positive", "negative"]})
        assert out.choices[0].text in ("positive", "negative")
        text = client.completions.create(model=MODEL, prompt="Code:", seed=seed, max_tokens=40,
                                         extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
        assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text.choices[0].text)


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [False, True])
def test_required_gives_valid_calls(client, parallel):
    counts = []
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=parallel, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls, {"get_weather", "add"})
        counts.append(len(choice.message.tool_calls))
    assert max(counts) == 1 if not parallel else min(counts) >= 1


def test_a_named_function_is_called(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=1,
                                         tool_choice={"type": "function", "function": {"name": "add"}})
    check_calls(out.choices[0].message.tool_calls, {"add"})
    assert len(out.choices[0].message.tool_calls) == 1


def collect_stream(stream) -> tuple[str, list[dict], str]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.id is not None:
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                calls[d.index]["arguments"] += d.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_streamed_required_calls_equal_the_whole_response(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=5)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = collect_stream(client.chat.completions.create(stream=True, **kwargs))
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_parses_the_models_own_calls_streamed_and_not(client, reply, stub):
    reply(HERMES_REPLY)
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0]
    assert out.message.content == "Let me look." and out.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert stub.params[-1].structured_outputs is None  # auto: the model decides, nothing is forced
    assert "<tools>" in stub.prompts[-1] and '"name": "get_weather"' in stub.prompts[-1]  # the fallback prompt
    content, calls, finish = collect_stream(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                           stream=True))
    assert content == "Let me look." and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]


def test_none_leaves_tools_out_and_the_text_alone(client, reply, stub):
    reply(HERMES_REPLY)
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none").choices[0]
    assert out.message.content == HERMES_REPLY and not out.message.tool_calls and out.finish_reason == "stop"
    assert "<tools>" not in stub.prompts[-1]


def test_a_tool_result_goes_back_into_the_next_turn(client, reply, stub):
    reply(HERMES_REPLY)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0].message
    reply("It is 18 C in Paris.")
    call = first.tool_calls[0]
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS).choices[0]
    assert answer.message.content == "It is 18 C in Paris." and answer.finish_reason == "stop"
    prompt = stub.prompts[-1]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
