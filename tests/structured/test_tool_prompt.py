"""Tools in the prompt: a template that reads `tools` gets them (and calls' arguments as mappings, as
Hugging Face templates expect); any other template gets the documented fallback."""

from __future__ import annotations

import json

import pytest

from tokenforge.structured.tool_prompt import FALLBACK_HEADER, fallback_messages, render_chat
from tokenforge.tokenizer import TokenizerWrapper

PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WITH_TOOLS = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }};"
    "{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9 C"},
]


def tokenizer_with(template: str, tokenizer_dir, tmp_path) -> TokenizerWrapper:
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": template}))
    return TokenizerWrapper(tmp_path)


def test_a_template_reading_tools_renders_them_and_the_calls(tokenizer_dir, tmp_path):
    tok = tokenizer_with(WITH_TOOLS, tokenizer_dir, tmp_path)
    assert tok.chat_template_uses("tools")
    text = render_chat(tok, CONVERSATION, TOOLS)
    assert text.startswith('<|tools|>get_weather:{"properties": {"city": {"type": "string"}}')
    assert '[call get_weather {"city": "Paris"}][call get_weather {"city": "Oslo"}]' in text  # a mapping, not text
    assert text.endswith("<|tool|>18 C(for call_1)<|tool|>9 C(for call_2)<|assistant|>")  # trim_blocks ate "\n"
    assert "<|tools|>" not in render_chat(tok, CONVERSATION[:2], None)


def test_a_template_without_tools_gets_the_fallback(tokenizer_dir, tmp_path):
    tok = tokenizer_with(PLAIN, tokenizer_dir, tmp_path)
    assert not tok.chat_template_uses("tools")
    text = render_chat(tok, CONVERSATION, TOOLS)
    header = FALLBACK_HEADER.format(tools=json.dumps(TOOLS[0]))
    assert text.startswith(f"<|system|>{header}\n\nBe brief.\n<|user|>Weather in Paris and Oslo?\n")
    assert ('<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n') in text
    assert text.endswith("<|user|><tool_response>\n18 C\n</tool_response>\n<tool_response>\n9 C\n</tool_response>\n"
                         "<|assistant|>")


def test_fallback_adds_a_system_message_when_there_is_none_and_keeps_text_beside_calls():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Checking.", "tool_calls": CONVERSATION[2]["tool_calls"][:1]}]
    result = fallback_messages(messages, TOOLS)
    assert result[0]["role"] == "system" and result[0]["content"].startswith("# Tools")
    assert result[2]["content"].startswith("Checking.\n<tool_call>\n")
    assert fallback_messages(messages[:1], None) == messages[:1]
    assert all(isinstance(m["content"], str) for m in fallback_messages(CONVERSATION, None))


def test_template_errors_stay_value_errors(tokenizer_dir, tmp_path):
    tok = tokenizer_with("{{ raise_exception('no tools here') }}", tokenizer_dir, tmp_path)
    with pytest.raises(ValueError, match="no tools here"):
        render_chat(tok, CONVERSATION, TOOLS)
    broken = tmp_path / "broken"
    broken.mkdir()
    assert not tokenizer_with("{% if %}", tokenizer_dir, broken).chat_template_uses("tools")
