"""The Hermes tool-call format (NousResearch Hermes, Qwen2.5 and others): each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>` lines, any text around the
calls is the message's content.

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Arguments are returned as the model wrote them (its own JSON text), so a stream's concatenated argument
deltas equal the non-streamed arguments. A stream opens a call as soon as its name is known and then
sends its arguments as they arrive; the whole-text parser is stricter (an output with a block that is not
a valid call is returned as plain content), so the two differ only on malformed output.
"""

from __future__ import annotations

import json
import re

from tokenforge.structured.compiler import JSON_OPTIONS
from tokenforge.structured.params import StructuredOutputsParams
from tokenforge.structured.tool_calls import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    parameters_schema,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)
# The start of a call whose name comes first, up to where the arguments' value begins.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_ARGUMENTS_KEY = re.compile(r'"arguments"\s*:\s*')


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        calls, outside, end = [], [], 0
        for match in _BLOCK.finditer(text):
            call = parse_call(match.group(1))
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
            outside.append(text[end:match.start()])
            end = match.end()
        outside.append(text[end:])
        content = "".join(outside).strip()
        return ParsedOutput(content or None, calls)

    def streamer(self) -> HermesStreamer:
        return HermesStreamer()

    def forcing_spec(self, tools: list[dict], only: str | None, parallel: bool) -> StructuredOutputsParams:
        chosen = [t for t in tools if only is None or t["function"]["name"] == only]
        if not chosen:
            raise ValueError(f"tool_choice names function {only!r}, which is not among the tools")
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    "arguments": parameters_schema(t)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
        schema = {"anyOf": calls, "x-guidance": JSON_OPTIONS}
        repeat = ' ("\\n" call)*' if parallel and only is None else ""
        grammar = f'start: call{repeat}\ncall: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"\n'
        return StructuredOutputsParams(grammar=grammar)


def parse_call(block: str) -> ToolCall | None:
    """One call's JSON (the text between the tags), or None if it is not a call."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    arguments = obj["arguments"]
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return ToolCall(obj["name"], arguments)
    return ToolCall(obj["name"], _raw_arguments(block, arguments))


def _raw_arguments(block: str, arguments) -> str:
    """The arguments' own text within the block, so that streaming and not agree."""
    decoder = json.JSONDecoder()
    for key in _ARGUMENTS_KEY.finditer(block):
        try:
            value, end = decoder.raw_decode(block, key.end())
        except json.JSONDecodeError:
            continue
        if value == arguments:
            return block[key.end():end]
    return json.dumps(arguments, ensure_ascii=False)


class HermesStreamer(ToolCallStreamer):
    """Text mode until `<tool_call>`; then the call's head (up to the arguments' value), which opens the call
    with its name; then the arguments object, streamed up to its closing brace; then the rest of the block,
    discarded up to `</tool_call>`. Content is stripped as the whole-text parser strips it: leading
    whitespace dropped, trailing whitespace held until more text follows."""

    def __init__(self):
        self.tool_calls: list[ToolCall] = []
        self._buffer = ""  # text received but not yet consumed by the current mode
        self._mode = "text"  # text | head | arguments | tail
        self._pending_space = ""
        self._started = False
        self._scan = _ObjectScanner()

    def feed(self, text: str) -> StreamDelta:
        self._buffer += text
        delta = StreamDelta()
        while True:
            step = getattr(self, f"_{self._mode}")()
            if step is None:
                return delta
            delta.extend(step)

    def finish(self) -> StreamDelta:
        delta = StreamDelta()
        if self._mode == "text":
            delta.content = self._content(self._buffer)
        elif self._mode == "head":  # stopped inside a block, before the arguments: a whole call or text
            call = parse_call(self._buffer)
            delta.extend(self._whole(call) if call else StreamDelta(self._content(OPEN + self._buffer)))
        self._buffer = ""
        self._mode = "text"
        return delta

    # Each mode consumes what it can and returns its delta, or None when it needs more text.
    def _text(self) -> StreamDelta | None:
        at = self._buffer.find(OPEN)
        if at < 0:
            keep = _partial_suffix(self._buffer, OPEN)
            ready, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
            return StreamDelta(self._content(ready)) if ready else None
        ready, self._buffer = self._buffer[:at], self._buffer[at + len(OPEN):]
        self._mode = "head"
        return StreamDelta(self._content(ready))

    def _head(self) -> StreamDelta | None:
        match = _HEAD.match(self._buffer)
        if match is not None:
            self._buffer = self._buffer[match.end():]
            self._mode = "arguments"
            self._scan = _ObjectScanner()
            call = ToolCall(json.loads(f'"{match.group(1)}"'), "")
            self.tool_calls.append(call)
            return StreamDelta(tool_calls=[{"index": len(self.tool_calls) - 1, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}])
        end = self._buffer.find(CLOSE)
        if end < 0:
            return None
        block, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
        self._mode = "text"
        call = parse_call(block)  # a call in another key order: sent whole once its block is closed
        return self._whole(call) if call else StreamDelta(self._content(OPEN + block + CLOSE))

    def _arguments(self) -> StreamDelta | None:
        if not self._scan.started:
            self._buffer = self._buffer.lstrip()  # as the whole-text parser, arguments start at their value
            if not self._buffer:
                return None
            if not self._buffer.startswith("{"):
                return self._arguments_whole()
        elif not self._buffer:
            return None
        used = self._scan.feed(self._buffer)
        piece, self._buffer = self._buffer[:used], self._buffer[used:]
        self.tool_calls[-1].arguments += piece
        if self._scan.done:
            self._mode = "tail"
        index = len(self.tool_calls) - 1
        return StreamDelta(tool_calls=[{"index": index, "function": {"arguments": piece}}]) if piece else None

    def _arguments_whole(self) -> StreamDelta | None:
        """Arguments that are not an object (a JSON string, say): sent once the block closes."""
        end = self._buffer.find(CLOSE)
        if end < 0:
            return None
        value = self._buffer[:end].strip().removesuffix("}").strip()
        self._buffer = self._buffer[end:]
        self._mode = "tail"
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        arguments = decoded if isinstance(decoded, str) else value
        self.tool_calls[-1].arguments = arguments
        return StreamDelta(tool_calls=[{"index": len(self.tool_calls) - 1, "function": {"arguments": arguments}}])

    def _tail(self) -> StreamDelta | None:
        end = self._buffer.find(CLOSE)
        if end < 0:
            return None
        self._buffer = self._buffer[end + len(CLOSE):]
        self._mode = "text"
        return StreamDelta()

    def _whole(self, call: ToolCall) -> StreamDelta:
        self.tool_calls.append(call)
        index = len(self.tool_calls) - 1
        return StreamDelta(tool_calls=[{"index": index, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": call.arguments}}])

    def _content(self, text: str) -> str:
        text = self._pending_space + text
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_space = text[len(body):]
        self._started = self._started or bool(body)
        return body


class _ObjectScanner:
    """Finds where a JSON object ends in text arriving piece by piece: brace depth outside strings."""

    def __init__(self):
        self.depth = 0
        self.started = False
        self.done = False
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the object (all of them unless it closes inside)."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (held back: it may be a tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
