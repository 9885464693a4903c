"""Tool calls in the Hermes format: whole-text parsing, streaming (any split of the text gives the same
content and calls as the whole-text parser, in OpenAI's delta shapes), and the forcing grammar, whose every
output parses into calls to the given tools with arguments valid under their schemas."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from tokenforge.structured.hermes import HermesToolParser
from tokenforge.structured.tool_calls import ToolCall, finish_reason, get_tool_parser

PARSER = HermesToolParser()
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number", "minimum": 0}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: an empty object
]

OUTPUTS = [
    "Just text, no calls.",
    CALL,
    f"Let me check.\n{CALL}",
    f"{CALL}\n{CALL.replace('Paris', 'Oslo')}\n",
    f"  before {CALL} middle {CALL} after  ",
    '<tool_call>\n{"name": "say", "arguments": {"text": "a } tricky \\" {string"}}\n</tool_call>',
    '<tool_call>{"arguments": {"x": 1}, "name": "swap"}</tool_call>',  # arguments first
    '<tool_call>\n{"name": "enc", "arguments": "{\\"q\\": 1}"}\n</tool_call>',  # arguments as a JSON string
    '<tool_call>\n{"name": "cut", "arguments": {"n": 5}}',  # the model stopped before the closing tag
    "a < b and <tool_ca is not a tag",
    "日本語 🙂 then " + CALL,
]


def test_whole_text_parsing():
    parsed = PARSER.parse(f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}")
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2]}), ("get_weather", {"city": "Oslo", "days": [1, 2]})]
    assert parsed.tool_calls[0].arguments == '{"city": "Paris", "days": [1, 2]}'  # as the model wrote it
    assert parsed.tool_calls[0].id.startswith("call_") and parsed.tool_calls[0].id != parsed.tool_calls[1].id
    assert PARSER.parse(CALL).content is None
    assert PARSER.parse("plain").tool_calls == [] and PARSER.parse("plain").content == "plain"


@pytest.mark.parametrize("text", [
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    f"{CALL}<tool_call>[1, 2]</tool_call>",
])
def test_an_output_with_a_malformed_call_is_all_content(text):
    parsed = PARSER.parse(text)
    assert parsed.tool_calls == [] and parsed.content == text


def stream(text: str, rng: random.Random) -> tuple[str, list[dict]]:
    """Feed `text` in random pieces; return the content and the calls rebuilt from the deltas."""
    streamer = PARSER.streamer()
    content, calls = "", {}
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for delta in [streamer.feed(p) for p in pieces] + [streamer.finish()]:
        content += delta.content
        for d in delta.tool_calls:
            if d["index"] not in calls:
                assert set(d) == {"index", "id", "type", "function"} and d["type"] == "function"
                assert d["id"].startswith("call_") and d["function"]["name"]
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", OUTPUTS)
def test_streaming_any_split_gives_the_whole_text_result(text):
    parsed = PARSER.parse(text)
    expected = [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
    for seed in range(20):
        content, calls = stream(text, random.Random(seed))
        assert content == (parsed.content or "")
        assert calls == expected


def test_streaming_sends_arguments_before_the_call_closes():
    streamer = PARSER.streamer()
    first = streamer.feed('<tool_call>\n{"name": "f", "arguments": {"a": [1, ')
    assert first.tool_calls[0]["function"] == {"name": "f", "arguments": ""}
    assert first.tool_calls[1]["function"]["arguments"] == '{"a": [1, '
    assert streamer.feed("2]}}\n</tool").tool_calls[0]["function"]["arguments"] == "2]}"
    assert not streamer.feed("_call>")
    assert [c.arguments for c in streamer.tool_calls] == ['{"a": [1, 2]}']


def test_streamed_content_holds_back_only_what_may_be_a_tag():
    streamer = PARSER.streamer()
    assert streamer.feed("Hello <tool").content == "Hello"
    assert streamer.feed("box> ok").content == " <toolbox> ok"


def walk_calls(compiler, walker, tokenizer, spec, seed: int) -> list[ToolCall]:
    ids, ended = walker.walk(compiler.matcher(spec), random.Random(seed))
    text = tokenizer.decode(ids)
    assert ended, text
    parsed = PARSER.parse(text)
    assert parsed.content is None, text
    content, streamed = stream(text, random.Random(seed))
    assert content == "" and streamed == [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
    return parsed.tool_calls


def check_valid(calls: list[ToolCall]) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_required_forces_exactly_one_valid_call(compiler, walker, tokenizer):
    spec = PARSER.forcing_spec(TOOLS, None, parallel=False)
    names = set()
    for seed in range(12):
        calls = walk_calls(compiler, walker, tokenizer, spec, seed)
        assert len(calls) == 1
        check_valid(calls)
        names.add(calls[0].name)
    assert names == {"get_weather", "add", "now"}


def test_parallel_calls_are_each_valid(compiler, walker, tokenizer):
    spec = PARSER.forcing_spec(TOOLS, None, parallel=True)
    counts = []
    for seed in range(12):
        calls = walk_calls(compiler, walker, tokenizer, spec, seed)
        check_valid(calls)
        counts.append(len(calls))
    assert min(counts) >= 1 and max(counts) > 1


def test_a_named_function_is_the_only_one_called(compiler, walker, tokenizer):
    spec = PARSER.forcing_spec(TOOLS, "add", parallel=True)
    for seed in range(6):
        calls = walk_calls(compiler, walker, tokenizer, spec, seed)
        assert [c.name for c in calls] == ["add"]
        check_valid(calls)
    with pytest.raises(ValueError, match="not among the tools"):
        PARSER.forcing_spec(TOOLS, "nope", parallel=False)


def test_finish_reason_and_registry():
    call = ToolCall("f", "{}")
    assert finish_reason("stop", [call]) == "tool_calls"
    assert finish_reason("length", [call]) == "length"
    assert finish_reason("stop", []) == "stop"
    assert call.to_openai() == {"id": call.id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert isinstance(get_tool_parser("hermes"), HermesToolParser)
    with pytest.raises(ValueError, match="unknown tool-call parser 'mistral'; available: hermes"):
        get_tool_parser("mistral")
