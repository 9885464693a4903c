"""The OpenAI wire format: request schemas, their one mapping to `SamplingParams`, the response, chunk and
logprob shapes, and the error body. No I/O here; api.py does the serving.

Schemas are strict (no "0.5" for a float, no `true` for an int) and reject unknown fields, so a typo or
an unsupported OpenAI option gets a 400 that names it instead of being silently ignored. Fields outside
the OpenAI API (`top_k`, `min_p`, `ignore_eos`, ...) use vLLM's names.

Output constraints come from OpenAI's `response_format` or vLLM's `structured_outputs` and older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`; a request may use one of them, and
`constraint()` says which and turns it into a `StructuredOutputsParams`. Tools (`tools`, `tool_choice`,
`parallel_tool_calls`) and the messages that carry calls and results are chat-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenforge.sample.sampler import TokenLogprobs
from tokenforge.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from tokenforge.server.constraint_schemas import (
    GUIDED_FIELDS,
    ChatTool,
    MessageToolCall,
    NamedToolChoice,
    ResponseFormat,
)
from tokenforge.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # the sampler's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as in the OpenAI API; chat defaults to "up to the context length"


class APIError(Exception):
    """A request answered with an OpenAI-shaped error; the message says what to change."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests -------------------------------------------------------------------------------------------
def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields both endpoints share. `None` means the default, since many clients send explicit nulls."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None  # None: the one served model
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None  # isolates the KV cache per user with --kv-isolate-users; otherwise ignored
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's: requests with different salts share no KV block
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as text) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    bad_words: list[str] | None = None
    return_token_ids: bool = False  # vLLM's: each choice also carries its prompt's and its output's token ids

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        if value is None or isinstance(value, str) and value:
            return value
        if isinstance(value, list) and all(isinstance(s, str) and s for s in value):
            return value
        raise ValueError("must be a non-empty string or a list of non-empty strings")

    def _max_tokens(self) -> int | None:
        raise NotImplementedError  # each endpoint has its own field names and default

    def _num_logprobs(self) -> int | None:
        raise NotImplementedError  # each endpoint has its own field names and default

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        if value is None:
            return value
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids written as decimal strings, like \"50256\" (got {key!r})")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"values must be in [-100, 100] (got {bias} for token {key})")
        return value

    def constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        """The output constraint this request asks for and the parameter that asked, or None."""
        given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS)
                 if getattr(self, name) is not None and not (name == "response_format"
                                                            and self.response_format.type == "text")]
        if not given:
            return None
        if len(given) > 1:
            raise APIError(400, f"give one output constraint, not several: got {' and '.join(given)}", param=given[1])
        param = given[0]
        try:
            if param == "response_format":
                return param, self.response_format.spec()
            if param == "structured_outputs":
                return param, StructuredOutputsParams.from_dict(self.structured_outputs)
            return param, StructuredOutputsParams(**{GUIDED_FIELDS[param]: getattr(self, param)})
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids in logit_bias and allowed_token_ids must exist in the model's vocabulary."""
        for param, ids in (("logit_bias", [int(k) for k in self.logit_bias or {}]),
                           ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"{param} has token id(s) {bad[:5]} outside this model's vocabulary "
                                    f"[0, {vocab_size})", param=param)

    def sampling_params(self, choice: int, structured_outputs: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        """The one mapping from request fields to engine options. Choice i of a seeded request gets seed + i,
        so n choices differ from each other yet each is reproducible. `structured_outputs` is the request's
        constraint (from `constraint()`, or the tool-call grammar)."""
        try:
            return SamplingParams(
                temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
                top_k=_default(self.top_k, 0), min_p=_default(self.min_p, 0.0),
                repetition_penalty=_default(self.repetition_penalty, 1.0),
                presence_penalty=_default(self.presence_penalty, 0.0),
                frequency_penalty=_default(self.frequency_penalty, 0.0),
                seed=None if self.seed is None else self.seed + choice, max_tokens=self._max_tokens(),
                min_tokens=_default(self.min_tokens, 0), stop=_default(self.stop, []),
                stop_token_ids=_default(self.stop_token_ids, []), ignore_eos=self.ignore_eos,
                logprobs=self._num_logprobs(), skip_special_tokens=self.skip_special_tokens,
                structured_outputs=structured_outputs,
                logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
                allowed_token_ids=self.allowed_token_ids, bad_words=_default(self.bad_words, []))
        except ValueError as e:  # SamplingParams names the parameter first: "top_k must be ..."
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return self.stream_options is not None and self.stream_options.include_usage


def _default(value, default):
    return default if value is None else value


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, str) or _is_token_ids(value):
            if not value:
                raise ValueError("must not be empty")
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
            if not all(value):
                raise ValueError("must not contain an empty prompt")
            if len({type(p) for p in value}) > 1:
                raise ValueError("a batch must be all strings or all token-id lists")
            return value
        raise ValueError("must be a string, a list of token ids, or a batch: a list of strings or of token-id lists")

    def prompt_list(self) -> list[str | list[int]]:
        """The batch: each element is one prompt, as text or token ids."""
        if isinstance(self.prompt, str) or _is_token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def _max_tokens(self) -> int | None:
        return _default(self.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)

    def _num_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # may be null only for an assistant message that calls tools
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only: the call this message answers

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError("must be a string or a list of text parts like {\"type\": \"text\", \"text\": \"...\"} "
                         "(images and other parts are not supported)")

    @model_validator(mode="after")
    def _check_role_fields(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("needs content (it may be null only for an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("may have tool_calls only with role \"assistant\"")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("needs tool_call_id exactly when role is \"tool\"")
        return self

    def template_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value):
        names = [t.function.name for t in value or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"must name each function once; repeated: {', '.join(duplicates)}")
        return value

    def _max_tokens(self) -> int | None:
        return _default(self.max_completion_tokens, self.max_tokens)  # None: up to the context length

    def _num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return _default(self.top_logprobs, 0)

    def tool_dicts(self) -> list[dict] | None:
        """The tools as OpenAI dicts (what chat templates and tool parsers take), or None without tools."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function). Without tools it is "none"; with
        tools the default is "auto", as in the OpenAI API."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools", param="tool_choice")
            return "none", None
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools",
                               param="tool_choice")
            return "named", name
        return choice or "auto", None

    def parallel(self) -> bool:
        return _default(self.parallel_tool_calls, True)


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """Turn pydantic's (or FastAPI's) error list into one actionable message and the offending parameter."""
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first["type"] == "json_invalid":
        error = first.get("ctx", {}).get("error", "")
        at = f" at character {loc[0]}" if loc else ""
        return f"the request body is not valid JSON ({error}{at})", None
    if not loc:
        if first["type"] == "missing":
            return "the request body is empty: send a JSON object", None
        return "the request body must be a JSON object, sent with Content-Type: application/json", None
    messages = [_describe(e) for e in errors[:3]]
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return "; ".join(messages) + more, _param(loc)


def _param(loc: list) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")


def _describe(error: dict) -> str:
    param = _param([x for x in error.get("loc", ()) if x != "body"]) or "body"
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return f"{param} is required"
    if kind == "extra_forbidden":
        return f"{param} is not a parameter this server supports; remove it"
    if kind == "value_error":
        return f"{param} {msg.removeprefix('Value error, ')}"
    got = repr(error.get("input"))
    return f"{param}: {msg} (got {got[:60]}{'...' if len(got) > 60 else ''})"


# ---- responses ------------------------------------------------------------------------------------------
def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_logprobs(entries: list[TokenLogprobs], token_text: Callable[[int], str], offset: int) -> dict:
    """The legacy completions shape; `offset` is where these tokens start in the choice's text."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = []
    for e in entries:
        top: dict[str, float] = {}
        for t, lp in e.top_logprobs:  # best first; two tokens with the same text keep the better logprob
            top.setdefault(token_text(t), lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprobs], token_text: Callable[[int], str]) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        # UTF-8 of the token's own text: exact except for a token that is only part of a character
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top_logprobs]}
                        for e in entries]}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, content: str | None, logprobs: dict | None, finish_reason: str | None,
                tool_calls: list[dict] | None = None) -> dict:
    """A whole chat choice; `tool_calls` (OpenAI's shape) only when the model called tools."""
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      first: bool, tool_calls: list[dict] | None = None) -> dict:
    """One streamed chat chunk's choice: the first carries the role; tool-call deltas ride along when a
    tool-call parser turned some of the text into calls."""
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
