"""Tool calls as data, and the contract of a tool-call parser: how a model's text becomes OpenAI's
`message.tool_calls` (whole, or as a stream's deltas), and which grammar forces a model to call a tool.

Parsers are chosen by name (`--tool-call-parser`); `get_tool_parser` knows them. A parser for another
model family implements `ToolParser` (parse, streamer, forcing_spec) and registers its module below.
"""

from __future__ import annotations

import importlib
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from tokenforge.structured.params import StructuredOutputsParams

# name -> "module:class", imported on first use
TOOL_PARSERS = {"hermes": "tokenforge.structured.hermes:HermesToolParser"}
DEFAULT_TOOL_PARSER = "hermes"


def new_call_id() -> str:
    """An id in OpenAI's shape (`call_` and 24 alphanumerics)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    """A whole output split into the assistant's text (None when there is none) and its tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    """What one piece of streamed text adds: content text, and tool-call deltas in OpenAI's chunk shape
    (`{"index", "id", "type", "function": {"name", "arguments": ""}}` to open call `index`, then
    `{"index", "function": {"arguments": piece}}` for each piece of its arguments)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: StreamDelta) -> None:
        self.content += other.content
        self.tool_calls += other.tool_calls


class ToolCallStreamer(ABC):
    """Incremental parsing of one choice's text. `feed` each new piece of text as it arrives, `finish` once
    at the end; their deltas, concatenated, give the choice's content and calls. `tool_calls` lists the
    calls opened so far. Content never includes the markup around calls, even split across pieces."""

    tool_calls: list[ToolCall]

    @abstractmethod
    def feed(self, text: str) -> StreamDelta: ...

    @abstractmethod
    def finish(self) -> StreamDelta: ...


class ToolParser(ABC):
    """A model family's tool-call format."""

    name: str

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The whole output: content and calls. Output that does not parse as calls is all content."""

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A fresh incremental parser for one streamed choice."""

    @abstractmethod
    def forcing_spec(self, tools: list[dict], only: str | None, parallel: bool) -> StructuredOutputsParams:
        """A grammar admitting only calls in this format to `tools` (OpenAI tool dicts), each function's
        arguments valid under its parameter schema: one call, or with `parallel` one or more; just
        function `only` when given (a named tool_choice)."""


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; available: {', '.join(sorted(TOOL_PARSERS))}")
    module, cls = TOOL_PARSERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def finish_reason(reason: str | None, tool_calls: list[ToolCall]) -> str | None:
    """OpenAI answers "tool_calls" when the model stopped after calling tools; a cut-off output
    ("length", "abort") keeps its reason."""
    return "tool_calls" if tool_calls and reason == "stop" else reason


def parameters_schema(tool: dict) -> dict:
    """A function's parameter schema; a function without one takes an empty object."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}
