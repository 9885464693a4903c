"""llama.cpp as the side-by-side peer for GGUF work: its own tools, run as subprocesses from a build folder.

`../shared/peers/llama-cpp.sh DIR` builds them into DIR/bin; the project never depends on them. Every
failure (missing binary, bad file, timeout) comes back as a result with an error line and the log path,
never as an exception, so tokenforge's own figures are still reported. `--peer-args` adds flags to whichever
tool a bench runs (e.g. `--peer-args="--repack 0"` for llama-bench, `"--no-repack"` for llama-server, where
llama.cpp's AMX path cannot run: on a VM whose kernel does not grant AMX state it dies with SIGSEGV).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlamaBenchResult:
    prefill_tok_s: float | None = None  # pp<prompt_len>
    decode_tok_s: float | None = None  # tg<new_tokens>
    version: str | None = None
    error: str | None = None
    log_path: str | None = None


def _binary(bin_dir: str, name: str) -> Path:
    path = Path(bin_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build llama.cpp's tools with ../shared/peers/llama-cpp.sh DIR "
                                f"and pass --peer-bin DIR/bin")
    return path


def _log_file(tag: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"tokenforge-bench-llamacpp-{tag}-", suffix=".log")
    os.close(fd)
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_llama_bench(bin_dir: str, model: str, threads: int, prompt_len: int = 512, new_tokens: int = 128,
                    repetitions: int = 3, timeout_s: float = 1800.0,
                    extra_args: Sequence[str] = ()) -> LlamaBenchResult:
    """`llama-bench -p prompt_len -n new_tokens -t threads [extra_args]`: prompt processing and decode tok/s
    (its means over `repetitions`), exactly as llama.cpp reports them."""
    log_path = _log_file("bench")
    try:
        exe = _binary(bin_dir, "llama-bench")
        cmd = [str(exe), "-m", model, "-p", str(prompt_len), "-n", str(new_tokens), "-t", str(threads),
               "-r", str(repetitions), "-o", "json", *extra_args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return LlamaBenchResult(error=str(e).splitlines()[0], log_path=log_path)
    Path(log_path).write_text(done.stdout + "\n---- stderr ----\n" + done.stderr)
    if done.returncode != 0:
        return LlamaBenchResult(error=f"llama-bench exited {done.returncode}: {_last_line(done.stderr)}",
                                log_path=log_path)
    try:
        rows = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        return LlamaBenchResult(error=f"cannot read llama-bench's JSON ({e})", log_path=log_path)
    prefill = next((r["avg_ts"] for r in rows if r.get("n_prompt") and not r.get("n_gen")), None)
    decode = next((r["avg_ts"] for r in rows if r.get("n_gen") and not r.get("n_prompt")), None)
    version = rows[0].get("build_commit") if rows else None
    return LlamaBenchResult(prefill, decode, version, log_path=log_path)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float | None = None
    error: str | None = None
    log_path: str | None = None


_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def run_llama_perplexity(bin_dir: str, model: str, text_file: str, ctx: int, threads: int,
                         timeout_s: float = 3600.0, extra_args: Sequence[str] = ()) -> PerplexityResult:
    """`llama-perplexity -f FILE -c ctx`: its final estimate over non-overlapping windows of `ctx` tokens,
    each scored on its second half."""
    log_path = _log_file("perplexity")
    try:
        exe = _binary(bin_dir, "llama-perplexity")
        cmd = [str(exe), "-m", model, "-f", text_file, "-c", str(ctx), "-t", str(threads), *extra_args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return PerplexityResult(error=str(e).splitlines()[0], log_path=log_path)
    Path(log_path).write_text(done.stdout + "\n---- stderr ----\n" + done.stderr)
    match = _FINAL_PPL.search(done.stdout + done.stderr)
    if match is None:
        return PerplexityResult(error=f"no final estimate (exit {done.returncode}): {_last_line(done.stderr)}",
                                log_path=log_path)
    return PerplexityResult(float(match.group(1)), log_path=log_path)


_VERSION = re.compile(r"version: (.+)")


def tool_version(bin_dir: str, name: str) -> str | None:
    """What `NAME --version` says of its build, e.g. "0.5.0-dev (build 1, commit 0c1e570)"; None if it cannot
    tell."""
    try:
        done = subprocess.run([str(_binary(bin_dir, name)), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(done.stdout + done.stderr)
    return match.group(1).strip() if match else None


class LlamaServer:
    """`llama-server` on 127.0.0.1 for the duration of a `with` block: `slots` parallel sequences (continuous
    batching on), `ctx_per_slot` tokens each, then `extra_args`. Waits for /health before returning."""

    def __init__(self, bin_dir: str, model: str, threads: int, port: int, slots: int = 16,
                 ctx_per_slot: int = 2048, ready_timeout_s: float = 300.0, extra_args: Sequence[str] = ()):
        self.cmd = [str(_binary(bin_dir, "llama-server")), "-m", model, "-t", str(threads), "-np", str(slots),
                    "-c", str(slots * ctx_per_slot), "-cb", "--host", "127.0.0.1", "--port", str(port),
                    *extra_args]
        self.base_url = f"http://127.0.0.1:{port}"
        self.ready_timeout_s = ready_timeout_s
        self.log_path = _log_file("server")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode} at start-up; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"llama-server was not ready after {self.ready_timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
