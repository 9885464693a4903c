"""Putting tools and tool messages into the prompt: through the model's chat template when it renders tools
itself (it reads the `tools` variable, as Hugging Face templates do), else through a fallback.

The fallback, for templates without tool support, speaks the Hermes format the default parser reads:
- a system message (prepended, or put before the first system message's text) lists the functions as JSON
  inside `<tools></tools>` and asks for each call as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`;
- an assistant message's `tool_calls` are written into its content in that same format;
- `tool` messages (a function's result) become a user message with each result inside
  `<tool_response></tool_response>`, consecutive results joined, since such templates often know no `tool`
  role.
"""

from __future__ import annotations

import json

FALLBACK_HEADER = (
    "# Tools\n\n"
    "You can call functions to help answer. Their signatures are listed, one JSON object per line, between "
    "<tools> and </tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments between <tool_call> and </tool_call>, "
    "one block per call:\n<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": <arguments as a JSON "
    "object>}}\n</tool_call>"
)


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text for OpenAI-shaped `messages` (assistant `tool_calls` with JSON-text arguments, `tool`
    messages with `tool_call_id`) and `tools` (None: no tools offered). Raises ValueError (a template that
    refuses the messages) or ConfigError (no template)."""
    if tokenizer.chat_template_uses("tools"):
        return tokenizer.apply_chat_template([_for_template(m) for m in messages], tools=tools)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools))


def _for_template(message: dict) -> dict:
    """Hugging Face templates take a call's arguments as a mapping (they write it with `tojson`)."""
    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call["function"], "arguments": _decoded(call["function"]["arguments"])}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _decoded(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not JSON: the template gets the text as sent


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages rewritten for a template that knows nothing of tools (see the module notes)."""
    result: list[dict] = []
    for message in messages:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if result and result[-1].get("_tool_responses"):
                result[-1]["content"] += "\n" + response
            else:
                result.append({"role": "user", "content": response, "_tool_responses": True})
        elif message.get("tool_calls"):
            calls = "\n".join(_call_block(c) for c in message["tool_calls"])
            text = message.get("content") or ""
            result.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            result.append({k: v for k, v in message.items() if k != "tool_call_id"})
    result = [{k: v for k, v in m.items() if k != "_tool_responses"} for m in result]
    if tools:
        result = _with_tools_system_prompt(result, tools)
    return result


def _call_block(call: dict) -> str:
    payload = {"name": call["function"]["name"], "arguments": _decoded(call["function"]["arguments"])}
    return f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"


def _with_tools_system_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    header = FALLBACK_HEADER.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{header}\n\n{first.get('content') or ''}".rstrip()}] + messages[1:]
    return [{"role": "system", "content": header}] + messages
