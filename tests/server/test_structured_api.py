"""The real server (a tiny random Llama) takes every structured-output, logits and tool option and answers a
bad one with a 400 that names the parameter and the problem, then serves the next request; a valid one is
served and its spec travels in SamplingParams (test_structured_engine.py checks what the engine makes of
it; test_tools_api.py the response shapes, on a stub engine that follows the grammar)."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MESSAGES, PROMPT

pytestmark = pytest.mark.timeout(60)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def completion(**extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": 3, **extra}


def chat(**extra) -> dict:
    return {"messages": MESSAGES, "max_tokens": 3, **extra}


def json_schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


BAD = [
    ("invalid schema", CHAT, chat(response_format=json_schema_format({"type": "foo"})), "response_format",
     "Invalid type: foo"),
    ("unsupported keyword", COMPLETIONS, completion(response_format=json_schema_format(
        {"type": "array", "uniqueItems": True})), "response_format", "uniqueItems"),
    ("unsatisfiable schema", CHAT, chat(guided_json={"type": "integer", "minimum": 3, "maximum": 1}), "guided_json",
     "minimum (3) is greater than maximum (1)"),
    ("schema as bad JSON text", CHAT, chat(guided_json="{nope"), "guided_json", "not valid JSON"),
    ("json_schema type without a schema object", CHAT, chat(response_format={"type": "json_schema"}),
     "response_format", "needs json_schema"),
    ("unknown response_format type", CHAT, chat(response_format={"type": "yaml"}), "response_format.type", None),
    ("bad regex", COMPLETIONS, completion(guided_regex="(unclosed"), "guided_regex", "unclosed group"),
    ("bad regex in structured_outputs", CHAT, chat(structured_outputs={"regex": "a{5,3}"}), "structured_outputs",
     "invalid repetition count"),
    ("bad grammar", COMPLETIONS, completion(guided_grammar="start: undefined_rule"), "guided_grammar",
     "unknown name"),
    ("empty choice", CHAT, chat(guided_choice=[]), "guided_choice", "non-empty list"),
    ("two keys in structured_outputs", CHAT, chat(structured_outputs={"regex": "a", "choice": ["a"]}),
     "structured_outputs", "got regex and choice"),
    ("unknown structured_outputs key", CHAT, chat(structured_outputs={"regexp": "a"}), "structured_outputs",
     "unknown key(s) regexp"),
    ("two constraints", CHAT, chat(guided_regex="a", response_format={"type": "json_object"}), "guided_regex",
     "not several: got response_format and guided_regex"),
    ("logit_bias key", COMPLETIONS, completion(logit_bias={"hello": 1}), "logit_bias", "decimal strings"),
    ("logit_bias range", CHAT, chat(logit_bias={"5": 150}), "logit_bias", "[-100, 100]"),
    ("logit_bias outside the vocabulary", CHAT, chat(logit_bias={"99999": 5}), "logit_bias", "vocabulary"),
    ("allowed_token_ids empty", COMPLETIONS, completion(allowed_token_ids=[]), "allowed_token_ids", None),
    ("allowed_token_ids outside the vocabulary", CHAT, chat(allowed_token_ids=[5, 70000]), "allowed_token_ids",
     "vocabulary"),
    ("blank bad word", COMPLETIONS, completion(bad_words=[" "]), "bad_words", "non-blank"),
    ("tool_choice without tools", CHAT, chat(tool_choice="required"), "tool_choice", "needs tools"),
    ("named function not among tools", CHAT, chat(tools=[TOOL], tool_choice={"type": "function", "function": {
        "name": "nope"}}), "tool_choice", "not among the tools"),
    ("duplicate tool names", CHAT, chat(tools=[TOOL, TOOL]), "tools", "repeated: get_weather"),
    ("bad function name", CHAT, chat(tools=[{"type": "function", "function": {"name": "has space"}}]),
     "tools[0].function.name", None),
    ("forced call with a bad parameter schema", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}],
        tool_choice="required"), "tools", "Invalid type: nope"),
    ("forced call and a schema", CHAT, chat(tools=[TOOL], tool_choice="required",
                                            response_format={"type": "json_object"}), "tool_choice",
     "cannot be combined with response_format"),
    ("tool message without tool_call_id", CHAT, chat(messages=[{"role": "tool", "content": "18 C"}]), "messages[0]",
     "tool_call_id"),
    ("user message without content", CHAT, chat(messages=[{"role": "user"}]), "messages[0]", "needs content"),
    ("tool_calls on a user message", CHAT, chat(messages=[{"role": "user", "content": "x", "tool_calls": [CALL]}]),
     "messages[0]", "only with role"),
]


@pytest.mark.parametrize("path, body, param, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_options_get_a_400_naming_the_parameter(live, path, body, param, message):
    response = httpx.post(f"{live.url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if message is not None:
        assert message in error["message"]
    # and the server goes on: the next request is served
    ok = httpx.post(f"{live.url}{COMPLETIONS}", json=completion(guided_regex="[0-9]+"), timeout=30)
    assert ok.status_code == 200, ok.text


GOOD = [
    (COMPLETIONS, completion(response_format=json_schema_format(SCHEMA))),
    (CHAT, chat(response_format={"type": "json_object"})),
    (CHAT, chat(response_format={"type": "text"})),
    (CHAT, chat(structured_outputs={"json": SCHEMA})),
    (COMPLETIONS, completion(guided_choice=["yes", "no"])),
    (CHAT, chat(guided_grammar='start: "a"+')),
    (CHAT, chat(logit_bias={"5": -100, "7": 2.5}, allowed_token_ids=[5, 6, 7, 8], bad_words=["hello"])),
    (CHAT, chat(tools=[TOOL], tool_choice="none")),
    (CHAT, chat(messages=[{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])),
]
# Requests offering tools are served end to end in test_tools_api.py: here the tools prompt would not fit
# the tiny model's 256-token context.


@pytest.mark.parametrize("path, body", GOOD)
def test_valid_options_are_served(live, path, body):
    response = httpx.post(f"{live.url}{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text


def test_the_request_fields_reach_sampling_params():
    from tokenforge.server.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(**chat(guided_json=SCHEMA, logit_bias={"5": -1}, allowed_token_ids=[5, 9],
                                        bad_words=["x"]))
    param, spec = body.constraint()
    params = body.sampling_params(0, spec)
    assert param == "guided_json" and params.structured_outputs.json == SCHEMA
    assert params.logit_bias == {5: -1.0} and params.allowed_token_ids == [5, 9] and params.bad_words == ["x"]
