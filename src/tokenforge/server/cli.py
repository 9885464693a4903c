"""`tokenforge serve`: build the engine, bind the socket, say where the server listens and how long it took to
get ready, then run uvicorn until Ctrl-C or SIGTERM, which drain the in-flight requests before the app's
lifespan stops the engine loop.

Heavy imports (torch, FastAPI, uvicorn) happen inside `serve`, so registering the command costs nothing.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from collections.abc import Callable

from tokenforge.cluster.options import add_cluster_args, wants_cluster
from tokenforge.config import ConfigError
from tokenforge.models.catalog import resolve_model, served_name
from tokenforge.structured.tool_calls import DEFAULT_TOOL_PARSER, TOOL_PARSERS

SWITCH_INTERVAL_S = 0.0005


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def add_serve_parser(sub, engine_args: Callable[..., None]) -> None:
    """Register `serve`; `engine_args(parser)` adds the shared engine options (--model optional)."""
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model folder's name, or the "
                   "GGUF file's without .gguf)")
    p.add_argument("--max-queue", type=_positive_int, default=256,
                   help="generations waiting or running beyond which requests get 503 (default 256)")
    p.add_argument("--request-timeout", type=_positive_float, default=600.0,
                   help="seconds after which a request is aborted (default 600)")
    p.add_argument("--tool-call-parser", default=DEFAULT_TOOL_PARSER, choices=sorted(TOOL_PARSERS),
                   help="how the model writes tool calls, to turn them into message.tool_calls "
                   f"(default {DEFAULT_TOOL_PARSER}: <tool_call>{{...}}</tool_call>)")
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on every route but /health")
    p.add_argument("--api-keys", metavar="FILE", help="one tenant per line: KEY [NAME [QUOTA]]; each tenant's "
                   "requests get their own KV cache salt (and KV quota); see server/auth.py")
    p.add_argument("--kv-isolate-users", action="store_true",
                   help="salt the KV cache by the OpenAI 'user' field too: users share no cached block")
    p.add_argument("--ssl-keyfile", help="serve HTTPS with this private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (with --ssl-keyfile)")
    add_cluster_args(p)
    p.set_defaults(func=serve)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        model = resolve_model(args.model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # uvicorn re-raises the stop signal once it has drained; SIGTERM then takes Ctrl-C's path and exits 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args, model, started)
    except KeyboardInterrupt:
        print("tokenforge: stopped", file=sys.stderr)
        return 0


def _run(args: argparse.Namespace, model: str, started: float) -> int:
    import asyncio

    import uvicorn

    from tokenforge.cli import engine_kwargs
    from tokenforge.server.api import build_app
    from tokenforge.server.auth import APIKeys

    name = args.served_model_name or served_name(model)
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        print("error: HTTPS needs both --ssl-keyfile and --ssl-certfile", file=sys.stderr)
        return 2
    try:
        api_keys = APIKeys.from_args(args.api_key, args.api_keys)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.kv_tenant_quotas = api_keys.quotas() if api_keys else None
    if not _loopback(args.host) and args.ssl_certfile is None:
        print(f"tokenforge: warning: listening on {args.host} without HTTPS"
              f"{'; API keys travel in clear text' if api_keys else ''} (see --ssl-keyfile/--ssl-certfile)",
              file=sys.stderr)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port or --host",
              file=sys.stderr)
        return 2
    try:
        engine, grammar_compiler = _engine_client(args, model, engine_kwargs(args, model))
    except (ConfigError, ValueError, ConnectionError) as e:  # ConnectionError: no Ray at --ray-address
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the server checks constraints with the engine's own compiler, so each compiles once in one cache
    app = build_app(engine, name, max_queue=args.max_queue, request_timeout=args.request_timeout,
                    tool_call_parser=args.tool_call_parser, grammar_compiler=grammar_compiler,
                    api_keys=api_keys, isolate_users=args.kv_isolate_users)
    # The engine thread takes the GIL back after every kernel; with Python's default 5 ms switch interval a
    # busy event loop can hold it that long each time while the cores idle. 0.5 ms keeps the engine fed.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Requests end by --request-timeout anyway; the cap only matters if a client stops reading its stream.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=int(args.request_timeout) + 1,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    host, port = sock.getsockname()[:2]
    scheme = "https" if args.ssl_certfile else "http"
    url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    asyncio.run(_serve(uvicorn.Server(config), sock, f"serving {name!r} at {url}/v1", started))
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _engine_client(args: argparse.Namespace, model: str, kwargs: dict):
    """One engine in this process with its grammar compiler, or replicas on Ray behind a `ClusterClient` (any
    cluster option given; they compile grammars in their own processes, so the app makes its own compiler)."""
    if not wants_cluster(args):
        from tokenforge.engine.async_engine import AsyncLLMEngine

        engine = AsyncLLMEngine.from_args(model, **kwargs)
        return engine, engine.engine.grammar
    from tokenforge.cluster.client import ClusterClient
    from tokenforge.cluster.options import cluster_config

    return ClusterClient.start(model, kwargs, cluster_config(args)), None


async def _serve(server, sock: socket.socket, banner: str, started: float) -> None:
    import asyncio

    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # uvicorn has no "listening" hook; poll its flag
        await asyncio.sleep(0.02)
    if server.started:
        print(f"tokenforge: {banner} (ready in {time.perf_counter() - started:.1f} s)", flush=True)
        from tokenforge.attention.torch_ref import preload

        preload()
    await task
