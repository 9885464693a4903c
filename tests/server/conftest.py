"""A real uvicorn server on a free 127.0.0.1 port, in a background thread, around a tiny checkpoint's engine.

The engine is shared by the API and fault tests (one server for the whole package); tests that need other
server settings start their own engine, since an engine's loop belongs to one server's event loop.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from tokenforge.engine.async_engine import AsyncLLMEngine
from tokenforge.server.api import build_app

MODEL = "tiny-llama"
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]


class LiveServer:
    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the test server did not shut down"


def tiny_engine(path) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_args(str(path), kv_cache_memory="16MiB", num_threads=1)


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def engine_idle(engine: AsyncLLMEngine) -> bool:
    stats = engine.stats()
    return stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


@pytest.fixture(scope="package")
def engine(llama_dir) -> AsyncLLMEngine:
    return tiny_engine(llama_dir)


@pytest.fixture(scope="package")
def live(engine):
    with LiveServer(build_app(engine, MODEL, max_queue=256, request_timeout=60)) as server:
        yield server
