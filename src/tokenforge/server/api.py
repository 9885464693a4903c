"""The HTTP front: `build_app` puts the OpenAI-compatible routes on one engine, with server-sent event
streams, a queue limit, per-request deadlines, aborts on client disconnect and OpenAI-shaped errors.

One API request becomes one engine request per choice (n for each prompt), each pumped by a task into one
queue (`_Generation`). A client that goes away or a deadline that passes cancels those tasks at once, which
aborts the engine requests and frees their KV blocks, whether or not a token is being written just then.

An output constraint is compiled before anything is queued (off the event loop; cached), so a bad schema,
regex or grammar is a 400 naming its parameter. With tools, the chat's output text goes through the
tool-call parser (`--tool-call-parser`) into `message.tool_calls` or a stream's tool-call deltas.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenforge.engine.client import EngineClient, EngineDeadError
from tokenforge.engine.messages import RequestOutput
from tokenforge.kv.block_hash import compose_salt
from tokenforge.sample.sampler import TokenLogprobs
from tokenforge.sampling_params import SamplingParams
from tokenforge.server import protocol
from tokenforge.server.auth import APIKeyAuth, APIKeys
from tokenforge.server.metrics import ResponseCounter, ServerMetrics
from tokenforge.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.params import StructuredOutputsParams
from tokenforge.structured.tool_calls import DEFAULT_TOOL_PARSER, ToolCallStreamer, ToolParser, get_tool_parser
from tokenforge.structured.tool_calls import finish_reason as tool_finish_reason
from tokenforge.structured.tool_prompt import render_chat
from tokenforge.tokenizer import check_text

RETRY_AFTER_S = 1  # a full queue sheds finished requests every decode step, so a second is a fair wait
CLIENT_CLOSED = 499  # nginx's "client closed request": counted in the metrics, never seen by anyone
_DISCONNECTED = object()
_TIMED_OUT = object()
_DONE = "data: [DONE]\n\n"

router = APIRouter()


class _ClientGone(Exception):
    """The client disconnected: there is nobody left to answer."""


class _TimedOut(APIError):
    def __init__(self, timeout: float):
        super().__init__(504, f"the request ran longer than the server's request timeout ({timeout:g} s) and was "
                              "aborted; ask for fewer tokens (max_tokens) or start the server with a larger "
                              "--request-timeout", type="timeout_error", code="request_timeout")


@dataclass
class _Server:
    engine: EngineClient
    model_name: str
    max_queue: int
    request_timeout: float
    metrics: ServerMetrics
    created: int
    grammars: GrammarCompiler
    tool_parser: ToolParser
    isolate_users: bool = False  # the OpenAI `user` field salts the KV cache
    num_inflight: int = 0  # engine requests started here and not yet ended

    async def check_constraint(self, param: str, spec: StructuredOutputsParams) -> None:
        """Compile the request's constraint now (a thread, as compiles take milliseconds to seconds), so a bad
        one is a 400 before anything is queued; the engine then finds it in the compiler's cache."""
        try:
            await asyncio.to_thread(self.grammars.compile, spec)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def cache_salt(self, request: Request, body) -> str | None:
        """The tenant's salt (its API key's), then the user's (--kv-isolate-users), then the request's own:
        the tenant part always enters, so no request can reach another tenant's blocks."""
        tenant = getattr(request.state, "tenant", None)
        user = f"user:{body.user}" if self.isolate_users and body.user else None
        return compose_salt(tenant.salt if tenant else None, user, body.cache_salt)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def admit(self, num_jobs: int) -> None:
        problem = self.engine.health()
        if problem is not None:
            raise APIError(503, f"{problem}; restart the server", type="server_error", code="engine_dead")
        if num_jobs > self.max_queue:
            raise APIError(400, f"this request needs {num_jobs} generations (n x prompts) but the server queues "
                                f"at most {self.max_queue}; lower n or send fewer prompts", param="n")
        if self.num_inflight + num_jobs > self.max_queue:
            raise APIError(503, f"the server is busy: {self.num_inflight} generations are waiting or running and "
                                f"the limit is {self.max_queue}; retry in a moment", type="server_overloaded",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class _Job:
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None


class _Generation:
    """The engine requests behind one API request. `next()` reads their outputs as (choice index, output) in
    arrival order, or raises: `_ClientGone`, `_TimedOut`, or an `APIError` for a rejected request."""

    def __init__(self, server: _Server, request: Request, req_id: str, jobs: list[_Job], prompt_param: str):
        self.server = server
        self.prompt_param = prompt_param
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_unfinished = len(jobs)
        server.num_inflight += len(jobs)
        self.tasks = [asyncio.create_task(self._pump(f"{req_id}-{i}", i, job)) for i, job in enumerate(jobs)]
        for task in self.tasks:  # a done callback runs even for a task cancelled before it started
            task.add_done_callback(self._release)
        self.watcher = asyncio.create_task(self._watch(request))
        self.deadline = asyncio.get_running_loop().call_later(server.request_timeout, self._stop, _TIMED_OUT)

    def _release(self, _task: asyncio.Task) -> None:
        self.server.num_inflight -= 1

    async def _pump(self, req_id: str, index: int, job: _Job) -> None:
        timer = self.server.metrics.timer()
        try:
            async for out in self.server.engine.generate(params=job.params, req_id=req_id,
                                                         prompt_token_ids=job.prompt_token_ids,
                                                         cache_salt=job.cache_salt):
                timer.on_output(out)
                self.queue.put_nowait((index, out))
        except Exception as e:  # handed to the reader, who answers with it: a pump must never fail unseen
            self.queue.put_nowait((index, e))

    async def _watch(self, request: Request) -> None:
        # The body has been read, so receive() now returns only when the client disconnects.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._stop(_DISCONNECTED)

    def _stop(self, why: object) -> None:
        for task in self.tasks:  # cancelling generate() aborts the engine request
            task.cancel()
        self.queue.put_nowait((-1, why))

    async def next(self) -> tuple[int, RequestOutput]:
        index, item = await self.queue.get()
        if item is _DISCONNECTED:
            raise _ClientGone
        if item is _TIMED_OUT:
            raise _TimedOut(self.server.request_timeout)
        if isinstance(item, EngineDeadError):
            raise APIError(503, f"{item}; restart the server", type="server_error", code="engine_dead")
        if isinstance(item, ValueError):
            raise self._rejected(item)
        if isinstance(item, Exception):
            raise item
        if item.finished:
            self.num_unfinished -= 1
        return index, item

    def _rejected(self, e: ValueError) -> APIError:
        """The engine's own check (prompt length, max_tokens, token ids) with the parameter it is about."""
        message = str(e)
        if "max_tokens" in message:
            return APIError(400, message, param="max_tokens")
        code = "context_length_exceeded" if "context length" in message else None
        return APIError(400, message, param=self.prompt_param, code=code)

    async def first_outputs(self) -> list[tuple[int, RequestOutput]]:
        """Wait until every choice has its first output. The engine rejects a request before its first output,
        so a stream still gets a proper 4xx instead of headers followed by an error."""
        seen, outputs = set(), []
        while len(seen) < len(self.tasks):
            index, out = await self.next()
            seen.add(index)
            outputs.append((index, out))
        return outputs

    def close(self) -> None:
        """Stop everything still running (a no-op for finished tasks); safe to call more than once."""
        self.deadline.cancel()
        self.watcher.cancel()
        for task in self.tasks:
            task.cancel()


class _Choice:
    """What one choice has produced so far; `streamer` parses tool calls out of a streamed chat choice."""

    def __init__(self, prompt_token_ids: list[int], streamer: ToolCallStreamer | None = None):
        self.prompt_token_ids = prompt_token_ids
        self.streamer = streamer
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, out: RequestOutput) -> tuple[str, list[TokenLogprobs]]:
        """Take one output; returns its new text and logprobs."""
        completion = out.outputs[0]
        start = self.num_tokens
        self.token_ids += completion.new_token_ids
        # Each output carries the logprobs of all tokens so far; this output's are those past our count.
        new_logprobs = completion.logprobs[start:self.num_tokens] if completion.logprobs is not None else []
        self.logprobs += new_logprobs
        self.text += completion.new_text
        self.finish_reason = completion.finish_reason
        return completion.new_text, new_logprobs


class _Reply:
    """One API request's answer in the OpenAI shapes: the full body, or the stream's SSE events."""

    def __init__(self, server: _Server, chat: bool, choice_prompts: list[list[int]], num_prompt_tokens: int,
                 include_usage: bool, want_logprobs: bool, want_token_ids: bool,
                 tool_parser: ToolParser | None = None):
        self.chat = chat
        self.tool_parser = tool_parser  # None: the text is the message, as generated
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = server.model_name
        self.tokenizer = server.engine.tokenizer
        self.choices = [_Choice(ids, tool_parser.streamer() if tool_parser else None) for ids in choice_prompts]
        self.num_prompt_tokens = num_prompt_tokens
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs
        self.want_token_ids = want_token_ids

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, entries: list[TokenLogprobs], offset: int) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return protocol.chat_logprobs(entries, self._token_text)
        return protocol.completion_logprobs(entries, self._token_text, offset)

    def _envelope(self, stream: bool, choices: list[dict]) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        envelope = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if stream and self.include_usage:
            envelope["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return envelope

    def _with_ids(self, choice: dict, index: int, new_ids: list[int], first: bool) -> dict:
        """vLLM's `return_token_ids`: the output's ids (a stream's chunk: its new ones) and, in a body or a
        choice's first chunk, the prompt's."""
        if self.want_token_ids:
            if first:
                choice["prompt_token_ids"] = self.choices[index].prompt_token_ids
            choice["token_ids"] = new_ids
        return choice

    def _event(self, index: int, text: str, entries: list[TokenLogprobs], offset: int, first: bool,
               new_ids: list[int]) -> str:
        finish_reason = self.choices[index].finish_reason
        logprobs = self._logprobs(entries, offset)
        if not self.chat:
            choice = protocol.completion_choice(index, text, logprobs, finish_reason)
            return _sse(self._envelope(True, [self._with_ids(choice, index, new_ids, first)]))
        tool_calls = None
        streamer = self.choices[index].streamer
        if streamer is not None:
            delta = streamer.feed(text)
            if finish_reason is not None:
                delta.extend(streamer.finish())
                finish_reason = tool_finish_reason(finish_reason, streamer.tool_calls)
            text, tool_calls = delta.content, delta.tool_calls
        choice = protocol.chat_chunk_choice(index, text, logprobs, finish_reason, first, tool_calls)
        return _sse(self._envelope(True, [self._with_ids(choice, index, new_ids, first)]))

    def event(self, index: int, out: RequestOutput) -> str:
        choice = self.choices[index]
        offset, first, num_ids = len(choice.text), choice.num_tokens == 0, len(choice.token_ids)
        text, entries = choice.add(out)
        return self._event(index, text, entries, offset, first, choice.token_ids[num_ids:])

    def abort_events(self) -> list[str]:
        """End every unfinished choice with finish_reason "abort"."""
        events = []
        for index, choice in enumerate(self.choices):
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                events.append(self._event(index, "", [], len(choice.text), choice.num_tokens == 0, []))
        return events

    def usage(self) -> dict:
        return protocol.usage(self.num_prompt_tokens, sum(c.num_tokens for c in self.choices))

    def usage_event(self) -> str:
        return _sse({**self._envelope(True, []), "usage": self.usage()})

    def body(self) -> dict:
        choices = [self._choice(i, c) for i, c in enumerate(self.choices)]
        return {**self._envelope(False, choices), "usage": self.usage()}

    def _choice(self, index: int, choice: _Choice) -> dict:
        logprobs = self._logprobs(choice.logprobs, 0)
        if not self.chat:
            body = protocol.completion_choice(index, choice.text, logprobs, choice.finish_reason)
        elif self.tool_parser is None:
            body = protocol.chat_choice(index, choice.text, logprobs, choice.finish_reason)
        else:
            parsed = self.tool_parser.parse(choice.text)
            body = protocol.chat_choice(index, parsed.content, logprobs,
                                        tool_finish_reason(choice.finish_reason, parsed.tool_calls),
                                        [call.to_openai() for call in parsed.tool_calls])
        return self._with_ids(body, index, choice.token_ids, True)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(gen: _Generation, reply: _Reply, first: list[tuple[int, RequestOutput]]):
    try:
        for index, out in first:
            yield reply.event(index, out)
        while gen.num_unfinished:
            try:
                index, out = await gen.next()
            except _TimedOut:
                for event in reply.abort_events():
                    yield event
                break
            yield reply.event(index, out)
        if reply.include_usage:
            yield reply.usage_event()
        yield _DONE
    except _ClientGone:
        return
    except APIError as e:  # the engine failed after the headers went out: say so inside the stream
        yield _sse(e.body())
        yield _DONE
    finally:
        gen.close()


async def _answer(request: Request, body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                  chat: bool, constraint: tuple[str, StructuredOutputsParams] | None = None,
                  tool_parser: ToolParser | None = None) -> Response:
    """Serve the request; `constraint` is (the parameter it came from, the spec), `tool_parser` parses a
    chat's output into tool calls."""
    server: _Server = request.app.state.server
    spec = constraint[1] if constraint else None
    salt = server.cache_salt(request, body)
    jobs = [_Job(ids, body.sampling_params(i, spec), salt) for ids in prompts for i in range(body.n)]
    body.check_token_ids(server.engine.model_config.vocab_size)
    if constraint is not None:
        await server.check_constraint(*constraint)
    reply = _Reply(server, chat, [job.prompt_token_ids for job in jobs], sum(len(ids) for ids in prompts),
                   body.include_usage(), jobs[0].params.logprobs is not None, body.return_token_ids, tool_parser)
    server.admit(len(jobs))
    gen = _Generation(server, request, reply.id, jobs, "messages" if chat else "prompt")
    if body.stream:
        try:
            first = await gen.first_outputs()
        except BaseException:
            gen.close()
            raise
        return StreamingResponse(_events(gen, reply, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while gen.num_unfinished:
            index, out = await gen.next()
            reply.choices[index].add(out)
    finally:
        gen.close()
    return JSONResponse(reply.body())


def _valid_text(text: str, param: str) -> str:
    """Text the tokenizer can take, or a 400 naming the field (a lone surrogate is the client's error)."""
    try:
        check_text(text)
    except ValueError as e:
        raise APIError(400, f"{param} {e}", param=param) from None
    return text


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    server: _Server = request.app.state.server
    server.check_model(body.model)
    tokenizer = server.engine.tokenizer
    batch = body.prompt_list()
    prompts = [p if isinstance(p, list) else tokenizer.encode(_valid_text(p, "prompt" if len(batch) == 1 else
                                                                          f"prompt[{i}]"))
               for i, p in enumerate(batch)]
    return await _answer(request, body, prompts, chat=False, constraint=body.constraint())


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    server: _Server = request.app.state.server
    server.check_model(body.model)
    tokenizer = server.engine.tokenizer
    for i, message in enumerate(body.messages):
        if message.content is not None:
            _valid_text(message.content, f"messages[{i}].content")
    mode, named = body.tool_mode()
    tools = body.tool_dicts() if mode != "none" else None  # tool_choice "none": tools stay out of the prompt
    try:
        text = render_chat(tokenizer, [m.template_dict() for m in body.messages], tools)
    except ValueError as e:  # the template refused the messages, or the model has no template (ConfigError)
        raise APIError(400, str(e), param="messages") from None
    constraint = body.constraint()
    if mode in ("required", "named"):  # a grammar admitting only calls, each following its tool's schema
        if constraint is not None:
            raise APIError(400, f"tool_choice {body.tool_choice if mode == 'required' else 'naming a function'} "
                                f"cannot be combined with {constraint[0]}", param="tool_choice")
        try:
            constraint = "tools", server.tool_parser.forcing_spec(tools, named, body.parallel())
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
    # The template writes the special tokens it wants (BOS included), as transformers assumes.
    return await _answer(request, body, [tokenizer.encode(text, add_special_tokens=False)], chat=True,
                         constraint=constraint, tool_parser=server.tool_parser if tools else None)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    server: _Server = request.app.state.server
    return {"object": "list", "data": [{
        "id": server.model_name, "object": "model", "created": server.created, "owned_by": "tokenforge",
        "max_model_len": server.engine.model_config.max_model_len}]}


@router.get("/health")
async def health(request: Request) -> Response:
    server: _Server = request.app.state.server
    problem = server.engine.health()
    if problem is not None:
        return JSONResponse(protocol.error_body(problem, "server_error", code="engine_dead"), status_code=503)
    return JSONResponse(server.engine.health_report())  # "ok", or "degraded" with details (replicas)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    content, content_type = request.app.state.server.metrics.render()
    return Response(content, media_type=content_type)


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    message, param = protocol.describe_validation_errors(list(exc.errors()))
    return JSONResponse(protocol.error_body(message, "invalid_request_error", param), status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = f"{exc.detail}: {request.method} {request.url.path} (the API is under /v1; see /docs)"
    return JSONResponse(protocol.error_body(message, "invalid_request_error"), status_code=exc.status_code,
                        headers=exc.headers)


async def _client_gone(request: Request, exc: _ClientGone) -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Runs outside the middleware stack, so the response counter would not see this 500.
    request.app.state.server.metrics.count(request.url.path, 500)
    return JSONResponse(protocol.error_body(f"internal error ({exc!r}); this is a bug in tokenforge, please "
                                            "report it with the request that caused it", "server_error"),
                        status_code=500)


def build_app(engine: EngineClient, served_model_name: str, max_queue: int = 256,
              request_timeout: float = 600.0, tool_call_parser: str = DEFAULT_TOOL_PARSER,
              grammar_compiler: GrammarCompiler | None = None, api_keys: APIKeys | None = None,
              isolate_users: bool = False) -> FastAPI:
    """The server for one engine client: at most `max_queue` generations waiting or running (more get 503),
    and none longer than `request_timeout` seconds; tool calls parsed by `tool_call_parser`. Constraints are
    compiled by `grammar_compiler` (give the engine's, to share its cache; one is made otherwise). With
    `api_keys`, every route but /health needs a key, and a key's tenant salts its requests' KV blocks (see
    `server/auth.py`); `isolate_users` salts them by the OpenAI `user` field too. The app's lifespan shuts
    the engine loop down."""
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")

    tool_parser = get_tool_parser(tool_call_parser)
    grammars = grammar_compiler or _grammar_compiler(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()  # uvicorn has drained the in-flight requests by now
        grammars.close()

    # strict_content_type=False: a body without a Content-Type header is still read as JSON (curl -d ...).
    app = FastAPI(title="tokenforge", lifespan=lifespan, strict_content_type=False)
    server_metrics = ServerMetrics(engine, frozenset(route.path for route in router.routes))
    app.state.server = _Server(engine, served_model_name, max_queue, request_timeout, server_metrics,
                               created=int(time.time()), grammars=grammars, tool_parser=tool_parser,
                               isolate_users=isolate_users)
    app.include_router(router)
    if api_keys is not None:  # inside the counter, so 401s are counted too
        app.add_middleware(APIKeyAuth, keys=api_keys)
    app.add_middleware(ResponseCounter, metrics=server_metrics)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(_ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    return app


def _grammar_compiler(engine: EngineClient) -> GrammarCompiler:
    """A compiler for the engine's model: its tokenizer, logits width and EOS ids (as the engine counts them)."""
    config, tokenizer = engine.model_config, engine.tokenizer
    return GrammarCompiler(tokenizer.tokenizer, config.vocab_size,
                           frozenset(config.eos_token_ids) | tokenizer.eos_token_ids)
